"""What a RAG service runs: `capture` after each answer, `choose` (or `choose_model`) before it.

```python
from openai import OpenAI
from qe_assets.service import capture, choose

route = choose(request_id)                      # Route(model, base_url)
answer = OpenAI(base_url=route.base_url).chat.completions.create(model=route.model, ...)
capture(request_id=request_id, question=question, docs=docs, answer=answer_text,
        evaluation={"score": 0.42, "labels": ["incomplete_answer"]}, model=route.model)
```

The package stands alone: it imports the standard library and pydantic (and, when QE_QUEUE_URL
names one, the Redis or Kafka client) and nothing else of `qe_assets`; it reads only its own
variables (`config.ServiceSettings`), and neither call ever raises into the request path. It
installs without the pipeline as the `qe-capture` distribution (`pip install ./qe_assets/service`,
see docs/service.md); the full `qe_assets` distribution contains it too.
"""

from qe_assets.service.capture import CaptureResult, CaptureStatus, QualityCapture, capture
from qe_assets.service.config import ServiceSettings
from qe_assets.service.event_model import QualityEvent, validate_event
from qe_assets.service.producers import QueueUnavailable
from qe_assets.service.rollout import RolloutState, Route, Router, choose, choose_model

__all__ = [
    "CaptureResult",
    "CaptureStatus",
    "QualityCapture",
    "QualityEvent",
    "QueueUnavailable",
    "RolloutState",
    "Route",
    "Router",
    "ServiceSettings",
    "capture",
    "choose",
    "choose_model",
    "validate_event",
]
