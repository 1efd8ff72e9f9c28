"""Lightning modules and callbacks for training meddiff models."""

from meddiff.training.adapters import LoRAModule, TextualInversionModule
from meddiff.training.autoencoder import AutoencoderModule
from meddiff.training.controlnet import ControlNetModule
from meddiff.training.module import DiffusionModule

__all__ = ["AutoencoderModule", "ControlNetModule", "DiffusionModule", "LoRAModule", "TextualInversionModule"]
