"""Perplexity over token windows and offline zero-shot multiple-choice accuracy (lm-eval style)."""

from __future__ import annotations

import contextlib
import inspect
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from spinquant.errors import SpinQuantError
from spinquant.evaluation.data import DATA_DIR_ENV, shared_data_dir


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Switch off dropout for the evaluation, then restore whatever mode the caller had."""
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield
    finally:
        if was_training and hasattr(model, "train"):
            model.train()


def _forward_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Run the model and return [B, T, V] logits, whatever HF-like wrapper it is."""
    kwargs = {}
    forward = getattr(model, "forward", None)
    # A KV cache is useless for scoring; only ask for none when the forward really takes that argument.
    if forward is not None:
        try:
            if "use_cache" in inspect.signature(forward).parameters:
                kwargs["use_cache"] = False
        except (TypeError, ValueError):
            pass
    out = model(input_ids, **kwargs)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out:
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise SpinQuantError(
            f"model returned {type(out).__name__} without logits; evaluate a causal LM that returns `.logits`"
        )
    return logits


def _bar_disable(progress: bool) -> bool | None:
    # tqdm's disable=None hides the bar by itself when stderr is not a terminal (CI logs, pipes).
    return None if progress else True


@torch.no_grad()
def perplexity(
    model: Any,
    windows: torch.Tensor,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> float:
    """exp(mean next-token NLL) over independent windows [n, L], scoring positions 1..L-1 of each."""
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise SpinQuantError(
            f"perplexity needs windows shaped [n>=1, seq_len>=2], got {tuple(windows.shape)}; "
            "build them with spinquant.evaluation.data.tokenize_windows"
        )
    if batch_size < 1:
        raise SpinQuantError(f"batch_size must be positive, got {batch_size}; pass --batch-size 1 or more")
    device = torch.device(device) if device is not None else _model_device(model)
    nll_sum = 0.0  # python floats are float64, so unequal batches combine exactly
    n_tokens = 0
    starts = range(0, windows.shape[0], batch_size)
    with _eval_mode(model):
        for start in tqdm(starts, desc="perplexity", unit="batch", disable=_bar_disable(progress)):
            batch = windows[start : start + batch_size].to(device=device, dtype=torch.long)
            logits = _forward_logits(model, batch)
            batch_nll = 0.0
            # Row by row so the float32 copy of the logits stays one window large.
            for row in range(batch.shape[0]):
                target = batch[row, 1:].to(logits.device)  # a sharded model may return logits elsewhere
                loss = F.cross_entropy(logits[row, :-1].float(), target, reduction="sum")
                batch_nll += float(loss.double())
            if not math.isfinite(batch_nll):
                # Stop at the first bad batch instead of burning the rest of the run.
                _raise_not_finite()
            nll_sum += batch_nll
            n_tokens += batch.shape[0] * (batch.shape[1] - 1)
    ppl = math.exp(nll_sum / n_tokens) if nll_sum / n_tokens < 700 else math.inf
    if not math.isfinite(ppl):
        _raise_not_finite()
    return ppl


def _raise_not_finite() -> None:
    raise SpinQuantError(
        "perplexity is not finite (nan/inf): the quantized model diverged; try more bits or a rotation"
    )


# ----------------------------------------------------------------------------------------------------------
# Zero-shot multiple choice


@dataclass
class MCItem:
    """One multiple-choice question: the prompt, the answer strings (no leading space), the right index."""

    context: str
    choices: list[str]
    gold: int


def _task_path(relative: str) -> Path:
    root = shared_data_dir()
    if root is None:
        raise SpinQuantError(
            f"local task data not found; set {DATA_DIR_ENV} to the shared data folder (it holds tasks/)"
        )
    path = root / "tasks" / relative
    if not path.is_file():
        raise SpinQuantError(
            f"{path} is missing from the shared data folder; restore it or set {DATA_DIR_ENV}"
        )
    return path


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _load_piqa() -> list[MCItem]:
    # lm-eval piqa: "Question: {goal}\nAnswer:" scored against " {sol1}" / " {sol2}".
    docs = _read_jsonl(_task_path("piqa/valid.jsonl"))
    labels = _task_path("piqa/valid-labels.lst").read_text(encoding="utf-8").split()
    if len(labels) != len(docs):
        raise SpinQuantError(
            f"piqa has {len(docs)} questions but {len(labels)} labels; restore the shared piqa files"
        )
    return [
        MCItem(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], int(label))
        for d, label in zip(docs, labels)
    ]


