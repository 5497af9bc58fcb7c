"""A comparison people can look at: the Markdown table and a PNG chart of `spinquant compare` rows.

Rows are the dicts `api.run_compare` builds: method, quant, weights, ppl, `tasks` ({task: {acc, acc_norm,
n}}) when zero-shot tasks ran, and `cost` (runtime/cost.py: size, memory, prefill / decode tokens/s) when
measured. The chart has perplexity per method (log scale: RTN at W4A4 is thousands, a rotation brings it
to tens), with tasks accuracy per task per method, and with cost decode speed against checkpoint size.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import SpinQuantError
from ..io import atomic_path
from .lm_eval_bridge import average_accuracy, main_metric


def task_names(rows: list[dict]) -> list[str]:
    """Tasks in first-seen order across rows."""
    names: list[str] = []
    for r in rows:
        for t in r.get("tasks") or {}:
            if t not in names:
                names.append(t)
    return names


def accuracy_cells(row: dict, tasks: list[str]) -> list[str]:
    """Percent cells of each task's main metric, then the average; '-' where a task did not run."""
    res = row.get("tasks") or {}
    cells = [f"{100 * res[t][main_metric(t)]:.1f}" if t in res else "-" for t in tasks]
    avg = average_accuracy(res) if res else None
    return cells + ([f"{100 * avg:.1f}" if avg is not None else "-"] if tasks else [])


def accuracy_headers(tasks: list[str]) -> list[str]:
    return [f"{t} {main_metric(t)}" for t in tasks] + (["avg"] if tasks else [])


COST_COLUMNS = (("size MiB", "size_bytes"), ("memory MiB", "memory_bytes"), ("prefill tok/s", "prefill_tok_s"),
                ("decode tok/s", "decode_tok_s"))


def cost_headers() -> list[str]:
    return [name for name, _ in COST_COLUMNS]


def cost_cells(row: dict) -> list[str]:
    """Checkpoint size, peak memory (MiB), prefill and decode tokens/s; '-' for a row not measured."""
    c = row.get("cost")
    if not c:
        return ["-"] * len(COST_COLUMNS)
    return [f"{c[key] / 2**20:.1f}" if key.endswith("bytes") else f"{c[key]:.1f}" for _, key in COST_COLUMNS]


def _ratio(ppl: float, fp: float | None) -> str:
    return f"{ppl / fp:.2f}×" if fp and math.isfinite(ppl) else "-"


def comparison_markdown(rows: list[dict], title: str | None = None) -> str:
    """The comparison as a Markdown table (accuracy columns in percent when tasks ran)."""
    tasks = task_names(rows)
    fp = next((r["ppl"] for r in rows if r["method"] == "fp"), None)
    with_cost = any("cost" in r for r in rows)
    head = ["method", "bits", "weights", "perplexity", "vs FP", *accuracy_headers(tasks),
            *(cost_headers() if with_cost else ())]
    lines = [f"**{title}**", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], r["quant"], r["weights"], f"{r['ppl']:.2f}", _ratio(r["ppl"], fp),
                 *accuracy_cells(r, tasks), *(cost_cells(r) if with_cost else ())]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(rows: list[dict], path: str | Path, title: str | None = None, overwrite: bool = False) -> Path:
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(comparison_markdown(rows, title))
    return path


def plot_comparison(rows: list[dict], path: str | Path, title: str | None = None, overwrite: bool = False) -> Path:
    """Bar charts: perplexity per method (log scale), and zero-shot accuracy per task and method if any."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed, none opened
        import matplotlib.pyplot as plt
    except ImportError:
        raise SpinQuantError("--plot needs matplotlib; install it with: pip install 'spinquant[plot]'") from None
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise SpinQuantError(f"--plot writes a PNG file; give it a name ending in .png, not {path.name!r}")
    tasks = task_names(rows)
    labels = [f"{r['method']}\n{r['quant']}" for r in rows]
    colors = plt.get_cmap("tab10").colors
    with_cost = any("cost" in r for r in rows)
    panels = 1 + bool(tasks) + with_cost
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    ppl = [r["ppl"] for r in rows]
    bars = ax.bar(range(len(rows)), ppl, color=[colors[i % len(colors)] for i in range(len(rows))])
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylabel("perplexity (log scale, lower is better)")
    ax.set_title("perplexity")
    for bar, value in zip(bars, ppl):
        ax.annotate(f"{value:.1f}" if value < 1000 else f"{value:,.0f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 2), textcoords="offset points")
    if tasks:
        ax = axes[0][1]
        names = tasks + ["avg"]
        width = 0.8 / len(rows)
        for i, r in enumerate(rows):
            res = r.get("tasks") or {}
            avg = average_accuracy(res)
            values = [100 * res[t][main_metric(t)] if t in res else 0.0 for t in tasks]
            values.append(100 * avg if avg is not None else 0.0)
            xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(names))]
            ax.bar(xs, values, width, label=r["method"], color=colors[i % len(colors)])
        ax.set_xticks(range(len(names)), [f"{t}\n{main_metric(t)}" if t != "avg" else t for t in names])
        ax.set_ylabel("zero-shot accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title("zero-shot accuracy")
        ax.legend(fontsize=8)
    if with_cost:  # speed against size: where each method lands on what it costs to run
        ax = axes[0][panels - 1]
        for i, r in enumerate(rows):
            c = r.get("cost")
            if not c:
                continue
            ax.scatter(c["size_bytes"] / 2**20, c["decode_tok_s"], s=60, color=colors[i % len(colors)], label=r["method"])
            ax.annotate(f"{r['method']} {r['quant']}\nppl {r['ppl']:.1f}, prefill {c['prefill_tok_s']:.0f}/s",
                        (c["size_bytes"] / 2**20, c["decode_tok_s"]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        ax.set_xlabel("checkpoint size (MiB)")
        ax.set_ylabel("decode tokens/s (higher is better)")
        ax.set_title("inference cost")
        top = max((r["cost"]["decode_tok_s"] for r in rows if r.get("cost")), default=1.0)
        right = max((r["cost"]["size_bytes"] / 2**20 for r in rows if r.get("cost")), default=1.0)
        ax.set_ylim(0, top * 1.3)  # room for the labels above the highest point
        ax.set_xlim(0, right * 1.35)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        with atomic_path(path, overwrite=overwrite) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)
    return path
