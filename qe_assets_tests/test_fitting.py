"""Fitting samples into max_length: context documents give way, lowest score first, never the
completion; what cannot fit is named, and too many refuse the run (qe_assets.finetune.fitting)."""

from __future__ import annotations

from qe_assets.finetune.fitting import dropped_refusal, fit_prompt, fit_samples

PROMPT = (
    "[Document 1] <<<Refunds are accepted within 30 days.>>>\n"
    "[Document 2] <<<Shipping takes five business days, longer on holidays.>>>\n"
    "[Document 3] <<<The warranty covers two years of normal use.>>>\n\n"
    "Answer from the documents.\n\n# Question\nHow long do refunds take?"
)
TAIL = "Answer from the documents.\n\n# Question\nHow long do refunds take?"


def under(limit: int):
    """A budget in characters (a stand-in tokenizer: one character, one token)."""
    return lambda text: len(text) <= limit


def test_a_prompt_that_fits_is_left_alone() -> None:
    assert fit_prompt(PROMPT, under(len(PROMPT))) == PROMPT


def test_the_lowest_ranked_document_is_shortened_first() -> None:
    fitted = fit_prompt(PROMPT, under(len(PROMPT) - 10))
    assert fitted is not None and len(fitted) == len(PROMPT) - 10
    # Documents 1 and 2 whole, the end of document 3 cut, its markers and the question kept.
    assert "[Document 2] <<<Shipping takes five business days, longer on holidays.>>>" in fitted
    assert "[Document 3] <<<The warranty covers two years of n>>>\n\n" in fitted
    assert fitted.endswith(TAIL)


def test_documents_are_removed_whole_from_the_bottom_when_shortening_is_not_enough() -> None:
    without_3 = PROMPT.replace(
        "\n[Document 3] <<<The warranty covers two years of normal use.>>>", ""
    )
    fitted = fit_prompt(PROMPT, under(len(without_3) - 5))
    assert fitted is not None and "Document 3" not in fitted
    assert "[Document 2] <<<Shipping takes five business days, longer on holi>>>\n\n" in fitted
    assert fitted.startswith("[Document 1] <<<Refunds are accepted within 30 days.>>>\n")


def test_a_prompt_without_any_document_room_keeps_its_question() -> None:
    fitted = fit_samples([PROMPT], ["s-1"], lambda _, text: len(text) <= len(TAIL) + 2)
    assert fitted.kept == [0] and fitted.dropped == []
    assert fitted.prompts[0] == TAIL  # no stray blank line where the block was


def test_what_cannot_fit_even_without_documents_is_named_not_kept() -> None:
    fitted = fit_samples(
        [PROMPT, "short question"], ["s-long", "s-short"], lambda _, text: len(text) <= 20
    )
    assert fitted.kept == [1] and fitted.dropped == ["s-long"] and fitted.trimmed == 0


def test_the_run_is_refused_past_the_dropped_share_only() -> None:
    assert dropped_refusal("train", ["a"], 100, 0.01) is None
    message = dropped_refusal("train", ["a", "b"], 100, 0.01)
    assert message is not None
    assert message.startswith("2 of 100 train samples do not fit max_length")
    assert "QE_TRAIN_MAX_DROPPED_SHARE=0.01" in message and "a, b" in message
    assert dropped_refusal("train", [], 0, 0.01) is None
