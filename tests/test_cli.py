"""The command line end to end on tiny models, and its one-line errors for bad input."""

import json

import pytest
import transformers
from conftest import bpe_tokenizer, byte_tokenizer, save_tiny

from spinquant.cli import main
from spinquant.config import RunConfig
from spinquant.errors import SpinQuantError

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "eval.txt").write_text(TEXT)
    (d / "calib.txt").write_text(TEXT[::-1])
    return d


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def small(files, *extra):
    return ["--eval-data", str(files / "eval.txt"), "--calib-data", str(files / "calib.txt"),
            "--seq-len", "64", "--max-windows", "2", *extra]


def test_quantize_end_to_end_prints_json(tiny_dir, files, capsys):
    code, out, err = run_cli(["quantize", "--model", str(tiny_dir), *small(files), "--json"], capsys)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["quant"] == "W4A4KV4" and result["method"] == "hadamard"
    assert result["ppl"] > 1


def test_eval_and_compare(tiny_dir, files, capsys, tmp_path):
    code, out, _ = run_cli(["eval", "--model", str(tiny_dir), *small(files)[:2], "--seq-len", "64",
                            "--max-windows", "2", "--json"], capsys)
    assert code == 0
    fp = json.loads(out.strip().splitlines()[-1])["ppl"]
    md = tmp_path / "table.md"
    code, out, err = run_cli(["compare", "--model", str(tiny_dir), *small(files), "--methods", "fp,rtn,hadamard",
                              "--markdown", str(md), "--json"], capsys)
    assert code == 0, err
    rows = json.loads(out.strip().splitlines()[-1])["rows"]
    assert [r["method"] for r in rows] == ["fp", "rtn", "hadamard"]
    assert rows[0]["ppl"] == pytest.approx(fp)
    assert "| hadamard | W4A4KV4 |" in md.read_text()
    # Inference cost on every row, measured in the same run: the packed rows are smaller than FP.
    costs = {r["method"]: r["cost"] for r in rows}
    for c in costs.values():
        assert c["prefill_tok_s"] > 0 and c["decode_tok_s"] > 0 and c["memory_bytes"] > 0
    assert costs["hadamard"]["size_bytes"] < costs["fp"]["size_bytes"]
    assert "decode tok/s" in md.read_text()


def test_learned_rotation_via_cli_saves_and_reuses(tiny_dir, files, capsys, tmp_path):
    rot = tmp_path / "rot.safetensors"
    args = ["quantize", "--model", str(tiny_dir), *small(files), "--rotation", "learned", "--train-steps", "2",
            "--train-seq-len", "32", "--train-batch", "2", "--save-rotation", str(rot), "--json"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    first = json.loads(out.strip().splitlines()[-1])
    assert first["train"]["steps"] == 2 and rot.is_file()
    code, out, err = run_cli(["quantize", "--model", str(tiny_dir), *small(files), "--rotation", "learned",
                              "--rotation-file", str(rot), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["ppl"] == pytest.approx(first["ppl"], rel=1e-4)
    # compare takes the saved file as its learned row, next to rows that must ignore it
    code, out, err = run_cli(["compare", "--model", str(tiny_dir), *small(files), "--methods", "hadamard,learned",
                              "--rotation-file", str(rot), "--json"], capsys)
    assert code == 0, err
    rows = {r["method"]: r["ppl"] for r in json.loads(out.strip().splitlines()[-1])["rows"]}
    assert rows["learned"] == pytest.approx(first["ppl"], rel=1e-4) and rows["hadamard"] != rows["learned"]


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("odd")
    gpt2 = d / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=260)
                                 ).save_pretrained(gpt2)
    byte_tokenizer().save_pretrained(gpt2)
    # hidden 92 = 4·23: no Hadamard construction is known for it.
    odd = save_tiny(d / "hidden92", hidden_size=92, head_dim=16)
    return {"gpt2": gpt2, "odd": odd}


# Bad input through the CLI: tests/test_bad_input.py.


def test_impossible_hadamard_size_suggests_random(odd_models, files, capsys):
    code, _, err = run_cli(["quantize", "--model", str(odd_models["odd"]), *small(files)], capsys)
    assert code == 2 and "92" in err and "--rotation random" in err
    code, _, err = run_cli(["quantize", "--model", str(odd_models["odd"]), *small(files), "--rotation", "random",
                            "--no-r3", "--no-r4"], capsys)
    assert code == 0, err


def test_atomic_output_has_normal_permissions_and_no_leftovers(tmp_path):
    import os

    from spinquant.io import atomic_path

    target = tmp_path / "file.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("x")
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == (0o666 & ~umask)
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "failed.txt") as tmp:
        tmp.write_text("partial")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_tables_flag_sets_embedding_storage(tiny_dir, files, capsys, tmp_path):
    import torch
    from safetensors import safe_open

    out_dir = tmp_path / "q"
    code, _, err = run_cli(["quantize", "--model", str(tiny_dir), *small(files), "--output", str(out_dir),
                            "--tables", "float16"], capsys)
    assert code == 0, err
    section = json.loads((out_dir / "config.json").read_text())["spinquant"]
    assert section["embedding"] == "float16"
    with safe_open(str(out_dir / "model.safetensors"), "pt") as f:
        tables = [k for k in f.keys() if "embed" in k or "lm_head" in k]  # noqa: SIM118 (safe_open is no dict)
        assert tables and all(f.get_tensor(k).dtype in (torch.float16, torch.float32) for k in tables)
        assert any(f.get_tensor(k).dtype == torch.float16 for k in tables)
        assert not any(k.endswith(".qweight") for k in tables)


