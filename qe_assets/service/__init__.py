"""What a RAG service runs: `capture` after each answer, `choose_model` before it.

```python
from qe_assets.service import capture, choose_model

model = choose_model(request_id)
answer = call_llm(model, question, docs)
capture(request_id=request_id, question=question, docs=docs, answer=answer,
        evaluation={"score": 0.42, "labels": ["incomplete_answer"]}, model=model)
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
from qe_assets.service.rollout import RolloutState, Router, choose_model

__all__ = [
    "CaptureResult",
    "CaptureStatus",
    "QualityCapture",
    "QualityEvent",
    "QueueUnavailable",
    "RolloutState",
    "Router",
    "ServiceSettings",
    "capture",
    "choose_model",
    "validate_event",
]
