"""README's Python examples run as written, on a tiny model standing in for the built-in default."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tiny

from spinquant.evaluation.data import shared_data_dir

README = Path(__file__).resolve().parents[1] / "README.md"
DEFAULT = '"smollm2-135m"'


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_the_python_examples():
    blocks = python_blocks()
    assert len(blocks) >= 2 and all(DEFAULT in b for b in blocks)
    assert any("spinquant.save(" in b and "spinquant.load(" in b and "spinquant.evaluate(" in b for b in blocks)


@pytest.mark.skipif(shared_data_dir() is None, reason="needs ../shared/data (WikiText-2)")
@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_example_runs(tmp_path, index):
    """Only the model name changes: a tiny random Llama with a 2048-token context (the examples evaluate
    2 × 2048 tokens); the rest runs as users copy it, in a fresh interpreter in an empty folder."""
    tiny = save_tiny(tmp_path / "tiny", max_position_embeddings=2048)
    code = python_blocks()[index].replace(DEFAULT, repr(str(tiny)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny tensors: a second thread only adds stalls
    run = subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    printed = run.stdout.strip().splitlines()
    ppl = [float(line) for line in printed if re.fullmatch(r"[0-9.]+", line)]
    assert ppl and all(p > 1 for p in ppl), printed
    written = {p.name for p in tmp_path.iterdir()} - {"tiny"}
    assert written, "each example writes what it says (a model folder or a rotation file)"
