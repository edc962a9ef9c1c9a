"""What the server tests share: a tiny random llama on disk with three random adapters (B ≠ 0) of different
ranks and targets, references computed the way `lorakit generate` computes them, and a real uvicorn server on
a free loopback port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import uvicorn

import lorakit
from lorakit.generate import generate_texts
from lorakit.models import load_model
from support.files import save_tiny_llama
from support.models import randomize_lora

ADAPTERS = {
    "sql": lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "e2e": lorakit.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "up_proj"]),
    "chat": lorakit.LoraConfig(r=8, alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
}
PROMPTS = [
    "The Vaults is a pub",
    "name[Café Adriatic], eatType[pub], priceRange[more than £30], near[The Vaults]",
    "it 's a",
    "Describe this restaurant in one or two sentences.",
]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and then do not fight other processes for the cores (import this
    fixture into a test module to use it there)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_model_and_adapters(root: Path) -> tuple[Path, dict[str, Path]]:
    """root/model (tiny llama with a chat template) and root/adapters/<name> for every adapter in ADAPTERS."""
    torch.manual_seed(0)
    model_dir = save_tiny_llama(root / "model", chat=True)
    model, _ = load_model(str(model_dir), "causal-lm")
    for name, config in ADAPTERS.items():
        lorakit.add_adapter(model, config, name=name)
    randomize_lora(model, std=0.3)
    return model_dir, {name: lorakit.save_adapter(model, root / "adapters" / name, name=name) for name in ADAPTERS}


def reference_texts(
    model_dir: Path, adapter: Path | None, prompts: list[str], max_new_tokens: int, chat: bool = False
) -> list[str]:
    """What `lorakit generate` prints for these prompts with only this adapter (None: the base model)."""
    from lorakit.train.data import format_prompt

    model, tokenizer = load_model(str(model_dir), "causal-lm")
    if adapter is not None:
        lorakit.load_adapter(model, adapter, name="only")
    inputs = [format_prompt(tokenizer, p) for p in prompts] if chat else prompts
    return [generate_texts(model, tokenizer, [p], max_new_tokens)[0] for p in inputs]


def reference_tokens(model, tokenizer, adapter: str | None, prompt: str, max_new_tokens: int) -> list[int]:
    """Greedy tokens of `model.generate` on the prompt alone with only `adapter` active (up to the first EOS)."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if adapter is None:
        with lorakit.disable_adapters(model):
            out = model.generate(ids, **kwargs)
    else:
        lorakit.set_adapter(model, adapter)
        out = model.generate(ids, **kwargs)
    tokens = out[0, ids.shape[1] :].tolist()
    return tokens[: tokens.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in tokens else tokens


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def running(app) -> Iterator[str]:
    """Serve `app` with uvicorn in a thread on a free loopback port; yields the base URL."""
    sock = free_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()
