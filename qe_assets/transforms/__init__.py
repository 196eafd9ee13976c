"""Pure Polars transforms: DataFrames in, DataFrames out; no Dagster, no I/O."""
