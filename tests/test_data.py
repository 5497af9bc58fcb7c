"""Text loading, windowing and calibration sampling in spinquant.evaluation.data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import byte_tokenizer

from spinquant.errors import SpinQuantError
from spinquant.evaluation import data
from spinquant.evaluation.data import calibration_batches, load_text, shared_data_dir, tokenize_windows


class CountingTokenizer:
    """Whitespace-free toy tokenizer: one token per character code, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __len__(self) -> int:
        return 1 << 16

    def __call__(self, text: str, return_tensors: str | None = None, verbose: bool = True) -> dict:
        self.calls += 1
        return {"input_ids": torch.tensor([[ord(c) for c in text]])}


@pytest.fixture
def shared() -> Path:
    root = shared_data_dir()
    if root is None:
        pytest.skip(
            "shared data folder not found (set SPINQUANT_DATA_DIR or put shared/data beside the repo)"
        )
    return root


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # Named sources must come from the local files here, even on a machine with `datasets` and a network.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


# -- shared_data_dir ---------------------------------------------------------------------------------------


def test_shared_data_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("SPINQUANT_DATA_DIR", str(tmp_path))
    assert shared_data_dir() == tmp_path


def test_shared_data_dir_env_not_a_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("SPINQUANT_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(SpinQuantError, match="not a directory; point it at the shared data folder"):
        shared_data_dir()


def test_shared_data_dir_found_beside_repo(shared):
    assert (shared / "wikitext-2-raw" / "wiki.test.raw").is_file()


# -- named sources ----------------------------------------------------------------------------------------


def test_wikitext2_matches_hub_rows_joined(shared):
    raw = shared / "wikitext-2-raw" / "wiki.test.raw"
    sums = {}
    for line in (shared / "SHA256SUMS").read_text().splitlines():
        if line.strip():
            digest, name = line.split()
            sums[name.removeprefix("./")] = digest
    assert hashlib.sha256(raw.read_bytes()).hexdigest() == sums["wikitext-2-raw/wiki.test.raw"]
    lines = raw.read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(lines) == 4358  # one hub row per line

    text = load_text("wikitext2")
    # Hub rows keep their newline, whitespace-only rows become "", rows are joined by "\n\n".
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    assert len(text) == sum(len(row) for row in lines if row.strip()) + 2 * (len(lines) - 1)
    assert text.endswith("and Eddie Pelkey . \n\n\n")


def test_split_hint_selects_wikitext_split(shared):
    valid = load_text("wikitext2-valid")
    assert load_text("wikitext2", split_hint="validation") == valid
    assert load_text("wikitext2", split_hint="test") != valid
    with pytest.raises(SpinQuantError, match="unknown split 'dev' for wikitext2"):
        load_text("wikitext2", split_hint="dev")


def test_wikitext2_train_offline_names_alternatives():
    with pytest.raises(SpinQuantError, match="use wikitext2-valid or c4 or a local text file"):
        load_text("wikitext2-train")


def test_c4_local_sample(shared):
    text = load_text("c4")
    assert text.startswith("Beginners BBQ Class Taking Place in Missoula!")
    assert text.count("\n\n") >= 499  # 500 documents joined by blank lines


# -- local files ------------------------------------------------------------------------------------------


def test_local_text_file_read_verbatim(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("héllo\nworld\n", encoding="utf-8")
    assert load_text(str(path)) == "héllo\nworld\n"


def test_jsonl_joins_text_fields(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": "first doc", "url": "a"}, {"text": "second\ndoc"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_text(str(path)) == "first doc\n\nsecond\ndoc"


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", b"", "is empty; pass a file with text"),
        ("blank.txt", b"  \n\n", "is empty; pass a file with text"),
        ("blob.bin", b"ab\x00\x01cd", "looks binary"),
        ("latin1.txt", "caf\u00e9".encode("latin-1"), "is not UTF-8 text"),
        ("notext.jsonl", b'{"body": "x"}\n', 'has no `text` field; give every line a "text" string'),
        ("badjson.jsonl", b'{"text": "x"}\n{oops\n', "line 2 of .* is not valid JSON"),
        ("emptytext.jsonl", b'{"text": ""}\n', "only empty `text` fields"),
    ],
)
def test_bad_files_raise(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SpinQuantError, match=message):
        load_text(str(path))


def test_missing_file_lists_named_sources(tmp_path):
    with pytest.raises(SpinQuantError) as err:
        load_text(str(tmp_path / "missing.txt"))
    assert "not found; pass an existing text or JSONL file, or one of: wikitext2, wikitext2-valid, c4" in str(
        err.value
    )


def test_directory_rejected(tmp_path):
    with pytest.raises(SpinQuantError, match="is a directory; pass a text or JSONL file"):
        load_text(str(tmp_path))


# -- windows and calibration ------------------------------------------------------------------------------


def test_windows_are_consecutive_and_drop_tail():
    tok = byte_tokenizer()
    text = "abcdefghij" * 10  # 100 bytes + BOS = 101 tokens
    ids = torch.tensor(tok(text)["input_ids"])
    assert ids[0] == tok.bos_token_id  # the tokenizer default adds one BOS at the very start

    windows = tokenize_windows(text, tok, seq_len=16)
    assert windows.shape == (6, 16) and windows.dtype == torch.long
    assert torch.equal(windows.reshape(-1), ids[:96])  # non-overlapping, tail of 5 dropped
    assert tokenize_windows(text, tok, seq_len=16, max_windows=2).shape == (2, 16)
    assert tokenize_windows(text, tok, seq_len=101).shape == (1, 101)


def test_windows_too_short_text():
    with pytest.raises(SpinQuantError, match="text has 6 tokens, fewer than one window of 8; use a smaller"):
        tokenize_windows("short", byte_tokenizer(), seq_len=8)
    with pytest.raises(SpinQuantError, match="seq_len must be a positive integer"):
        tokenize_windows("short", byte_tokenizer(), seq_len=0)


def test_tokenization_is_cached_and_callers_cannot_corrupt_it():
    tok = CountingTokenizer()
    text = "the cache is keyed on text and tokenizer " * 3
    first = tokenize_windows(text, tok, seq_len=10)
    first.zero_()
    second = tokenize_windows(text, tok, seq_len=10)
    calibration_batches(text, tok, seq_len=10, n_samples=2, seed=0)
    assert tok.calls == 1
    assert second[0, 0] == ord("t")
    tokenize_windows(text, CountingTokenizer(), seq_len=10)  # another tokenizer is another cache entry
    assert len(data._TOKEN_CACHE) >= 2


def test_calibration_is_seeded_and_samples_real_windows():
    tok = CountingTokenizer()
    text = "".join(chr(0x4E00 + i) for i in range(500))  # every token distinct, so a window locates itself
    ids = torch.tensor([ord(c) for c in text])
    a = calibration_batches(text, tok, seq_len=32, n_samples=8, seed=3)
    b = calibration_batches(text, tok, seq_len=32, n_samples=8, seed=3)
    c = calibration_batches(text, tok, seq_len=32, n_samples=8, seed=4)
    assert a.shape == (8, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    for row in a:
        start = int(row[0]) - 0x4E00
        assert torch.equal(row, ids[start : start + 32])
    # A text exactly one window long still gives that window.
    one = calibration_batches(text[:32], tok, seq_len=32, n_samples=2, seed=0)
    assert torch.equal(one[0], ids[:32]) and torch.equal(one[1], ids[:32])
