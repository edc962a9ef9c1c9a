"""The server's doors: the admin API wants its own key (the client key does not open it; without an admin key it
is off), the API documentation is off unless asked for and then behind the key, adapter files are read only
inside the allowed folders without following symlinks (also one swapped in after the path was checked), the
event loop keeps answering while a prompt is tokenised, and a non-streamed request whose client disconnects
stops generating."""

from __future__ import annotations

import os
import shutil
import threading
import time

import httpx
import pytest

from lorakit.models import load_model
from lorakit.serve import ServeConfig, create_app
from lorakit.serve.allowed_files import Forbidden, allowed_folder, read_allowed_adapter
from support.serving import (
    PROMPTS,
    make_model_and_adapters,
    one_torch_thread,  # noqa: F401  (an autouse fixture)
    running,
)

KEY, ADMIN = "client-key", "admin-key"
BASE = "base"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    model_dir, folders = make_model_and_adapters(root)
    return root, model_dir, folders


def serve(files, **settings):
    root, model_dir, folders = files
    model, tokenizer = load_model(str(model_dir), "causal-lm")
    config = ServeConfig(BASE, adapter_dirs=(root / "adapters",), **settings)
    return create_app(model, tokenizer, config, {"sql": folders["sql"]})


def bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def test_the_admin_api_wants_the_admin_key_and_is_off_without_one(files):
    with running(serve(files, api_key=KEY, admin_key=ADMIN)) as url:
        body = {"name": "e2e", "path": "e2e"}
        for key in (None, KEY, "wrong"):
            refused = httpx.post(f"{url}/admin/adapters", json=body, headers=bearer(key))
            assert refused.status_code == 401 and "admin key" in refused.json()["error"]["message"]
            assert httpx.delete(f"{url}/admin/adapters/sql", headers=bearer(key)).status_code == 401
        assert httpx.get(f"{url}/v1/models", headers=bearer(ADMIN)).status_code == 401  # and it is no client key
        assert httpx.post(f"{url}/admin/adapters", json=body, headers=bearer(ADMIN)).status_code == 200
        listed = httpx.get(f"{url}/admin/adapters", headers=bearer(ADMIN)).json()["adapters"]
        assert [a["name"] for a in listed] == ["sql", "e2e"]
    with running(serve(files, api_key=KEY)) as url:  # no admin key: off, whatever the request sends
        for key in (None, KEY):
            off = httpx.delete(f"{url}/admin/adapters/sql", headers=bearer(key))
            assert off.status_code == 403 and "--admin-key" in off.json()["error"]["message"]
        assert [m["id"] for m in httpx.get(f"{url}/v1/models", headers=bearer(KEY)).json()["data"]] == [BASE, "sql"]


def test_api_documentation_is_off_by_default_and_behind_the_key_when_on(files):
    paths = ("/docs", "/redoc", "/openapi.json")
    with running(serve(files, api_key=KEY)) as url:
        assert [httpx.get(url + p, headers=bearer(KEY)).status_code for p in paths] == [404, 404, 404]
    with running(serve(files, api_key=KEY, docs=True)) as url:
        assert [httpx.get(url + p).status_code for p in paths] == [401, 401, 401]
        assert [httpx.get(url + p, headers=bearer(KEY)).status_code for p in paths] == [200, 200, 200]
        schema = httpx.get(f"{url}/openapi.json", headers=bearer(KEY)).json()
        assert "/v1/completions" in schema["paths"] and "/openapi.json" not in schema["paths"]


