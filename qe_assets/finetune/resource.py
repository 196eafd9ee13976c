"""The fine-tune backend as a Dagster resource, one concern: which backend trains (`none`,
`command`, `openai`) and the knobs of the training step itself.

Built from `Settings` (`from_settings`), where the QE_FINETUNE_* variables are parsed and
validated when the definitions load; the launchpad shows these fields and a run may override
them (`resources.finetune.config.backend`). The release knobs (threshold, sensor) stay in the
settings: they decide when a release runs, not how it trains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import dagster as dg

from qe_assets.finetune.command_backend import model_of, run_command
from qe_assets.finetune.inputs import TrainingInputs
from qe_assets.finetune.k8s import parse_target
from qe_assets.finetune.openai_backend import (
    FineTuneFailed,
    FineTuneStillRunning,
    follow_job,
    start_job,
)
from qe_assets.lib.resources import FineTuneBackendConfig

if TYPE_CHECKING:  # the LLM client stays a resource of its own, handed in by the asset
    import openai as openai_sdk

    from qe_assets.lib.resources import OpenAIResource

SKIPPED_MESSAGE = "skipped: no backend configured"

Save = Callable[..., None]


@dataclass(frozen=True)
class Claim:
    """The run a fine-tune works on: a new attempt, or an interrupted one resumed."""

    run_id: str
    version: str
    inputs: TrainingInputs
    job_id: str | None


@dataclass(frozen=True)
class Trained:
    """How an attempt ended: what `fine_tune_runs` records and the asset reports."""

    status: str
    model_id: str | None = None
    message: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    job_id: str | None = None
    # The model the adapter was trained on, as the training command reported it (`base_model`
    # in its Pipes metadata): the gate's baseline. None keeps the recipe's.
    base_model: str | None = None


class FineTuneBackendResource(FineTuneBackendConfig):
    """Which backend trains and how (the fields of `FineTuneBackendConfig`), and the training
    itself: `train` runs the claimed attempt on that backend."""

    def train(
        self,
        context: dg.AssetExecutionContext,
        claim: Claim,
        openai: OpenAIResource,
        save: Save,
    ) -> Trained:
        """Hand the claimed inputs to the backend; a failure is saved (`save(**fields)` updates
        the claim's `fine_tune_runs` row), then raised."""
        if self.backend == "none":
            return Trained("skipped", message=SKIPPED_MESSAGE)
        if self.backend == "openai":
            return self._follow_openai(context, claim, openai.client(), save)
        assert self.command  # the validator refuses `command` without one
        try:
            metrics = run_command(context, self.command, claim.inputs, parse_target(self.k8s))
        except Exception as exc:
            save(status="failed", message=f"training command failed: {exc}"[:2000])
            raise
        reported_base = metrics.get("base_model")
        return Trained(
            "succeeded",
            model_id=model_of(metrics),
            metrics=metrics,
            base_model=str(reported_base) if reported_base else None,
        )

    def _follow_openai(
        self,
        context: dg.AssetExecutionContext,
        claim: Claim,
        client: openai_sdk.OpenAI,
        save: Save,
    ) -> Trained:
        """Start the job (unless the claim resumes one) and follow it up to the deadline."""
        job_id = claim.job_id
        try:
            job_id = job_id or start_job(client, claim.inputs, save)
            outcome = follow_job(
                client,
                job_id,
                poll_seconds=self.poll_seconds,
                deadline_seconds=self.deadline_seconds,
                on_status=lambda s: context.log.info(f"job {job_id}: {s}"),
            )
        except FineTuneStillRunning as exc:
            save(message=str(exc))
            raise dg.Failure(str(exc)) from exc
        except FineTuneFailed as exc:
            # The provider's own status (failed or cancelled) and its events, for the post-mortem.
            failed = exc.outcome
            save(
                status=failed.status,
                message=str(exc),
                metrics={**failed.metrics, "events": failed.events},
            )
            raise dg.Failure(str(exc)) from exc
        metrics = {**outcome.metrics, "events": outcome.events}
        return Trained("succeeded", model_id=outcome.model_id, metrics=metrics, job_id=job_id)
