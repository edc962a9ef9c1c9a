"""Every limit and bad request of the server: unknown models, out-of-bounds max_tokens and prompts, a full queue,
unsupported options, malformed bodies, the API key, adapter paths outside the allowed folders, and unloading
an adapter that requests still use. A bad request gets a clear 4xx and the requests around it are unaffected."""

from __future__ import annotations

import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
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

KEY = "s3cret"
ADMIN = "adm1n"
BASE = "base"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    model_dir, folders = make_model_and_adapters(root)
    (root / "adapters" / "not-an-adapter").mkdir()
    outside = root / "outside"
    outside.mkdir()
    (root / "adapters" / "escape").symlink_to(folders["e2e"].parent.parent / "model")  # a link leading outside
    model, tokenizer = load_model(str(model_dir), "causal-lm")
    config = ServeConfig(
        BASE,
        max_batch_size=2,
        max_queue=2,
        max_tokens=120,
        max_prompt_tokens=20,
        api_key=KEY,
        admin_key=ADMIN,
        adapter_dirs=(root / "adapters",),
        max_body_bytes=4096,
    )
    app = create_app(model, tokenizer, config, {"sql": folders["sql"]})
    with running(app) as url:
        yield {
            "url": url,
            "app": app,
            "root": root,
            "model_dir": model_dir,
            "folders": folders,
            "client": openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0),
        }


def post(server, path: str, body=None, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server['url']}{path}", json=body, headers=headers, timeout=60, **kwargs)


def wait_for(server, predicate) -> None:
    for _ in range(250):
        if predicate(httpx.get(f"{server['url']}/health").json()):
            return
        threading.Event().wait(0.02)
    raise AssertionError("the server never reached the expected state")


