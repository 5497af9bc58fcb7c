"""Tiny random models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

COMMON = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 96,  # 12·8: exercises a non-power-of-two Hadamard for R4
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}

# (name, config class, model class, extra config)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"tie_word_embeddings": False}),
    "llama-tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"tie_word_embeddings": True}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {"tie_word_embeddings": True}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 16}),
}


def tiny_model(family: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    cfg_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = cfg_cls(**{**COMMON, **extra, **overrides})
    model = model_cls(cfg).to(dtype).eval()
    # Random init leaves norms at 1 and biases at 0: randomise them so fusion and bias rotation are tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.08)
            if "embed_tokens" in name:
                p[:, :3] *= 8  # a few outlier channels in the residual stream, as in real LLMs
    return model


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


def byte_tokenizer():
    """A byte-level tokenizer (one token per UTF-8 byte, BOS prepended like Llama's), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def bpe_tokenizer():
    """Byte-level BPE with two merges (llama.cpp needs merges) and BOS/EOS: 260 tokens, like the tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("Ġ", "t"), ("h", "e")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab.update({"<s>": len(vocab), "</s>": len(vocab) + 1})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def save_tiny(path: Path, family: str = "llama", **overrides) -> Path:
    """A tiny random model + byte tokenizer saved as a Hugging Face folder (what users pass to --model)."""
    model = tiny_model(family, vocab_size=260, **overrides)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture
def one_thread():
    """Tiny tensor ops on a shared 2-core box: a second OpenMP thread only adds stalls (oneDNN ~20× slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
