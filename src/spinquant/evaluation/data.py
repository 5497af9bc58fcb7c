"""Text sources for calibration and evaluation, and their tokenized windows.

Named sources resolve to the `datasets` hub copy when it is installed and online, else to the local copies in
`shared/data` (see its README). Anything else is read as a local text or JSON-lines file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from spinquant.errors import SpinQuantError
from spinquant.io import user_path

log = logging.getLogger(__name__)

DATA_DIR_ENV = "SPINQUANT_DATA_DIR"

# The names a user can pass instead of a path; wikitext2 (test) is for evaluation only.
NAMED_SOURCES = ("wikitext2", "wikitext2-valid", "wikitext2-train", "c4")
_OFFERED = "wikitext2, wikitext2-valid, c4"

# Hub split name and local file for each WikiText-2 source; the train split has no local copy.
_WIKITEXT = {
    "wikitext2": ("test", "wikitext-2-raw/wiki.test.raw"),
    "wikitext2-valid": ("validation", "wikitext-2-raw/wiki.valid.raw"),
    "wikitext2-train": ("train", None),
}
# split_hint values accepted for the bare name "wikitext2".
_SPLIT_HINTS = {
    "test": "wikitext2",
    "validation": "wikitext2-valid",
    "valid": "wikitext2-valid",
    "train": "wikitext2-train",
}

_C4_LOCAL = "c4/c4-en-train-00000-docs-0000-0499.jsonl"
_C4_SHARD = "en/c4-train.00000-of-01024.json.gz"
_C4_DOCS = 500  # the local sample is the first 500 documents of that shard

# Documents and wikitext rows are separated by a blank line, as the GPTQ/QuaRot/SpinQuant loaders do.
_JOIN = "\n\n"


def shared_data_dir() -> Path | None:
    """The shared data folder: $SPINQUANT_DATA_DIR, else ../shared/data beside the repo, else found from cwd."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise SpinQuantError(
                f"{DATA_DIR_ENV}={env} is not a directory; point it at the shared data folder or unset it"
            )
        return path
    # src/spinquant/evaluation/data.py -> parents[3] is the repo root when running from a checkout.
    repo_root = Path(__file__).resolve().parents[3]
    candidate = repo_root.parent / "shared" / "data"
    if candidate.is_dir():
        return candidate
    # Installed (site-packages) copies cannot see the checkout, so look around the working directory.
    cwd = Path.cwd().resolve()
    for folder in (cwd, *cwd.parents):
        candidate = folder / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


# Texts read in this process, by source: a pipe (`--calib-data <(...)`) can be read only once, and the
# calibration-vs-evaluation check compares contents before training and evaluation read them again.
_TEXT_CACHE: dict[str, str] = {}


def load_text(source: str, split_hint: str | None = None) -> str:
    """Return the raw text of a named source or a local text/JSONL file.

    `split_hint` ("test", "validation", "train") picks the WikiText-2 split for the bare name "wikitext2"
    (so a calibration caller can ask for "train"); other sources name their data fully and ignore it.
    """
    name = str(source)
    if name == "wikitext2" and split_hint is not None:
        if split_hint not in _SPLIT_HINTS:
            raise SpinQuantError(
                f"unknown split {split_hint!r} for wikitext2; use one of: {', '.join(_SPLIT_HINTS)}"
            )
        name = _SPLIT_HINTS[split_hint]
    if name not in _TEXT_CACHE:
        if name in _WIKITEXT:
            text = _load_wikitext(name)
        elif name == "c4":
            text = _load_c4()
        else:
            text = _read_local(user_path(name))
        _TEXT_CACHE[name] = text
    return _TEXT_CACHE[name]


