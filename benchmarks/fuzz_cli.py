"""Adversarial sweep of the CLI: every numeric flag and every path flag with hostile values, on a tiny model.

    python benchmarks/fuzz_cli.py [--json benchmarks/results/fuzz_cli.json]

Each run calls `spinquant.cli.main` in-process and is classified:
  clean      exit 2 and exactly one stderr line "spinquant: error: ..."
  traceback  an exception escaped main() (what a user would see as a traceback)
  accepted   exit 0: the value is legal (listed, to be read by a person: a silent wrong result hides here)
  other      any other exit code or a multi-line error
Needs the test helpers (tests/conftest.py) for the tiny model. Prints a table per class and writes a JSON
record (command, commit, machine, counts, every case).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

from record import write_record  # at the top: the record's load is the one at start

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

NUMBERS = ["-1", "0", "nan", "inf", "-inf", "1e309", "abc", "", "99999999999999999999", "2.5"]
TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def run(argv: list[str]) -> tuple[str, str]:
    from spinquant.cli import main

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except SystemExit as e:  # argparse --help and the like
        code = e.code if isinstance(e.code, int) else 2
    except BaseException as e:  # noqa: BLE001 - that is the finding
        return "traceback", f"{type(e).__name__}: {str(e)[:160]}"
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip() and "warning" not in ln.lower()]
    if code == 0:
        return "accepted", ""
    if code == 2 and len(lines) == 1 and lines[0].startswith("spinquant: error: "):
        return "clean", lines[0][len("spinquant: error: "):][:160]
    return "other", f"exit {code}: " + " | ".join(lines)[:200]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path)
    a = p.parse_args()

    import torch
    from conftest import save_tiny

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="spinquant-fuzz-"))
    tiny = save_tiny(work / "tiny")
    (work / "eval.txt").write_text(TEXT)
    (work / "calib.txt").write_text(TEXT[::-1])
    (work / "empty.txt").write_text("")
    (work / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (work / "a_dir").mkdir()
    base = ["--model", str(tiny), "--eval-data", str(work / "eval.txt"), "--calib-data", str(work / "calib.txt"),
            "--seq-len", "64", "--max-windows", "1"]
    saved = work / "saved"
    assert run(["quantize", *base, "--no-eval", "--output", str(saved)])[0] == "accepted"
    paths = {"missing": str(work / "nope"), "directory": str(work / "a_dir"), "/dev/null": "/dev/null",
             "empty file": str(work / "empty.txt"), "binary file": str(work / "binary.bin"), "empty string": "",
             "~nosuchuser": "~nosuchuser_spq/x"}
    learned = ["--rotation", "learned", "--train-steps", "1", "--train-seq-len", "32", "--train-batch", "1"]
    numeric = {
        ("quantize", f): ["quantize", *base, "--no-eval"] for f in
        ("--w-bits", "--a-bits", "--kv-bits", "--k-bits", "--v-bits", "--w-group", "--a-group", "--a-clip",
         "--kv-clip", "--seq-len", "--max-windows", "--seed", "--task-limit")}
    numeric.update({("quantize gptq", f): ["quantize", *base, "--no-eval", "--weight-quant", "gptq"]
                    for f in ("--gptq-samples", "--gptq-seq-len")})
    numeric.update({("quantize learned", f): ["quantize", *base, "--no-eval", *learned]
                    for f in ("--train-steps", "--train-seq-len", "--train-batch", "--lr", "--train-checkpoint-every")})
    numeric.update({("generate", f): ["generate", str(saved), "hi", "--max-new-tokens", "3"]
                    for f in ("--max-new-tokens", "--temperature", "--seed")})
    numeric.update({("compare", f): ["compare", *base, "--methods", "fp", "--cost-decode", "2", "--cost-prompt", "8"]
                    for f in ("--cost-prompt", "--cost-decode")})
    path_flags = {
        ("quantize", "--model"): ["quantize", *base, "--no-eval"],
        ("quantize", "--eval-data"): ["quantize", *base],
        ("quantize", "--calib-data"): ["quantize", *base, "--no-eval", *learned],
        ("quantize", "--rotation-file"): ["quantize", *base, "--no-eval", "--rotation", "learned"],
        ("quantize", "--resume"): ["quantize", *base, "--no-eval", *learned],
        ("quantize", "--save-rotation"): ["quantize", *base, "--no-eval"],
        ("quantize", "--output"): ["quantize", *base, "--no-eval"],
        ("quantize", "--train-checkpoint"): ["quantize", *base, "--no-eval", *learned],
        ("compare", "--markdown"): ["compare", *base, "--methods", "fp", "--no-cost"],
        ("eval", "model"): ["eval", "--eval-data", str(work / "eval.txt"), "--seq-len", "64"],
        ("generate", "model"): ["generate"],
        ("export", "model"): ["export", "--format", "gguf", "--output", str(work / "x.gguf")],
    }
    cases = []
    t0 = time.time()
    for (cmd, flag), argv in numeric.items():
        for value in NUMBERS:
            cases.append({"command": cmd, "flag": flag, "value": value, "argv": [*argv, flag, value]})
    for (cmd, flag), argv in path_flags.items():
        for label, value in paths.items():
            if flag in ("model",):
                full = [*argv, value] if cmd != "generate" else [*argv, value, "hi"]
            else:
                full = [*argv, flag, value]
            cases.append({"command": cmd, "flag": flag, "value": label, "argv": full})
    for i, case in enumerate(cases):
        print(f"[{i + 1}/{len(cases)}] {case['command']} {case['flag']} {case['value']!r}", file=sys.__stderr__,
              flush=True)
        case["class"], case["message"] = run(case["argv"])
        for leftover in (work / "nope", work / "x.gguf"):
            if leftover.is_dir():
                import shutil

                shutil.rmtree(leftover)
            elif leftover.exists():
                leftover.unlink()
        del case["argv"]
    counts = {k: sum(c["class"] == k for c in cases) for k in ("clean", "traceback", "accepted", "other")}
    print(f"{len(cases)} hostile inputs in {time.time() - t0:.0f}s: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    for klass in ("traceback", "other", "accepted"):
        rows = [c for c in cases if c["class"] == klass]
        if rows:
            print(f"\n{klass}:\n| command | flag | value | message |\n|---|---|---|---|")
            for c in rows:
                print(f"| {c['command']} | {c['flag']} | {c['value']} | {c['message']} |")
    if a.json:
        write_record(a.json, threads=1, counts=counts, cases=cases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
