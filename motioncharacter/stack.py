"""Local services on loopback: ``motioncharacter stack up|down|status`` (S3 server + MLflow server).

(stub: being filled in) ``load_stack_env`` exports the running stack's endpoints and
credentials into this process when the environment does not already set them.
"""
from __future__ import annotations


def load_stack_env() -> None:
    return None


def add_commands(sub) -> None:
    return None
