"""Lightning modules and callbacks for training meddiff models."""

from meddiff.training.module import DiffusionModule

__all__ = ["DiffusionModule"]
