"""Moved to `qe_assets.service.answer_counts` (the light service package); this path keeps
working."""

from qe_assets.service.answer_counts import (
    RECORD_KIND,
    RECORD_PREFIX,
    AnswerCounter,
    CountRecord,
    CountRecordError,
    ModelCount,
    count_record,
    is_count_record,
    parse_count_record,
)

__all__ = [
    "RECORD_KIND",
    "RECORD_PREFIX",
    "AnswerCounter",
    "CountRecord",
    "CountRecordError",
    "ModelCount",
    "count_record",
    "is_count_record",
    "parse_count_record",
]
