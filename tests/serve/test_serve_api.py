"""The server through the official `openai` client, on a real loopback port: completions, chat, streaming and the
model list; greedy answers equal `lorakit generate` with that adapter alone (text for text), also when many
requests for different adapters are in flight together and share batches."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from typer.testing import CliRunner

from lorakit.cli import app as cli_app
from lorakit.models import load_model
from lorakit.serve import ServeConfig, create_app
from support.serving import (
    PROMPTS,
    make_model_and_adapters,
    one_torch_thread,  # noqa: F401  (an autouse fixture)
    reference_texts,
    running,
)

BASE = "tiny-llama"
MODELS = [BASE, "sql", "e2e", "chat"]
N = 10  # max_tokens of the comparisons


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model_dir, folders = make_model_and_adapters(tmp_path_factory.mktemp("api"))
    expected = {name: reference_texts(model_dir, folders.get(name), PROMPTS, N) for name in MODELS}
    assert len({tuple(texts) for texts in expected.values()}) == len(MODELS)  # the adapters change the answers
    model, tokenizer = load_model(str(model_dir), "causal-lm")
    app = create_app(model, tokenizer, ServeConfig(BASE, max_batch_size=6, max_tokens=64), folders)
    with running(app) as url:
        yield {
            "url": url,
            "app": app,
            "model_dir": model_dir,
            "folders": folders,
            "expected": expected,
            "client": openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0),
        }


def test_model_list_has_the_base_and_every_adapter(setup):
    listed = setup["client"].models.list().data
    assert [m.id for m in listed] == MODELS
    assert [m.parent for m in listed] == [None, BASE, BASE, BASE]


def test_greedy_completions_equal_lorakit_generate(setup):
    client = setup["client"]
    for name in MODELS:
        for prompt, expected in zip(PROMPTS[:2], setup["expected"][name]):
            out = client.completions.create(model=name, prompt=prompt, max_tokens=N, temperature=0)
            assert out.choices[0].text.strip() == expected
            assert out.model == name and out.usage.completion_tokens <= N
            assert out.choices[0].finish_reason in ("stop", "length")


def test_concurrent_mixed_adapter_requests_are_all_answered_correctly(setup):
    """48 requests for four models and four prompts, queued while the worker is held so that they are admitted
    together: batches of 6 rows mixing adapters. Each answer equals its own reference."""
    client, registry = setup["client"], setup["app"].state.registry
    jobs = [(MODELS[i % 4], i % len(PROMPTS)) for i in range(48)]

    def ask(job):
        name, p = job
        return client.completions.create(model=name, prompt=PROMPTS[p], max_tokens=N, temperature=0).choices[0].text

    with ThreadPoolExecutor(max_workers=48) as pool:
        with registry.lock:  # the worker cannot start a forward pass: the requests pile up in the queue
            futures = [pool.submit(ask, job) for job in jobs]
            wait_for_queue(setup["url"], 48)
        answers = [f.result(timeout=60) for f in futures]
    assert [a.strip() for a in answers] == [setup["expected"][name][p] for name, p in jobs]


def wait_for_queue(url: str, depth: int) -> None:
    for _ in range(500):
        if httpx.get(f"{url}/health").json()["queued"] >= depth:
            return
        threading.Event().wait(0.02)
    raise AssertionError(f"the queue never reached {depth}")


def test_chat_equals_lorakit_generate_with_the_chat_template(setup):
    client = setup["client"]
    prompt = PROMPTS[3]
    result = CliRunner().invoke(
        cli_app,
        [
            "generate",
            "--model",
            str(setup["model_dir"]),
            "--adapter",
            str(setup["folders"]["chat"]),
            "--max-new-tokens",
            str(N),
            prompt,
        ],
    )
    assert result.exit_code == 0, result.output
    out = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": prompt}], max_tokens=N, temperature=0
    )
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content.strip() == result.stdout.strip()
    assert (
        out.object == "chat.completion"
        and out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    )


def test_streaming_gives_the_same_text_in_pieces(setup):
    client = setup["client"]
    whole = client.completions.create(model="e2e", prompt=PROMPTS[1], max_tokens=N, temperature=0)
    chunks = list(client.completions.create(model="e2e", prompt=PROMPTS[1], max_tokens=N, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    messages = [{"role": "user", "content": PROMPTS[0]}]
    whole = client.chat.completions.create(model="sql", messages=messages, max_tokens=N, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="sql",
            messages=messages,
            max_tokens=N,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_strings_end_the_text_before_them(setup):
    client = setup["client"]
    full = client.completions.create(model="sql", prompt=PROMPTS[2], max_tokens=N, temperature=0).choices[0].text
    stop = full[4:7]
    expected = full[: full.find(stop)]
    for stream in (False, True):
        out = client.completions.create(
            model="sql", prompt=PROMPTS[2], max_tokens=N, temperature=0, stop=[stop], stream=stream
        )
        chunks = list(out) if stream else [out]
        assert "".join(c.choices[0].text for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_sampling_with_a_seed_is_reproducible(setup):
    client = setup["client"]
    texts = [
        client.completions.create(model="chat", prompt=PROMPTS[0], max_tokens=N, temperature=1.2, top_p=0.9, seed=11)
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert texts[0] == texts[1]


def test_several_prompts_in_one_request_are_separate_choices(setup):
    out = setup["client"].completions.create(model="e2e", prompt=PROMPTS[:3], max_tokens=N, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text.strip() for c in out.choices] == setup["expected"]["e2e"][:3]


def test_metrics_count_requests_tokens_and_queues_per_model(setup):
    client = setup["client"]
    client.completions.create(model="e2e", prompt=PROMPTS[0], max_tokens=3, temperature=0)
    text = httpx.get(f"{setup['url']}/metrics").text
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples['lorakit_requests_total{model="e2e",outcome="length"}'] >= 1
    assert samples['lorakit_generated_tokens_total{model="e2e"}'] >= 3
    assert samples['lorakit_generated_tokens_per_second{model="e2e"}'] > 0
    for name in MODELS:
        assert samples[f'lorakit_queue_depth{{model="{name}"}}'] == 0
        assert samples[f'lorakit_running_sequences{{model="{name}"}}'] == 0
    assert "# TYPE lorakit_requests_total counter" in text
    assert httpx.get(f"{setup['url']}/health").json() == {"status": "ok", "queued": 0, "running": 0}