def test_target_writes_the_gguf_recipe_in_one_command(files, capsys, tmp_path):
    """--target gguf:Q4_0 --output FILE: the recipe's flags (any given explicitly win) and one .gguf whose
    decoder weights are the model's own full-range Q4_0 codes; the tied table stays one table."""
    from gguf import GGUFReader

    from spinquant.cli import config_from_args, parse_args
    from spinquant.config import TARGETS

    a = parse_args(["quantize", "--target", "gguf:Q4_0", "--output", "m.gguf", "--w-group", "64"])
    cfg = config_from_args(a)
    assert (a.export, a.export_output, a.output, cfg.output) == ("gguf", "m.gguf", None, None)
    assert cfg.quant.weight.group_size == 64 and cfg.quant.weight.full_range and cfg.gptq.weighted_clip
    assert cfg.gptq.act_order and cfg.gptq.damp == 0.1 and cfg.quant.weight_role_bits == {"down.0": 5}
    assert (cfg.quant.act.bits, cfg.quant.key.bits, cfg.rotation.mode.value) == (16, 16, "none")
    assert {t for t in TARGETS if t.startswith("gguf:")} == {"gguf:Q4_0", "gguf:Q5_0"}

    src = save_tiny(tmp_path / "tied", "llama-tied")
    bpe_tokenizer().save_pretrained(src)  # llama.cpp needs BPE merges
    out = tmp_path / "m.gguf"
    code, _, err = run_cli(["quantize", "--model", str(src), *small(files), "--gptq-samples", "2", "--gptq-seq-len", "64",
                            "--target", "gguf:Q4_0", "--output", str(out)], capsys)
    assert code == 0, err
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(out)).tensors}
    assert types["blk.1.ffn_down.weight"] == types["blk.0.attn_q.weight"] == "Q4_0"
    assert types["blk.0.ffn_down.weight"] == "Q5_0"  # the recipe's one wider ffn_down
    assert types["token_embd.weight"] == "Q8_0" and "output.weight" not in types
    assert not (tmp_path / "m.gguf" / "config.json").exists()


@pytest.mark.parametrize("target, bits, group", [("spinquant:W4A4KV4", (4, 4, 4), 32),
                                                  ("spinquant:W4A8KV8", (4, 8, 8), 32),
                                                  ("spinquant:W4A16", (4, 16, 16), None)])
def test_accuracy_targets_are_the_measured_recipes(target, bits, group):
    """spinquant:<bits> sets the recipe of the best accuracy record at those bits; --output stays the packed
    folder (no export), and flags given explicitly still win."""
    from spinquant.cli import config_from_args, parse_args

    a = parse_args(["quantize", "--target", target, "--output", "out"])
    cfg = config_from_args(a)
    assert (cfg.quant.weight.bits, cfg.quant.act.bits, cfg.quant.key.bits) == bits
    assert cfg.quant.weight.group_size == group and str(cfg.output) == "out" and a.export is None
    assert cfg.rotation.mode.value == "hadamard" and cfg.quant.weight_method == "gptq" and cfg.tune.steps == 60
    assert cfg.gptq.samples == 16 and cfg.gptq.act_order and cfg.gptq.weighted_clip and cfg.gptq.damp == 0.1
    assert cfg.gptq.act_aware == (0.5 if bits[1] < 16 else 0.0)
    assert config_from_args(parse_args(["quantize", "--target", target, "--tune-scales", "5"])).tune.steps == 5


