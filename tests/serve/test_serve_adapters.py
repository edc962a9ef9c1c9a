"""The server's adapter manager: with `max_loaded_adapters` the least recently used idle adapter leaves the model
for host memory (and beyond `max_cpu_adapters` for disk), pinned adapters never leave, unknown adapters load on
first use from an allowed folder (with the admin API's path checks) unless auto-loading is off, a reload gives
new requests new weights while a request in flight finishes on the old ones, and /metrics counts all of it.
Every answer is checked against `lorakit generate` with that adapter alone."""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lorakit.models import load_model
from lorakit.serve import ServeConfig, create_app
from support.serving import (
    PROMPTS,
    make_model_and_adapters,
    one_torch_thread,  # noqa: F401  (an autouse fixture)
    reference_texts,
    running,
)

BASE = "base"
ADMIN = "admin-key"
N = 8


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("manager")
    model_dir, folders = make_model_and_adapters(root)
    expected = {name: reference_texts(model_dir, folder, PROMPTS[:2], N) for name, folder in folders.items()}
    return root, model_dir, folders, expected


def serve(files, adapters=("sql", "e2e", "chat"), **settings):
    root, model_dir, folders, _ = files
    model, tokenizer = load_model(str(model_dir), "causal-lm")
    settings = {"adapter_dirs": (root / "adapters",), "admin_key": ADMIN, **settings}
    return create_app(model, tokenizer, ServeConfig(BASE, **settings), {n: folders[n] for n in adapters})