def _hub_allowed() -> bool:
    """Whether to try `datasets` at all: it must be importable and the hub not switched off."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return False
    try:
        import datasets  # noqa: F401
    except ImportError:
        return False
    return True


def _local_copy(relative: str | None) -> Path | None:
    """The shared-data copy of a named source, if present: byte-identical, so it wins over a download."""
    root = shared_data_dir()
    if relative is None or root is None:
        return None
    path = root / relative
    return path if path.is_file() else None


def _load_wikitext(name: str) -> str:
    split, local = _WIKITEXT[name]
    path = _local_copy(local)
    if path is None and _hub_allowed():
        try:
            from datasets import load_dataset

            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
            return _JOIN.join(rows)
        except Exception as exc:  # noqa: BLE001 - datasets raises many types; any failure means "go local"
            log.info("datasets could not load wikitext %s (%s); using the local copy", split, exc)
    if local is None:
        raise SpinQuantError(
            "wikitext2-train needs the `datasets` package and a network; "
            "use wikitext2-valid or c4 or a local text file for calibration instead"
        )
    path = path or _shared_file(local, name)
    # Rebuild the hub's rows from the raw file: one row per line (newline kept), blank lines as "".
    # Joined with "\n\n" this is exactly the string the usual `"\n\n".join(ds["text"])` evaluation uses.
    with path.open(encoding="utf-8") as f:
        rows = [line if line.strip() else "" for line in f]
    return _JOIN.join(rows)


def _load_c4() -> str:
    local = _local_copy(_C4_LOCAL)
    if local is not None:
        return _read_local(local)
    if _hub_allowed():
        try:
            from datasets import load_dataset

            # Streaming reads only the first documents instead of downloading the whole shard.
            stream = load_dataset(
                "allenai/c4", data_files={"train": _C4_SHARD}, split="train", streaming=True
            )
            docs = [doc["text"] for _, doc in zip(range(_C4_DOCS), stream)]
            if docs:
                return _JOIN.join(docs)
        except Exception as exc:  # noqa: BLE001 - datasets raises many types; any failure means "go local"
            log.info("datasets could not load c4 (%s); using the local sample", exc)
    return _read_local(_shared_file(_C4_LOCAL, "c4"))


def _shared_file(relative: str, name: str) -> Path:
    root = shared_data_dir()
    if root is None:
        raise SpinQuantError(
            f"{name} needs the `datasets` package and a network, or the local shared data folder; "
            f"set {DATA_DIR_ENV} to it (it holds wikitext-2-raw/ and c4/)"
        )
    path = root / relative
    if not path.is_file():
        raise SpinQuantError(
            f"{path} is missing from the shared data folder; restore it or set {DATA_DIR_ENV}"
        )
    return path


def _read_local(path: Path) -> str:
    """Read a local text file, or join the `text` fields of a JSONL file."""
    if not path.exists():
        raise SpinQuantError(
            f"data file {path} not found; pass an existing text or JSONL file, or one of: {_OFFERED}"
        )
    if path.is_dir():
        raise SpinQuantError(f"{path} is a directory; pass a text or JSONL file inside it")
    raw = path.read_bytes()
    if not raw.strip():
        raise SpinQuantError(f"data file {path} is empty; pass a file with text in it")
    if b"\x00" in raw:
        raise SpinQuantError(f"data file {path} looks binary (NUL bytes); pass a UTF-8 text or JSONL file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpinQuantError(
            f"data file {path} is not UTF-8 text (byte {exc.start}); pass a UTF-8 text or JSONL file"
        ) from None
    if path.suffix.lower() == ".jsonl":
        text = _join_jsonl(text, path)
        if not text.strip():
            raise SpinQuantError(
                f"data file {path} has only empty `text` fields; pass a file with text in it"
            )
    return text


def _join_jsonl(text: str, path: Path) -> str:
    docs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError:
            raise SpinQuantError(
                f"line {lineno} of {path} is not valid JSON; fix it or pass a plain text file"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise SpinQuantError(
                f'line {lineno} of {path} has no `text` field; give every line a "text" string '
                "or pass a plain text file"
            )
        try:
            record["text"].encode("utf-8")
        except UnicodeEncodeError as exc:  # a "\\ud800" escape: valid JSON, but no tokenizer can encode it
            raise SpinQuantError(
                f"line {lineno} of {path} holds invalid Unicode ({exc.object[exc.start]!r}, a lone surrogate); "
                "fix the file"
            ) from None
        docs.append(record["text"])
    return _JOIN.join(docs)


def same_text_source(a: str, b: str) -> bool:
    """Whether two data sources hold the same text, however each is named: the same name, or the same
    content (a built-in name and a path to its file, a copy, a symlink, a pipe). Contents are compared by
    digest once both can be read here (read once per process, see load_text); where one cannot (no
    network, no local copy), the names decide and the run fails later on reading it anyway."""
    a, b = str(a), str(b)
    if a == b:
        return True
    try:
        return bool(_content_digests(a) & _content_digests(b))
    except SpinQuantError:
        return False


def _content_digests(source: str) -> set[str]:
    """Digests of the text a source yields and, for a named source, of its local file as stored (the
    WikiText-2 loader rebuilds rows, so the file's bytes differ from the text it returns)."""
    digests = {_digest(load_text(source))}
    local = {**{k: v[1] for k, v in _WIKITEXT.items()}, "c4": _C4_LOCAL}.get(source)
    path = _local_copy(local) if local else None
    if path is not None:
        digests.add(_digest(path.read_text(encoding="utf-8")))
    return digests


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def check_calibration_differs(calib: str, eval_data: str, what: str = "calibration data") -> None:
    """Refuse calibrating on the evaluation text (it inflates the scores): one check for the CLI, rotation
    training and GPTQ. `what` names the caller's data in the message, e.g. "GPTQ calibration data"."""
    if same_text_source(calib, eval_data):
        same = f"both {calib!r}" if str(calib) == str(eval_data) else f"{calib!r} and {eval_data!r}, the same text"
        raise SpinQuantError(
            f"{what} and evaluation data are {same}; calibrate on other text "
            "(e.g. --calib-data wikitext2-valid or c4)"
        )


# Tokenizing a 1.3 MB corpus takes seconds, and evaluation and calibration often reuse it in one process.
_TOKEN_CACHE: OrderedDict[tuple, tuple[Any, torch.Tensor]] = OrderedDict()
_TOKEN_CACHE_SIZE = 4


def _token_ids(text: str, tokenizer: Any) -> torch.Tensor:
    """Tokenize the whole text once with the tokenizer's defaults; returns a 1-D int64 tensor (cached)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()
    # The id is safe as a key because the entry holds a reference to the tokenizer; the length catches
    # tokens added after the first call.
    key = (digest, id(tokenizer), len(tokenizer) if hasattr(tokenizer, "__len__") else None)
    hit = _TOKEN_CACHE.get(key)
    if hit is not None:
        _TOKEN_CACHE.move_to_end(key)
        return hit[1]
    # Default special tokens on purpose: Llama-style tokenizers then put one BOS at the very start, as the
    # GPTQ/QuaRot/SpinQuant WikiText-2 perplexity does. verbose=False silences the "longer than max length"
    # warning, which is expected here because the text is cut into windows afterwards.
    ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"]
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    _TOKEN_CACHE[key] = (tokenizer, ids)
    while len(_TOKEN_CACHE) > _TOKEN_CACHE_SIZE:
        _TOKEN_CACHE.popitem(last=False)
    return ids


def _check_positive(value: int | None, what: str, flag: str) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise SpinQuantError(f"{what} must be a positive integer, got {value!r}; fix {flag}")


def _ids_for(text: str, tokenizer: Any, seq_len: int, flag: str = "--seq-len") -> torch.Tensor:
    _check_positive(seq_len, "seq_len", flag)
    ids = _token_ids(text, tokenizer)
    if ids.numel() < seq_len:
        raise SpinQuantError(
            f"text has {ids.numel()} tokens, fewer than one window of {seq_len}; "
            f"use a smaller {flag} or more text"
        )
    return ids


def tokenize_windows(text: str, tokenizer: Any, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Cut the tokenized text into consecutive non-overlapping [n, seq_len] windows, dropping the tail."""
    _check_positive(max_windows, "max_windows", "the window limit")
    ids = _ids_for(text, tokenizer, seq_len)
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    # Clone so callers can modify the batch without touching the cached ids.
    return ids[: n * seq_len].view(n, seq_len).clone()


def calibration_batches(text: str, tokenizer: Any, seq_len: int, n_samples: int, seed: int) -> torch.Tensor:
    """Draw n_samples random seq_len windows from the tokenized text (GPTQ-style), reproducible per seed."""
    _check_positive(n_samples, "n_samples", "--gptq-samples or --train-steps")
    ids = _ids_for(text, tokenizer, seq_len, flag="--train-seq-len / --gptq-seq-len")
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
