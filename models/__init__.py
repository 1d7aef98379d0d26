"""Reference models and presets."""

from .presets import PRESETS, build_model, example_inputs, get
from .reference import RefConfig, RefDecoder

__all__ = ["PRESETS", "RefConfig", "RefDecoder", "build_model", "example_inputs", "get"]
