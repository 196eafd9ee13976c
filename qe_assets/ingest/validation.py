"""Rules a dataset version must pass; used by the asset checks. Pure: frames in, findings out."""

from __future__ import annotations

import json
from dataclasses import dataclass

import polars as pl

from qe_assets.ingest.events import KNOWN_LABELS, UNSPECIFIED

CHAT_ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content", "weight", "name")
_SHOWN = 5  # offending lines quoted per problem


def _lines(frame: pl.DataFrame, mask: pl.Expr) -> str:
    rows = frame.filter(mask)["line"].head(_SHOWN).to_list()
    more = frame.filter(mask).height - len(rows)
    return ", ".join(str(r) for r in rows) + (f" and {more} more" if more > 0 else "")


def chat_format_problems(chat: pl.DataFrame, first_line: int = 1) -> list[str]:
    """OpenAI chat fine-tuning rules over a chat file (or a chunk of it starting at
    `first_line`) read with `pl.read_ndjson`.

    Each line: an object with only `messages`; a non-empty list of objects with only known keys;
    roles system/user/assistant; non-empty string content; at least one assistant message;
    `weight` only on assistant messages and only 0 or 1.
    """
    problems: list[str] = []
    extra_keys = sorted(set(chat.columns) - {"messages"})
    if extra_keys:
        problems.append(f"top-level keys other than messages: {extra_keys}")
    if "messages" not in chat.columns:
        return [*problems, "no line has a messages key"]
    dtype = chat.schema["messages"]
    if not (isinstance(dtype, pl.List) and isinstance(dtype.inner, pl.Struct)):
        return [*problems, f"messages is not a list of objects (read as {dtype})"]
    keys = {f.name for f in dtype.inner.fields}
    if unknown := sorted(keys - set(MESSAGE_KEYS)):
        problems.append(f"message keys not allowed by the chat format: {unknown}")
    for required in ("role", "content"):
        if required not in keys:
            problems.append(f"no message has a {required}")
    if problems:
        return problems

    lines = chat.with_row_index("line", offset=first_line)
    empty = pl.col("messages").list.len().fill_null(0) == 0
    if lines.filter(empty).height:
        problems.append(f"lines without messages: {_lines(lines, empty)}")
    messages = lines.filter(~empty).explode("messages").unnest("messages")
    if messages.schema["content"] != pl.String:
        problems.append(f"message content is not text (read as {messages.schema['content']})")
        return problems
    checks = {
        "a role other than system/user/assistant": ~pl.col("role").is_in(CHAT_ROLES)
        | pl.col("role").is_null(),
        "empty or missing content": pl.col("content").fill_null("").str.strip_chars() == "",
    }
    if "weight" in keys:
        weight = pl.col("weight").cast(pl.Float64, strict=False)
        checks["weight on a non-assistant message"] = weight.is_not_null() & (
            pl.col("role") != "assistant"
        )
        checks["weight other than 0 or 1"] = weight.is_not_null() & ~weight.is_in([0.0, 1.0])
    for what, mask in checks.items():
        if messages.filter(mask).height:
            problems.append(f"{what} on lines {_lines(messages, mask)}")
    assistants = messages.group_by("line").agg((pl.col("role") == "assistant").sum().alias("n"))
    no_assistant = pl.col("n") == 0
    if assistants.filter(no_assistant).height:
        problems.append(
            f"no assistant message on lines {_lines(assistants.sort('line'), no_assistant)}"
        )
    return problems


def record_problems(records: pl.DataFrame, min_examples: int, first_line: int = 1) -> list[str]:
    """The seed's JSONL records (or a chunk of them starting at `first_line`): enough of them,
    nothing empty, confidence in [0, 1]."""
    problems = []
    if records.height < min_examples:
        problems.append(f"{records.height} examples, fewer than the minimum of {min_examples}")
    lines = records.with_row_index("line", offset=first_line)
    checks = {
        "empty prompt": pl.col("prompt").fill_null("").str.strip_chars() == "",
        "empty completion": pl.col("completion").fill_null("").str.strip_chars() == "",
        "confidence outside [0, 1]": ~pl.col("confidence").is_between(0.0, 1.0)
        | pl.col("confidence").is_null(),
    }
    for what, mask in checks.items():
        if lines.filter(mask).height:
            problems.append(f"{what} on lines {_lines(lines, mask)}")
    return problems


@dataclass(frozen=True)
class LabelBounds:
    max_label_share: float = 0.8
    max_unspecified_share: float = 0.2
    max_unknown_share: float = 0.1


