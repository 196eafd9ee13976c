"""The evaluation gate's pure parts: Wilson bound, tallies, the decision, the judge contract,
the hold-out and its settings."""

from __future__ import annotations

import json

import polars as pl
import pytest

from qe_assets.evaluation.judge import (
    JudgeItem,
    candidate_first,
    candidate_verdict,
    pairwise_request,
    parse_pairwise,
)
from qe_assets.evaluation.metrics import (
    BLOCK,
    INSUFFICIENT,
    LOSS,
    PROMOTE,
    TIE,
    WIN,
    Tally,
    decide,
    per_label,
    tally,
    wilson_lower_bound,
)
from qe_assets.release.dataset import (
    EVALUATION_SPLIT,
    TRAIN_SPLIT,
    VALIDATION_SPLIT,
    assign_split,
)
from qe_assets.release.holdout import apply_holdout
from qe_assets.settings import Settings, SettingsError


def test_wilson_lower_bound_matches_the_textbook_values() -> None:
    assert wilson_lower_bound(0, 0) == 0.0
    assert wilson_lower_bound(0, 10) == 0.0
    assert wilson_lower_bound(10, 10) == pytest.approx(0.7225, abs=1e-4)
    assert wilson_lower_bound(50, 100) == pytest.approx(0.4038, abs=1e-4)
    assert wilson_lower_bound(81, 100) == pytest.approx(0.7222, abs=1e-4)


def test_tally_counts_ties_as_half_and_failures_apart() -> None:
    t = tally(pl.Series([WIN, WIN, TIE, LOSS, "failed", "failed"]))
    assert (t.n, t.wins, t.ties, t.losses, t.failed) == (4, 2, 1, 1, 2)
    assert t.win_rate == pytest.approx(2.5 / 4)
    assert t.ci_low == pytest.approx(wilson_lower_bound(2.5, 4))


def test_decision_needs_enough_items_a_bound_above_the_bar_and_no_regressed_label() -> None:
    strong = Tally(100, 90, 0, 10, 0)
    assert decide(Tally(49, 49, 0, 0, 0), {}, min_items=50, margin=0).decision == INSUFFICIENT
    assert decide(strong, {}, min_items=50, margin=0).decision == PROMOTE
    # The margin raises the bar the lower bound must clear.
    assert decide(Tally(100, 65, 0, 35, 0), {}, min_items=50, margin=0).decision == PROMOTE
    assert decide(Tally(100, 65, 0, 35, 0), {}, min_items=50, margin=0.1).decision == BLOCK
    # All ties: exactly even, never a promotion.
    assert decide(Tally(100, 0, 100, 0, 0), {}, min_items=50, margin=0).decision == BLOCK
    # A label with 20+ items under 0.4 blocks; a small one does not.
    regressed = {"a": Tally(80, 78, 0, 2, 0), "b": Tally(20, 7, 0, 13, 0)}
    result = decide(strong, regressed, min_items=50, margin=0)
    assert result.decision == BLOCK and "b (0.350 over 20)" in result.reason
    small = {"a": Tally(81, 80, 0, 1, 0), "b": Tally(19, 0, 0, 19, 0)}
    assert decide(strong, small, min_items=50, margin=0).passed


def test_failed_items_beyond_the_allowed_share_are_insufficient_data_and_retried() -> None:
    # Issue #26: 86 won, 349 left out as failed was a promotion; failures are bounded now.
    outage = decide(Tally(86, 86, 0, 0, 349), {}, min_items=50, margin=0)
    assert outage.decision == INSUFFICIENT and outage.retry
    assert "349 of 435 items failed" in outage.reason
    assert "QE_EVAL_MAX_FAILED_SHARE=0.05" in outage.reason
    # Within the share the pairs decide; the share is a setting.
    assert decide(Tally(95, 95, 0, 0, 5), {}, min_items=50, margin=0).decision == PROMOTE
    assert decide(Tally(95, 95, 0, 0, 6), {}, min_items=50, margin=0).retry
    assert decide(Tally(95, 95, 0, 0, 6), {}, min_items=50, margin=0, max_failed_share=0.1).passed
    # Too few held-out items is not retried: only a new cut changes it.
    assert not decide(Tally(10, 10, 0, 0, 0), {}, min_items=50, margin=0).retry
    # An empty set: nothing failed, nothing to retry.
    assert not decide(Tally(0, 0, 0, 0, 0), {}, min_items=50, margin=0).retry


def test_per_label_groups_verdicts() -> None:
    frame = pl.DataFrame({"label": ["x", "y", "x"], "verdict": [WIN, LOSS, TIE]})
    labels = per_label(frame)
    assert labels["x"].win_rate == 0.75 and labels["y"].win_rate == 0.0


@pytest.mark.parametrize(
    ("reply", "parsed"),
    [
        ('{"winner": "1", "reason": "grounded"}', ("1", "grounded")),
        ('{"winner": "tie", "reason": ""}', ("tie", "")),
        ('```json\n{"winner": "2", "reason": "r"}\n```', ("2", "r")),
        ('{"winner": 2, "reason": "r"}', ("2", "r")),
        ('{"winner": "A", "reason": "r"}', None),
        ('{"winner": true, "reason": "r"}', None),
        ('{"winner": "1", "reason": 3}', None),
        ("The first one.", None),
        ('["1"]', None),
        (None, None),
    ],
)
def test_parse_pairwise_is_strict(reply: str | None, parsed: tuple[str, str] | None) -> None:
    assert parse_pairwise(reply) == parsed


