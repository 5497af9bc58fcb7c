"""Untrusted files (issue 8 item 5): a pickle that runs code when unpickled is refused everywhere the CLI
reads a file, with a one-line error and exit code 2, and its code never runs."""

from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil

import pytest
import torch

from spinquant.cli import main
from spinquant.runtime.manifest import config_digest, sha256_file

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


class Payload:
    """Unpickling this runs a shell command that creates `sentinel` (what an attacker's file would do)."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.sentinel)}",)


def hostile(sentinel) -> dict:
    """Looks like a rotation file / training checkpoint / state dict, with the payload inside."""
    return {"R1": Payload(sentinel), "format": "spinquant-train-checkpoint-1", "step": 1,
            "model.embed_tokens.weight": Payload(sentinel)}


def write_zip(path, sentinel):  # torch.save's zip archive (what R.bin / .pt files are today)
    torch.save(hostile(sentinel), path)
    return path


def write_pickle(path, sentinel):  # a bare pickle stream (the legacy torch format starts the same way)
    path.write_bytes(pickle.dumps(hostile(sentinel), protocol=2))
    return path


def test_the_payload_really_runs_when_unpickled(tmp_path):
    """Control: without the safeguards these files do execute code, so the refusals below mean something."""
    for write, load in ((write_zip, lambda p: torch.load(p, weights_only=False)),
                        (write_pickle, lambda p: pickle.loads(p.read_bytes()))):
        sentinel = tmp_path / f"ran-{write.__name__}"
        load(write(tmp_path / f"{write.__name__}.bin", sentinel))
        assert sentinel.exists()


def _saved_model_with_pickle(ctx, sentinel):
    """A spinquant checkpoint folder whose weights are a pickle, checksums updated to match (the attacker
    controls the whole folder)."""
    folder = ctx["tmp"] / "saved"
    shutil.copytree(ctx["saved"], folder)
    write_zip(folder / "model.safetensors", sentinel)
    config = json.loads((folder / "config.json").read_text())
    config["spinquant"]["files"]["model.safetensors"] = sha256_file(folder / "model.safetensors")
    config["spinquant"]["config_sha256"] = config_digest(config)
    (folder / "config.json").write_text(json.dumps(config))
    return ["eval", str(folder), "--eval-data", str(ctx["inp"] / "eval.txt"), "--seq-len", "64"]


def _hf_folder_with_pickle(ctx, sentinel):
    """A Hugging Face folder (as downloaded from the hub) with pytorch_model.bin instead of safetensors."""
    folder = ctx["tmp"] / "hf"
    shutil.copytree(ctx["tiny"], folder)
    (folder / "model.safetensors").unlink()
    write_zip(folder / "pytorch_model.bin", sentinel)
    return _quantize(ctx, "--model", str(folder))


def _quantize(ctx, *extra):
    args = ["quantize", "--model", str(ctx["tiny"]), "--eval-data", str(ctx["inp"] / "eval.txt"),
            "--calib-data", str(ctx["inp"] / "calib.txt"), "--seq-len", "64", "--max-windows", "1"]
    return args + list(extra)


def _learned(ctx, *extra):
    return _quantize(ctx, "--rotation", "learned", "--train-steps", "2", "--train-seq-len", "32",
                     "--train-batch", "2", *extra)


CARRIERS = {
    "rotation file (torch zip)": (
        lambda c, s: _quantize(c, "--rotation", "learned", "--rotation-file", str(write_zip(c["tmp"] / "R.bin", s))),
        "holds more than tensors"),
    "rotation file (bare pickle)": (
        lambda c, s: _quantize(c, "--rotation", "learned", "--rotation-file",
                               str(write_pickle(c["tmp"] / "R.pt", s))),
        "holds more than tensors"),
    "training checkpoint (torch zip)": (
        lambda c, s: _learned(c, "--resume", str(write_zip(c["tmp"] / "train.ckpt", s))), "cannot resume"),
    "training checkpoint (bare pickle)": (
        lambda c, s: _learned(c, "--resume", str(write_pickle(c["tmp"] / "train.ckpt", s))), "cannot resume"),
    "saved quantized model": (_saved_model_with_pickle, "model.safetensors"),
    "hub-style model folder": (_hf_folder_with_pickle, "cannot load model"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_dir):
    d = tmp_path_factory.mktemp("untrusted")
    (d / "eval.txt").write_text(TEXT)
    (d / "calib.txt").write_text(TEXT[::-1])
    assert main(["quantize", "--model", str(tiny_dir), "--eval-data", str(d / "eval.txt"), "--calib-data",
                 str(d / "calib.txt"), "--seq-len", "64", "--no-eval", "--output", str(d / "saved")]) == 0
    return d


@pytest.mark.parametrize("name", list(CARRIERS))
def test_malicious_pickle_is_refused_and_never_runs(name, saved, tiny_dir, tmp_path, capsys, one_thread):
    build, expect = CARRIERS[name]
    sentinel = tmp_path / "PWNED"
    ctx = {"tmp": tmp_path, "tiny": tiny_dir, "inp": saved, "saved": saved / "saved"}
    argv = build(ctx, sentinel)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert not sentinel.exists(), "the pickled code ran"
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("spinquant: error: ") and expect in lines[0], lines[0]
