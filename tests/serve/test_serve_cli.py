"""`lorakit serve` from the command line: bad options end with one line and exit code 2 before anything starts;
a real server process answers the openai client like `lorakit generate` and stops cleanly on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from typer.testing import CliRunner

from lorakit.cli import app
from support.serving import (
    PROMPTS,
    free_socket,
    make_model_and_adapters,
    one_torch_thread,  # noqa: F401  (an autouse fixture)
    reference_texts,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_model_and_adapters(tmp_path_factory.mktemp("cli"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--adapter", "=x"], "--adapter takes NAME=FOLDER"),
        (["--adapter", "a=x", "--adapter", "a=y"], "two adapters are named 'a'"),
        (["--max-queue", "0"], "max_queue must be at least 1"),
        (["--batch-wait-ms", "-1"], "batch_wait_ms must not be negative"),
        (["--adapter", "sql=does-not-exist"], "does-not-exist"),
        (["--adapter-dir", "no-such-dir"], "adapter folder"),
        (["--host", "0.0.0.0"], "reachable beyond this machine: set --api-key"),
        (["--host", "example.org"], "or pass --allow-unauthenticated"),
        (["--api-key", "k", "--admin-key", "k"], "the admin key must differ from the API key"),
        (["--max-loaded-adapters", "1", "--pin", "sql"], "1 pinned adapters leave no room"),
    ],
)
def test_bad_options_exit_2_with_one_line(files, extra, message):
    model_dir, _ = files
    result = CliRunner().invoke(app, ["serve", "--model", str(model_dir), *extra])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    "host, key, warned",
    [("0.0.0.0", None, True), ("::", None, True), ("0.0.0.0", "k", False), ("127.0.0.2", None, False)],
)
def test_serving_beyond_loopback_without_a_key_warns_when_allowed(files, monkeypatch, host, key, warned):
    import uvicorn

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: started.append(kwargs["host"]))
    monkeypatch.delenv("LORAKIT_API_KEY", raising=False)
    options = ["--allow-unauthenticated"] + (["--api-key", key] if key else [])
    result = CliRunner().invoke(app, ["serve", "--model", str(files[0]), "--host", host, *options])
    assert result.exit_code == 0, result.output
    assert started == [host]
    assert ("has no --api-key" in result.output) == warned


def test_server_process_answers_and_stops_on_ctrl_c(files):
    model_dir, folders = files
    expected = reference_texts(model_dir, folders["e2e"], [PROMPTS[0]], 8)[0]
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()  # the server binds it again (SO_REUSEADDR)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORAKIT_API_KEY": "k"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lorakit",
            "serve",
            "--model",
            str(model_dir),
            "--adapter",
            f"e2e={folders['e2e']}",
            "--served-model-name",
            "tiny",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180  # generous: the tests may share a loaded machine
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()  # before reading its output, which would otherwise wait for it forever
                pytest.fail(f"the server did not start:\n{process.communicate()[0]}")
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny", "e2e"]
        out = client.completions.create(model="e2e", prompt=PROMPTS[0], max_tokens=8, temperature=0)
        assert out.choices[0].text.strip() == expected
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "serving tiny, e2e on http://127.0.0.1" in output
