"""The `lorakit` command line: one module per command group, all registered on one Typer app.

Each command is a thin layer over the library: it parses options, calls one function, and turns the
library's specific errors into a one-line message and a non-zero exit code.
"""

from . import adapters, analyze, estimate, export, serve, train  # noqa: F401  (importing registers the commands)
from .common import app

__all__ = ["app", "main"]


def main() -> None:
    app(prog_name="lorakit")
