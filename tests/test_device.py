"""`lorakit.device`: which device and compute dtype `--device` / `--precision` mean, the one-line error for a
device this machine lacks (exit 2, nothing written, in every command that takes it), and the helpers that
put batches and master weights where they belong. This machine has no GPU: CUDA is faked where needed."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.device import autocast, model_device, resolve_device, resolve_precision, to_device, trainable_to_float32

runner = CliRunner()


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def test_auto_is_the_cpu_here(no_gpu):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("cuda", "--device cuda: no CUDA device is available on this machine"),
        ("cuda:3", "--device cuda:3: no CUDA device is available on this machine"),
        ("mps", "--device mps: this machine has no MPS (Apple GPU) device"),
        ("tpu", "--device tpu: expected one of auto, cpu, cuda, cuda:N, mps"),
        ("cuda:x", "--device cuda:x: expected one of auto, cpu, cuda, cuda:N, mps"),
    ],
)
def test_absent_device_is_a_one_line_error(no_gpu, spec, message):
    with pytest.raises(ValueError) as err:
        resolve_device(spec)
    assert str(err.value) == message


def test_cuda_index_and_local_rank(two_gpus, monkeypatch):
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"^--device cuda:3: cuda:3 does not exist; this machine has 2 CUDA"):
        resolve_device("cuda:3")
    monkeypatch.setenv("LOCAL_RANK", "1")  # under torchrun, cuda is this process's GPU
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index wins


def test_precision(two_gpus, monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_precision("auto", cpu) == torch.float32  # emulated bf16 is slower on this kind of CPU
    assert resolve_precision("bf16", cpu) == torch.bfloat16
    assert resolve_precision("fp16", cpu) == torch.float16
    assert resolve_precision("fp32", gpu) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision("auto", gpu) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_precision("auto", gpu) == torch.float32
    with pytest.raises(ValueError, match=r"^--precision fp8: expected auto, fp32, bf16, fp16$"):
        resolve_precision("fp8", cpu)


def test_autocast_is_nothing_in_fp32():
    a = torch.randn(4, 4)
    with autocast("cpu", torch.float32):
        assert (a @ a).dtype == torch.float32
        assert not torch.is_autocast_enabled("cpu")
    with autocast("cpu", torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16


def test_to_device_and_master_weights():
    batch = to_device({"input_ids": torch.ones(2, 3, dtype=torch.long), "n": 3}, torch.device("meta"))
    assert batch["input_ids"].device.type == "meta" and batch["n"] == 3
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)).to(torch.bfloat16)
    model[0].requires_grad_(False)
    assert trainable_to_float32(model) == 2
    assert [p.dtype for p in model.parameters()] == [torch.bfloat16] * 2 + [torch.float32] * 2
    assert model_device(model) == torch.device("cpu") and model_device(nn.ReLU()) == torch.device("cpu")
    # BitFit: a norm's trained bias makes its frozen weight float32 too (layer_norm needs one dtype for both).
    norm = nn.Sequential(nn.LayerNorm(3), nn.Linear(3, 3)).to(torch.float16)
    norm.requires_grad_(False)
    norm[0].bias.requires_grad_(True)
    norm[1].bias.requires_grad_(True)
    assert trainable_to_float32(norm) == 3
    assert [p.dtype for p in norm.parameters()] == [torch.float32] * 2 + [torch.float16, torch.float32]


@pytest.mark.parametrize(
    "command",
    [
        ["train", "--device", "cuda"],
        ["train", "--device", "cuda:3", "--precision", "bf16"],
        ["eval", "--model", "nowhere", "--device", "mps"],
        ["generate", "hello", "--model", "nowhere", "--device", "cuda"],
        ["merge", "--adapter", "nowhere", "--device", "cuda"],
        ["serve", "--model", "nowhere", "--device", "cuda"],
    ],
)
def test_cli_refuses_an_absent_device(no_gpu, tmp_path, command):
    out = tmp_path / "out"
    extra = ["--output", str(out)] if command[0] in ("train", "eval", "merge") else []
    result = runner.invoke(app, [*command, *extra])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: --device {command[command.index('--device') + 1]}:")
    assert not out.exists()
