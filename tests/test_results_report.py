"""benchmarks/RESULTS.md and README's results block are what benchmarks/results/*.json give, and nothing else."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).parents[1] / "benchmarks"


def _report():
    spec = importlib.util.spec_from_file_location("report", BENCH / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_and_readme_regenerate_from_the_records_without_a_diff():
    assert _report().main(["--check"]) == 0, "run python benchmarks/report.py and commit the result"


def test_every_record_says_where_it_came_from_and_is_shown():
    report = _report()
    read = []
    original = report.load

    def tracking(name):
        read.append(name)
        return original(name)

    report.load = tracking
    report.results_md()
    report.readme_block()
    records = sorted(p.stem for p in (BENCH / "results").glob("*.json"))
    assert sorted(set(read)) == records, "a record the report does not show, or a table without a record"
    for name in records:
        rec = json.loads((BENCH / "results" / f"{name}.json").read_text())
        assert rec.get("command"), name
        # A record written by a benchmark names its commit; one carried over from the old notes says so.
        assert rec.get("commit") or rec.get("transcribed") or all(r.get("commit") for r in rec.get("runs", [])), name


def test_the_report_notices_an_edited_figure(tmp_path, monkeypatch):
    report = _report()
    before = report.results_md()
    rec = json.loads((BENCH / "results" / "exactness.json").read_text())
    rec["rows"][0]["saved"] += 1.0
    (tmp_path / "exactness.json").write_text(json.dumps(rec))
    original = report.load
    monkeypatch.setattr(report, "load", lambda name: json.loads((tmp_path / "exactness.json").read_text())
                        if name == "exactness" else original(name))
    after = report.results_md()
    assert after != before and repr(rec["rows"][0]["saved"]) in after


def test_accuracy_targets_are_the_recipes_their_records_measured():
    """`--target spinquant:<bits>` must stay the recipe of the record behind its claim (config.TARGETS)."""
    import shlex

    import pytest

    from spinquant.cli import config_from_args, parse_args

    records = {"spinquant:W4A4KV4": "accuracy_tuned_w4a4", "spinquant:W4A8KV8": "accuracy_tuned_w4a8",
               "spinquant:W4A16": "accuracy_tuned_w4a16"}
    for target, name in records.items():
        path = BENCH / "results" / f"{name}.json"
        if not path.exists():
            pytest.fail(f"{target}: its record {path.name} is missing")
        flags = next(r["flags"] for r in json.loads(path.read_text())["rows"] if r.get("flags"))
        measured = config_from_args(parse_args(["quantize", *shlex.split(flags)]))
        target_cfg = config_from_args(parse_args(["quantize", "--target", target]))
        for part in ("quant", "gptq", "tune", "rotation", "tables"):
            assert getattr(target_cfg, part) == getattr(measured, part), (target, part)


def test_records_say_when_they_read_the_load(monkeypatch):
    """A script that imports record.py late (after its work) must not call its own load the load at start."""
    spec = importlib.util.spec_from_file_location("record", BENCH / "record.py")
    record = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(record)
    assert record._process_age_s() > 0
    monkeypatch.setattr(record, "_AGE_AT_IMPORT", 1.0)
    assert "load_avg_at_start" in record.machine()
    monkeypatch.setattr(record, "_AGE_AT_IMPORT", 600.0)
    machine = record.machine()
    assert "load_avg_at_end" in machine and "load_avg_at_start" not in machine
