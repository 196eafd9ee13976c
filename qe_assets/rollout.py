"""Moved to `qe_assets.service.rollout` (the light service package); this path keeps working."""

from qe_assets.service.rollout import (
    MAX_STATE_BYTES,
    MAX_STATE_DEPTH,
    STATE_FILE,
    STATE_VERSION,
    RolloutState,
    Router,
    bucket,
    choose_model,
    default_router,
    read_bounded,
    read_state,
    state_path,
    write_state,
)

__all__ = [
    "MAX_STATE_BYTES",
    "MAX_STATE_DEPTH",
    "STATE_FILE",
    "STATE_VERSION",
    "RolloutState",
    "Router",
    "bucket",
    "choose_model",
    "default_router",
    "read_bounded",
    "read_state",
    "state_path",
    "write_state",
]