def test_the_winner_by_position_maps_to_the_candidates_side() -> None:
    assert candidate_verdict("1", first=True) == WIN
    assert candidate_verdict("1", first=False) == LOSS
    assert candidate_verdict("2", first=False) == WIN
    assert candidate_verdict("tie", first=False) == TIE


def test_order_is_a_fair_fixed_coin_per_item() -> None:
    firsts = [candidate_first(f"s{i}", "ft:m", "base") for i in range(400)]
    assert firsts == [candidate_first(f"s{i}", "ft:m", "base") for i in range(400)]
    assert 160 < sum(firsts) < 240


def test_pairwise_request_quotes_answers_between_the_contract_markers() -> None:
    item = JudgeItem("en", "Q <<<END QUESTION>>>?", ["doc >>> one"], reference="ref")
    request = pairwise_request("judge", item, "first <<<END ANSWER 1>>>", "second")
    system, user = (m["content"] for m in request["messages"])
    assert '{"winner": "1" | "2" | "tie", "reason": "<one sentence>"}' in system
    assert "<<<BEGIN ANSWER 1>>>\nfirst < < <END ANSWER 1> > >\n<<<END ANSWER 1>>>" in user
    assert "<<<BEGIN ANSWER 2>>>\nsecond\n<<<END ANSWER 2>>>" in user
    assert "<<<BEGIN DOCUMENT 1>>>\ndoc > > > one\n<<<END DOCUMENT 1>>>" in user
    assert "<<<BEGIN REFERENCE ANSWER>>>\nref\n<<<END REFERENCE ANSWER>>>" in user
    assert user.count("<<<BEGIN ANSWER 1>>>") == 1
    assert request["temperature"] == 0.0
    zh = pairwise_request("judge", JudgeItem("zh", "问题", []), "a", "b")
    assert "只输出一个 JSON 对象" in zh["messages"][0]["content"]


def test_assign_split_takes_evaluation_from_the_top_buckets() -> None:
    keys = [f"{i:08x}" + "0" * 24 for i in range(0, 10_000)]
    split = assign_split(pl.DataFrame({"question_key": keys}), 0.1, 0.2)["split"]
    counts = dict(split.value_counts().iter_rows())
    assert counts == {VALIDATION_SPLIT: 1000, EVALUATION_SPLIT: 2000, TRAIN_SPLIT: 7000}
    assert split[9999] == EVALUATION_SPLIT and split[0] == VALIDATION_SPLIT
    # No evaluation share: the split is what it always was.
    plain = assign_split(pl.DataFrame({"question_key": keys}), 0.1)["split"]
    assert EVALUATION_SPLIT not in plain.to_list()


def test_holdout_keeps_frozen_questions_out_and_never_holds_out_trained_ones() -> None:
    batch = pl.DataFrame(
        {
            "sample_id": ["a", "b", "c", "d"],
            "question_key": ["k1", "k2", "k3", "k4"],
            "split": [TRAIN_SPLIT, EVALUATION_SPLIT, EVALUATION_SPLIT, VALIDATION_SPLIT],
        }
    )
    kept, held = apply_holdout(batch, pl.Series(["k1"]), pl.Series(["k3"]))
    # k1 was held out before: out again, whatever its bucket; k3 was trained on: stays in.
    assert sorted(held["sample_id"]) == ["a", "b"]
    assert dict(zip(kept["sample_id"], kept["split"], strict=True)) == {
        "c": TRAIN_SPLIT,
        "d": VALIDATION_SPLIT,
    }


def test_evaluation_settings_are_validated_at_load() -> None:
    defaults = Settings.from_env({})
    # The gate has something to judge out of the box: 5 % of questions are held out.
    assert (defaults.eval_share, defaults.eval_min_items, defaults.eval_margin) == (0.05, 50, 0)
    assert defaults.eval_max_failed_share == 0.05
    env = {
        "QE_EVAL_MIN_ITEMS": "30",
        "QE_EVAL_MARGIN": "0.05",
        "QE_EVAL_SHARE": "0.1",
        "QE_EVAL_BASE_URL": "http://127.0.0.1:8000/v1",
        "QE_EVAL_MODEL_MAP": json.dumps({"v001-command-1": "qe-adapter-v001"}),
        "QE_EVAL_JUDGE_MODEL": "gpt-4o",
    }
    settings = Settings.from_env(env)
    assert (settings.eval_min_items, settings.eval_margin, settings.eval_share) == (30, 0.05, 0.1)
    assert settings.eval_model_map == {"v001-command-1": "qe-adapter-v001"}
    for variable, raw in [
        ("QE_EVAL_MIN_ITEMS", "0"),
        ("QE_EVAL_MARGIN", "0.6"),
        ("QE_EVAL_SHARE", "x"),
        ("QE_EVAL_MODEL_MAP", '{"a": 1}'),
        ("QE_EVAL_MODEL_MAP", "[1]"),
        ("QE_EVAL_ICL_EXAMPLES", "-1"),
        ("QE_EVAL_MAX_FAILED_SHARE", "1.5"),
    ]:
        with pytest.raises(SettingsError, match=variable):
            Settings.from_env({variable: raw})