def _load_arc_easy() -> list[MCItem]:
    # lm-eval arc_easy: "Question: {question}\nAnswer:"; the local `query` already holds "Question: ...".
    docs = _read_jsonl(_task_path("arc/ARC-Easy-Test.jsonl"))
    return [MCItem(f"{d['query']}\nAnswer:", list(d["choices"]), int(d["gold"])) for d in docs]


def _capitalize_ctx_b(context: str) -> str:
    """Redo lm-eval's `ctx_b.capitalize()` on an already assembled HellaSwag context.

    The local file joins activity label, ctx_a and ctx_b without capitalizing ctx_b. ctx_b is the unfinished
    sentence at the end, so when the context stops mid-sentence and that last sentence starts in lower case,
    upper-case its first letter. Only the first letter: lower-casing the rest, as str.capitalize would,
    could damage ctx_a text if the guess of where ctx_b starts is wrong.
    """
    if not context or context[-1] in ".!?\"'":
        return context  # a finished sentence: ctx_b was empty, nothing to capitalize
    cut = max(context.rfind(". "), context.rfind("! "), context.rfind("? "), context.find(": "))
    start = cut + 2 if cut >= 0 else 0
    if start < len(context) and context[start].islower():
        return context[:start] + context[start].upper() + context[start + 1 :]
    return context


def _load_hellaswag() -> list[MCItem]:
    # Six lines per item: context, gold index, four endings; markup is already stripped like lm-eval's
    # preprocess(). lm-eval's query is "{activity_label}: {ctx_a} {ctx_b.capitalize()}", endings get " ".
    lines = _task_path("hellaswag/hellaswag_val_full.txt").read_text(encoding="utf-8").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % 6:
        raise SpinQuantError(
            f"hellaswag file has {len(lines)} lines, not a multiple of 6; restore the shared hellaswag file"
        )
    items = []
    for i in range(0, len(lines), 6):
        context = _capitalize_ctx_b(lines[i].strip())
        items.append(MCItem(context, [e.strip() for e in lines[i + 2 : i + 6]], int(lines[i + 1])))
    return items


TASK_LOADERS: dict[str, Callable[[], list[MCItem]]] = {
    "piqa": _load_piqa,
    "arc_easy": _load_arc_easy,
    "hellaswag": _load_hellaswag,
}


def _check_task_name(name: str) -> None:
    if name not in TASK_LOADERS:
        raise SpinQuantError(f"unknown task {name!r}; the local tasks are: {', '.join(TASK_LOADERS)}")


def load_task(name: str, limit: int | None = None) -> list[MCItem]:
    """Load a local task's items in file order; `limit` keeps the first N, as lm-eval's --limit does."""
    _check_task_name(name)
    if limit is not None and limit < 1:
        raise SpinQuantError(f"limit must be positive, got {limit}; pass --limit 1 or more, or omit it")
    items = TASK_LOADERS[name]()
    for n, item in enumerate(items):
        if not 0 <= item.gold < len(item.choices):
            raise SpinQuantError(
                f"{name} item {n} has gold {item.gold} for {len(item.choices)} choices; restore the task file"
            )
    return items[:limit] if limit is not None else items


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def encode_pair(
    tokenizer: Any,
    context: str,
    continuation: str,
    add_special_tokens: bool = False,
    cache: dict[str, list[int]] | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split the way lm-eval's HFLM._encode_pair does.

    Trailing spaces of the context move to the continuation; the continuation tokens are what encoding the
    whole string adds after the context's own tokens, so merges across the boundary go to the answer.
    `cache` memoizes context encodings, which every choice of a question shares.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation, add_special_tokens)
    if cache is None:
        ctx = _encode(tokenizer, context, add_special_tokens)
    else:
        ctx = cache.get(context)
        if ctx is None:
            ctx = cache[context] = _encode(tokenizer, context, add_special_tokens)
    return ctx, whole[len(ctx) :]


def _max_length(model: Any) -> int | None:
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _prefix_token(tokenizer: Any) -> int:
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise SpinQuantError(
        "a context encodes to no tokens and the tokenizer has no BOS/EOS; give it context text"
    )


