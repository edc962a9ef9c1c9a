"""Data-parallel training with 2 local processes (torchrun, gloo on CPU) on a tiny model: the same global
batch and seed give the same adapter as one process, under DDP and FSDP; a run resumes with another
number of processes; a process that dies makes the launch fail instead of hanging."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lorakit.cli import app
from support.files import save_tiny_llama

ROWS = [
    ("name[The Vaults], eatType[pub]", "The Vaults is a pub."),
    ("name[Blue Spice], near[The Vaults]", "Blue Spice is near The Vaults."),
    ("name[Café Adriatic], priceRange[cheap]", "Café Adriatic is cheap."),
    ("name[The Vaults], area[riverside]", "The Vaults is by the riverside."),
] * 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    model = save_tiny_llama(root / "llama", chat=True)
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps({"input": a, "output": b}) + "\n" for a, b in ROWS))
    return model, data


def args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    # Batches of 5 do not split evenly over 2 processes: the token weighting must still match.
    return [
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--target-modules",
        "q_proj,v_proj,o_proj",
        "--lora-rank",
        "2",
        "--alpha",  # the scale (8) the bf16 tolerances below were set at
        "16",
        "--dropout",
        "0",
        "--batch-size",
        "5",
        "--grad-accum",
        "2",
        "--max-steps",
        "4",
        "--lr",
        "0.02",
        "--eval-examples",
        "3",
        "--eval-every",
        "2",
        "--output",
        str(out),
        "--quiet",
        *extra,
    ]


def torchrun(nproc: int, cli_args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "lorakit",
        *cli_args,
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def assert_same_adapter(a: Path, b: Path) -> None:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    for key in x:
        torch.testing.assert_close(y[key], x[key], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def single(setup, tmp_path_factory) -> Path:
    model, data = setup
    out = tmp_path_factory.mktemp("single") / "run"
    result = CliRunner().invoke(app, args(model, data, out))
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(setup, single, tmp_path, mode):
    model, data = setup
    out = tmp_path / mode
    run = torchrun(2, args(model, data, out, "--distributed", mode))
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_adapter(single, out)
    results = json.loads((out / "results.json").read_text())
    assert results["distributed"]["processes"] == 2 and len(results["distributed"]["peak_rss_mb_per_process"]) == 2
    # Rank 0 alone wrote: one metrics log whose losses equal the single process's.
    mine = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    theirs = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(mine, theirs):
        for key in ("loss", "eval_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4)


def test_resume_with_another_number_of_processes(setup, single, tmp_path):
    model, data = setup
    out = tmp_path / "run"
    run = torchrun(2, args(model, data, out, "--save-every", "2"))
    assert run.returncode == 0, run.stderr[-3000:]
    shutil.rmtree(out / "checkpoints" / "step-000004")  # as if it had stopped after step 2
    result = CliRunner().invoke(app, args(model, data, out, "--save-every", "2", "--resume"))
    assert result.exit_code == 0, result.output
    assert_same_adapter(single, out)


def test_a_dying_process_fails_the_launch(tmp_path):
    script = tmp_path / "die.py"
    script.write_text(
        "import os, sys, time\n"
        "from lorakit.train.distributed import init_parallel\n"
        "parallel = init_parallel('ddp', timeout_s=20)\n"
        "if parallel.rank == 1:\n"
        "    sys.exit(3)\n"
        "parallel.barrier()\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    started = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    assert time.perf_counter() - started < 90


def test_qlora_base_under_ddp(setup, tmp_path):
    model, data = setup
    single_out, ddp_out = tmp_path / "one", tmp_path / "two"
    result = CliRunner().invoke(app, args(model, data, single_out, "--quantize", "nf4"))
    assert result.exit_code == 0, result.output
    run = torchrun(2, args(model, data, ddp_out, "--quantize", "nf4", "--distributed", "ddp"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_adapter(single_out, ddp_out)


def test_ranks_reseed_per_step_so_dropout_resumes_exactly(setup, tmp_path):
    """With dropout on, two processes draw their own masks from (seed, step, rank): stopping after step 2 and
    resuming with two processes gives the uninterrupted run's adapter."""
    model, data = setup
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    extra = ("--dropout", "0.3", "--save-every", "2")
    for out in (whole, resumed):
        run = torchrun(2, args(model, data, out, *extra))
        assert run.returncode == 0, run.stderr[-3000:]
    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    run = torchrun(2, args(model, data, resumed, *extra, "--resume"))
    assert run.returncode == 0, run.stderr[-3000:]
    x, y = (load_file(out / "adapter_model.safetensors") for out in (whole, resumed))
    assert all(torch.equal(x[key], y[key]) for key in x)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_bf16_two_processes_match_one(setup, tmp_path, mode):
    """bf16 autocast over a bf16 base with float32 adapters: FSDP all-gathers in bf16 and reduces in float32
    (its mixed-precision policy), DDP reduces the float32 adapter gradients; both land where one process
    does, within bf16 rounding."""
    model, data = setup
    one, two = tmp_path / "one", tmp_path / "two"
    # Without label smoothing: the tolerance is bf16 rounding over these steps of the plain loss (the smoothed
    # loss's agreement across processes is checked in float32 by test_two_processes_match_one).
    bf16 = ("--precision", "bf16", "--label-smoothing", "0")
    result = CliRunner().invoke(app, args(model, data, one, *bf16))
    assert result.exit_code == 0, result.output
    run = torchrun(2, args(model, data, two, *bf16, "--distributed", mode))
    assert run.returncode == 0, run.stderr[-3000:]
    x, y = (load_file(out / "adapter_model.safetensors") for out in (one, two))
    for key in x:
        assert y[key].dtype == torch.float32
        torch.testing.assert_close(y[key], x[key], rtol=2e-2, atol=2e-3)
