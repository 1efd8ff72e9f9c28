"""meddiff: MONAI-based diffusion models for medical imaging.

``import meddiff`` stays light: readers and pipelines (SimpleITK, torch, MONAI) load on first use.
"""

from meddiff.errors import MeddiffError
from meddiff.image import Image

__version__ = "0.1.0"
__all__ = ["DiffusionPipeline", "Image", "MeddiffError", "load_image", "load_pipeline", "save_image", "__version__"]

_LAZY = {
    "load_image": "meddiff.io",
    "save_image": "meddiff.io",
    "DiffusionPipeline": "meddiff.pipelines",
    "load_pipeline": "meddiff.pipelines",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'meddiff' has no attribute {name!r}")
