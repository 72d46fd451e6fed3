"""Gallery images for the index builder: the one image-source grammar of ``ascl.image_sources``.

Kept only so that ``from ascl.serving.sources import SourceImage, iter_source`` (serving/build.py)
keeps working while that file is being edited elsewhere; new code imports ``ascl.image_sources``
(``SourceImage``, ``iter_images``, ``describe_specs``) directly. Records read their bytes lazily,
so building an index over 50,000 images never holds them all in memory.
"""

from __future__ import annotations

from ascl.image_sources import SourceImage, describe_specs
from ascl.image_sources import iter_images as iter_source

__all__ = ["SourceImage", "describe_specs", "iter_source"]
