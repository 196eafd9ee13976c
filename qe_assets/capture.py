"""Moved to `qe_assets.service.capture` (the light service package); this path keeps working."""

from qe_assets.service.capture import (
    CaptureResult,
    CaptureStatus,
    QualityCapture,
    capture,
    default_capture,
)

__all__ = ["CaptureResult", "CaptureStatus", "QualityCapture", "capture", "default_capture"]
