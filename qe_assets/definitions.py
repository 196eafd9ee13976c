"""The Dagster code location's entry point (workspace.yaml, `dagster dev -m qe_assets.definitions`).

Importing it builds nothing: `defs` is the lazy `@dg.definitions` of `qe_assets.ops.definitions`,
which Dagster calls when it loads the code location.
"""

from qe_assets.ops.definitions import defs

__all__ = ["defs"]
