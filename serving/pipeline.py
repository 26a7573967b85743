"""The inference module the server runs (kept behind one function so tests and the backend agree)."""
from __future__ import annotations


def inference_api():
    """The module with ``load_pipeline`` and ``generate``: motioncharacter.model.inference."""
    from motioncharacter.model import inference

    return inference
