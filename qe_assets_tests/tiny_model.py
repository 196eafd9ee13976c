"""Re-export of `qe_assets.testing.tiny_model`, where the builder lives so `make demo-loop` can use
it without importing the test suite; tests keep importing it from here."""

from qe_assets.testing.tiny_model import CHAT_TEMPLATE, SPECIAL, build_tiny_model

__all__ = ["CHAT_TEMPLATE", "SPECIAL", "build_tiny_model"]
