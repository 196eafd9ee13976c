"""The wording of instructions, naive-completion prefixes, prompt headings, system messages, and
the LLM regeneration and judge prompts.

Kept as data in `texts.json` (one place to edit, per label and language); this module only loads
it and turns it into small lookup frames the Polars transforms join against.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

import polars as pl

LANGUAGES = ("zh", "en")
DEFAULT_KEY = "default"
JUDGE_KEYS = ("system", "intro", "reminder")


@dataclass(frozen=True)
class Templates:
    instructions: dict[str, dict[str, str]]
    naive_prefixes: dict[str, dict[str, str]]
    prompt: dict[str, dict[str, str]]
    system: dict[str, str]
    # language → {"system"}: sent with the sample's prompt when an LLM regenerates the answer.
    regenerate: dict[str, dict[str, str]]
    # language → {"system", "intro", "reminder"}: the judge's rubric and framing.
    judge: dict[str, dict[str, str]]

    def per_label(self, kind: str) -> pl.DataFrame:
        """(language, label, text) rows for `instructions` or `naive_prefixes`."""
        table: dict[str, dict[str, str]] = getattr(self, kind)
        rows = [
            (language, label, text)
            for language, by_label in table.items()
            for label, text in by_label.items()
        ]
        return pl.DataFrame(rows, schema=["language", "label", "text"], orient="row")

    def attach(self, frame: pl.DataFrame, kind: str, column: str) -> pl.DataFrame:
        """Add `column` with the text of `kind` for each row's (language, label), falling back
        to the language's default text for labels without their own."""
        table = self.per_label(kind)
        specific = table.rename({"text": column})
        fallback = table.filter(pl.col("label") == DEFAULT_KEY).select(
            "language", pl.col("text").alias("_fallback")
        )
        return (
            frame.join(specific, on=["language", "label"], how="left", maintain_order="left")
            .join(fallback, on="language", how="left", maintain_order="left")
            .with_columns(pl.coalesce(column, "_fallback").alias(column))
            .drop("_fallback")
        )

    def per_language(self) -> pl.DataFrame:
        """(language, document, question_heading, system) rows."""
        return pl.DataFrame(
            [
                {"language": lang, **self.prompt[lang], "system": self.system[lang]}
                for lang in LANGUAGES
            ]
        )

    def llm_per_language(self) -> pl.DataFrame:
        """(language, regenerate_system, judge_system, judge_intro, judge_reminder) rows."""
        return pl.DataFrame(
            [
                {
                    "language": lang,
                    "regenerate_system": self.regenerate[lang]["system"],
                    **{f"judge_{key}": self.judge[lang][key] for key in JUDGE_KEYS},
                }
                for lang in LANGUAGES
            ]
        )


def _check(data: dict) -> Templates:
    for kind in ("instructions", "naive_prefixes"):
        for lang in LANGUAGES:
            if DEFAULT_KEY not in data[kind].get(lang, {}):
                raise ValueError(f"templates: {kind}.{lang}.{DEFAULT_KEY} is missing")
    for lang in LANGUAGES:
        for key in ("document", "question_heading"):
            if key not in data["prompt"].get(lang, {}):
                raise ValueError(f"templates: prompt.{lang}.{key} is missing")
        if lang not in data["system"]:
            raise ValueError(f"templates: system.{lang} is missing")
        for kind, keys in (("regenerate", ("system",)), ("judge", JUDGE_KEYS)):
            for key in keys:
                if key not in data.get(kind, {}).get(lang, {}):
                    raise ValueError(f"templates: {kind}.{lang}.{key} is missing")
    return Templates(
        instructions=data["instructions"],
        naive_prefixes=data["naive_prefixes"],
        prompt=data["prompt"],
        system=data["system"],
        regenerate=data["regenerate"],
        judge=data["judge"],
    )


@cache
def load_templates() -> Templates:
    text = resources.files(__package__).joinpath("texts.json").read_text(encoding="utf-8")
    return _check(json.loads(text))
