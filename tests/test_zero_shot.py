"""Zero-shot tasks through the CLI (local tasks offline), the lm-eval bridge, and the compare chart."""

import json
import sys

import pytest
import torch
from conftest import byte_tokenizer, tiny_model

from spinquant import RunConfig, quantize
from spinquant.cli import main
from spinquant.evaluation.data import shared_data_dir
from spinquant.evaluation.lm_eval_bridge import SPINQUANT_TASKS, average_accuracy, parse_tasks
from spinquant.evaluation.plot import comparison_markdown
from spinquant.evaluation.scoring import loglikelihoods

torch.set_num_threads(1)
TEXT = "The quick brown fox jumps over the lazy dog. " * 40
needs_tasks = pytest.mark.skipif(shared_data_dir() is None or not (shared_data_dir() / "tasks").is_dir(),
                                 reason="shared task data (../shared/data/tasks) not present")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("zs")
    (d / "eval.txt").write_text(TEXT)
    (d / "calib.txt").write_text(TEXT[::-1])
    return d


def small(files):
    return ["--eval-data", str(files / "eval.txt"), "--seq-len", "64", "--max-windows", "1"]


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_parse_tasks_expands_groups_and_drops_duplicates():
    assert parse_tasks(" piqa, ARC_easy ,piqa,") == ("piqa", "arc_easy")
    assert parse_tasks("spinquant") == SPINQUANT_TASKS and len(SPINQUANT_TASKS) == 8
    assert parse_tasks("local,piqa") == ("piqa", "arc_easy", "hellaswag")
    assert parse_tasks(None) == ()


@needs_tasks
def test_eval_and_quantize_report_tasks(tiny_dir, files, capsys):
    code = main(["eval", "--model", str(tiny_dir), *small(files), "--tasks", "piqa", "--task-limit", "5", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    piqa = last_json(out)["tasks"]["piqa"]
    assert piqa["n"] == 5 and 0 <= piqa["acc"] <= 1 and 0 <= piqa["acc_norm"] <= 1
    assert "zero-shot accuracy" in out
    code = main(["quantize", "--model", str(tiny_dir), *small(files), "--calib-data", str(files / "calib.txt"),
                 "--no-eval", "--tasks", "piqa,arc_easy", "--task-limit", "3", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    tasks = last_json(out)["tasks"]
    assert list(tasks) == ["piqa", "arc_easy"] and all(t["n"] == 3 for t in tasks.values())


@needs_tasks
def test_compare_writes_markdown_and_png_with_accuracy(tiny_dir, files, capsys, tmp_path):
    png = tmp_path / "cmp.png"
    code = main(["compare", "--model", str(tiny_dir), *small(files), "--calib-data", str(files / "calib.txt"),
                 "--methods", "fp,rtn,hadamard", "--tasks", "piqa", "--task-limit", "4", "--plot", str(png), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = last_json(out)
    assert [r["tasks"]["piqa"]["n"] for r in result["rows"]] == [4, 4, 4]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    md = (tmp_path / "cmp.md").read_text()
    assert "| method | bits | weights | perplexity | vs FP | piqa acc | avg |" in md
    assert "| hadamard | W4A4KV4 | rtn |" in md
    assert "piqa acc" in out  # the terminal table has the accuracy column too


def test_compare_plot_without_tasks_and_bad_name(tiny_dir, files, capsys, tmp_path):
    png = tmp_path / "ppl.png"
    code = main(["compare", "--model", str(tiny_dir), *small(files), "--calib-data", str(files / "calib.txt"),
                 "--methods", "fp,rtn", "--plot", str(png)])
    assert code == 0, capsys.readouterr().err
    assert png.is_file() and "piqa" not in (tmp_path / "ppl.md").read_text()
    code = main(["compare", "--model", str(tiny_dir), *small(files), "--plot", str(tmp_path / "chart.jpg")])
    assert code == 2 and "ending in .png" in capsys.readouterr().err


def test_markdown_table_from_rows():
    rows = [{"method": "fp", "quant": "FP", "weights": "-", "ppl": 20.0,
             "tasks": {"piqa": {"acc": 0.6, "acc_norm": 0.62, "n": 10},
                       "hellaswag": {"acc": 0.3, "acc_norm": 0.4, "n": 10}}},
            {"method": "rtn", "quant": "W4A4KV4", "weights": "rtn", "ppl": 2000.0}]
    md = comparison_markdown(rows)
    assert "| piqa acc | hellaswag acc_norm | avg |" in md
    assert "| fp | FP | - | 20.00 | 1.00× | 60.0 | 40.0 | 50.0 |" in md
    assert "| rtn | W4A4KV4 | rtn | 2000.00 | 100.00× | - | - | - |" in md
    assert average_accuracy(rows[0]["tasks"]) == pytest.approx(0.5)


def test_remote_task_without_lm_eval_says_how_to_install(tiny_dir, files, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    code = main(["eval", "--model", str(tiny_dir), *small(files), "--tasks", "piqa,boolq"])
    err = capsys.readouterr().err
    assert code == 2 and "boolq" in err and "pip install 'spinquant[lm-eval]'" in err


def test_lm_eval_hflm_scores_like_our_evaluator():
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from spinquant.evaluation.lm_eval_bridge import hflm

    model, tok = tiny_model("llama", vocab_size=260), byte_tokenizer()
    quantize(model, tok, RunConfig(), progress=False)  # W4A4KV4 with R3/R4: HFLM runs our modules as they are
    lm = hflm(model, tok, batch_size=2)
    requests = [("Question: what is a fox?\nAnswer:", " an animal"), ("The sky is", " blue")]
    theirs = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i)
                               for i, r in enumerate(requests)], disable_tqdm=True)
    ours = loglikelihoods(model, tok, requests, progress=False)
    for (value, _greedy), mine in zip(theirs, ours):
        assert value == pytest.approx(mine, abs=1e-3)


@needs_tasks
def test_lm_eval_task_results_match_the_offline_evaluator(tmp_path, monkeypatch):
    """A local copy of piqa as an lm-eval YAML task: simple_evaluate through our bridge gives our numbers."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from spinquant.evaluation.lm_eval_bridge import run_lm_eval
    from spinquant.evaluation.scoring import zero_shot

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the json builder is local; never ask the hub
    root = shared_data_dir() / "tasks" / "piqa"
    docs = [json.loads(line) for line in (root / "valid.jsonl").read_text().splitlines()[:6]]
    labels = (root / "valid-labels.lst").read_text().split()[:6]
    data = tmp_path / "piqa.jsonl"
    data.write_text("".join(json.dumps({**d, "label": int(y)}) + "\n" for d, y in zip(docs, labels)))
    (tmp_path / "piqa_copy.yaml").write_text(
        "task: piqa_copy\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    validation: {data}\noutput_type: multiple_choice\nvalidation_split: validation\n"
        'doc_to_text: "Question: {{goal}}\\nAnswer:"\ndoc_to_target: label\ndoc_to_choice: "{{[sol1, sol2]}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    # lm-eval refuses continuations longer than the context; the byte tokenizer needs room for piqa's answers.
    model, tok = tiny_model("llama", vocab_size=260, max_position_embeddings=2048), byte_tokenizer()
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    theirs = run_lm_eval(model, tok, ["piqa_copy"], batch_size=4, manager=manager)["piqa_copy"]
    ours = zero_shot(model, tok, ["piqa"], limit=6, progress=False)["piqa"]
    assert theirs == pytest.approx(ours)