@pytest.fixture
def hostile_root(files, tmp_path):
    """An allowed folder holding adapters whose files or folders are symlinks, and a FIFO as a weights file."""
    _, _, folders = files
    root, outside = tmp_path / "allowed", tmp_path / "outside"
    shutil.copytree(folders["e2e"], outside / "e2e")
    shutil.copytree(folders["e2e"], root / "real")
    (root / "linked-weights").mkdir()
    shutil.copy(folders["e2e"] / "adapter_config.json", root / "linked-weights")
    (root / "linked-weights" / "adapter_model.safetensors").symlink_to(outside / "e2e" / "adapter_model.safetensors")
    (root / "linked-config").mkdir()
    shutil.copy(folders["e2e"] / "adapter_model.safetensors", root / "linked-config")
    (root / "linked-config" / "adapter_config.json").symlink_to(outside / "e2e" / "adapter_config.json")
    (root / "fifo").mkdir()
    shutil.copy(folders["e2e"] / "adapter_config.json", root / "fifo")
    os.mkfifo(root / "fifo" / "adapter_model.safetensors")
    (root / "inner-link").symlink_to(root / "real")  # resolves inside the allowed folder: read as "real"
    return root, outside


@pytest.mark.parametrize(
    "path, message",
    [
        ("linked-weights", "adapter_model.safetensors is a symbolic link"),
        ("linked-config", "adapter_config.json is a symbolic link"),
        ("fifo", "adapter_model.safetensors is not a regular file"),
    ],
)
def test_symlinked_or_special_adapter_files_are_refused(hostile_root, path, message):
    root, _ = hostile_root
    allowed, folder = allowed_folder([root], path)
    with pytest.raises(Forbidden, match=message):
        read_allowed_adapter(allowed, folder, path)


def test_a_link_inside_the_allowed_folder_is_read_as_its_target(hostile_root, files):
    root, _ = hostile_root
    allowed, folder = allowed_folder([root], "inner-link")
    assert folder == root / "real"
    config, tensors = read_allowed_adapter(allowed, folder, "inner-link")
    assert config.r == 2 and tensors


def test_a_folder_swapped_for_a_symlink_after_the_check_is_not_followed(hostile_root):
    root, outside = hostile_root
    shutil.copytree(root / "real", root / "swapped")
    allowed, folder = allowed_folder([root], "swapped")  # checked: a real folder inside the allowed one
    shutil.rmtree(root / "swapped")
    (root / "swapped").symlink_to(outside / "e2e")  # then replaced by a link leading outside
    with pytest.raises(Forbidden, match="holds a symbolic link"):
        read_allowed_adapter(allowed, folder, "swapped")


def test_the_event_loop_answers_while_a_prompt_is_tokenised(files):
    app = serve(files)
    tokenizer = app.state.context.tokenizer
    started = threading.Event()

    class SlowTokenizer(type(tokenizer)):  # tokenising takes a second, as a huge prompt would
        def __call__(self, *args, **kwargs):
            started.set()
            time.sleep(1.0)
            return super().__call__(*args, **kwargs)

    tokenizer.__class__ = SlowTokenizer
    with running(app) as url:
        body = {"model": "sql", "prompt": PROMPTS[0], "max_tokens": 2}
        worker = threading.Thread(target=httpx.post, args=(f"{url}/v1/completions",), kwargs={"json": body})
        worker.start()
        assert started.wait(10)
        begin = time.monotonic()
        assert httpx.get(f"{url}/health").status_code == 200
        assert time.monotonic() - begin < 0.5
        worker.join(30)


def test_a_non_streamed_request_stops_generating_when_its_client_leaves(files):
    app = serve(files, max_tokens=120)
    engine = app.state.scheduler.engine
    steps = []
    step = engine.step

    def slow_step():  # 120 tokens would take 6 s
        steps.append(time.monotonic())
        time.sleep(0.05)
        return step()

    engine.step = slow_step
    with running(app) as url:
        body = {"model": "sql", "prompt": PROMPTS[0], "max_tokens": 120, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=body, timeout=0.5)
        left = time.monotonic()
        for _ in range(250):
            if httpx.get(f"{url}/health").json()["running"] == 0:
                break
            time.sleep(0.02)
        metrics = httpx.get(f"{url}/metrics").text
    assert 'lorakit_requests_total{model="sql",outcome="cancelled"} 1' in metrics
    assert 0 < len(steps) < 40  # it ran, and stopped long before its 120 tokens
    assert len([t for t in steps if t > left + 0.3]) == 0  # no step once the server has seen the client go
