"""One process vs 2-process DDP vs 2-process FSDP on SmolLM2-135M + E2E (LoRA r=8 on q,k,v,o):
training wall time for the same global batches, peak memory per process, and whether the adapters agree.

    python bench/distributed.py [--steps 8] [--batch-size 8]

Prints a table and writes bench/results/distributed.json. Each configuration runs `lorakit train` in
its own process tree, so the memory figures are per process: the peak (ru_maxrss, loading included)
and the resident set after training (what FSDP's sharding lowers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from common import MMAP_THRESHOLD_ENV, machine

RESULTS = Path(__file__).parent / "results"


def run(kind: str, out: Path, steps: int, batch_size: int) -> dict:
    train = [
        "train",
        "--max-steps",
        str(steps),
        "--batch-size",
        str(batch_size),
        "--dropout",
        "0",
        "--eval-examples",
        "2",
        "--eval-every",
        "0",
        "--save-every",
        "0",
        "--output",
        str(out),
        "--quiet",
    ]
    if kind == "1 process":
        command = [sys.executable, "-m", "lorakit", *train]
    else:
        mode = kind.split()[-1].lower()
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "lorakit",
            *train,
            "--distributed",
            mode,
        ]
    threads = os.environ.get("OMP_NUM_THREADS", "1" if kind != "1 process" else str(os.cpu_count()))
    # With the fixed mmap threshold the RSS after training shows what the process still holds (FSDP's shards
    # rather than the loaded model).
    env = {**os.environ, "OMP_NUM_THREADS": threads, **MMAP_THRESHOLD_ENV}
    subprocess.run(command, check=True, capture_output=True, env=env)
    results = json.loads((out / "results.json").read_text())
    spread = results.get("distributed", {})
    return {
        "train_s": results["train"]["wall_time_s"],
        "tokens_per_s": results["train"]["tokens_per_s"],
        "final_loss": results["train"]["final_loss"],
        "peak_rss_mb_per_process": spread.get("peak_rss_mb_per_process", [results["peak_rss_mb"]]),
        "rss_after_training_mb_per_process": spread.get(
            "rss_after_training_mb_per_process", [results["rss_after_training_mb"]]
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("1 process", "2 processes DDP", "2 processes FSDP"):
            out = Path(tmp) / kind.replace(" ", "_")
            rows[kind] = run(kind, out, args.steps, args.batch_size)
            rows[kind]["adapter"] = load_file(out / "adapter_model.safetensors")
        reference = rows["1 process"].pop("adapter")
        for kind in ("2 processes DDP", "2 processes FSDP"):
            adapter = rows[kind].pop("adapter")
            rows[kind]["max_abs_diff_vs_1_process"] = max(
                float((adapter[k] - reference[k]).abs().max()) for k in reference
            )
    base = rows["1 process"]["train_s"]
    print(
        f"{'run':<18} {'train s':>8} {'speed-up':>9} {'tokens/s':>9} {'peak RSS MB':>14} "
        f"{'RSS after MB':>14} {'Δ adapter':>10}"
    )
    for kind, row in rows.items():
        peak = ", ".join(f"{v:.0f}" for v in row["peak_rss_mb_per_process"])
        held = ", ".join(f"{v:.0f}" for v in row["rss_after_training_mb_per_process"])
        diff = row.get("max_abs_diff_vs_1_process", 0.0)
        print(
            f"{kind:<18} {row['train_s']:>8.1f} {base / row['train_s']:>8.2f}x {row['tokens_per_s']:>9.0f} "
            f"{peak:>14} {held:>14} {diff:>10.2e}"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distributed.json").write_text(
        json.dumps({"machine": machine(), "steps": args.steps, "batch_size": args.batch_size, "runs": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
