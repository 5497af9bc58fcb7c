"""`spinquant` CLI with every rotation-training step slowed by $SPINQUANT_TEST_STEP_SLEEP seconds (default 0).

Used by test_interrupt.py to kill or interrupt training in a known stretch of the run. The sleep sits at the
start of the optimizer step, before anything is updated, so it changes the timing only, never the numbers,
and a signal arriving during it finds the training state consistent.
"""

import os
import sys
import time

from spinquant.cli import main
from spinquant.training import loop as train

_sleep = float(os.environ.get("SPINQUANT_TEST_STEP_SLEEP", "0"))


class SlowCayleySGD(train.CayleySGD):
    def step(self, *args, **kwargs):
        time.sleep(_sleep)
        return super().step(*args, **kwargs)


train.CayleySGD = SlowCayleySGD

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