def test_unknown_model_is_404_listing_the_models(server):
    with pytest.raises(openai.NotFoundError, match=r"'nope' does not exist; available models: base, sql"):
        server["client"].completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError, match="available models: base, sql"):
        server["client"].chat.completions.create(model="../sql", messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "request_body, message",
    [
        ({"prompt": "hi", "max_tokens": 121}, "max_tokens=121 is above this server's limit of 120"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
        (
            {"prompt": "The Vaults is a pub " * 8, "max_tokens": 2},
            r"the prompt has 48 tokens; this server accepts at most 20",
        ),
        (
            {"prompt": "The Vaults is a pub " * 3, "max_tokens": 120},
            r"plus max_tokens=120 exceeds the model's context of 128",
        ),
        ({"prompt": "", "max_tokens": 2}, r"the prompt is empty"),
        ({"prompt": ["a", "b", "c"], "max_tokens": 2}, "give 1 to 2 prompts, got 3"),
        ({"prompt": "hi", "n": 2}, "option 'n' is not supported"),
        ({"prompt": "hi", "logprobs": 2}, "option 'logprobs' is not supported"),
        ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "'stop' takes up to 4 strings, got 5"),
        ({"prompt": "hi", "temperature": 3}, "temperature: Input should be less than or equal to 2"),
        ({"max_tokens": 2}, "prompt: Field required"),
    ],
)
def test_bad_completion_requests_are_400_with_the_reason(server, request_body, message):
    response = post(server, "/v1/completions", {"model": "sql", **request_body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert re.search(message, error["message"]), error["message"]


def test_bad_chat_requests_and_bodies(server):
    bad = post(server, "/v1/chat/completions", {"model": "sql", "messages": []})
    assert bad.status_code == 400 and "messages" in bad.json()["error"]["message"]
    bad = post(server, "/v1/chat/completions", {"model": "sql", "messages": [{"role": "robot", "content": "x"}]})
    assert bad.status_code == 400 and "role" in bad.json()["error"]["message"]
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    bad = httpx.post(f"{server['url']}/v1/completions", content=b"{not json", headers=headers)
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]
    too_big = post(server, "/v1/completions", {"model": "sql", "prompt": "x" * 5000})
    assert too_big.status_code == 413 and "larger than 4096 bytes" in too_big.json()["error"]["message"]


def test_api_key_is_required_except_for_health(server):
    no_key = openai.OpenAI(base_url=f"{server['url']}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="missing or wrong API key"):
        no_key.models.list()
    assert post(server, "/v1/completions", {"model": "sql", "prompt": "hi"}, key=None).status_code == 401
    assert httpx.get(f"{server['url']}/metrics").status_code == 401
    assert httpx.post(f"{server['url']}/admin/adapters", json={"name": "x", "path": "sql"}).status_code == 401
    assert httpx.get(f"{server['url']}/health").status_code == 200
    assert [m.id for m in server["client"].models.list().data] == [BASE, "sql"]


def test_full_queue_is_429_and_the_queued_requests_still_complete(server):
    client, registry = server["client"], server["app"].state.registry
    expected = reference_texts(server["model_dir"], server["folders"]["sql"], [PROMPTS[0], PROMPTS[3]], 6)
    with ThreadPoolExecutor(2) as pool:
        with registry.lock:  # the worker cannot admit anything: requests stay queued
            futures = [
                pool.submit(client.completions.create, model="sql", prompt=p, max_tokens=6, temperature=0)
                for p in [PROMPTS[0], PROMPTS[3]]
            ]
            wait_for(server, lambda health: health["queued"] == 2)
            with pytest.raises(openai.RateLimitError, match=r"the queue is full \(2 requests waiting\)"):
                client.completions.create(model="sql", prompt="hi", max_tokens=2)
        assert [f.result(timeout=60).choices[0].text.strip() for f in futures] == expected


def test_bad_requests_do_not_disturb_a_running_stream(server):
    expected = reference_texts(server["model_dir"], server["folders"]["sql"], [PROMPTS[2]], 100)[0]
    client = server["client"]
    stream = client.completions.create(model="sql", prompt=PROMPTS[2], max_tokens=100, temperature=0, stream=True)
    pieces = [next(stream).choices[0].text]
    for body in (
        {"model": "nope", "prompt": "x"},
        {"model": "sql", "prompt": "x" * 30, "max_tokens": 500},
        {"model": "sql", "prompt": ""},
        {"model": "sql"},
    ):
        assert 400 <= post(server, "/v1/completions", body).status_code < 500
    assert post(server, "/admin/adapters", {"name": "evil", "path": "../model"}, key=ADMIN).status_code == 403
    pieces += [chunk.choices[0].text for chunk in stream]
    assert "".join(pieces).strip() == expected


def test_a_client_that_leaves_frees_its_row(server):
    registry = server["app"].state.registry
    body = {"model": "sql", "prompt": PROMPTS[0], "max_tokens": 120, "ignore_eos": True, "stream": True}
    with httpx.stream(
        "POST", f"{server['url']}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, json=body
    ) as response:
        next(response.iter_lines())
        registry.lock.acquire()  # no more steps until the server has seen the client go
    try:
        threading.Event().wait(0.5)
    finally:
        registry.lock.release()
    wait_for(server, lambda health: health["running"] == 0 and health["queued"] == 0)
    metrics = httpx.get(f"{server['url']}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'lorakit_requests_total{model="sql",outcome="cancelled"} 1' in metrics


@pytest.mark.parametrize(
    "path, status, message",
    [
        ("../model", 403, "without '..'"),
        ("escape", 403, "leads outside the allowed adapter folders"),
        ("/etc", 403, "leads outside the allowed adapter folders"),
        ("missing", 404, "no adapter folder 'missing'"),
        ("not-an-adapter", 400, "has no adapter_config.json"),
    ],
)
def test_adapter_loads_outside_the_allowed_folders_are_refused(server, path, status, message):
    response = post(server, "/admin/adapters", {"name": "x", "path": path}, key=ADMIN)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]
    assert "x" not in [m.id for m in server["client"].models.list().data]


def test_load_generate_and_unload_at_run_time(server):
    client, registry = server["client"], server["app"].state.registry
    assert post(server, "/admin/adapters", {"name": "sql", "path": "e2e"}, key=ADMIN).status_code == 409  # taken
    assert post(server, "/admin/adapters", {"name": "a.b", "path": "e2e"}, key=ADMIN).status_code == 400
    absolute = str(server["folders"]["e2e"])
    loaded = post(server, "/admin/adapters", {"name": "e2e-v2", "path": absolute}, key=ADMIN)
    assert loaded.status_code == 200 and loaded.json()["models"] == [BASE, "sql", "e2e-v2"]
    expected = reference_texts(server["model_dir"], server["folders"]["e2e"], [PROMPTS[3]], 6)[0]
    text = client.completions.create(model="e2e-v2", prompt=PROMPTS[3], max_tokens=6, temperature=0).choices[0].text
    assert text.strip() == expected

    # Unloading waits for the request that uses the adapter; meanwhile the adapter takes no new requests.
    with ThreadPoolExecutor(2) as pool:
        with registry.lock:
            pending = pool.submit(
                client.completions.create, model="e2e-v2", prompt=PROMPTS[3], max_tokens=6, temperature=0
            )
            wait_for(server, lambda health: health["queued"] == 1)
            unloading = pool.submit(
                httpx.delete,
                f"{server['url']}/admin/adapters/e2e-v2",
                headers={"Authorization": f"Bearer {ADMIN}"},
                timeout=60,
            )
            threading.Event().wait(0.3)
            assert not unloading.done()
            with pytest.raises(openai.NotFoundError):
                client.completions.create(model="e2e-v2", prompt="hi", max_tokens=2)
        assert pending.result(timeout=60).choices[0].text.strip() == expected
        assert unloading.result(timeout=60).json() == {"unloaded": "e2e-v2", "models": [BASE, "sql"]}
    assert (
        httpx.delete(f"{server['url']}/admin/adapters/e2e-v2", headers={"Authorization": f"Bearer {ADMIN}"}).status_code
        == 404
    )


def test_run_time_loading_is_off_without_adapter_dirs(server, tmp_path):
    model, tokenizer = load_model(str(server["model_dir"]), "causal-lm")
    app = create_app(model, tokenizer, ServeConfig(BASE, admin_key=ADMIN))
    with running(app) as url:
        response = httpx.post(
            f"{url}/admin/adapters",
            json={"name": "x", "path": os.fspath(tmp_path)},
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
    assert response.status_code == 403 and "run time is off" in response.json()["error"]["message"]
