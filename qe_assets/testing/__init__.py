"""Test helpers shared by the test suite (qe_assets_tests) and the benchmarks (qe_assets_bench):
an OpenAI-compatible HTTP server, event factories and in-process runs of the real definitions.

Standard library plus the package's own dependencies; nothing here is imported by the pipeline.
"""
