"""The step protocol's one exception, apart from ``prepare`` so that steps can raise it without
importing the orchestrator that imports them."""
from __future__ import annotations

__all__ = ["StepSkipped"]


class StepSkipped(Exception):
    """A step that does not apply to this asset now (e.g. annotate without a source): left undone."""
