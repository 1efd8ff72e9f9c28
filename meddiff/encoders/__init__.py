"""Text encoders for report conditioning: ``load_text_encoder(spec)``."""

from meddiff.encoders.text import HFTextEncoder, TextEncoding, load_text_encoder

__all__ = ["HFTextEncoder", "TextEncoding", "load_text_encoder"]
