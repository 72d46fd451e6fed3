"""Load encoders by any name a user has for them: the public entry point of the README.

``load_encoder(spec)`` is ``ascl.models.resolve_model(spec).load_encoder()``: a training
checkpoint or run folder, a hub folder, a shipped model name (``default``), or a hub repo id.
Writing a hub folder with the project's card is publishing: ``ascl.model_cards.publish``.
"""

from __future__ import annotations

from ascl.models import ModelRef, load_encoder, resolve_model
from ascl.pretrained import ConfigError, ModelNotFoundError, is_hub_folder
from ascl.weights import WeightsError

__all__ = ["ConfigError", "ModelNotFoundError", "ModelRef", "WeightsError", "is_hub_folder", "load_encoder",
           "resolve_model"]
