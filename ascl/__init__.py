"""ascl-hub: self-supervised image encoders trained with ASCL, exported and served.

The public API is imported lazily so that ``ascl --help`` and light tools do not pay for
importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["ASCLLoss", "Encoder", "__version__"]

if TYPE_CHECKING:
    from ascl.encoder import Encoder
    from ascl.training.loss import ASCLLoss


def __getattr__(name: str) -> Any:
    if name == "ASCLLoss":
        from ascl.training.loss import ASCLLoss

        return ASCLLoss
    if name == "Encoder":
        from ascl.encoder import Encoder

        return Encoder
    raise AttributeError(f"module 'ascl' has no attribute {name!r}")
