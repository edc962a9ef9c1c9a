"""The cost measurements: the growth of resident memory counts a block's own allocations even after earlier
work freed more than that, the weights' size is the files' size, and latency is the median of timed forward
passes after the warm-up, in milliseconds (against a model whose forward pass takes a known time)."""

from __future__ import annotations

import time

import torch
from torch import nn

from lorakit.methods.measure import PeakRss, forward_latency_ms, weights_bytes

PIECE = 8 * 1024  # floats: 32 KB tensors, below malloc's mmap threshold, so they live on the heap


def test_peak_rss_sees_a_blocks_allocation_after_a_larger_free():
    earlier = [torch.ones(PIECE) for _ in range(9600)]  # 300 MB
    pin = torch.ones(PIECE)  # allocated above them: the heap cannot shrink by itself when they are freed
    del earlier
    with PeakRss(interval=0.005) as peak:  # without returning the freed 300 MB first, the block reuses it unseen
        block = [torch.ones(PIECE) for _ in range(3200)]  # 100 MB
    assert len(block) == 3200 and pin.numel() == PIECE
    assert 90 <= peak.peak_mb - peak.start_mb <= 150


def test_weights_bytes_and_latency(tmp_path, llama, input_ids):
    (tmp_path / "a.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "notes.json").write_text("{}")
    assert weights_bytes(tmp_path) == 1000
    llama.train()
    forward_latency_ms(llama, {"input_ids": input_ids, "labels": input_ids}, repeats=3)
    assert llama.training  # the mode is restored


class Sleeper(nn.Module):
    """A forward pass of known duration: `first` seconds on the first call (the warm-up), then the
    durations of `later` in turn. Takes no labels, and records whether it ran in evaluation mode."""

    def __init__(self, first: float, later: list[float]) -> None:
        super().__init__()
        self.durations = [first, *later]
        self.modes: list[bool] = []

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        time.sleep(self.durations[len(self.modes) - 1])
        return input_ids


def test_latency_is_the_median_after_the_warm_up_in_milliseconds(input_ids):
    model = Sleeper(0.3, [0.01, 0.04, 0.02, 0.2, 0.04])
    model.train()
    latency = forward_latency_ms(model, {"input_ids": input_ids, "labels": input_ids}, repeats=5, warmup=1)
    # Median of 10, 40, 20, 200, 40 ms = 40 ms (their mean would be 62); the 300 ms warm-up is not counted.
    # Sleep overshoots a little, more on a busy machine.
    assert 40 <= latency < 60
    assert model.modes == [False] * 6 and model.training
