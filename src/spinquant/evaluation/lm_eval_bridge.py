"""Zero-shot tasks: local ones with the offline evaluator, any other through lm-evaluation-harness.

piqa, arc_easy and hellaswag are scored from ../shared/data by `spinquant.evaluation.scoring.zero_shot` (no network).
Every other name goes to lm-eval (an optional extra, imported only when needed), which wraps our in-memory
model in its `HFLM` and downloads the task's data set on first use. The eight tasks of the SpinQuant paper are
`SPINQUANT_TASKS`; `--tasks spinquant` asks for all of them.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from ..errors import SpinQuantError
from .scoring import TASK_LOADERS, zero_shot

SPINQUANT_TASKS = ("arc_easy", "arc_challenge", "boolq", "piqa", "social_iqa", "hellaswag", "openbookqa",
                   "winogrande")
TASK_GROUPS = {"spinquant": SPINQUANT_TASKS, "local": tuple(TASK_LOADERS)}
# The metric people quote per task (lm-eval leaderboard habit): length-normalized where choices differ a lot.
MAIN_METRIC = {"hellaswag": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
INSTALL_HINT = "pip install 'spinquant[lm-eval]'"


def parse_tasks(text: str | None) -> tuple[str, ...]:
    """"arc_easy, piqa" → ("arc_easy", "piqa"); group names expand; duplicates dropped, order kept."""
    if not text:
        return ()
    names: list[str] = []
    for raw in text.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        for n in TASK_GROUPS.get(name, (name,)):
            if n not in names:
                names.append(n)
    return tuple(names)


def main_metric(task: str) -> str:
    return MAIN_METRIC.get(task, "acc")


def lm_eval_available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def _require_lm_eval(tasks: list[str]):
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError:
        raise SpinQuantError(
            f"task(s) {', '.join(tasks)} are not available offline (local: {', '.join(TASK_LOADERS)}); install "
            f"lm-evaluation-harness with: {INSTALL_HINT} (its data sets need network access)"
        ) from None
    return lm_eval


def hflm(model: Any, tokenizer: Any, batch_size: int = 8, add_special_tokens: bool = False) -> Any:
    """lm-eval's HFLM around an already loaded (and possibly quantized) model.

    add_bos_token is passed explicitly so lm-eval tokenizes exactly as our offline evaluator does.
    """
    _require_lm_eval(["(lm-eval)"])
    from lm_eval.models.huggingface import HFLM

    # HFLM logs a warning for every in-memory model ("pretrained is not a str"): expected here, not news.
    logger = logging.getLogger("lm_eval.models.huggingface")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=add_special_tokens)
    finally:
        logger.setLevel(level)


_MANAGER = None


def task_manager(tasks: list[str]) -> Any:
    """lm-eval's task index (it takes a while to build), after checking every name is in it."""
    _require_lm_eval(tasks)
    from lm_eval.tasks import TaskManager

    global _MANAGER
    if _MANAGER is None:
        _MANAGER = TaskManager()  # seconds to build: once per process (check_tasks, then the evaluation)
    manager = _MANAGER
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise SpinQuantError(f"lm-eval has no task {', '.join(unknown)}; see `lm-eval ls tasks` for the names "
                             f"(the SpinQuant eight: {','.join(SPINQUANT_TASKS)})")
    return manager


def run_lm_eval(model: Any, tokenizer: Any, tasks: list[str], limit: int | None = None, batch_size: int = 8,
                add_special_tokens: bool = False, manager: Any = None) -> dict[str, dict[str, float]]:
    """{task: {"acc", "acc_norm", "n"}} from lm-eval's simple_evaluate (zero-shot)."""
    lm_eval = _require_lm_eval(tasks)
    manager = task_manager(tasks) if manager is None else manager
    lm = hflm(model, tokenizer, batch_size, add_special_tokens)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=0, limit=limit, task_manager=manager,
                                      log_samples=False, bootstrap_iters=0)
    except (ConnectionError, OSError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise SpinQuantError(f"lm-eval could not fetch the task data ({first}); it needs network access, or use "
                             f"the local tasks {', '.join(TASK_LOADERS)}") from None
    results: dict[str, dict[str, float]] = {}
    for task in tasks:
        r = out["results"].get(task, {})
        n = out.get("n-samples", {}).get(task, {}).get("effective")
        results[task] = {"acc": float(r.get("acc,none", float("nan"))),
                         "acc_norm": float(r.get("acc_norm,none", r.get("acc,none", float("nan")))),
                         "n": int(n) if n is not None else None}
    return results


def evaluate_tasks(model: Any, tokenizer: Any, tasks: list[str] | tuple[str, ...], limit: int | None = None,
                   batch_size: int = 8, progress: bool = True, add_special_tokens: bool = False
                   ) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy per task, in the order asked: local tasks offline, the rest through lm-eval."""
    tasks = list(tasks)
    local = [t for t in tasks if t in TASK_LOADERS]
    remote = [t for t in tasks if t not in TASK_LOADERS]
    manager = task_manager(remote) if remote else None  # a bad name fails before the local tasks run
    results: dict[str, dict[str, float]] = {}
    if local:
        results.update(zero_shot(model, tokenizer, local, limit=limit, batch_size=batch_size, progress=progress,
                                 add_special_tokens=add_special_tokens))
    if remote:
        results.update(run_lm_eval(model, tokenizer, remote, limit, batch_size, add_special_tokens, manager))
    return {t: results[t] for t in tasks}


def average_accuracy(results: dict[str, dict[str, float]]) -> float | None:
    """Mean of each task's main metric (the paper's 'zero-shot avg')."""
    values = [r[main_metric(t)] for t, r in results.items() if r.get(main_metric(t)) is not None]
    return sum(values) / len(values) if values else None


def standard_error(p: float, n: int) -> float:
    """Binomial standard error sqrt(p(1-p)/n) of an accuracy p over n items (nan for none)."""
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def add_standard_errors(results: dict[str, dict]) -> dict[str, dict]:
    """`evaluate_tasks` results with each task's "stderr": the standard error of its main metric."""
    for task, r in results.items():
        r["stderr"] = standard_error(r[main_metric(task)], int(r.get("n") or 0))
    return results


def check_tasks(tasks: tuple[str, ...]) -> tuple[str, ...]:
    """Fail at once (not after quantizing) when tasks need lm-eval and it is not installed."""
    import importlib.util

    remote = [t for t in tasks if t not in TASK_LOADERS]
    if remote and importlib.util.find_spec("lm_eval") is None:
        _require_lm_eval(remote)
    if remote:
        task_manager(remote)  # an unknown name fails now, not after the quantization and a saved output
    return tasks
