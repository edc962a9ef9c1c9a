"""The cost measurements: the growth of resident memory counts a block's own allocations even after earlier
work freed more than that, the weights' size is the files' size, and latency is a positive median."""

from __future__ import annotations

import torch

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
    assert forward_latency_ms(llama, {"input_ids": input_ids, "labels": input_ids}, repeats=3) > 0
    assert llama.training  # the mode is restored
