"""`lorakit serve`: an OpenAI-compatible HTTP server for a base model and its adapters (see `lorakit.serve`)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

import typer

from .common import (
    USER_ERRORS,
    DeviceOption,
    NamedAdapters,
    NamingFolders,
    PrecisionOption,
    RequiredModel,
    Target,
    app,
    console,
    err_console,
    fail,
    named_folders,
)


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable only from this machine (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(host: str, api_key: str | None, allow_unauthenticated: bool) -> None:
    """Refuse to serve beyond loopback without an API key, unless the operator says so."""
    if api_key is None and not is_loopback(host) and not allow_unauthenticated:
        raise ValueError(
            f"--host {host} makes the server reachable beyond this machine: set --api-key "
            "(or LORAKIT_API_KEY), or pass --allow-unauthenticated to serve it open"
        )


AdapterDirs = Annotated[
    list[Path] | None,
    typer.Option(
        "--adapter-dir",
        help="a folder adapters may be loaded from at run time: admin API, first use (repeat; none: off)",
    ),
]
ApiKey = Annotated[
    str | None,
    typer.Option(envvar="LORAKIT_API_KEY", help="require 'Authorization: Bearer KEY' (all but /health and admin)"),
]
AdminKey = Annotated[
    str | None,
    typer.Option(envvar="LORAKIT_ADMIN_KEY", help="the admin API's key (load / reload / unload); none: it is off"),
]
AllowOpen = Annotated[
    bool, typer.Option(help="allow a non-loopback --host without --api-key (anyone who reaches it may use it)")
]
Docs = Annotated[bool, typer.Option(help="serve /docs, /redoc and /openapi.json (behind the API key)")]
AutoLoad = Annotated[bool, typer.Option(help="load an unknown requested adapter from its folder in an --adapter-dir")]
MaxLoaded = Annotated[
    int | None, typer.Option(help="adapters on the model at once; the least recently used go to host memory")
]
MaxCpu = Annotated[int | None, typer.Option(help="adapters kept in host memory beyond those; more: read from disk")]
Pins = Annotated[list[str] | None, typer.Option("--pin", help="an adapter that always stays on the model (repeat)")]


@app.command()
def serve(
    model: RequiredModel,
    adapter: NamingFolders = None,
    named_adapter: NamedAdapters = None,
    adapter_dir: AdapterDirs = None,
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0 for every interface)")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    api_key: ApiKey = None,
    admin_key: AdminKey = None,
    allow_unauthenticated: AllowOpen = False,
    docs: Docs = False,
    auto_load: AutoLoad = True,
    max_loaded_adapters: MaxLoaded = None,
    max_cpu_adapters: MaxCpu = None,
    pin: Pins = None,
    served_model_name: Annotated[str | None, typer.Option(help="the base model's id in the API")] = None,
    max_batch_size: Annotated[int, typer.Option(help="sequences generated together")] = 32,
    max_queue: Annotated[int, typer.Option(help="waiting requests; more get HTTP 429")] = 256,
    max_tokens: Annotated[int, typer.Option(help="largest max_tokens a request may ask for")] = 512,
    max_prompt_tokens: Annotated[int, typer.Option(help="longest prompt accepted")] = 2048,
    batch_wait_ms: Annotated[float, typer.Option(help="how long a lone request waits for others to batch with")] = 10.0,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
) -> None:
    """Serve a model and its adapters over HTTP: lorakit serve --model smollm2-135m --named-adapter sql=out/sql"""
    import uvicorn

    from ..device import place
    from ..models import load_model
    from ..serve import ServeConfig, create_app

    try:
        check_exposure(host, api_key, allow_unauthenticated)
        target = Target(device, precision)
        adapters = named_folders(adapter or [], named_adapter or [])
        config = ServeConfig(
            model_name=served_model_name or model,
            max_batch_size=max_batch_size,
            max_queue=max_queue,
            max_tokens=max_tokens,
            max_prompt_tokens=max_prompt_tokens,
            batch_wait_ms=batch_wait_ms,
            api_key=api_key,
            admin_key=admin_key,
            docs=docs,
            adapter_dirs=tuple(adapter_dir or ()),
            auto_load=auto_load,
            max_loaded_adapters=max_loaded_adapters,
            max_cpu_adapters=max_cpu_adapters,
            pinned=tuple(pin or ()),
        )
        base, tokenizer = load_model(model, "causal-lm", dtype=target.dtype)
        place(base, target.device)  # placed and cast before the server starts
        server = create_app(base, tokenizer, config, adapters)
    except USER_ERRORS as err:
        fail(err)
    announce(host, port, api_key, [config.model_name, *adapters])
    uvicorn.run(server, host=host, port=port, log_level="info")


def announce(host: str, port: int, api_key: str | None, names: list[str]) -> None:
    """The served models' address, with a warning when anyone beyond this machine may use them."""
    if api_key is None and not is_loopback(host):
        err_console.print(f"[bold yellow]warning:[/] {host} is reachable beyond this machine and has no --api-key")
    console.print(f"serving {', '.join(names)} on http://{host}:{port}/v1", highlight=False)
