"""Re-export of `qe_assets.testing.openai_server`, where the server lives so the benchmarks can
use it without importing the test suite; tests keep importing it from here."""

from qe_assets.testing.openai_server import (
    ANSWER_BLOCK,
    CHAT_PATH,
    EMPTY_ANSWERS,
    JUDGE_GARBAGE,
    QUALITY,
    ChatRequest,
    EvalModels,
    FineTuneJob,
    OpenAIServer,
    Recorded,
    RemoteServer,
    Reply,
    default_answer,
    main,
    prompt_hash,
    running,
    spawned,
    word_count,
)

__all__ = [
    "ANSWER_BLOCK",
    "CHAT_PATH",
    "EMPTY_ANSWERS",
    "JUDGE_GARBAGE",
    "QUALITY",
    "ChatRequest",
    "EvalModels",
    "FineTuneJob",
    "OpenAIServer",
    "Recorded",
    "RemoteServer",
    "Reply",
    "default_answer",
    "main",
    "prompt_hash",
    "running",
    "spawned",
    "word_count",
]

if __name__ == "__main__":
    main()
