"""The MODEL argument of ``ascl export``: an Encoder plus the facts stamped into the graph.

Resolution is the core's (``ascl.models.resolve_model``); this module only adds what an export
records: the model's name (``ascl.model_name``) and the revision of its weights
(``ascl.source_revision``: the hub revision asked for, else a content hash of the weights).
"""

from __future__ import annotations

from ascl.errors import AsclError
from ascl.export.pipeline import LoadedModel
from ascl.models import SPEC_HELP, resolve_model

__all__ = ["LoadedModel", "ModelLoadError", "load_model"]


class ModelLoadError(AsclError, ValueError):
    """MODEL does not name an encoder we can load; the message says what was tried."""


def load_model(spec: str, *, revision: str | None = None) -> LoadedModel:
    """Any spec ``resolve_model`` accepts -> the encoder in eval mode, its name and revision.

    Raises ModelLoadError (naming ``spec``) when it is not a loadable encoder.
    """
    try:
        ref = resolve_model(spec, revision=revision)
        encoder = ref.load_encoder()
    except Exception as exc:  # any failure to build the encoder (bad pickle, bad config, ...) is the input's fault
        raise ModelLoadError(f"{spec}: not a loadable encoder ({exc}). MODEL must be {SPEC_HELP}.") from exc
    return LoadedModel(encoder.eval(), ref.name, ref.source_revision)
