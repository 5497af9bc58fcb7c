"""Bad input, one table: every case runs the real CLI on a tiny saved model and must end with one line on
stderr naming the problem, exit code 2, no traceback, and nothing new in the output location.

Most cases run in-process (`spinquant.cli.main`); the ones marked `sub` run `python -m spinquant.cli` in a
subprocess, which proves the user really sees a single line and no traceback.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from conftest import byte_tokenizer
from safetensors.torch import load_file, save_file

from spinquant.cli import main
from spinquant.rotation.sets import Rotations, make_rotations, save_rotations
from spinquant.runtime.manifest import FORMAT, config_digest, sha256_file

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_dir):
    """Every bad (and good) input file the table refers to, built once."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "eval.txt").write_text(TEXT)
    (d / "calib.txt").write_text(TEXT[::-1])
    (d / "eval_copy.txt").write_text(TEXT)  # same text under another name
    (d / "empty.txt").write_text("  \n")
    (d / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (d / "latin1.txt").write_bytes("café crème brûlée ".encode("latin-1") * 20)
    (d / "notext.jsonl").write_text('{"body": "no text field"}\n')
    (d / "short.txt").write_text("too short")
    (d / "a_dir").mkdir()
    (d / "a_dir" / "x.txt").write_text(TEXT)
    (d / "not_a_model").mkdir()
    (d / "not_a_model" / "README").write_text("no config.json here")

    # Rotation files: right ones for the tiny model are 64x64 R1 and two 16x16 R2.
    good = make_rotations("random", 64, 16, 2, seed=1).to(torch.float32)
    save_rotations(Rotations(make_rotations("random", 32, 16, 2).r1, good.r2), d / "rot_shape.safetensors")
    save_rotations(Rotations(good.r1, good.r2 + good.r2[:1]), d / "rot_layers.safetensors")
    save_rotations(Rotations(good.r1 * 1.1, good.r2), d / "rot_nonorth.safetensors")
    nan = good.r1.clone()
    nan[3, 5] = float("nan")
    save_rotations(Rotations(nan, good.r2), d / "rot_nan.bin", layout="reference")
    (d / "rot_garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    torch.save({"format": "something else"}, d / "foreign.ckpt")

    # Models: GPT-2 and a made-up model_type are not supported.
    gpt2 = d / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=260)
                                 ).save_pretrained(gpt2)
    byte_tokenizer().save_pretrained(gpt2)
    alien = d / "alien"
    shutil.copytree(tiny_dir, alien)
    cfg = json.loads((alien / "config.json").read_text())
    cfg["model_type"] = "frobnet"
    (alien / "config.json").write_text(json.dumps(cfg))

    # A saved quantized model, then a truncated and a tampered copy of it.
    saved = d / "saved"
    assert main(["quantize", "--model", str(tiny_dir), "--eval-data", str(d / "eval.txt"),
                 "--calib-data", str(d / "calib.txt"), "--seq-len", "64", "--max-windows", "1", "--no-eval",
                 "--output", str(saved)]) == 0
    weights = saved / "model.safetensors"
    truncated = d / "truncated"
    shutil.copytree(saved, truncated)
    (truncated / "model.safetensors").write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    tampered = d / "tampered"
    shutil.copytree(saved, tampered)
    data = bytearray(weights.read_bytes())
    data[len(data) * 3 // 4] ^= 0x40
    (tampered / "model.safetensors").write_bytes(bytes(data))
    edited = d / "edited_config"  # config.json changed by hand: 4-bit codes would be read as 8-bit ones
    shutil.copytree(saved, edited)
    config = json.loads((saved / "config.json").read_text())
    config["spinquant"]["quantization"]["weight"]["bits"] = 8
    (edited / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    # Integrity that must not be switched off by editing the folder (issue 15, class 1).
    def variant(name, edit_config, edit_tensors=None, manifest="keep"):
        """A copy of `saved` with its config (and tensors) edited; manifest: "keep" the old digests (stale),
        "drop" them, or "recompute" them so only the layout checks can catch the edit."""
        folder = d / name
        shutil.copytree(saved, folder)
        if edit_tensors is not None:
            tensors = load_file(str(folder / "model.safetensors"))
            edit_tensors(tensors)
            save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt", "spinquant": FORMAT})
        cfg = json.loads((folder / "config.json").read_text())
        cfg = edit_config(cfg)
        if manifest == "drop":
            cfg["spinquant"].pop("files", None)
            cfg["spinquant"].pop("config_sha256", None)
        elif manifest == "recompute":
            cfg["spinquant"]["files"] = {f: sha256_file(folder / f) for f in cfg["spinquant"]["files"]}
            cfg["spinquant"]["config_sha256"] = config_digest(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))

    def set_act_bits(cfg, bits=4):
        cfg["spinquant"]["quantization"]["act"]["bits"] = bits
        return cfg

    def flip_weight(tensors):
        key = next(k for k in tensors if k.endswith("qweight"))
        tensors[key] = tensors[key] ^ 0x11

    def scale_to_half(tensors):
        key = next(k for k in tensors if k.endswith("mlp.down_proj.scale"))
        tensors[key] = tensors[key].half()

    def drop_scale(tensors):
        del tensors[next(k for k in tensors if k.endswith("self_attn.o_proj.scale"))]

    def version(v):
        def edit(cfg):
            cfg["spinquant"]["format_version"] = v
            return cfg
        return edit

    variant("no_manifest_flipped", lambda c: c, flip_weight, manifest="drop")
    variant("no_manifest_bits", set_act_bits, manifest="drop")
    variant("no_section", lambda c: {k: v for k, v in c.items() if k != "spinquant"})
    variant("half_scale", lambda c: c, scale_to_half, manifest="recompute")
    variant("missing_scale", lambda c: c, drop_scale, manifest="recompute")
    variant("version_99", version(99), manifest="recompute")
    variant("version_text", version("one"), manifest="recompute")
    variant("bits_9", lambda c: set_act_bits(c, 9), manifest="recompute")
    (d / "list_config").mkdir()
    (d / "list_config" / "config.json").write_text("[1, 2, 3]")
    hf_list = d / "hf_list_config"
    shutil.copytree(tiny_dir, hf_list)
    (hf_list / "config.json").write_text("[]")
    partial = d / "partial_weights"  # a Hugging Face folder whose weights lack most tensors
    shutil.copytree(tiny_dir, partial)
    weights = load_file(str(partial / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if "layers.0." in k}, str(partial / "model.safetensors"),
              metadata={"format": "pt"})

    # Training checkpoints to resume from, edited (class 2).
    ckpt = d / "train.ckpt"
    assert main(["quantize", "--model", str(tiny_dir), "--eval-data", str(d / "eval.txt"), "--calib-data",
                 str(d / "calib.txt"), "--seq-len", "64", "--no-eval", "--rotation", "learned", "--train-steps", "2",
                 "--train-seq-len", "32", "--train-batch", "2", "--train-checkpoint", str(ckpt),
                 "--train-checkpoint-every", "1"]) == 0
    state = torch.load(ckpt, weights_only=True)

    def edited_ckpt(name, edit):
        s = {**state, "rotations": dict(state["rotations"])}
        edit(s)
        torch.save(s, d / name)

    edited_ckpt("ckpt_nonorth.ckpt", lambda s: s["rotations"].update(r1=s["rotations"]["r1"] * 1.1))
    edited_ckpt("ckpt_nan.ckpt", lambda s: s["rotations"].update(r1=s["rotations"]["r1"] * float("nan")))
    edited_ckpt("ckpt_step_text.ckpt", lambda s: s.update(step="1"))
    edited_ckpt("ckpt_step_losses.ckpt", lambda s: s.update(step=1))

    # Text inputs (class 5).
    (d / "surrogate.jsonl").write_text('{"text": "' + TEXT + '"}\n{"text": "bad \\ud800 here"}\n')
    return d


@dataclass
class Case:
    args: Callable  # (ctx) -> argv
    expect: str  # a piece of the one-line message
    sub: bool = False  # run in a subprocess instead of in-process
    setup: Callable | None = None  # (ctx) -> None, before the snapshot
    patch: Callable | None = None  # (monkeypatch) -> None, in-process only


class Ctx:
    def __init__(self, tiny: Path, inp: Path, out: Path):
        self.tiny, self.inp, self.out = tiny, inp, out
        self.target = out / "model"  # where --output points

    def quantize(self, *extra, model=None):
        return ["quantize", "--model", str(model or self.tiny), "--eval-data", str(self.inp / "eval.txt"),
                "--calib-data", str(self.inp / "calib.txt"), "--seq-len", "64", "--max-windows", "2",
                "--output", str(self.target), *extra]

    def learned(self, *extra):
        return self.quantize("--rotation", "learned", "--train-steps", "2", "--train-seq-len", "32",
                             "--train-batch", "2", *extra)

    def rotation_file(self, name):
        return self.quantize("--rotation", "learned", "--rotation-file", str(self.inp / name))

    def eval_saved(self, folder):
        return ["eval", str(self.inp / folder), "--eval-data", str(self.inp / "eval.txt"), "--seq-len", "64"]

    def pipe(self, text: str) -> str:
        """A pipe holding `text`, as `--calib-data <(cat file)` gives (read end left open for the run)."""
        r, w = os.pipe()
        os.write(w, text.encode())
        os.close(w)
        return f"/dev/fd/{r}"

    def wikitext_test(self) -> Path:
        from spinquant.evaluation.data import shared_data_dir

        root = shared_data_dir()
        if root is None or not (root / "wikitext-2-raw" / "wiki.test.raw").is_file():
            pytest.skip("needs the shared WikiText-2 copy")
        return root / "wikitext-2-raw" / "wiki.test.raw"

    def export(self, source):
        return ["export", str(self.inp / source), "--format", "compressed-tensors", "--output", str(self.target)]


def _read_only(ctx: Ctx) -> None:
    if os.geteuid() == 0:  # root ignores permission bits: aim below a regular file instead
        ctx.target = ctx.inp / "eval.txt" / "model"
    else:
        ctx.out.chmod(0o500)


def _existing_output(ctx: Ctx) -> None:
    ctx.target.mkdir()
    (ctx.target / "precious.txt").write_text("keep me")


def _disk_full_safetensors(monkeypatch) -> None:
    """What safetensors raises on a full disk: its own exception type, not an OSError."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)


def _existing_loss_csv(ctx: Ctx) -> None:
    (ctx.out / "r.safetensors.loss.csv").write_text("step,loss\n0,1.0\n")


def _output_is_file(ctx: Ctx) -> None:
    ctx.target.write_text("a file the user keeps")


def _latin1_stdin(monkeypatch) -> None:
    import io

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("café\n".encode("latin-1")), encoding="utf-8"))


def _disk_full(monkeypatch) -> None:
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)


CASES = {
    # flags
    "unknown flag": Case(lambda c: c.quantize("--frobnicate"), "unrecognized arguments", sub=True),
    "no subcommand": Case(lambda c: [], "required"),
    "w-bits 0": Case(lambda c: c.quantize("--w-bits", "0"), "weight bits = 0"),
    "a-bits 1": Case(lambda c: c.quantize("--a-bits", "1"), "activation bits = 1"),
    "kv-bits 9": Case(lambda c: c.quantize("--kv-bits", "9"), "bits = 9"),
    "w-bits 17": Case(lambda c: c.quantize("--w-bits", "17"), "weight bits = 17"),
    "k-bits 17": Case(lambda c: c.quantize("--k-bits", "17"), "key-cache bits = 17"),
    "bits not a number": Case(lambda c: c.quantize("--w-bits", "four"), "bits must be an integer"),
    "train-steps -1": Case(lambda c: c.learned("--train-steps", "-1"), "--train-steps"),
    "train-batch 0": Case(lambda c: c.learned("--train-batch", "0"), "--train-batch"),
    "gptq-samples -4": Case(lambda c: c.quantize("--weight-quant", "gptq", "--gptq-samples", "-4"), "--gptq-samples"),
    "gptq-seq-len -1": Case(lambda c: c.quantize("--weight-quant", "gptq", "--gptq-seq-len", "-1"), "--gptq-seq-len"),
    "max-windows -3": Case(lambda c: c.quantize("--max-windows", "-3"), "--max-windows"),
    "seq-len 0": Case(lambda c: c.quantize("--seq-len", "0"), "--seq-len"),
    "negative lr": Case(lambda c: c.learned("--lr", "-1"), "learning rate"),
    "clip ratio 1.5": Case(lambda c: c.quantize("--a-clip", "1.5"), "clip ratio"),
    "negative group": Case(lambda c: c.quantize("--w-group", "-8"), "group size -8"),
    "group not dividing": Case(lambda c: c.quantize("--w-group", "48"), "does not divide"),
    "act group not dividing": Case(lambda c: c.quantize("--a-group", "40"), "does not divide"),
    "seq-len over context": Case(lambda c: c.quantize("--seq-len", "4096"), "exceeds the model's context"),
    "train-seq-len over context": Case(lambda c: c.learned("--train-seq-len", "4096"), "--train-seq-len"),
    "gptq-seq-len over context": Case(lambda c: c.quantize("--weight-quant", "gptq", "--gptq-seq-len", "4096"),
                                      "--gptq-seq-len"),
    "export-output without export": Case(lambda c: c.quantize("--export-output", str(c.out / "x")), "--export"),
    "rotation-file without learned": Case(lambda c: c.quantize("--rotation-file", "r.safetensors"),
                                          "--rotation learned"),
    "generate 0 tokens": Case(lambda c: ["generate", str(c.tiny), "hi", "--max-new-tokens", "0"], "positive"),
    "unknown task": Case(lambda c: c.quantize("--tasks", "frobnicate"), "frobnicate"),
    # data files
    "missing data file": Case(lambda c: c.quantize("--eval-data", str(c.inp / "nope.txt")), "not found"),
    "empty data file": Case(lambda c: c.quantize("--eval-data", str(c.inp / "empty.txt")), "is empty"),
    "binary data file": Case(lambda c: c.quantize("--eval-data", str(c.inp / "binary.bin")), "binary"),
    "not UTF-8 data file": Case(lambda c: c.quantize("--eval-data", str(c.inp / "latin1.txt")), "UTF-8"),
    "JSONL without text": Case(lambda c: c.quantize("--eval-data", str(c.inp / "notext.jsonl")), "`text`"),
    "text shorter than a window": Case(lambda c: c.quantize("--eval-data", str(c.inp / "short.txt")),
                                       "fewer than one window"),
    "directory as data file": Case(lambda c: c.quantize("--eval-data", str(c.inp / "a_dir")), "is a directory"),
    "empty calibration file": Case(lambda c: c.learned("--calib-data", str(c.inp / "empty.txt")), "is empty"),
    "calibration is evaluation": Case(lambda c: c.quantize("--calib-data", str(c.inp / "eval.txt")),
                                      "evaluation", sub=True),
    "calibration is evaluation (other spelling)": Case(
        lambda c: c.quantize("--calib-data", str(c.inp / "a_dir" / ".." / "eval.txt")), "evaluation"),
    "calibration is evaluation (copy)": Case(lambda c: c.quantize("--calib-data", str(c.inp / "eval_copy.txt")),
                                             "evaluation"),
    "calibration is evaluation (names)": Case(
        lambda c: c.quantize("--calib-data", "wikitext2", "--eval-data", "wikitext2"), "evaluation"),
    # models
    "missing model path": Case(lambda c: c.quantize(model=c.inp / "no_such_model"), "not found"),
    "unknown model name": Case(lambda c: c.quantize(model="no-such-model"), "not found"),
    "folder without config.json": Case(lambda c: c.quantize(model=c.inp / "not_a_model"), "config.json"),
    "unsupported architecture (gpt2)": Case(lambda c: c.quantize(model=c.inp / "gpt2"), "'gpt2' is not supported",
                                            sub=True),
    "unknown model_type": Case(lambda c: c.quantize(model=c.inp / "alien"), "frobnet"),
    # rotation files
    "rotation file missing": Case(lambda c: c.rotation_file("nope.safetensors"), "not found"),
    "rotation file is a directory": Case(lambda c: c.rotation_file("a_dir"), "is a directory"),
    "rotation of wrong shape": Case(lambda c: c.rotation_file("rot_shape.safetensors"), "shape (32, 32)"),
    "rotation for other layer count": Case(lambda c: c.rotation_file("rot_layers.safetensors"), "3 layers"),
    "rotation not orthogonal": Case(lambda c: c.rotation_file("rot_nonorth.safetensors"), "not orthogonal"),
    "rotation with NaN": Case(lambda c: c.rotation_file("rot_nan.bin"), "NaN"),
    "rotation file garbage": Case(lambda c: c.rotation_file("rot_garbage.safetensors"), "cannot read rotation file"),
    # training checkpoints
    "resume missing file": Case(lambda c: c.learned("--resume", str(c.inp / "nope.ckpt")), "not found"),
    "resume from a directory": Case(lambda c: c.learned("--resume", str(c.inp / "a_dir")), "is a directory"),
    "resume foreign file": Case(lambda c: c.learned("--resume", str(c.inp / "foreign.ckpt")), "cannot resume"),
    "train checkpoint in missing folder": Case(
        lambda c: c.learned("--train-checkpoint", str(c.out / "nope" / "t.ckpt"), "--train-checkpoint-every", "1"),
        "does not exist"),
    # saved quantized checkpoints
    "truncated checkpoint (eval)": Case(lambda c: c.eval_saved("truncated"), "sha256"),
    "truncated checkpoint (export)": Case(lambda c: c.export("truncated"), "sha256"),
    "tampered checkpoint (generate)": Case(lambda c: ["generate", str(c.inp / "tampered"), "hi"], "sha256", sub=True),
    "tampered checkpoint (export)": Case(lambda c: c.export("tampered"), "sha256"),
    "edited config.json (eval)": Case(lambda c: c.eval_saved("edited_config"), "config.json"),
    "edited config.json (export)": Case(lambda c: c.export("edited_config"), "config.json"),
    # outputs
    "read-only output location": Case(lambda c: c.quantize(), "output folder", setup=_read_only),
    "output exists, no --overwrite": Case(lambda c: c.quantize(), "--overwrite", setup=_existing_output),
    "save-rotation exists": Case(lambda c: c.quantize("--save-rotation", str(c.inp / "eval.txt")), "--overwrite"),
    "save-rotation onto a directory": Case(
        lambda c: c.quantize("--save-rotation", str(c.out), "--overwrite"), "is a folder"),
    "markdown exists": Case(lambda c: ["compare", "--model", str(c.tiny), "--eval-data", str(c.inp / "eval.txt"),
                                       "--calib-data", str(c.inp / "calib.txt"), "--markdown",
                                       str(c.inp / "eval.txt")], "already exists"),
    "disk full while saving": Case(lambda c: c.quantize("--max-windows", "1"), "No space left", patch=_disk_full),
    "disk full inside safetensors": Case(lambda c: c.quantize("--max-windows", "1"), "No space left",
                                         patch=_disk_full_safetensors),
    # --- issue 15, class 1: integrity cannot be switched off by editing the folder
    "manifest removed, weights flipped": Case(lambda c: c.eval_saved("no_manifest_flipped"), "no integrity manifest"),
    "manifest removed, A8 edited to A4": Case(lambda c: c.eval_saved("no_manifest_bits"), "no integrity manifest",
                                             sub=True),
    "spinquant section removed": Case(lambda c: c.eval_saved("no_section"), "lost its 'spinquant' section"),
    "section removed (export)": Case(lambda c: c.export("no_section"), "lost its 'spinquant' section"),
    "scale of the wrong dtype, digests consistent": Case(lambda c: c.eval_saved("half_scale"), "declared layout"),
    "tensor missing, digests consistent": Case(lambda c: c.eval_saved("missing_scale"), "lacks the tensor"),
    "layout checked on export too": Case(lambda c: c.export("half_scale"), "declared layout"),
    "unknown format version": Case(lambda c: c.eval_saved("version_99"), "format version 99"),
    "malformed format version": Case(lambda c: c.eval_saved("version_text"), "format version 'one'"),
    "impossible declared bits": Case(lambda c: c.eval_saved("bits_9"), "invalid quantization"),
    "config.json a JSON list (saved)": Case(lambda c: c.eval_saved("list_config"), "JSON list"),
    "config.json a JSON list (HF)": Case(lambda c: c.quantize(model=c.inp / "hf_list_config"), "JSON list"),
    "HF weights lacking tensors": Case(lambda c: c.quantize(model=c.inp / "partial_weights"), "lack"),
    # class 2: resumed state is checked like a rotation file
    "resume with non-orthogonal R1": Case(lambda c: c.learned("--resume", str(c.inp / "ckpt_nonorth.ckpt")),
                                          "not orthogonal"),
    "resume with NaN R1": Case(lambda c: c.learned("--resume", str(c.inp / "ckpt_nan.ckpt")), "NaN"),
    "resume with a text step": Case(lambda c: c.learned("--resume", str(c.inp / "ckpt_step_text.ckpt")),
                                    "not a step count"),
    "resume, step and losses disagree": Case(lambda c: c.learned("--resume", str(c.inp / "ckpt_step_losses.ckpt")),
                                             "loss history"),
    # class 3: calibration text equal to the evaluation text however named
    "calibration is evaluation (pipe)": Case(lambda c: c.quantize("--calib-data", c.pipe(TEXT)), "evaluation"),
    "calibration is evaluation (built-in name and its file)": Case(
        lambda c: c.quantize("--eval-data", "wikitext2", "--calib-data", str(c.wikitext_test())), "evaluation"),
    # class 4: outputs
    "loss curve exists, no --overwrite": Case(lambda c: c.learned("--save-rotation", str(c.out / "r.safetensors")),
                                              "already exists", setup=_existing_loss_csv),
    "output is a file, --overwrite": Case(lambda c: c.quantize("--overwrite"), "is a file", setup=_output_is_file),
    # class 5: inputs that used to crash
    "empty prompt": Case(lambda c: ["generate", str(c.inp / "saved"), "   "], "prompt is empty"),
    "chat stdin not UTF-8": Case(lambda c: ["chat", str(c.inp / "saved")], "not UTF-8", patch=_latin1_stdin),
    "lone surrogate in JSONL": Case(lambda c: c.quantize("--eval-data", str(c.inp / "surrogate.jsonl")),
                                    "lone surrogate"),
    "unknown ~user in a path": Case(lambda c: c.quantize("--eval-data", "~nosuchuser_spq/x.txt"), "no such user"),
    "device meta": Case(lambda c: c.quantize("--device", "meta"), "not supported"),
    "device mps": Case(lambda c: c.quantize("--device", "mps"), "not supported"),
    "huge seed": Case(lambda c: c.quantize("--seed", str(10**20)), "out of range"),
    "negative seed": Case(lambda c: c.quantize("--seed", "-1"), "out of range"),
    "lr nan": Case(lambda c: c.learned("--lr", "nan"), "learning rate"),
    "clip ratio nan": Case(lambda c: c.quantize("--a-clip", "nan"), "clip ratio"),
    # found by benchmarks/fuzz_cli.py
    "k-bits 0 (was read as 'not given')": Case(lambda c: c.quantize("--k-bits", "0"), "key-cache bits = 0"),
    "empty --output (an unset shell variable)": Case(lambda c: c.quantize("--output", ""), "must not be empty"),
    "empty model path (eval)": Case(lambda c: ["eval", "", "--eval-data", str(c.inp / "eval.txt")],
                                    "must not be empty"),
    "train-steps 10^20": Case(lambda c: c.learned("--train-steps", str(10**20)), "too large"),
    "train checkpoint onto a user's file": Case(lambda c: c.learned("--train-checkpoint", str(c.inp / "eval.txt")),
                                                "already exists"),
    "train checkpoint onto /dev/null": Case(lambda c: c.learned("--train-checkpoint", "/dev/null", "--overwrite"),
                                            "device, pipe or socket"),
    "cost-decode past the context": Case(lambda c: ["compare", "--model", str(c.tiny), "--eval-data",
                                                    str(c.inp / "eval.txt"), "--seq-len", "64", "--methods", "fp",
                                                    "--cost-decode", str(10**9)], "--cost-decode"),
    "max-new-tokens past the context": Case(lambda c: ["generate", str(c.inp / "saved"), "hi", "--max-new-tokens",
                                                       str(10**9)], "exceeds the model's context"),
    "temperature nan": Case(lambda c: ["generate", str(c.inp / "saved"), "hi", "--temperature", "nan"],
                            "temperature"),
    "saved folder as --model": Case(lambda c: c.quantize(model=c.inp / "saved"), "already quantized", sub=True),
}


def snapshot(*roots: Path) -> dict[str, str]:
    """Every entry under the roots (hidden temp files included) → content hash for files, 'dir' for folders."""
    seen = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            seen[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return seen


def run_subprocess(argv: list[str]) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "spinquant.cli", *argv], capture_output=True, text=True, check=False,
                          env=env, timeout=300)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, inputs, tiny_dir, tmp_path, capsys, monkeypatch, one_thread):
    case = CASES[name]
    out = tmp_path / "out"
    out.mkdir()
    ctx = Ctx(tiny_dir, inputs, out)
    if case.setup:
        case.setup(ctx)
    argv = [str(a) for a in case.args(ctx)]
    before = snapshot(out, inputs, tiny_dir)
    try:
        if case.sub:
            code, err = run_subprocess(argv)
        else:
            if case.patch:
                case.patch(monkeypatch)
            code = main(argv)
            err = capsys.readouterr().err
    finally:
        out.chmod(0o700)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("spinquant: error: ") and case.expect in lines[0], lines[0]
    assert snapshot(out, inputs, tiny_dir) == before, "the failed run left files behind or changed some"


def test_table_is_big_enough():
    assert len(CASES) >= 95
    assert sum(c.sub for c in CASES.values()) >= 3