@torch.no_grad()
def loglikelihoods(
    model: Any,
    tokenizer: Any,
    requests: list[tuple[str, str]],
    batch_size: int = 8,
    add_special_tokens: bool = False,
    progress: bool = True,
    desc: str = "loglikelihood",
) -> list[float]:
    """Sum of log p(continuation tokens | context) for each (context, continuation), batched and padded."""
    if batch_size < 1:
        raise SpinQuantError(f"batch_size must be positive, got {batch_size}; pass --batch-size 1 or more")
    device = _model_device(model)
    max_len = _max_length(model)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = int(pad_id) if pad_id is not None else 0
    inputs: list[list[int]] = []
    targets: list[list[int]] = []
    cache: dict[str, list[int]] = {}
    for context, continuation in requests:
        ctx, cont = encode_pair(tokenizer, context, continuation, add_special_tokens, cache)
        if not ctx:
            ctx = [_prefix_token(tokenizer)]  # lm-eval scores an empty context after a BOS/EOS token
        full = ctx + cont
        if max_len is not None:
            full = full[-(max_len + 1) :]  # keep the end, as lm-eval's left truncation does
        # The last token is only ever a target, never an input.
        inputs.append(full[:-1])
        targets.append(cont[-len(full) + 1 :] if len(cont) >= len(full) else cont)
    # Longest first, as lm-eval does: padding stays small and an out-of-memory shows up on the first batch.
    # An empty continuation scores 0 without running the model.
    order = sorted((i for i in range(len(requests)) if targets[i]), key=lambda i: -len(inputs[i]))
    scores = [0.0] * len(requests)
    with _eval_mode(model):
        batches = range(0, len(order), batch_size)
        for start in tqdm(batches, desc=desc, unit="batch", disable=_bar_disable(progress)):
            idx = order[start : start + batch_size]
            width = max(len(inputs[i]) for i in idx)
            # Right padding needs no attention mask: causal attention never lets real tokens see the pads.
            batch = torch.full((len(idx), width), pad_id, dtype=torch.long)
            for row, i in enumerate(idx):
                batch[row, : len(inputs[i])] = torch.tensor(inputs[i], dtype=torch.long)
            logits = _forward_logits(model, batch.to(device))
            for row, i in enumerate(idx):
                n_cont, length = len(targets[i]), len(inputs[i])
                # Logits at position t predict token t+1, so the continuation's come from the last n_cont.
                logprobs = logits[row, length - n_cont : length].float().log_softmax(-1)
                cont = torch.tensor(targets[i], dtype=torch.long, device=logprobs.device)
                scores[i] = float(logprobs.gather(-1, cont[:, None]).double().sum())
    return scores


@torch.no_grad()
def zero_shot(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    add_special_tokens: bool = False,
) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy on local tasks: {"piqa": {"acc", "acc_norm", "n"}, ...}.

    Scored like lm-eval: acc picks the highest summed log-likelihood of " " + choice; acc_norm divides it by
    the choice's length in characters first. Tokens are encoded without special tokens, lm-eval's HF default
    (set add_special_tokens=True for models that need a BOS, as lm-eval's add_bos_token does).
    """
    for name in tasks:
        _check_task_name(name)
    results: dict[str, dict[str, float]] = {}
    for name in tasks:
        items = load_task(name, limit)
        requests = [(item.context, " " + choice) for item in items for choice in item.choices]
        lls = loglikelihoods(
            model, tokenizer, requests, batch_size, add_special_tokens, progress=progress, desc=name
        )
        acc = acc_norm = 0
        pos = 0
        for item in items:
            k = len(item.choices)
            scores = np.array(lls[pos : pos + k])
            pos += k
            # Character length of the bare choice, exactly lm-eval's completion_len (max 1 avoids 0/0).
            lengths = np.array([float(max(len(c), 1)) for c in item.choices])
            # np.argmax takes the first of equal scores, the same tie rule as lm-eval.
            acc += int(np.argmax(scores) == item.gold)
            acc_norm += int(np.argmax(scores / lengths) == item.gold)
        results[name] = {"acc": acc / len(items), "acc_norm": acc_norm / len(items), "n": len(items)}
    return results
