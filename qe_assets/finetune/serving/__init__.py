"""Serving locally trained models: each adapter under a stable name on an OpenAI-compatible
server that this project starts (`transformers`, `vllm`) or is told about (`external`)."""
