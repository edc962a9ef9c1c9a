"""`lorakit serve`: an OpenAI-compatible HTTP server for a base model and its adapters (see `lorakit.serve`)."""

from __future__ import annotations

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
    fail,
    named_folders,
)


@app.command()
def serve(
    model: RequiredModel,
    adapter: NamingFolders = None,
    named_adapter: NamedAdapters = None,
    adapter_dir: Annotated[
        list[Path] | None,
        typer.Option(
            help="a folder the admin API may load adapters from at run time (repeat; none: run-time loading is off)",
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0 for every interface)")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    api_key: Annotated[
        str | None, typer.Option(envvar="LORAKIT_API_KEY", help="require 'Authorization: Bearer KEY' (all but /health)")
    ] = None,
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
            adapter_dirs=tuple(adapter_dir or ()),
        )
        base, tokenizer = load_model(model, "causal-lm", dtype=target.dtype)
        place(base, target.device)  # placed and cast before the server starts
        server = create_app(base, tokenizer, config, adapters)
    except USER_ERRORS as err:
        fail(err)
    names = ", ".join([config.model_name, *adapters]) or config.model_name
    console.print(f"serving {names} on http://{host}:{port}/v1", highlight=False)
    uvicorn.run(server, host=host, port=port, log_level="info")
