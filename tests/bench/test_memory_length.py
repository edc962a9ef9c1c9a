"""bench/memory_length.py's readout of its saved points: the growth per 1,000 tokens along the batch-1 curve (what
says linear or quadratic), checkpointing's step-time cost, failed points, and its shape option. The measurement
itself (a real model in fresh processes, minutes) is run by hand, not here."""

from __future__ import annotations

import argparse

import pytest

from support.bench import bench_module


@pytest.fixture(scope="module")
def memory_length():
    """bench/memory_length.py as a module (the bench scripts import their siblings by bare name)."""
    with bench_module("memory_length") as module:
        yield module


def point(batch_size: int, length: int, mode: str, peak: float | None, step_s: float) -> dict:
    measured = {"peak_above_model_bytes": peak, "step_s": step_s} if peak is not None else None
    row = {"batch_size": batch_size, "length": length, "checkpointing": mode, "steps": 3}
    row["estimate"] = {"tensors_bytes": 1e8, "total_bytes": 2e8}
    return row | ({"measured": measured} if measured else {"failed": "killed"})


def saved(points: list[dict]) -> dict:
    return {
        "model": "smollm2-135m",
        "machine": {"cpu": "CPU", "cpu_flags": ["avx2"], "cpus": 2, "torch": "2", "torch_threads": 2},
        "uptime_before": "up 1 day, load average: 1.00, 1.00, 1.00",
        "uptime_after": "up 1 day, load average: 2.00, 2.00, 2.00",
        "points": points,
    }


def test_growth_per_1000_tokens_and_checkpointing_cost(memory_length):
    # Off: 100 MB + 0.5 MB per token + 100 B × T² → per 1,000 tokens from T0 to T1: 1000 · (0.5e6 + 100 (T0 + T1))
    # = 576.8 MB for 256→512 and 653.6 MB for 512→1024. On: 50 MB + 0.2 MB per token → 200 MB per 1,000 tokens.
    off = [point(1, t, "off", 100e6 + 0.5e6 * t + 100 * t * t, t / 100) for t in (256, 512, 1024)]
    on = [point(1, t, "on", 50e6 + 0.2e6 * t, 1.3 * t / 100) for t in (256, 512, 1024)]
    big = [point(8, 1024, "off", 9e9, 80.0), point(8, 1024, "on", 2e9, 100.0)]
    lines = memory_length.summary(saved(off + on + big))
    assert lines == [
        "Step time, checkpointing on ÷ off: 1 × 256 1.30×, 1 × 512 1.30×, 1 × 1024 1.30×, 8 × 1024 1.25×.",
        "Batch 1, checkpointing off, measured growth per 1,000 tokens: 256→512: 577 MB, 512→1024: 654 MB.",
        "Batch 1, checkpointing on, measured growth per 1,000 tokens: 256→512: 200 MB, 512→1024: 200 MB.",
    ]


def test_a_failed_point_shows_as_failed_and_is_left_out_of_the_readout(memory_length):
    points = [point(1, 256, "off", 3e8, 2.0), point(1, 256, "on", 1e8, 2.5), point(8, 1024, "off", None, 0.0)]
    table = memory_length.markdown(saved(points))
    assert "| 8 × 1024 | off | failed | 100 MB | – | 200 MB | – |" in table
    assert "| 1 × 256 | off | 300 MB | 100 MB | −66.7 % | 200 MB | 2.00 s (3 steps) |" in table
    assert "Step time, checkpointing on ÷ off: 1 × 256 1.25×." in table
    assert "load before: 1.00, 1.00, 1.00, after: 2.00, 2.00, 2.00" in table


def test_shapes_are_batch_x_length(memory_length):
    assert memory_length.shape_arg("8x1024") == (8, 1024)
    assert memory_length.shape_arg("4X512") == (4, 512)
    for bad in ("8*1024", "8x", "0x128", "8x1024x2"):
        with pytest.raises(argparse.ArgumentTypeError, match="BATCHxLENGTH|batch ≥ 1"):
            memory_length.shape_arg(bad)


def test_some_blocks_checkpointed_get_their_own_label_and_cost(memory_length):
    points = [point(8, 1024, "off", 6e9, 100.0), point(8, 1024, "22", 2.4e9, 116.0), point(8, 1024, "27", 1.6e9, 120.0)]
    points[2]["auto_limit_gb"] = 2.5
    table = memory_length.markdown(saved([*points, point(8, 1024, "on", 1.1e9, 122.0)]))
    assert "| 8 × 1024 | first 22 blocks | 2,400 MB |" in table
    assert "| 8 × 1024 | first 27 blocks (auto, --memory-limit 2.5) | 1,600 MB |" in table
    assert "Step time, checkpointing of the first 22 blocks ÷ off: 8 × 1024 1.16×." in table
    assert "Step time, checkpointing of the first 27 blocks ÷ off: 8 × 1024 1.20×." in table
    assert "Step time, checkpointing on ÷ off: 8 × 1024 1.22×." in table
    assert memory_length.checkpointing_of("22") == (True, 22)
    assert memory_length.checkpointing_of("on") == (True, None)
    assert memory_length.checkpointing_of("off") == (False, None)


def test_shape_modes_are_off_on_a_count_or_auto_at_a_limit(memory_length):
    for good in ("off", "on", "22", "auto:2.5"):
        assert memory_length.mode_arg(good) == good
    for bad in ("some", "auto", "auto:0", "auto:x", "-3"):
        with pytest.raises(argparse.ArgumentTypeError, match="off, on, a number of blocks or auto:GB"):
            memory_length.mode_arg(bad)
