"""`python -m spinquant ...` (and `torchrun --nproc-per-node N -m spinquant quantize ...`)."""

import sys

from .cli import main

sys.exit(main())