def ask(url: str, model: str, prompt: int = 0, max_tokens: int = N) -> httpx.Response:
    body = {"model": model, "prompt": PROMPTS[prompt], "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def answer(url: str, model: str, prompt: int = 0) -> str:
    response = ask(url, model, prompt)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"].strip()


def tiers(app) -> dict[str, str]:
    registry = app.state.registry
    return {name: registry.tier(name) for name in registry.adapters()}


def samples(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


@pytest.mark.parametrize("max_cpu, evicted_to", [(None, "host"), (0, "disk")])
def test_the_least_recently_used_idle_adapter_leaves_the_model(files, max_cpu, evicted_to):
    expected = files[3]
    app = serve(files, max_loaded_adapters=2, max_cpu_adapters=max_cpu)
    # loaded in the order sql, e2e, chat: sql was used least recently when chat came
    assert tiers(app) == {"sql": evicted_to, "e2e": "model", "chat": "model"}
    with running(app) as url:
        assert answer(url, "e2e") == expected["e2e"][0]
        assert answer(url, "sql") == expected["sql"][0]  # chat (created before e2e's use) leaves
        assert tiers(app) == {"sql": "model", "e2e": "model", "chat": evicted_to}
        assert answer(url, "chat", 1) == expected["chat"][1]  # e2e (used before sql) leaves
        assert tiers(app) == {"sql": "model", "e2e": evicted_to, "chat": "model"}
        assert answer(url, "e2e", 1) == expected["e2e"][1]
        assert tiers(app) == {"sql": evicted_to, "e2e": "model", "chat": "model"}
        metrics = samples(url)
    disk_reads = 1 if evicted_to == "host" else 2  # at start, then again after its host copy was dropped
    assert metrics['lorakit_adapter_loads_total{adapter="e2e",source="disk"}'] == disk_reads
    assert metrics['lorakit_adapter_loads_total{adapter="e2e",source="host"}'] == 2  # at start, and back
    assert metrics['lorakit_adapter_evictions_total{adapter="e2e",to="host"}'] == 1
    assert metrics.get('lorakit_adapter_evictions_total{adapter="e2e",to="disk"}', 0) == disk_reads - 1
    assert metrics['lorakit_adapters{tier="model"}'] == 2 and metrics[f'lorakit_adapters{{tier="{evicted_to}"}}'] == 1


def test_a_pinned_adapter_never_leaves_the_model(files):
    expected = files[3]
    app = serve(files, max_loaded_adapters=2, pinned=("chat",))
    with running(app) as url:
        for name in ["sql", "e2e", "sql", "e2e", "sql"]:
            assert answer(url, name) == expected[name][0]
            assert tiers(app)["chat"] == "model" and tiers(app)[name] == "model"
        assert answer(url, "chat") == expected["chat"][0]
        listed = httpx.get(f"{url}/admin/adapters", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    assert {a["name"]: a["pinned"] for a in listed["adapters"]} == {"sql": False, "e2e": False, "chat": True}


def test_requests_for_many_adapters_wait_for_room_and_all_answer_correctly(files):
    """More adapters in flight than fit the model: each request waits for its adapter's turn, none fails."""
    expected = files[3]
    app = serve(files, max_loaded_adapters=1, max_batch_size=4)
    jobs = [(["sql", "e2e", "chat"][i % 3], i % 2) for i in range(12)]
    with running(app) as url, ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda job: answer(url, *job), jobs))
        metrics = samples(url)
    assert answers == [expected[name][p] for name, p in jobs]
    assert sum(v for k, v in metrics.items() if k.startswith("lorakit_adapter_load_wait_seconds_total")) > 0
    # How many found their adapter on the model depends on arrival order; the gauge is their share, below 1.
    requests = {k: v for k, v in metrics.items() if k.startswith("lorakit_adapter_requests_total")}
    hits = sum(v for k, v in requests.items() if 'on_model="true"' in k)
    assert sum(requests.values()) == len(jobs) and hits < len(jobs)
    assert metrics["lorakit_adapter_hit_rate"] == pytest.approx(hits / len(jobs), rel=1e-5)  # printed to 6 digits


@pytest.fixture
def allowed(files, tmp_path):
    """An allowed folder with a copy of e2e, a link leading outside it, and an adapter whose weights are a link."""
    _, _, folders, _ = files
    root = tmp_path / "allowed"
    shutil.copytree(folders["e2e"], root / "fresh")
    (root / "outside").symlink_to(folders["sql"])
    (root / "linked").mkdir()
    shutil.copy(folders["e2e"] / "adapter_config.json", root / "linked")
    (root / "linked" / "adapter_model.safetensors").symlink_to(folders["e2e"] / "adapter_model.safetensors")
    return root


def test_an_unknown_adapter_in_an_allowed_folder_loads_on_first_use(files, allowed):
    expected = files[3]
    app = serve(files, adapters=("sql",), adapter_dirs=(allowed,))
    with running(app) as url:
        assert answer(url, "fresh") == expected["e2e"][0]
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == [BASE, "sql", "fresh"]
        outside = ask(url, "outside")
        assert outside.status_code == 403 and "leads outside" in outside.json()["error"]["message"]
        linked = ask(url, "linked")
        assert linked.status_code == 403 and "symbolic link" in linked.json()["error"]["message"]
        for name in ("missing", "..", "fresh/..", "../allowed/fresh"):
            assert ask(url, name).status_code == 404
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == [BASE, "sql", "fresh"]
    app = serve(files, adapters=("sql",), adapter_dirs=(allowed,), auto_load=False)
    with running(app) as url:
        assert ask(url, "fresh").status_code == 404


def test_a_reload_serves_new_weights_while_a_request_in_flight_finishes_on_the_old(files, allowed):
    expected = files[3]
    _, _, folders, _ = files
    app = serve(files, adapters=(), adapter_dirs=(allowed,), max_loaded_adapters=1)
    engine, admin = app.state.scheduler.engine, {"Authorization": f"Bearer {ADMIN}"}
    step = engine.step

    def slow_step():  # the stream takes over a second
        time.sleep(0.2)
        return step()

    engine.step = slow_step
    with running(app) as url:
        assert answer(url, "fresh") == expected["e2e"][0]
        body = {"model": "fresh", "prompt": PROMPTS[1], "max_tokens": N, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: {"))
            for name in ("adapter_config.json", "adapter_model.safetensors"):  # new weights: sql's
                shutil.copy(folders["sql"] / name, allowed / "fresh" / name)
            reloaded = httpx.post(f"{url}/admin/adapters/fresh/reload", headers=admin, timeout=60)
            assert reloaded.status_code == 200, reloaded.text
            # the request is still in flight, holding the old version; the new one is on the model for the next
            assert list(app.state.registry.residency.versions) == ["fresh", "fresh@2"]
            rest = [line for line in lines if line.startswith("data: {")]
        text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in [first, *rest])
        assert text.strip() == expected["e2e"][1]  # begun on the old weights, finished on them
        assert answer(url, "fresh") == expected["sql"][0]  # the next request: the new weights
        assert httpx.post(f"{url}/admin/adapters/nope/reload", headers=admin).status_code == 404
        assert list(app.state.registry.residency.versions) == ["fresh@2"]  # the old version has left


def test_an_adapter_that_cannot_be_put_on_the_model_fails_its_request_only(files, monkeypatch):
    expected = files[3]
    app = serve(files, max_loaded_adapters=1)
    registry = app.state.registry
    start = registry.start

    def failing_start(key):
        if key == "e2e":
            raise RuntimeError("out of device memory")
        return start(key)

    monkeypatch.setattr(registry, "start", failing_start)
    with running(app) as url:
        failed = ask(url, "e2e")
        assert failed.status_code == 500
        assert "adapter 'e2e' could not be loaded: out of device memory" in failed.json()["error"]["message"]
        assert answer(url, "sql") == expected["sql"][0]
        assert registry.in_use() == {"sql": 0, "e2e": 0, "chat": 0}
