"""benchmarks/bench_train.py runs its own code on a tiny CPU config (the GPU figures come from a GPU run)."""

import importlib.util
import math
from pathlib import Path


def test_bench_train_script_runs_tiny_on_cpu(one_thread, capsys):
    path = Path(__file__).parents[1] / "benchmarks" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    a = bench.parse_args(["--tiny", "--steps", "1", "--variants", "plain,float64,ours"])
    r = bench.run(a)
    plain, f64, ours = r["rows"]
    for row in r["rows"]:
        assert len(row["step_times_s"]) == 2 and row["step_s"] > 0 and row["tflops"] > 0
        assert all(math.isfinite(x) for x in row["losses"])
    assert ours["trained_weight_bits"] == 4 and plain["trained_weight_bits"] == 16
    # 6·N·T for the student's forward and backward plus 2·N·T for the teacher forward of the KL loss;
    # the plain float step has no teacher.
    n, t = ours["matmul_params_b"] * 1e9, ours["tokens_per_step"]
    assert abs(ours["tflops"] * 1e12 * ours["step_s"] - 8 * n * t) < 1e-3 * 8 * n * t
    assert abs(plain["tflops"] * 1e12 * plain["step_s"] - 6 * n * t) < 1e-3 * 6 * n * t
    # Rebuilding W·R in float64 changes the cost, not the step: same batches, nearly the same losses (the
    # tiny model is bf16, where the two ways of forming W·R round differently: a few % of a small KL).
    assert all(abs(x - y) < 0.15 * abs(y) for x, y in zip(f64["losses"], ours["losses"]))
    assert plain["losses"][0] > 10 * ours["losses"][0]  # next-token CE of the float net vs KL to it
    assert bench.main(["--tiny", "--steps", "1", "--profile"]) == 0
    out = capsys.readouterr().out
    assert "100-step recipe" in out and "profile of the last step (ours)" in out
