"""Text generation and a line-based chat loop over any causal LM (the packed runtime or a float model)."""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

import torch

from ..errors import SpinQuantError


def _sampling(tokenizer, max_new_tokens: int, temperature: float) -> dict:
    if max_new_tokens <= 0:
        raise SpinQuantError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise SpinQuantError(f"--temperature must be 0 (greedy) or a positive number, got {temperature}")
    kwargs: dict = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
    if temperature > 0:
        kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
    else:
        kwargs.update(temperature=None, top_k=None, top_p=None)  # silence sampling defaults under greedy
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is not None:
        kwargs["pad_token_id"] = pad
    return kwargs


def _generate(model, tokenizer, input_ids: torch.Tensor, kwargs: dict, out: TextIO | None) -> tuple[str, int, float]:
    """(new text, new token count, seconds); streams the text to `out` when given. A packed model decodes
    with its own step (runtime/decode.py) where that applies, else with transformers' generate."""
    streamer = None
    if out is not None:
        from transformers import TextStreamer

        class _To(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False):
                out.write(text + ("\n" if stream_end else ""))
                out.flush()

        streamer = _To(tokenizer, skip_prompt=True, skip_special_tokens=True)
    from .decode import engine_for

    limit = getattr(model.config, "max_position_embeddings", None)
    if limit:  # a chat history past the context keeps its end; generation stops where the context ends
        input_ids = input_ids[:, -(limit - 1):]
        kwargs = {**kwargs, "max_new_tokens": min(kwargs["max_new_tokens"], limit - input_ids.shape[1])}
    engine = engine_for(model) if input_ids.shape[0] == 1 else None
    device = next(model.parameters(), torch.empty(0)).device
    input_ids = input_ids.to(device)
    t = time.perf_counter()
    with torch.inference_mode():
        if engine is not None:
            on_token = None
            if streamer is not None:
                streamer.put(input_ids.cpu())  # the prompt, which the streamer skips, as generate() sends it
                on_token = lambda token: streamer.put(torch.tensor([token]))
            new = torch.tensor(engine.generate(input_ids, kwargs["max_new_tokens"], kwargs.get("temperature") or 0.0,
                                               _eos_ids(model, tokenizer), on_token), dtype=torch.long)
            if streamer is not None:
                streamer.end()
        else:
            ids = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                                 eos_token_id=list(_eos_ids(model, tokenizer)) or None, **kwargs)
            new = ids[0, input_ids.shape[1]:]
    seconds = time.perf_counter() - t
    return tokenizer.decode(new, skip_special_tokens=True), int(new.numel()), seconds


END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")  # chat templates' turn ends


def _eos_ids(model, tokenizer) -> tuple[int, ...]:
    """Where generation stops: the model's end-of-sequence ids, plus any end-of-turn token its vocabulary has
    (a chat reply ends there even where the config names only the end-of-text token)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    ids += [vocab[t] for t in END_OF_TURN if t in vocab and vocab[t] not in ids]
    return tuple(ids)


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                  out: TextIO | None = None) -> dict:
    """Continue `prompt` (greedy unless temperature > 0)."""
    if tokenizer is None:
        raise SpinQuantError("the model folder has no tokenizer; save it with its tokenizer")
    kwargs = _sampling(tokenizer, max_new_tokens, temperature)
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and input_ids.shape[1] >= limit:
        raise SpinQuantError(f"the prompt is {input_ids.shape[1]} tokens, the model's context {limit}; shorten it")
    text, n, seconds = _generate(model, tokenizer, input_ids, kwargs, out)
    return {"prompt": prompt, "text": text, "new_tokens": n, "seconds": seconds,
            "tokens_per_s": n / seconds if seconds > 0 else None}


def chat_ids(tokenizer, history: list[dict]) -> torch.Tensor:
    """Prompt ids for a conversation: the tokenizer's chat template, or a plain 'role: text' transcript."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt")
        if not isinstance(ids, torch.Tensor):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return ids
    text = "".join(f"{m['role']}: {m['content']}\n" for m in history) + "assistant:"
    return tokenizer(text, return_tensors="pt").input_ids


def chat_loop(model, tokenizer, max_new_tokens: int = 256, temperature: float = 0.0,
              stdin: TextIO | None = None, out: TextIO | None = None) -> dict:
    """Read user lines from stdin, answer each; stops at EOF or a line 'exit' / 'quit'."""
    if tokenizer is None:
        raise SpinQuantError("the model folder has no tokenizer; save it with its tokenizer")
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    kwargs = _sampling(tokenizer, max_new_tokens, temperature)
    history: list[dict] = []
    interactive = stdin.isatty()
    turns = 0
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        try:
            line = stdin.readline()
        except UnicodeDecodeError as e:
            raise SpinQuantError(f"input line {turns + 1} is not UTF-8 text (byte {e.object[e.start]:#04x}); "
                                 "set the terminal or file to UTF-8") from None
        if not line:
            break
        text = line.strip()
        if text.lower() in ("exit", "quit"):
            break
        if not text:
            continue
        history.append({"role": "user", "content": text})
        reply, _, _ = _generate(model, tokenizer, chat_ids(tokenizer, history), kwargs, out)
        history.append({"role": "assistant", "content": reply.strip()})
        turns += 1
    return {"turns": turns}
