"""benchmarks/bench_train_gpu.py runs its own code on a tiny CPU config (the GPU figures come from a GPU run)."""

import importlib.util
import math
from pathlib import Path


def test_bench_train_gpu_script_runs_tiny_on_cpu(one_thread, capsys):
    path = Path(__file__).parents[1] / "benchmarks" / "bench_train_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_train_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    a = bench.parse_args(["--tiny", "--steps", "1"])
    r = bench.run(a)
    assert len(r["step_times_s"]) == 2 and r["step_s"] > 0 and r["tflops"] > 0
    assert r["trained_weight_bits"] == 4 and all(math.isfinite(x) for x in r["losses"])
    # 6·N·T for the student's forward and backward plus 2·N·T for the teacher forward of the KL loss.
    n = r["matmul_params_b"] * 1e9
    assert abs(r["tflops"] * 1e12 * r["step_s"] - 8 * n * r["tokens_per_step"]) < 1e-3 * 8 * n * r["tokens_per_step"]
    assert bench.main(["--tiny", "--steps", "1"]) == 0
    assert "100-step recipe" in capsys.readouterr().out
