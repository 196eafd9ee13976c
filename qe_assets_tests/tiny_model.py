"""The tiny local model of the training tests; built by qe_assets.testing.tiny_model, which the
benchmarks share."""

from qe_assets.testing.tiny_model import CHAT_TEMPLATE, SPECIAL, build_tiny_model

__all__ = ["CHAT_TEMPLATE", "SPECIAL", "build_tiny_model"]
