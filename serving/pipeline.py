"""The inference module the server runs (kept behind one function so tests and the backend agree)."""
from __future__ import annotations


def inference_api():
    """The module with ``load_pipeline`` and ``generate``: motioncharacter.model.features, whose
    functions extend motioncharacter.model.inference's with the ID-Animator/DreaMoving options."""
    from motioncharacter.model import features

    return features
