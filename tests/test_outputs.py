"""Outputs under faults (issue 15, class 4): a disk that really fills, a run killed mid-save, something
created at the output path while a save runs, and the --no-verify escape hatch saying what it skips."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spinquant.cli import main

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def quantize_args(tiny: Path, data: Path, output: Path, *extra) -> list[str]:
    return ["quantize", "--model", str(tiny), "--eval-data", str(data / "eval.txt"), "--calib-data",
            str(data / "calib.txt"), "--seq-len", "64", "--no-eval", "--output", str(output), *extra]


@pytest.fixture
def data(tmp_path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    (d / "eval.txt").write_text(TEXT)
    (d / "calib.txt").write_text(TEXT[::-1])
    return d


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=16k tmpfs /mnt"],
                           capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unprivileged user + mount namespaces (unshare -rm)")
def test_a_really_full_disk_gives_one_line_and_leaves_nothing(tiny_dir, data, tmp_path):
    # A 32 KiB tmpfs mounted over the output folder in a private namespace: the kernel itself returns ENOSPC.
    out = tmp_path / "small_disk"
    out.mkdir()
    argv = " ".join(quantize_args(tiny_dir, data, out / "model"))
    script = (f"mount -t tmpfs -o size=32k tmpfs {out} && {sys.executable} -m spinquant.cli {argv}; "
              f"echo rc=$?; ls -A {out}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env,
                          check=False, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "rc=2" in proc.stdout, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and "No space left on device" in lines[0], proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "rc=2", "the failed save left files on the full disk"


def test_temporaries_of_a_killed_run_are_removed_by_the_next_save(tiny_dir, data, tmp_path):
    # What SIGKILL during a save leaves: a hidden temporary folder named after a process that is gone.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".model.{dead.pid}.x1y2.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)
    live = tmp_path / f".model.{os.getpid()}.keep.tmp"  # a live writer's temporary is left alone
    live.mkdir()
    assert main(quantize_args(tiny_dir, data, tmp_path / "model")) == 0
    assert not stale.exists()
    assert live.exists()
    assert (tmp_path / "model" / "config.json").is_file()


def test_an_output_created_during_the_save_is_never_replaced(tiny_dir, data, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    target = tmp_path / "model"
    real = safetensors.torch.save_file

    def save_then_race(*args, **kwargs):
        real(*args, **kwargs)
        target.mkdir()  # another process claims the path after our check, before our rename
        (target / "theirs.txt").write_text("not ours to replace")

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_race)
    assert main(quantize_args(tiny_dir, data, target)) == 2
    err = capsys.readouterr().err
    assert "appeared while this run was writing it" in err and "Traceback" not in err
    assert sorted(p.name for p in target.iterdir()) == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # our temporary is gone


def test_no_verify_loads_a_folder_without_manifest_and_says_so(tiny_dir, data, tmp_path, capsys):
    saved = tmp_path / "saved"
    assert main(quantize_args(tiny_dir, data, saved)) == 0
    config = json.loads((saved / "config.json").read_text())
    del config["spinquant"]["files"], config["spinquant"]["config_sha256"]
    (saved / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    eval_args = ["eval", str(saved), "--eval-data", str(data / "eval.txt"), "--seq-len", "64", "--max-windows", "1"]
    assert main(eval_args) == 2
    assert "no integrity manifest" in capsys.readouterr().err
    assert main([*eval_args, "--no-verify"]) == 0
    err = capsys.readouterr().err
    assert "--no-verify" in err and "without checking its sha256 manifest" in err
