"""A soak test of a real `lorakit serve` process on a loopback port: dozens of concurrent clients mixing valid
requests (whole and streamed), malformed JSON, oversized bodies, unknown adapters, wrong keys, admin loads and
unloads, and clients that disconnect abruptly, with room for two adapters on the model (the others move to host
memory and back). The server stays up, every valid greedy answer equals
`lorakit generate`'s for its prompt and adapter, and its resident memory after the load is within 10 % of its
level after a warm-up round of the same load. Prints requests/s and p50 / p99 latency."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from support.serving import PROMPTS, free_socket, make_model_and_adapters, reference_texts

KEY, ADMIN = "soak-key", "soak-admin"
BASE = "tiny"
MODELS = [BASE, "sql", "e2e", "chat"]
N = 8  # max_tokens of the valid requests
CLIENTS = 24


def rss_bytes(pid: int) -> int:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("soak")
    model_dir, folders = make_model_and_adapters(root)
    expected = {
        (m, p): text for m in MODELS for p, text in enumerate(reference_texts(model_dir, folders.get(m), PROMPTS, N))
    }
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()  # the server binds it again (SO_REUSEADDR)
    adapters = [f"--adapter={name}={folder}" for name, folder in folders.items()]
    command = [sys.executable, "-m", "lorakit", "serve", "--model", str(model_dir), *adapters]
    command += ["--served-model-name", BASE, "--port", str(port), "--adapter-dir", str(root / "adapters")]
    command += ["--max-batch-size", "16", "--max-tokens", "64", "--max-queue", "512", "--max-loaded-adapters", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORAKIT_API_KEY": KEY, "LORAKIT_ADMIN_KEY": ADMIN}
    url = f"http://127.0.0.1:{port}"
    with open(root / "server.log", "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the server did not start:\n{(root / 'server.log').read_text()}")
                time.sleep(0.1)
            yield {"url": url, "pid": process.pid, "expected": expected, "log": root / "server.log"}
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def job(server, kind: str, rng: random.Random) -> tuple[str, float, bool]:
    """One client action: (kind, seconds, whether the answer was right)."""
    url, auth = server["url"], {"Authorization": f"Bearer {KEY}"}
    model, prompt = rng.choice(MODELS), rng.randrange(len(PROMPTS))
    body = {"model": model, "prompt": PROMPTS[prompt], "max_tokens": N, "temperature": 0}
    expected = server["expected"][(model, prompt)]
    start = time.monotonic()
    if kind == "valid":
        response = httpx.post(f"{url}/v1/completions", json=body, headers=auth, timeout=120)
        ok = response.status_code == 200 and response.json()["choices"][0]["text"].strip() == expected
    elif kind == "stream":
        text = ""
        with httpx.stream(
            "POST", f"{url}/v1/completions", json={**body, "stream": True}, headers=auth, timeout=120
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
        ok = r.status_code == 200 and text.strip() == expected
    elif kind == "disconnect":  # read one event of a long stream, or wait briefly for a whole answer, then leave
        long = {**body, "max_tokens": 60, "ignore_eos": True}
        if rng.random() < 0.5:
            with httpx.stream("POST", f"{url}/v1/completions", json={**long, "stream": True}, headers=auth) as r:
                next(r.iter_lines())
        else:
            with contextlib.suppress(httpx.TimeoutException):
                httpx.post(f"{url}/v1/completions", json=long, headers=auth, timeout=0.05)
        ok = True
    elif kind == "admin":  # load a copy of an adapter, answer with it, unload it
        name = f"tmp{rng.randrange(10**9)}"
        admin = {"Authorization": f"Bearer {ADMIN}"}
        loaded = httpx.post(f"{url}/admin/adapters", json={"name": name, "path": "e2e"}, headers=admin, timeout=120)
        answer = httpx.post(f"{url}/v1/completions", json={**body, "model": name}, headers=auth, timeout=120)
        unloaded = httpx.delete(f"{url}/admin/adapters/{name}", headers=admin, timeout=120)
        right = server["expected"][("e2e", prompt)]
        ok = (loaded.status_code, unloaded.status_code) == (200, 200) and answer.json()["choices"][0][
            "text"
        ].strip() == right
    else:
        status, request = {
            "malformed": (
                400,
                {"content": b'{"model": "sql", "prompt": ', "headers": {**auth, "Content-Type": "application/json"}},
            ),
            "oversized": (413, {"json": {**body, "prompt": "x" * (1 << 20)}, "headers": auth}),
            "unknown": (404, {"json": {**body, "model": "nope"}, "headers": auth}),
            "wrong-key": (401, {"json": body, "headers": {"Authorization": "Bearer wrong"}}),
            "admin-with-client-key": (401, {"json": {"name": "x", "path": "e2e"}, "headers": auth}),
        }[kind]
        path = "/admin/adapters" if kind.startswith("admin") else "/v1/completions"
        ok = httpx.post(f"{url}{path}", timeout=120, **request).status_code == status
    return kind, time.monotonic() - start, ok


KINDS = ["valid"] * 8 + ["stream"] * 4 + ["disconnect"] * 2 + ["admin"]
KINDS += ["malformed", "oversized", "unknown", "wrong-key", "admin-with-client-key"]


def round_of(server, count: int, seed: int) -> list[tuple[str, float, bool]]:
    rng = random.Random(seed)
    kinds = [KINDS[i % len(KINDS)] for i in range(count)]
    rng.shuffle(kinds)
    seeds = [rng.randrange(10**9) for _ in kinds]
    with ThreadPoolExecutor(CLIENTS) as pool:
        return list(pool.map(lambda a: job(server, a[0], random.Random(a[1])), zip(kinds, seeds)))


def settled_rss(server) -> int:
    for _ in range(300):  # the disconnected requests' rows are freed
        health = httpx.get(f"{server['url']}/health").json()
        if health["running"] == health["queued"] == 0:
            break
        time.sleep(0.05)
    return rss_bytes(server["pid"])


@pytest.mark.slow
def test_the_server_survives_a_mixed_hostile_load_with_correct_answers(server):
    warm = round_of(server, 2 * len(KINDS), seed=0)
    assert all(ok for _, _, ok in warm), [kind for kind, _, ok in warm if not ok]
    before = settled_rss(server)
    start = time.monotonic()
    results = round_of(server, 6 * len(KINDS), seed=1)
    seconds = time.monotonic() - start
    after = settled_rss(server)
    assert [kind for kind, _, ok in results if not ok] == []
    assert httpx.get(f"{server['url']}/health").json()["status"] == "ok", server["log"].read_text()
    assert "Traceback" not in server["log"].read_text()
    assert abs(after - before) <= 0.10 * before, (before, after)
    latencies = sorted(s for kind, s, _ in results if kind in ("valid", "stream"))
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(
        f"\nsoak: {len(results)} requests from {CLIENTS} clients in {seconds:.1f} s = {len(results) / seconds:.1f} "
        f"requests/s; valid answers p50 {statistics.median(latencies):.3f} s, p99 {p99:.3f} s; "
        f"RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB"
    )
