"""Send RAG traces to a Phoenix server through the OpenTelemetry SDK, then judge them through
Phoenix's REST API. Run by the Phoenix venv's python (`make phoenix`), not ours: it imports only
the OpenTelemetry SDK and the standard library.

    python phoenix_sender.py URL PROJECT < spec.json > ids.json

The spec is a JSON object: `traces`, a list of {question, answer, docs: [{id, content?, score}],
model, metadata?, root_io? (default true: the root carries input/output), chinese?}, and
`annotations`, a list of {trace: index, name, score?, label?, explanation?, on?: "root"|"llm"}.
Prints, for each trace, {trace_id, root, retriever, llm} (hex ids). PHOENIX_SENDER_TOKEN, when set,
is sent as a bearer token (a Phoenix with authentication)."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor


def _auth() -> dict[str, str]:
    key = os.environ.get("PHOENIX_SENDER_TOKEN", "")
    return {"Authorization": f"Bearer {key}"} if key else {}


def send(url: str, project: str, traces: list[dict[str, Any]]) -> list[dict[str, str]]:
    provider = TracerProvider(resource=Resource({"openinference.project.name": project}))
    provider.add_span_processor(
        BatchSpanProcessor(
            OTLPSpanExporter(endpoint=f"{url}/v1/traces", timeout=60, headers=_auth()),
            max_queue_size=max(len(traces) * 3 + 16, 2048),
            max_export_batch_size=2048,
            schedule_delay_millis=200,
        )
    )
    tracer = provider.get_tracer("qe-phoenix-sender")
    ids: list[dict[str, str]] = []
    for spec in traces:
        with tracer.start_as_current_span("rag") as root:
            root.set_attribute("openinference.span.kind", "CHAIN")
            if spec.get("root_io", True):
                root.set_attribute("input.value", spec["question"])
                root.set_attribute("output.value", spec["answer"])
            if spec.get("metadata") is not None:
                root.set_attribute("metadata", json.dumps(spec["metadata"], ensure_ascii=False))
            with tracer.start_as_current_span("retrieve") as retriever:
                retriever.set_attribute("openinference.span.kind", "RETRIEVER")
                retriever.set_attribute("input.value", spec["question"])
                for i, doc in enumerate(spec.get("docs", [])):
                    prefix = f"retrieval.documents.{i}.document"
                    retriever.set_attribute(f"{prefix}.id", doc["id"])
                    if "content" in doc:
                        retriever.set_attribute(f"{prefix}.content", doc["content"])
                    if "score" in doc:
                        retriever.set_attribute(f"{prefix}.score", float(doc["score"]))
            with tracer.start_as_current_span("generate") as llm:
                llm.set_attribute("openinference.span.kind", "LLM")
                llm.set_attribute("llm.model_name", spec.get("model", "rag-model"))
                llm.set_attribute("llm.input_messages.0.message.role", "system")
                llm.set_attribute("llm.input_messages.0.message.content", "Answer from the docs.")
                llm.set_attribute("llm.input_messages.1.message.role", "user")
                llm.set_attribute("llm.input_messages.1.message.content", spec["question"])
                llm.set_attribute("llm.output_messages.0.message.role", "assistant")
                llm.set_attribute("llm.output_messages.0.message.content", spec["answer"])
        ids.append(
            {
                "trace_id": f"{root.get_span_context().trace_id:032x}",
                "root": f"{root.get_span_context().span_id:016x}",
                "retriever": f"{retriever.get_span_context().span_id:016x}",
                "llm": f"{llm.get_span_context().span_id:016x}",
            }
        )
    provider.force_flush(120_000)
    provider.shutdown()
    return ids


def annotate(url: str, ids: list[dict[str, str]], notes: list[dict[str, Any]]) -> None:
    """POST /v1/span_annotations?sync=true, a thousand at a time."""
    data = [
        {
            "span_id": ids[note["trace"]][note.get("on", "root")],
            "name": note["name"],
            "annotator_kind": note.get("kind", "LLM"),
            "result": {k: note[k] for k in ("score", "label", "explanation") if k in note},
            "identifier": note.get("identifier", ""),
        }
        for note in notes
    ]
    for start in range(0, len(data), 1000):
        body = json.dumps({"data": data[start : start + 1000]}).encode()
        request = urllib.request.Request(
            f"{url}/v1/span_annotations?sync=true",
            data=body,
            headers={"Content-Type": "application/json", **_auth()},
            method="POST",
        )
        # Phoenix inserts exported spans asynchronously: a span not stored yet is a 404.
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    response.read()
                break
            except urllib.error.HTTPError as exc:
                if exc.code != 404 or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def main() -> None:
    url, project = sys.argv[1], sys.argv[2]
    spec = json.load(sys.stdin)
    ids = send(url, project, spec.get("traces", [])) if spec.get("traces") else spec["ids"]
    if spec.get("annotations"):
        annotate(url, ids, spec["annotations"])
    json.dump(ids, sys.stdout)


if __name__ == "__main__":
    main()
