"""Serving many adapters from one base model: throughput and latency of three ways to do it (CPU).

SmolLM2-135M-Instruct with 32 random LoRA adapters (r=8 on q, k, v, o; A and B both nonzero), all loaded.
A closed-loop local client keeps `--concurrency` requests in flight until `--requests` are done; request i
asks adapter i mod k for k = 1, 8 and 32 distinct adapters, with an E2E meaning representation as the prompt and
exactly `--tokens` greedy new tokens (EOS ignored, so every system does the same work). Systems:

- lorakit: the server's own scheduler and engine (`lorakit.serve`) in process: continuous batching, requests for
  different adapters in one batch (base matmuls once, adapters gathered per row), a row-per-sequence KV cache.
- merge: per adapter, merge it into the base weights, generate (transformers `generate`) for the queued requests
  that use it (up to the batch size), unmerge; the next adapter waits. Merging per request with same-adapter
  requests batched together, so at k = 1 this is plain batched `generate`.
- peft: PEFT 0.21.2's mixed-batch inference: batches of queued requests (up to the batch size) through
  `generate(adapter_names=...)`, each batch to completion.

Every system waits up to `--wait-ms` for more requests when idle, and batches at most `--batch-size` rows. Torch
runs on `--threads` threads (default 1: on a machine shared with other work, two threads that wait for each other
at every operation give erratic times).
Reported per system and k: generated tokens per second over the run, p50 / p99 request latency (submit to last
token). With `--http`, lorakit is also measured through its HTTP server and the official openai client.

    nice -n 10 .venv/bin/python bench/serve.py    # about 6 minutes; table on stdout, JSON in bench/results/serve.json
    .venv/bin/python bench/serve.py --requests 128 --tokens 64 --threads 8 --http
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from common import load_average
from serve_load import make_adapters, run_load

RESULTS = Path(__file__).parent / "results" / "serve.json"
MODEL = "smollm2-135m"


# -- the systems: submit(prompt ids, adapter, on_done) from client threads --------------------------
class Lorakit:
    name = "lorakit"

    def __init__(self, model, tokenizer, folders, args) -> None:
        from lorakit.serve.engine import Engine
        from lorakit.serve.metrics import Metrics
        from lorakit.serve.registry import Registry
        from lorakit.serve.scheduler import Scheduler

        self.registry = Registry(model, MODEL)
        for name, folder in folders.items():
            self.registry.load(name, folder)
        self.model, self.tokenizer, self.batch = model, tokenizer, args.batch_size
        engine = Engine(model, tokenizer.eos_token_id, tokenizer.pad_token_id, args.batch_size)
        self.scheduler = Scheduler(engine, self.registry, Metrics(), max_queue=10_000, wait=args.wait_ms / 1000)
        self.tokens = args.tokens
        self.scheduler.start()

    def decode_ms(self, prompts: list[list[int]], k: int, steps: int) -> float:
        """Median time of one decode step (all rows of a full batch, adapters a0..a{k-1} in turn)."""
        from lorakit.serve.engine import Engine, Sampling, Sequence

        engine = Engine(self.model, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, self.batch)
        with self.registry.lock:  # the scheduler is idle; keep it so
            engine.add(
                [
                    Sequence(prompts[i][:16], f"a{i % k}", Sampling(steps + 2, ignore_eos=True))
                    for i in range(self.batch)
                ]
            )
            return _median_ms(engine.step, steps)

    def submit(self, ids: list[int], adapter: str, on_done: Callable[[], None]) -> None:
        from lorakit.serve.engine import Sampling, Sequence
        from lorakit.serve.scheduler import Request

        sequence = Sequence(ids, self.registry.acquire(adapter), Sampling(self.tokens, ignore_eos=True))
        self.scheduler.submit(Request(sequence, adapter, lambda event: event[0] != "token" and on_done()))

    def close(self) -> None:
        self.scheduler.stop()


class _Batcher:
    """A worker thread that takes batches off a queue (`pick` chooses them) and runs `run` on each."""

    def __init__(self, args, pick, run) -> None:
        self.args, self.pick, self.run = args, pick, run
        self.queue: deque = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def submit(self, ids: list[int], adapter: str, on_done: Callable[[], None]) -> None:
        with self.cond:
            self.queue.append((ids, adapter, on_done))
            self.cond.notify()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
                deadline = time.monotonic() + self.args.wait_ms / 1000
                while len(self.queue) < self.args.batch_size and time.monotonic() < deadline:
                    self.cond.wait(deadline - time.monotonic())
                batch = self.pick(self.queue)
            self.run(batch)
            for _, _, on_done in batch:
                on_done()

    def close(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join()


def hf_generate(model, tokenizer, prompts: list[list[int]], tokens: int, **extra) -> None:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    with torch.inference_mode():
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **extra,
        )


class Merge(_Batcher):
    name = "merge"

    def __init__(self, model, tokenizer, folders, args) -> None:
        import lorakit

        for name, folder in folders.items():
            lorakit.load_adapter(model, folder, name=name)

        def pick(queue: deque) -> list:
            adapter = queue[0][1]
            batch = [item for item in queue if item[1] == adapter][: args.batch_size]
            for item in batch:
                queue.remove(item)
            return batch

        def run(batch: list) -> None:
            lorakit.set_adapter(model, batch[0][1])
            lorakit.merge(model)
            try:
                hf_generate(model, tokenizer, [ids for ids, _, _ in batch], args.tokens)
            finally:
                lorakit.unmerge(model)

        super().__init__(args, pick, run)


class Peft(_Batcher):
    name = "peft"

    def __init__(self, model, tokenizer, folders, args) -> None:
        from peft import PeftModel

        names = list(folders)
        peft_model = PeftModel.from_pretrained(model, folders[names[0]], adapter_name=names[0])
        for name in names[1:]:
            peft_model.load_adapter(folders[name], adapter_name=name)
        peft_model.eval()

        def pick(queue: deque) -> list:
            return [queue.popleft() for _ in range(min(len(queue), args.batch_size))]

        def run(batch: list) -> None:
            hf_generate(
                peft_model,
                tokenizer,
                [ids for ids, _, _ in batch],
                args.tokens,
                adapter_names=[adapter for _, adapter, _ in batch],
            )

        self.peft_model, self.tokenizer, self.batch = peft_model, tokenizer, args.batch_size
        super().__init__(args, pick, run)

    def decode_ms(self, prompts: list[list[int]], k: int, steps: int) -> float:
        """Median time of one decode forward pass with a KV cache, as `generate` runs it, for a full batch."""
        names = [f"a{i % k}" for i in range(self.batch)]
        ids = torch.tensor([prompts[i][:16] for i in range(self.batch)])  # same length: no padding needed
        # transformers renamed the cache argument (past_key_values → cache) within 5.x
        cache_arg = (
            "cache"
            if "cache" in inspect.signature(type(self.peft_model.base_model.model).forward).parameters
            else "past_key_values"
        )
        with torch.inference_mode():
            out = self.peft_model(input_ids=ids, use_cache=True, adapter_names=names)
            cache, last = getattr(out, cache_arg), out.logits[:, -1:].argmax(-1)
            position = [ids.shape[1]]

            def step() -> None:
                nonlocal last
                mask = torch.ones(self.batch, position[0] + 1, dtype=torch.long)
                result = self.peft_model(
                    input_ids=last, attention_mask=mask, use_cache=True, adapter_names=names, **{cache_arg: cache}
                )
                last = result.logits[:, -1:].argmax(-1)
                position[0] += 1

            return _median_ms(step, steps)


class Http:
    """lorakit through its HTTP server (uvicorn in a thread) and the official openai client."""

    name = "lorakit-http"

    def __init__(self, model, tokenizer, folders, args) -> None:
        import openai
        import uvicorn

        from lorakit.serve import ServeConfig, create_app

        app = create_app(
            model,
            tokenizer,
            ServeConfig(MODEL, max_batch_size=args.batch_size, max_queue=10_000, batch_wait_ms=args.wait_ms),
            folders,
        )
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        self.tokenizer, self.tokens = tokenizer, args.tokens

    def submit(self, ids: list[int], adapter: str, on_done: Callable[[], None]) -> None:
        def ask() -> None:
            self.client.completions.create(
                model=adapter,
                prompt=self.tokenizer.decode(ids),
                temperature=0,
                max_tokens=self.tokens,
                extra_body={"ignore_eos": True},
            )
            on_done()

        threading.Thread(target=ask, daemon=True).start()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join()


SYSTEMS = {"lorakit": Lorakit, "merge": Merge, "peft": Peft}  # by their --systems names


def _median_ms(step: Callable[[], object], steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 1)


# -- the load ------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--wait-ms", type=float, default=10.0)
    parser.add_argument("--adapters", default="1,8,32", help="distinct adapters in the load (at most 32)")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: stable numbers on a shared machine; its core count on a free one)",
    )
    parser.add_argument("--http", action="store_true", help="also measure lorakit through HTTP + openai client")
    parser.add_argument(
        "--decode-steps",
        type=int,
        default=8,
        help="decode steps timed per adapter count (lorakit and peft: one full-batch step)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser.parse_args()


def measure(
    args: argparse.Namespace, model: Any, tokenizer: Any, prompts: list[list[int]]
) -> tuple[list[dict], list[dict]]:
    """Every chosen system under the load of each adapter count: one row per (system, k), and the timed decode
    steps. The random adapters are made on `model` (and removed from it again); every system holds its own copy
    of the model from the start, and the systems take turns at each adapter count: a change in the machine's
    load during the run then falls on all of them alike."""
    from lorakit.models import load_model

    counts = [int(k) for k in args.adapters.split(",")]
    chosen = [SYSTEMS[s] for s in args.systems.split(",")] + ([Http] if args.http else [])
    rows, steps = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_adapters(model, max(counts), Path(tmp))
        running = []
        for system_class in chosen:
            system = system_class(load_model(MODEL, "causal-lm")[0], tokenizer, folders, args)
            run_load(system, [(prompts[i], f"a{i % 2}") for i in range(4)], 4, tqdm(disable=True))  # warm-up
            running.append(system)
        for k in counts:
            requests = [(prompts[i % len(prompts)], f"a{i % k}") for i in range(args.requests)]
            for system in running:
                load = load_average()[0]
                with tqdm(total=len(requests), desc=f"{system.name} k={k}", unit="req", file=sys.stderr) as bar:
                    result = run_load(system, requests, args.concurrency, bar)
                tokens = args.requests * args.tokens
                rows.append(
                    {"system": system.name, "adapters": k, "requests": args.requests, "tokens": tokens, **result}
                    | {"tokens_per_s": round(tokens / result["seconds"], 1), "load_average": load}
                )
            for system in running:
                if hasattr(system, "decode_ms") and args.decode_steps:
                    ms = system.decode_ms(prompts, k, args.decode_steps)
                    steps.append({"system": system.name, "adapters": k, "batch": args.batch_size, "decode_step_ms": ms})
        for system in running:
            system.close()
    return rows, steps


def ratios(rows: list[dict], counts: list[int]) -> dict[str, float]:
    """lorakit's throughput with the most adapters over its own with one, and over PEFT's with as many."""

    def rate(system: str, k: int) -> float | None:
        return next((r["tokens_per_s"] for r in rows if r["system"] == system and r["adapters"] == k), None)

    top, out = max(counts), {}
    if rate("lorakit", top) and rate("lorakit", 1):
        out[f"lorakit {top} adapters / lorakit 1 adapter"] = round(rate("lorakit", top) / rate("lorakit", 1), 2)
    if rate("lorakit", top) and rate("peft", top):
        out[f"lorakit {top} adapters / peft {top} adapters"] = round(rate("lorakit", top) / rate("peft", top), 2)
    return out


def print_report(report: dict, output: Path) -> None:
    settings, rows, steps = report["settings"], report["results"], report["decode_steps"]
    print(
        f"\n{settings['requests']} requests x {settings['tokens']} new tokens, {settings['concurrency']} in flight, "
        f"batch <= {settings['batch_size']}; load average {report['load_average_before']} -> "
        f"{report['load_average_after']} on {report['cpus']} CPUs"
    )
    print(f"{'system':<14}{'adapters':>9}{'tokens/s':>10}{'p50 s':>8}{'p99 s':>8}{'wall s':>8}{'load':>7}")
    order = list(SYSTEMS)
    for r in sorted(rows, key=lambda r: (order.index(r["system"]) if r["system"] in order else 9, r["adapters"])):
        print(
            f"{r['system']:<14}{r['adapters']:>9}{r['tokens_per_s']:>10}{r['p50_s']:>8}{r['p99_s']:>8}"
            f"{r['seconds']:>8}{r['load_average']:>7}"
        )
    print(
        f"\none decode step, {settings['batch_size']} rows: "
        + ", ".join(f"{s['system']} k={s['adapters']} {s['decode_step_ms']} ms" for s in steps)
    )
    for name, value in report["ratios"].items():
        print(f"{name}: {value}")
    print(f"written to {output}")


def main() -> None:
    args = parse_args()
    from lorakit.atomic import atomic_write
    from lorakit.models import load_model
    from lorakit.train.data import load_builtin

    torch.set_num_threads(args.threads)
    load_before = load_average()
    model, tokenizer = load_model(MODEL, "causal-lm")
    examples = load_builtin("e2e", "validation").examples
    prompts = [tokenizer(e.prompt, add_special_tokens=False).input_ids for e in examples]
    rows, steps = measure(args, model, tokenizer, prompts)
    prompt_lengths = [len(prompts[i % len(prompts)]) for i in range(args.requests)]
    report = {
        "model": MODEL,
        "adapters": "r=8, alpha=16 on q,k,v,o, random A and B",
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "settings": {k: v for k, v in vars(args).items() if k != "output"}
        | {"mean_prompt_tokens": round(statistics.mean(prompt_lengths), 1)},
        "results": rows,
        "decode_steps": steps,
        "ratios": ratios(rows, [int(k) for k in args.adapters.split(",")]),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.output, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n"))
    print_report(report, args.output)


if __name__ == "__main__":
    main()
