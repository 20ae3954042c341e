"""The mocker: a simulated inference engine (scheduling, KV cache, timing; no model).

Use it to test and benchmark the gateway without GPUs: ``MockerEngine(context)``.
"""

from __future__ import annotations

from dynamo_gateway.engines.mocker.engine import MockerEngine
from dynamo_gateway.engines.mocker.text import TokenStream, WordSource, load_word_source
from dynamo_gateway.engines.mocker.timing import TimingModel

__all__ = [
    "MockerEngine",
    "TimingModel",
    "TokenStream",
    "WordSource",
    "load_word_source",
]
