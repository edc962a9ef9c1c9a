"""Crash safety: a training process killed with SIGKILL at seeded random moments (a checkpoint is written every
step, so many kills land inside one; the first kill waits until a checkpoint is being written), then resumed,
each time until it completes. After every kill each
checkpoint and the run's adapter read back whole, with the mode open() gives, and the final adapter equals an
uninterrupted run's bit for bit."""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.train.checkpoint import CHECKPOINT_DIR, read_state

STEPS = 30
KILLS = 3
TESTS = Path(__file__).resolve().parents[1]
TRAINING = f"""
import sys
import torch
import lorakit
from transformers import LlamaConfig, LlamaForCausalLM
from lorakit.train.data import Collator
from lorakit.train.loop import LoopSettings, train_adapter

sys.path.insert(0, {str(TESTS)!r})
from support.files import random_token_rows

torch.set_num_threads(1)
torch.manual_seed(0)
config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
model = LlamaForCausalLM(config)
lorakit.add_adapter(model, lorakit.LoraConfig(r=2, alpha=4, dropout=0.2, target_modules=["q_proj", "v_proj"]))
rows = random_token_rows(16)
settings = LoopSettings(lr=0.01, max_steps={STEPS}, batch_size=2, seed=3, progress=False, save_every=1)
print("training", flush=True)
train_adapter(model, rows, Collator(0), settings, sys.argv[1], resume=sys.argv[2] == "resume")
print("done", flush=True)
"""


def _start(script: Path, output: Path, resume: bool) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, str(script), str(output), "resume" if resume else "fresh"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdout.readline() == "training\n", process.stderr
    return process


def _finish(process: subprocess.Popen) -> None:
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0 and out == "done\n", err[-2000:]


def _assert_whole(output: Path) -> None:
    """Every checkpoint and the run's adapter (if written yet) read back whole, with open()'s file mode."""
    mode = 0o666 & ~_umask()
    for checkpoint in (output / CHECKPOINT_DIR).glob("step-*"):
        lorakit.read_adapter(checkpoint)
        read_state(checkpoint)
        modes = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in checkpoint.iterdir()}
        assert set(modes.values()) == {mode}, modes
    if any(output.glob("adapter_*")) or any(output.glob(".adapter_*")):
        lorakit.read_adapter(output)


def _wait_for_a_checkpoint_being_written(folder: Path, timeout: float = 30.0) -> None:
    """Return as soon as a checkpoint's temporary folder (a hidden entry) exists under `folder`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if folder.is_dir() and any(entry.name.startswith(".") for entry in os.scandir(folder)):
            return
        time.sleep(0.0005)
    raise AssertionError(f"no checkpoint was being written under {folder} within {timeout} s")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAINING)
    reference = tmp_path / "reference"
    _finish(_start(script, reference, resume=False))

    crashed, moments = tmp_path / "crashed", random.Random(19)
    process = _start(script, crashed, resume=False)
    for kill in range(KILLS):
        if kill == 0:
            _wait_for_a_checkpoint_being_written(crashed / CHECKPOINT_DIR)
        else:
            time.sleep(moments.uniform(0.05, 1.0))
        if process.poll() is not None:  # it finished before this kill
            break
        process.send_signal(signal.SIGKILL)
        process.wait()
        _assert_whole(crashed)
        process = _start(script, crashed, resume=True)
    _finish(process)

    expected = load_file(reference / "adapter_model.safetensors")
    got = load_file(crashed / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected), "the resumed run ended elsewhere"
    steps = sorted(p.name for p in (crashed / CHECKPOINT_DIR).iterdir())
    assert steps[-1] == f"step-{STEPS:06d}" and not any(name.startswith(".") for name in steps)
