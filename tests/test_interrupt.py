"""Interrupted rotation training (issue 8 item 2), in real processes through the CLI: SIGKILL mid-run, then
Ctrl-C (SIGINT) mid-resume, then a resume to the end gives the rotations of one uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from spinquant.rotation.sets import load_rotations, make_rotations

STEPS = 12
HERE = Path(__file__).parent
TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def start(args: list[str], sleep: float) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "SPINQUANT_TEST_STEP_SLEEP": str(sleep)}
    return subprocess.Popen([sys.executable, str(HERE / "slow_cli.py"), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def checkpoint_step(path: Path) -> int | None:
    if not path.is_file():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])  # written atomically


def wait_for_step(proc: subprocess.Popen, ckpt: Path, step: int, timeout: float = 240) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        at = checkpoint_step(ckpt)
        if at is not None and at >= step:
            return at
        assert proc.poll() is None, f"training ended before step {step}: {proc.communicate()[1][-2000:]}"
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no checkpoint at step {step} within {timeout} s")


def test_sigkill_and_ctrl_c_then_resume_equal_an_uninterrupted_run(tiny_dir, tmp_path):
    (tmp_path / "eval.txt").write_text(TEXT)
    (tmp_path / "calib.txt").write_text(TEXT[::-1])
    ckpt = tmp_path / "train.ckpt"

    def args(rotation_file: str, *extra: str) -> list[str]:
        return ["quantize", "--model", str(tiny_dir), "--eval-data", str(tmp_path / "eval.txt"),
                "--calib-data", str(tmp_path / "calib.txt"), "--no-eval", "--seed", "3", "--rotation", "learned",
                "--train-steps", str(STEPS), "--train-seq-len", "32", "--train-batch", "2",
                "--save-rotation", str(tmp_path / rotation_file), *extra]

    full = start(args("full.safetensors"), sleep=0)
    _, err = full.communicate(timeout=300)
    assert full.returncode == 0, err[-2000:]

    # 1. SIGKILL once a few steps are checkpointed: nothing gets a chance to clean up or save.
    killed = start(args("killed.safetensors", "--train-checkpoint", str(ckpt), "--train-checkpoint-every", "1"),
                   sleep=0.25)
    wait_for_step(killed, ckpt, 4)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    at_kill = checkpoint_step(ckpt)
    assert 4 <= at_kill < STEPS, at_kill
    assert not (tmp_path / "killed.safetensors").exists()

    # 2. Resume, then Ctrl-C a few steps later: the CLI saves the checkpoint, says how to resume, exits 130.
    interrupted = start(args("interrupted.safetensors", "--resume", str(ckpt), "--train-checkpoint-every", "1"),
                        sleep=0.25)
    wait_for_step(interrupted, ckpt, at_kill + 3)
    interrupted.send_signal(signal.SIGINT)
    _, err = interrupted.communicate(timeout=60)
    assert interrupted.returncode == 130, err[-2000:]
    assert "Traceback" not in err and f"--resume {ckpt}" in err
    at_interrupt = checkpoint_step(ckpt)
    assert at_kill + 3 <= at_interrupt < STEPS, at_interrupt
    assert not (tmp_path / "interrupted.safetensors").exists()

    # 3. Resume to the end.
    resumed = start(args("resumed.safetensors", "--resume", str(ckpt), "--train-checkpoint-every", "1"), sleep=0)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert checkpoint_step(ckpt) == STEPS

    a, b = load_rotations(tmp_path / "full.safetensors"), load_rotations(tmp_path / "resumed.safetensors")
    assert (a.r1 - b.r1).abs().max() <= 1e-6
    assert len(a.r2) == len(b.r2) and all((x - y).abs().max() <= 1e-6 for x, y in zip(a.r2, b.r2))
    init = make_rotations("learned", 64, 16, 2, seed=3)  # what training started from
    assert (a.r1 - init.r1.float()).abs().max() > 1e-4, "training did not move R1: the comparison proves nothing"