def label_shares(counts: dict[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {label: count / total for label, count in counts.items()} if total else {}


def label_share_problems(counts: dict[str, int], bounds: LabelBounds) -> list[str]:
    shares = label_shares(counts)
    problems = [
        f"{label} is {share:.1%} of the samples (bound {bounds.max_label_share:.0%})"
        for label, share in shares.items()
        if share > bounds.max_label_share
    ]
    unspecified = shares.get(UNSPECIFIED, 0.0)
    if unspecified > bounds.max_unspecified_share:
        problems.append(
            f"{UNSPECIFIED} is {unspecified:.1%} (bound {bounds.max_unspecified_share:.0%}): "
            "the evaluator gave many events no label"
        )
    unknown = sum(s for label, s in shares.items() if label not in (*KNOWN_LABELS, UNSPECIFIED))
    if unknown > bounds.max_unknown_share:
        problems.append(
            f"labels outside the known four are {unknown:.1%} "
            f"(bound {bounds.max_unknown_share:.0%}): add aliases or templates for them"
        )
    return problems


def total_variation(previous: dict[str, int], current: dict[str, int]) -> float:
    """Total variation distance between two label distributions (0 = same, 1 = disjoint)."""
    p, q = label_shares(previous), label_shares(current)
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


# Preference formats, from the providers' documentation: TRL's conversational preference dataset
# (`prompt` messages, `chosen` / `rejected` completions as assistant messages) and OpenAI's
# preference fine-tuning (DPO) input (`input.messages`, `preferred_output`,
# `non_preferred_output`, each output exactly one assistant message).
PREFERENCE_KEYS = {
    "trl": ("prompt", "chosen", "rejected"),
    "openai": ("input", "preferred_output", "non_preferred_output"),
}

OPENAI_INPUT_KEYS = ("messages", "tools", "parallel_tool_calls")


def _messages_problem(messages: object, where: str) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"{where} is not a non-empty list of messages"
    for message in messages:
        if not isinstance(message, dict) or set(message) - set(MESSAGE_KEYS):
            return f"{where} holds a message that is not a {{role, content}} object"
        if message.get("role") not in CHAT_ROLES:
            return f"{where} holds a role other than system/user/assistant"
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            return f"{where} holds empty or missing content"
    return None


def _output_problem(output: object, where: str) -> str | None:
    problem = _messages_problem(output, where)
    if problem is None and (len(output) != 1 or output[0]["role"] != "assistant"):  # type: ignore[arg-type, index]
        problem = f"{where} is not exactly one assistant message"
    return problem


def preference_line_problem(line: object, flavour: str) -> str | None:
    """Why one preference line breaks the `flavour` ("trl" or "openai") format, or None."""
    keys = PREFERENCE_KEYS[flavour]
    if not isinstance(line, dict) or set(line) != set(keys):
        return f"keys other than {', '.join(keys)}"
    prompt = line[keys[0]]
    if flavour == "openai":
        if not isinstance(prompt, dict) or set(prompt) - set(OPENAI_INPUT_KEYS):
            return "input is not an object with messages"
        prompt = prompt.get("messages")
    problem = _messages_problem(prompt, keys[0])
    if problem is None and prompt[-1]["role"] != "user":  # type: ignore[index]
        problem = f"{keys[0]} does not end with a user message"
    problem = problem or _output_problem(line[keys[1]], keys[1])
    problem = problem or _output_problem(line[keys[2]], keys[2])
    if problem is None and line[keys[1]][0]["content"] == line[keys[2]][0]["content"]:
        problem = f"{keys[1]} and {keys[2]} are the same answer"
    return problem


def preference_problems(
    lines: list[bytes], flavour: str, name: str, first_line: int = 1
) -> list[str]:
    """Problems of a chunk of preference lines, each naming the lines (a few of them) it is on."""
    found: dict[str, list[int]] = {}
    for number, raw in enumerate(lines, start=first_line):
        try:
            problem = preference_line_problem(json.loads(raw), flavour)
        except ValueError:
            problem = "not a JSON object"
        if problem is not None:
            found.setdefault(problem, []).append(number)
    return [
        f"{name}: {problem} on lines {', '.join(map(str, numbers[:_SHOWN]))}"
        + (f" and {len(numbers) - _SHOWN} more" if len(numbers) > _SHOWN else "")
        for problem, numbers in found.items()
    ]
