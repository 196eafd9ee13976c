"""Fitting training samples into a token budget without losing any of them silently.

TRL truncates every sequence at `max_length` from the end, so a long sample loses the end of its
completion (the very part it is trained on), and a sample whose prompt alone fills the budget is
dropped without a word. Here a sample that is too long gives up context instead: its documents,
lowest score first (the prompt numbers them best first, see `build_prompts`), are shortened and
then removed, and never a character of the completion. What still does not fit is returned as
dropped, by sample id, so the run can name it and refuse when too many are lost.

Pure: the caller passes `fits(prompt) -> bool`, which knows the tokenizer and the chat template.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# One quoted document of a prompt: "[Document 3] <<<…>>>" / "[资料3] <<<…>>>", preceded by the
# newline that separates it from the one before. The content cannot hold ">>>": the judge markers
# are neutralised when the prompt is built.
_DOCUMENT = re.compile(r"(\n?)(\[[^\]\n]{1,40}\] <<<)(.*?)(>>>)", re.S)


@dataclass
class Fitted:
    """The outcome for a batch of samples."""

    kept: list[int] = field(default_factory=list)  # indexes of the samples that fit
    prompts: dict[int, str] = field(default_factory=dict)  # index → trimmed prompt (changed only)
    dropped: list[str] = field(default_factory=list)  # sample ids that cannot fit

    @property
    def trimmed(self) -> int:
        return len(self.prompts)


def fit_prompt(prompt: str, fits: Callable[[str], bool]) -> str | None:
    """`prompt` itself when it fits; else with its lowest-ranked documents shortened or removed
    until it does (the longest prefix of the last document kept that fits); None when even no
    document at all is too long."""
    if fits(prompt):
        return prompt
    for doc in reversed(list(_DOCUMENT.finditer(prompt))):
        head, tail = prompt[: doc.start()], prompt[doc.end() :]
        if not fits(head + tail):
            # Even without this document it is too long: drop it whole and try the next one up.
            prompt = head + tail
            continue
        # Some of it fits: the longest prefix of its content that does (binary search).
        content = doc.group(3)
        low, high = 0, len(content)  # prefix `low` fits (no content at all does), `high` not
        while high - low > 1:
            middle = (low + high) // 2
            if fits(_with_content(head, doc, content[:middle], tail)):
                low = middle
            else:
                high = middle
        return _with_content(head, doc, content[:low], tail) if low else _tidy(head + tail)
    return None


def _with_content(head: str, doc: re.Match[str], content: str, tail: str) -> str:
    return head + doc.group(1) + doc.group(2) + content + doc.group(4) + tail


def _tidy(prompt: str) -> str:
    """A prompt whose every document was removed starts with the blank line after the block."""
    return prompt.lstrip("\n") if not _DOCUMENT.search(prompt) else prompt


def fit_samples(
    prompts: Sequence[str], sample_ids: Sequence[str], fits: Callable[[int, str], bool]
) -> Fitted:
    """`fit_prompt` over a batch; `fits(index, prompt)` judges sample `index` with that prompt
    (its completion and system message are the caller's)."""
    fitted = Fitted()
    for index, prompt in enumerate(prompts):
        result = fit_prompt(prompt, lambda text, i=index: fits(i, text))
        if result is None:
            fitted.dropped.append(sample_ids[index])
            continue
        fitted.kept.append(index)
        if result != prompt:
            fitted.prompts[index] = _tidy(result)
    return fitted


def dropped_refusal(split: str, dropped: Sequence[str], total: int, max_share: float) -> str | None:
    """Why the run must stop: more than `max_share` of the split's samples cannot fit."""
    if not total or len(dropped) / total <= max_share:
        return None
    shown = ", ".join(dropped[:5]) + (f" and {len(dropped) - 5} more" if len(dropped) > 5 else "")
    return (
        f"{len(dropped)} of {total} {split} samples do not fit max_length even without their "
        f"context documents ({len(dropped) / total:.1%} > QE_TRAIN_MAX_DROPPED_SHARE="
        f"{max_share:g}): {shown}; raise max_length or QE_TRAIN_MAX_DROPPED_SHARE"
    )
