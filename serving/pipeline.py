"""Which inference module the server runs: the model package's, or the temporary stand-in until it lands."""
from __future__ import annotations

import importlib
import importlib.util


def inference_api():
    """The module with ``load_pipeline`` and ``generate`` (motioncharacter.model.inference)."""
    if importlib.util.find_spec("motioncharacter.model.inference") is not None:
        return importlib.import_module("motioncharacter.model.inference")
    from . import _standin  # TEMPORARY until the model package lands

    return _standin
