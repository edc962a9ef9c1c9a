"""What every metric family shares: the model's outputs beside what they are scored against (`Scored`), checked
once for shape; the error of a metric that cannot run here (`MetricUnavailable`: reported as skipped, with its
reason); and the version of the package that implements a metric."""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, NamedTuple


class MetricUnavailable(RuntimeError):
    """A metric that cannot be computed on this machine (a missing package or runtime, a tool that failed); the
    message is the reason, one line."""


class Scored(NamedTuple):
    """Predictions and their references, one per scored example.

    Generation: texts, each against a list of one or more reference texts. Classification: label ids against
    label ids (num_labels: the task's label count). Regression: numbers against numbers."""

    predictions: Sequence[Any]
    references: Sequence[Any]
    num_labels: int | None = None

    def checked(self, texts: bool) -> Scored:
        """Itself, when there is something to score and every prediction has its reference(s); else ValueError."""
        if len(self.predictions) != len(self.references):
            raise ValueError(f"{len(self.predictions)} predictions but {len(self.references)} references")
        if not self.predictions:
            raise ValueError("no predictions to score")
        if texts and any(len(group) == 0 for group in self.references):
            raise ValueError("every prediction needs at least one reference")
        return self


def package_version(package: str) -> str:
    """The installed version of a distribution ("not installed" when it is not)."""
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"
