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

With `--manager`, the adapter manager instead: a tiny random llama with `--many-adapters` (256) r=8 adapters,
`--requests` requests drawn from a Zipf popularity over them (exponent `--zipf`), run with every adapter on the
model, with `--max-loaded` (16) on the model and the rest in host memory, and with 16 on the model, 64 in host
memory and the rest read from disk on use. Reported per setup: tokens/s, p50 / p99 latency, hit rate, loads,
evictions and the seconds requests waited for loads (JSON in bench/results/serve_manager.json).

    ../shared/tools/quiet .venv/bin/python bench/serve.py --manager --requests 512 --tokens 16
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

import torch

from common import load_average

RESULTS = Path(__file__).parent / "results" / "serve.json"
MANAGER_RESULTS = Path(__file__).parent / "results" / "serve_manager.json"
MODEL = "smollm2-135m"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def make_adapters(model, count: int, folder: Path) -> dict[str, Path]:
    """`count` random r=8 adapters saved in folder (B ≠ 0, small enough to keep the model's text sane)."""
    import lorakit

    generator = torch.Generator().manual_seed(0)
    folders = {}
    for i in range(count):
        name = f"a{i}"
        lorakit.add_adapter(model, lorakit.LoraConfig(r=8, alpha=16, target_modules=TARGETS), name=name)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if f".{name}." in param_name or param_name.endswith(f".{name}"):
                    param.copy_(
                        torch.randn(param.shape, generator=generator) * (0.02 if "lora_B" in param_name else 0.05)
                    )
        folders[name] = lorakit.save_adapter(model, folder / name, name=name)
        lorakit.delete_adapter(model, name)
    return folders


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


