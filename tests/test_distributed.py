"""Distributed rotation training: two gloo processes (FSDP2-sharded model, split batch, averaged gradients)
learn the same rotations as one process with the same global batch and seed."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from spinquant.rotation.sets import Rotations

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")

STEPS, BATCH, SEQ = 3, 4, 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(out: str | None = None) -> Rotations:
    """Tiny llama, W4A4KV4 (RTN mode: clip-searched weights in the loop), a few Cayley steps."""
    from conftest import tiny_model
    from test_train import tiny_train_config

    from spinquant.models import model_parts
    from spinquant.quant.install import install_modules
    from spinquant.rotation.merge import prepare
    from spinquant.rotation.sets import make_rotations
    from spinquant.training.loop import train_rotations

    torch.set_num_threads(1)
    model = tiny_model("llama")
    parts = model_parts(model)
    prepare(parts)
    install_modules(parts, r3=True, r4=True)
    cfg = tiny_train_config(steps=STEPS)
    cfg.train.batch, cfg.train.seq_len, cfg.train.clip_every = BATCH, SEQ, 2
    cfg.device = "cpu"
    init = make_rotations("learned", parts.hidden_size, parts.head_dim, len(parts.layers), seed=cfg.seed)
    calib = torch.randint(0, 96, (STEPS * BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train_rotations(parts, init, cfg, calib_ids=calib, progress=False)
    # The caller's model is untouched by the sharding (FSDP2 worked on a storage-sharing copy).
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())
    assert result.summary["steps"] == STEPS
    if out is not None:
        torch.save({"r1": result.rotations.r1, "r2": result.rotations.r2, "losses": result.losses,
                    "processes": result.summary["processes"]}, out)
    return result.rotations


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from spinquant import distributed

    try:
        _train(os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


def test_two_gloo_processes_learn_the_rotations_of_one(tmp_path, one_thread):
    single = _train()
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["processes"] == 2
    for got in ranks:
        assert (got["r1"] - single.r1).abs().max() <= 1e-5
        for a, b in zip(got["r2"], single.r2, strict=True):
            assert (a - b).abs().max() <= 1e-5
    # Every rank took the very same steps.
    assert torch.equal(ranks[0]["r1"], ranks[1]["r1"])
    assert (single.r1 - make_init_r1()).abs().max() > 1e-3, "R1 did not move: the comparison would be empty"


def make_init_r1() -> torch.Tensor:
    from spinquant.rotation.sets import make_rotations

    return make_rotations("learned", 64, 16, 2, seed=0).r1.float()


def test_torchrun_quantize_cli(tiny_dir, tmp_path, capsys):
    """`torchrun --nproc-per-node 2 -m spinquant quantize --rotation learned` works end to end: rank 0 alone
    prints and writes, and the rotations are those of a single-process run."""
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file

    from spinquant.cli import main

    text = "The quick brown fox jumps over the lazy dog. " * 40
    (tmp_path / "eval.txt").write_text(text)
    (tmp_path / "calib.txt").write_text(text[::-1])
    args = ["quantize", "--model", str(tiny_dir), "--eval-data", str(tmp_path / "eval.txt"), "--calib-data",
            str(tmp_path / "calib.txt"), "--seq-len", "64", "--max-windows", "2", "--rotation", "learned",
            "--train-steps", "2", "--train-seq-len", "32", "--train-batch", "2", "--device", "cpu", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), "-m", "spinquant", *args,
                          "--save-rotation", str(tmp_path / "two.safetensors")],
                         capture_output=True, text=True, env=env, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, run.stdout  # one JSON object: rank 1 printed nothing
    assert json.loads(lines[0])["train"]["processes"] == 2
    assert main([*args, "--save-rotation", str(tmp_path / "one.safetensors")]) == 0
    two, one = load_file(tmp_path / "two.safetensors"), load_file(tmp_path / "one.safetensors")
    assert two.keys() == one.keys()
    assert max((two[k] - one[k]).abs().max().item() for k in one) <= 1e-5
