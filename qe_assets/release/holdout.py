"""The frozen evaluation set: which samples of a cut are held out of its files, for good.

A question is held out when its `question_key` (md5 of the normalised question, the key the
split and the near-duplicate machinery already share) falls in the evaluation buckets of
`assign_split`, or was held out by an earlier cut; a question some version already trained on is
never held out (it would grade the model on what it learnt). Exact duplicates never reach a cut
(`duplicate_of`), and near-duplicates share the normalised question, so they share the fate.
"""

from __future__ import annotations

import duckdb
import polars as pl

from qe_assets.release.dataset import EVALUATION_SPLIT, TRAIN_SPLIT
from qe_assets.store import owned_copy


def apply_holdout(
    batch: pl.DataFrame, frozen_keys: pl.Series, trained_keys: pl.Series
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(rows for the version's files, held-out rows: sample_id and question_key).

    `batch` carries `split` and `question_key`; `frozen_keys` are the question keys already in
    the evaluation set, `trained_keys` those an earlier version exported.
    """
    key = pl.col("question_key")
    split = (
        pl.when(key.is_in(frozen_keys.implode()))
        .then(pl.lit(EVALUATION_SPLIT))
        .when((pl.col("split") == EVALUATION_SPLIT) & key.is_in(trained_keys.implode()))
        .then(pl.lit(TRAIN_SPLIT))
        .otherwise(pl.col("split"))
    )
    marked = batch.with_columns(split=split)
    held = pl.col("split") == EVALUATION_SPLIT
    return marked.filter(~held), marked.filter(held).select("sample_id", "question_key")


def hold_out(
    conn: duckdb.DuckDBPyConnection, batch: pl.DataFrame
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """`apply_holdout` with the keys read from the store for this batch's questions."""
    conn.register("holdout_keys", batch.select("question_key").unique())
    frozen = conn.sql(
        "SELECT DISTINCT question_key FROM evaluation_set SEMI JOIN holdout_keys "
        "USING (question_key)"
    ).pl()["question_key"]
    trained = pl.Series("question_key", [], dtype=pl.String)
    if (batch["split"] == EVALUATION_SPLIT).any():
        trained = conn.sql(
            """
            SELECT DISTINCT s.question_key FROM annotated_samples s
            SEMI JOIN holdout_keys USING (question_key)
            WHERE EXISTS (SELECT 1 FROM dataset_samples d WHERE d.sample_id = s.sample_id)
            """
        ).pl()["question_key"]
    conn.unregister("holdout_keys")
    kept, held = apply_holdout(batch, frozen, trained)
    # Kept until the cut commits: own buffers, so the batch's prompts can be freed meanwhile.
    return kept, held.select(owned_copy("sample_id"), owned_copy("question_key"))