# -- the adapter manager: many small adapters, few of them on the model -------------------------------
def tiny_llama() -> torch.nn.Module:
    """A random 4-layer, hidden-64 llama (vocabulary 512): the model is small, so the adapters' loads and
    evictions are a large part of the work."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


class Managed:
    """The server's scheduler and engine in process, with at most `max_loaded` adapters on the model (the least
    recently used idle one moves to host memory) and `max_host` in host memory (more: read from disk again)."""

    def __init__(self, folders: dict[str, Path], args, max_loaded: int | None, max_host: int | None) -> None:
        from lorakit.serve.engine import Engine
        from lorakit.serve.metrics import Metrics
        from lorakit.serve.registry import Registry
        from lorakit.serve.scheduler import Scheduler

        self.metrics = Metrics()
        model = tiny_llama()
        self.registry = Registry(model, "tiny", metrics=self.metrics, max_loaded=max_loaded, max_host=max_host)
        for name, folder in folders.items():
            self.registry.load(name, folder)
        engine = Engine(model, None, 0, args.batch_size)
        self.scheduler = Scheduler(engine, self.registry, self.metrics, max_queue=10_000, wait=args.wait_ms / 1000)
        self.tokens = args.tokens
        self.scheduler.start()

    def submit(self, ids: list[int], adapter: str, on_done: Callable[[], None]) -> None:
        from lorakit.serve.engine import Sampling, Sequence
        from lorakit.serve.scheduler import Request

        key = self.registry.acquire(adapter)  # reads the adapter from disk if its host copy was dropped
        sequence = Sequence(ids, key, Sampling(self.tokens, ignore_eos=True))
        emit = lambda event: event[0] != "token" and on_done()  # noqa: E731
        self.scheduler.submit(Request(sequence, adapter, emit, cold=not self.registry.on_model(key)))

    def counters(self) -> dict[str, float]:
        """Loads, evictions, hit rate and seconds waited for loads, summed over the adapters (from /metrics)."""
        sums: dict[str, float] = {}
        for line in self.metrics.render({}, {}, []).splitlines():
            if line.startswith("lorakit_adapter"):
                name, value = line.rsplit(" ", 1)
                family = name.split("{")[0].removeprefix("lorakit_adapter_").removesuffix("_total")
                label = name.split(",")[-1].rstrip("}").replace('"', "") if "," in name else ""
                key = f"{family}_{label.split('=')[1]}" if label else family
                sums[key] = round(sums.get(key, 0.0) + float(value), 3)
        return sums

    def close(self) -> None:
        self.scheduler.stop()


def run_manager(args) -> None:
    """256 adapters, requests for them drawn from a Zipf popularity: all on the model, or 16 with the rest in
    host memory, or 16 on the model, 64 in host memory and the rest read from disk on use."""
    import random

    from tqdm.auto import tqdm

    from lorakit.atomic import atomic_write

    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    names = [f"a{k}" for k in range(args.many_adapters)]
    popularity = [1 / (k + 1) ** args.zipf for k in range(len(names))]
    requests = [
        ([rng.randrange(3, 512) for _ in range(32)], name) for name in rng.choices(names, popularity, k=args.requests)
    ]
    setups = [("all on the model", None, None), (f"{args.max_loaded} on the model", args.max_loaded, None)]
    setups.append(
        (f"{args.max_loaded} on the model, {4 * args.max_loaded} in host memory", args.max_loaded, 4 * args.max_loaded)
    )
    rows = []
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_adapters(tiny_llama(), len(names), Path(tmp))
        for label, max_loaded, max_host in setups:
            system = Managed(folders, args, max_loaded, max_host)
            run_load(system, requests[:32], args.concurrency, tqdm(disable=True))  # warm-up
            before = system.counters()
            with tqdm(total=len(requests), desc=label, unit="req", file=sys.stderr) as bar:
                result = run_load(system, requests, args.concurrency, bar)
            after = system.counters()
            system.close()
            counts = {k: round(v - before.get(k, 0.0), 3) for k, v in after.items() if k != "hit_rate"}
            asked = counts.get("requests_true", 0) + counts.get("requests_false", 0)
            counts["hit_rate"] = round(counts.get("requests_true", 0) / asked, 3) if asked else 1.0
            rows.append(
                {
                    "setup": label,
                    "max_loaded_adapters": max_loaded,
                    "max_cpu_adapters": max_host,
                    **result,
                    "tokens_per_s": round(len(requests) * args.tokens / result["seconds"], 1),
                    **counts,
                    "load_average": load_average()[0],
                }
            )
    report = {
        "model": "random llama: 4 layers, hidden 64, vocabulary 512",
        "adapters": f"{len(names)} x r=8, alpha=16 on q,k,v,o, random A and B",
        "popularity": f"Zipf, exponent {args.zipf}",
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "results": rows,
    }
    output = args.output or MANAGER_RESULTS
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(output, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n"))
    print(f"\n{args.requests} requests x {args.tokens} tokens over {len(names)} adapters (Zipf {args.zipf})")
    print(f"{'setup':<40}{'tokens/s':>10}{'p50 s':>8}{'p99 s':>8}{'loads':>7}{'evictions':>10}")
    for r in rows:
        print(
            f"{r['setup']:<40}{r['tokens_per_s']:>10}{r['p50_s']:>8}{r['p99_s']:>8}"
            f"{r.get('loads_host', 0):>7g}{r.get('evictions_host', 0):>10g}"
        )
    print(f"written to {output}")


def _median_ms(step: Callable[[], object], steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 1)


# -- the load ------------------------------------------------------------------------------------
def run_load(system, requests: list[tuple[list[int], str]], concurrency: int, progress) -> dict:
    """Closed loop: `concurrency` clients, each sending its next request when the previous one is answered."""
    pending = deque(enumerate(requests))
    latencies: list[float] = []
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if not pending:
                    return
                _, (ids, adapter) = pending.popleft()
            done = threading.Event()
            start = time.perf_counter()
            system.submit(ids, adapter, done.set)
            done.wait()
            with lock:
                latencies.append(time.perf_counter() - start)
                progress.update(1)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    latencies.sort()
    return {
        "seconds": round(seconds, 2),
        "p50_s": round(statistics.median(latencies), 3),
        "p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--wait-ms", type=float, default=10.0)
    parser.add_argument("--adapters", default="1,8,32", help="distinct adapters in the load (at most 32)")
    parser.add_argument("--systems", default="lorakit,merge,peft")
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
    parser.add_argument(
        "--output", type=Path, default=None, help=f"default {RESULTS} ({MANAGER_RESULTS} with --manager)"
    )
    parser.add_argument(
        "--manager",
        action="store_true",
        help="instead: the adapter manager (a tiny model, --many-adapters adapters, --max-loaded on the model)",
    )
    parser.add_argument("--many-adapters", type=int, default=256)
    parser.add_argument("--max-loaded", type=int, default=16)
    parser.add_argument("--zipf", type=float, default=1.0, help="exponent of the adapters' Zipf popularity")
    args = parser.parse_args()
    if args.manager:
        run_manager(args)
        return
    args.output = args.output or RESULTS

    from tqdm.auto import tqdm

    from lorakit.atomic import atomic_write
    from lorakit.models import load_model
    from lorakit.train.data import load_builtin

    torch.set_num_threads(args.threads)
    counts = [int(k) for k in args.adapters.split(",")]
    systems = {"lorakit": Lorakit, "merge": Merge, "peft": Peft}
    chosen = [systems[s] for s in args.systems.split(",")] + ([Http] if args.http else [])
    load_before = load_average()
    model, tokenizer = load_model(MODEL, "causal-lm")
    prompts = [
        tokenizer(e.prompt, add_special_tokens=False).input_ids for e in load_builtin("e2e", "validation").examples
    ]
    rows, steps = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_adapters(model, max(counts), Path(tmp))
        # Every system holds its own copy of the model from the start, and the systems take turns at each
        # adapter count: a change in the machine's load during the run then falls on all of them alike.
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
                    {
                        "system": system.name,
                        "adapters": k,
                        "requests": args.requests,
                        "tokens": tokens,
                        **result,
                        "tokens_per_s": round(tokens / result["seconds"], 1),
                        "load_average": load,
                    }
                )
            for system in running:
                if hasattr(system, "decode_ms") and args.decode_steps:
                    steps.append(
                        {
                            "system": system.name,
                            "adapters": k,
                            "batch": args.batch_size,
                            "decode_step_ms": system.decode_ms(prompts, k, args.decode_steps),
                        }
                    )
        for system in running:
            system.close()
    load_after = load_average()

    def rate(system: str, k: int) -> float | None:
        return next((r["tokens_per_s"] for r in rows if r["system"] == system and r["adapters"] == k), None)

    top = max(counts)
    ratios = {}
    if rate("lorakit", top) and rate("lorakit", 1):
        ratios[f"lorakit {top} adapters / lorakit 1 adapter"] = round(rate("lorakit", top) / rate("lorakit", 1), 2)
    if rate("lorakit", top) and rate("peft", top):
        ratios[f"lorakit {top} adapters / peft {top} adapters"] = round(rate("lorakit", top) / rate("peft", top), 2)
    prompt_lengths = [len(prompts[i % len(prompts)]) for i in range(args.requests)]
    report = {
        "model": MODEL,
        "adapters": "r=8, alpha=16 on q,k,v,o, random A and B",
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "settings": {k: v for k, v in vars(args).items() if k != "output"}
        | {"mean_prompt_tokens": round(statistics.mean(prompt_lengths), 1)},
        "results": rows,
        "decode_steps": steps,
        "ratios": ratios,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.output, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n"))

    print(
        f"\n{args.requests} requests x {args.tokens} new tokens, {args.concurrency} in flight, batch <= "
        f"{args.batch_size}; load average {load_before} -> {load_after} on {os.cpu_count()} CPUs"
    )
    print(f"{'system':<14}{'adapters':>9}{'tokens/s':>10}{'p50 s':>8}{'p99 s':>8}{'wall s':>8}{'load':>7}")
    for r in sorted(
        rows, key=lambda r: (list(systems).index(r["system"]) if r["system"] in systems else 9, r["adapters"])
    ):
        print(
            f"{r['system']:<14}{r['adapters']:>9}{r['tokens_per_s']:>10}{r['p50_s']:>8}{r['p99_s']:>8}"
            f"{r['seconds']:>8}{r['load_average']:>7}"
        )
    print(
        f"\none decode step, {args.batch_size} rows: "
        + ", ".join(f"{s['system']} k={s['adapters']} {s['decode_step_ms']} ms" for s in steps)
    )
    for name, value in ratios.items():
        print(f"{name}: {value}")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
