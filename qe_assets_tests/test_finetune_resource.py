"""The fine-tune backend resource (`finetune`): built from the settings, validated when built,
and overridable per run from the launchpad's run config."""

from __future__ import annotations

import sys

import dagster as dg
import pytest

from qe_assets.finetune.resource import FineTuneBackendResource
from qe_assets.lib.resources import SETTINGS_FIELDS
from qe_assets.ops.definitions import RELEASE_JOB, build_definitions, build_resources
from qe_assets.settings import Settings, SettingsError
from qe_assets.store import connect
from qe_assets_tests.runs import checks, metadata
from qe_assets_tests.test_finetune import SCRIPTS, processed

PIPES_TRAIN = f"{sys.executable} {SCRIPTS / 'pipes_train.py'}"


def test_the_resource_is_built_from_the_settings() -> None:
    settings = Settings.from_env(
        {
            "QE_FINETUNE_BACKEND": "command",
            "QE_FINETUNE_COMMAND": "python train.py",
            "QE_FINETUNE_BASE_MODEL": "tiny",
            "QE_FINETUNE_METHOD": "dpo",
            "QE_FINETUNE_HYPERPARAMETERS": '{"n_epochs": 3}',
            "QE_FINETUNE_DEADLINE_SECONDS": "60",
            "QE_FINETUNE_ALLOW_NAIVE": "true",
        }
    )
    resource = build_resources(settings)["finetune"]
    assert isinstance(resource, FineTuneBackendResource)
    for field, source in SETTINGS_FIELDS.items():
        assert getattr(resource, field) == getattr(settings, source), field
    assert (resource.name, resource.configured) == ("command", True)
    # Its defaults are the settings' defaults: one place says what they are.
    assert FineTuneBackendResource() == FineTuneBackendResource.from_settings(Settings())
    assert not FineTuneBackendResource().configured
    assert "finetune" in build_definitions(Settings()).resources


def test_a_command_backend_without_a_command_fails_at_load_in_one_line() -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"QE_FINETUNE_BACKEND": "command"})
    assert str(raised.value).startswith("QE_FINETUNE_BACKEND=command needs QE_FINETUNE_COMMAND")
    assert "\n" not in str(raised.value)
    # Settings made in code (not from the environment) are held to the same rule when the
    # definitions load.
    with pytest.raises(ValueError, match="QE_FINETUNE_BACKEND=command needs QE_FINETUNE_COMMAND"):
        build_definitions(Settings(finetune_backend="command"))
    with pytest.raises(ValueError, match="needs QE_FINETUNE_COMMAND"):
        FineTuneBackendResource(backend="command", command="  ")


def release(settings: Settings, finetune: dict, instance: dg.DagsterInstance):
    """One run of the release job as the launchpad launches it, with `finetune` overridden."""
    job = build_definitions(settings).resolve_job_def(RELEASE_JOB)
    run_config = {
        "ops": {"tuning_dataset": {"config": {"force": True}}},
        "resources": {"finetune": {"config": finetune}},
    }
    return job.execute_in_process(instance=instance, run_config=run_config, raise_on_error=False)


def test_a_run_config_override_of_the_backend_takes_effect(settings: Settings) -> None:
    assert settings.finetune_backend == "none"
    processed(settings, 15)
    override = {"backend": "command", "command": PIPES_TRAIN, "allow_naive": True}
    with dg.instance_for_test() as instance:
        run = release(settings, override, instance)
    assert run.success
    model = metadata(run, "fine_tuned_model")
    assert (model["backend"], model["status"]) == ("command", "succeeded")
    assert model["model_id"] == "/models/v001-command-1"
    # The release's checks looked at the version the overridden backend trains on.
    assert {c.metadata["version"].value for c in checks(run).values()} == {"v001"}
    with connect(settings.database, read_only=True) as conn:
        rows = conn.execute("SELECT run_id, backend, status FROM fine_tune_runs").fetchall()
    assert rows == [("v001-command-1", "command", "succeeded")]


def test_a_bad_override_fails_the_run_before_anything_is_written(settings: Settings) -> None:
    processed(settings, 15)
    with dg.instance_for_test() as instance:
        # Not one of the backends: the launchpad's config schema refuses it.
        with pytest.raises(dg.DagsterInvalidConfigError, match="backend"):
            release(settings, {"backend": "sagemaker"}, instance)
        # A command backend without a command: the run fails building the resource.
        run = release(settings, {"backend": "command"}, instance)
    assert not run.success
    (failure,) = [
        e for e in run.all_events if e.event_type == dg.DagsterEventType.RESOURCE_INIT_FAILURE
    ]
    error = failure.event_specific_data.error
    assert "QE_FINETUNE_BACKEND=command needs QE_FINETUNE_COMMAND" in error.message
    with connect(settings.database, read_only=True) as conn:
        assert conn.execute("SELECT count(*) FROM dataset_versions").fetchall() == [(0,)]
