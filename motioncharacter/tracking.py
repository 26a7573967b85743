"""MLflow tracking in one place.

The tracking server comes from ``MLFLOW_TRACKING_URI`` (set by ``motioncharacter stack up``
for the local stack, or by the cluster); the embedded default is a sqlite file in the
working directory, ``sqlite:///mlflow.db``, with artifacts next to it.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

DEFAULT_URI = "sqlite:///mlflow.db"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


@contextlib.contextmanager
def run(experiment: str, run_name: str | None = None, tags: dict | None = None) -> Iterator["object"]:
    """Start (and always end) an MLflow run in ``experiment``; yields the active run."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name, tags=tags or {}) as active:
        yield active