def test_flag_defaults_are_the_config_defaults_and_help_shows_them():
    from spinquant.cli import build_parser, config_from_args
    from spinquant.config import RunConfig

    parser = build_parser()
    cfg, ref = config_from_args(parser.parse_args(["quantize"])), RunConfig()
    assert cfg.quant == ref.quant
    assert (cfg.eval.data, cfg.eval.seq_len, cfg.eval.max_windows) == (ref.eval.data, ref.eval.seq_len,
                                                                      ref.eval.max_windows)
    assert (cfg.gptq.samples, cfg.gptq.seq_len, cfg.gptq.calib_data) == (ref.gptq.samples, ref.gptq.seq_len,
                                                                         ref.gptq.calib_data)
    assert (cfg.rotation.mode, cfg.seed, cfg.device, cfg.tables, cfg.model) == (
        ref.rotation.mode, ref.seed, ref.device, ref.tables, ref.model)
    help_text = " ".join(parser._subparsers._group_actions[0].choices["quantize"].format_help().split())
    for flag, value in (("--w-bits", ref.quant.weight.bits), ("--a-clip", ref.quant.act.clip_ratio),
                        ("--seed", ref.seed), ("--max-windows", ref.eval.max_windows),
                        ("--gptq-samples", ref.gptq.samples), ("--rotation", ref.rotation.mode)):
        after = help_text.split(f" {flag} ", 1)[1]
        assert f"(default: {value})" in after.split(" --", 1)[0], flag


def test_rotation_mode_is_one_enum_from_flag_to_saved_json():
    """The CLI's choices are the enum's values; configs built from plain words (the Python API, replace())
    hold the enum; a word assigned later is converted by validate(); an unknown one is refused there."""
    from dataclasses import replace

    from spinquant.config import RotationConfig, RotationMode

    assert replace(RotationConfig(), mode="learned").mode is RotationMode.LEARNED
    cfg = RunConfig()
    cfg.rotation.mode = "random"  # README's Python example sets it this way
    cfg.validate()
    assert cfg.rotation.mode is RotationMode.RANDOM and json.dumps({"m": cfg.rotation.mode}) == '{"m": "random"}'
    assert f"{RotationMode.HADAMARD}" == "hadamard" and not RotationMode.NONE.rotates
    cfg.rotation.mode = "spin"
    with pytest.raises(SpinQuantError, match="rotation 'spin' is unknown; use none, hadamard, random, learned"):
        cfg.validate()


def test_threads_auto_takes_the_idle_cores(monkeypatch):
    """--threads N wins; no flag keeps torch's choice; --threads auto (0) takes the cores that other work
    leaves idle, at least 1, with a note when that is fewer than all."""
    from spinquant import distributed as threads
    from spinquant.cli import parse_args

    assert parse_args(["eval", "--threads", "auto"]).threads == 0 and parse_args(["eval"]).threads is None
    measured = threads.idle_cores(0.05)  # the real measure, on this machine
    assert measured is None or 0 <= measured <= threads.os.cpu_count()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # a set OMP_NUM_THREADS is the user's choice: kept
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(threads, "idle_cores", lambda: 1.2)
    assert threads.pick_threads(3) == (3, None) and threads.pick_threads(None) == (None, None)
    n, note = threads.pick_threads(0)
    assert n == 1 and "1.2 of 4 cores idle" in note and "--threads" in note
    monkeypatch.setattr(threads, "idle_cores", lambda: 0.1)
    assert threads.pick_threads(0)[0] == 1
    monkeypatch.setattr(threads, "idle_cores", lambda: 3.8)
    assert threads.pick_threads(0) == (4, None)
    monkeypatch.setattr(threads, "idle_cores", lambda: None)  # no /proc/stat: one per core
    assert threads.pick_threads(0) == (4, None)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.pick_threads(0) == (None, None)  # the user's own setting stays
