"""Benchmarking tools: the ``bench`` load generator and the bare-SSE floor server.

Importing this package is cheap; the floor server (starlette) is only imported from
:mod:`dynamo_gateway.bench.floor`.
"""

from __future__ import annotations

from dynamo_gateway.bench.loadgen import (
    BenchConfig,
    BenchResult,
    RequestRecord,
    format_summary,
    run_bench,
)

__all__ = ["BenchConfig", "BenchResult", "RequestRecord", "format_summary", "run_bench"]
