"""Hand-written quality events for tests."""

from __future__ import annotations

import json
from typing import Any


def make_event(request_id: str = "req-1", **overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "request_id": request_id,
        "question": "How many days do I have to request a refund?",
        "docs": [
            {"id": "kb-1", "content": "Refunds are accepted within 30 days.", "score": 0.82},
            {"id": "kb-2", "content": "Shipping takes 5 business days.", "score": 0.41},
        ],
        "answer": "You have 14 days.",
        "evaluation": {
            "score": 0.35,
            "labels": ["factuality_error"],
            "checks": {"grounded": False},
        },
        "timestamp": "2026-11-01T08:00:00Z",
    }
    event.update(overrides)
    return event


def line(event: dict[str, Any]) -> bytes:
    return json.dumps(event, ensure_ascii=False).encode()
