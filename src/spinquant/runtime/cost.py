"""What running a model costs: checkpoint size, peak memory, prefill and decode tokens/s.

`spinquant compare` measures every row with the same prompt, decode length and threads, one after the
other in one process: the float model through transformers, a quantized one as its packed runtime model
(`checkpoint.freeze`: the modules a saved copy runs) with its own decode step. Peak memory is the model's
tensors plus the growth of the process's resident set during the timed runs (Linux: VmHWM after a reset
through /proc/self/clear_refs; elsewhere the model's tensors alone).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class Cost:
    size_bytes: int  # the checkpoint's tensors (float: as float16, what a float checkpoint is shipped as)
    memory_bytes: int  # model tensors + the run's peak growth
    prefill_tok_s: float
    decode_tok_s: float
    threads: int
    prompt_len: int
    decode_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def float_checkpoint_bytes(model) -> int:
    """A float model's tensors at 16 bits, tied ones counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or not t.is_floating_point():
            continue
        seen.add(t.data_ptr())
        total += t.numel() * 2
    return total


def tensor_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for module in model.modules():  # tensors held outside the state (e.g. TiedLMHead's shared table)
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.numel() * value.element_size()
    return total


def _rss(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


@torch.inference_mode()
def measure(model, size_bytes: int, prompt_len: int = 128, decode_tokens: int = 32, threads: int | None = None,
            repeats: int = 2, seed: int = 0) -> Cost:
    """Time one prefill (last position's logits only, as generation needs) and `decode_tokens` greedy steps
    on a random prompt; the median of `repeats` after one warm-up."""
    from .decode import engine_for

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        vocab = model.config.vocab_size
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit:  # prompt + decode must fit the context (tiny test models have 128 positions)
            prompt_len = max(1, min(prompt_len, limit - decode_tokens))
        prompt = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
        engine = engine_for(model) if hasattr(model, "spinquant_kv") else None
        new_cache = model.new_cache if hasattr(model, "new_cache") else (lambda: None)
        start = min(32, prompt_len)

        def prefill() -> float:
            t = time.perf_counter()
            model(prompt, cache=new_cache(), use_cache=True, logits_to_keep=1)
            return time.perf_counter() - t

        def decode() -> float:
            if engine is not None:
                logits = engine.begin(prompt[:, :start], start + decode_tokens)
                t = time.perf_counter()
                for i in range(decode_tokens):
                    logits = engine.forward_token(int(logits.argmax()), start + i)
                return time.perf_counter() - t
            out = model(prompt[:, :start], cache=new_cache(), use_cache=True)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(decode_tokens):
                out = model(token, cache=cache, use_cache=True)
                cache, token = out.cache, out.logits[:, -1:].argmax(-1)
            return time.perf_counter() - t

        before = _rss("VmRSS")
        tracked = _reset_peak() and before is not None
        prefill()
        decode()
        prefill_s = sorted(prefill() for _ in range(repeats))[repeats // 2]
        decode_s = sorted(decode() for _ in range(repeats))[repeats // 2]
        growth = max(0, (_rss("VmHWM") or 0) - before) if tracked else 0
    finally:
        torch.set_num_threads(old_threads)
    return Cost(size_bytes=size_bytes, memory_bytes=tensor_bytes(model) + growth,
                prefill_tok_s=prompt_len / prefill_s, decode_tok_s=decode_tokens / decode_s,
                threads=threads or old_threads, prompt_len=prompt_len, decode_tokens=decode_tokens)
