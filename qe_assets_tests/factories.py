"""Re-export of `qe_assets.testing.factories` (shared with the benchmarks)."""

from qe_assets.testing.factories import line, make_event

__all__ = ["line", "make_event"]
