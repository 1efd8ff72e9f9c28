"""meddiff: MONAI-based diffusion models for medical imaging."""

from meddiff.errors import MeddiffError
from meddiff.image import Image
from meddiff.io import load_image, save_image

__version__ = "0.1.0"
__all__ = ["Image", "MeddiffError", "load_image", "save_image", "__version__"]
