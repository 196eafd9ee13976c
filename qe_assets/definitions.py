"""The Dagster code location's entry point: workspace.yaml and `dagster dev -m` load this module.

Importing it builds nothing: `defs` is the lazy `@dg.definitions` of `qe_assets.ops.definitions`,
which Dagster calls when it loads the code location.
"""

from qe_assets.ops.definitions import defs

__all__ = ["defs"]
