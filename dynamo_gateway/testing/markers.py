"""Command-line options and markers: ``--run-slow``, ``--require-engines``,
``--chaos-seconds`` (how long the ``chaos`` tests run) and the hardware / engine
markers (``gpu``, ``vllm``, ``sglang``, ``trtllm``, ``nixl``, ``ray``, ``slow``,
``chaos``, ``real_model``).

A test marked with an engine is skipped when that engine's library cannot be
imported, one marked ``gpu`` when torch sees no CUDA device; under
``--require-engines`` such a test fails instead (the CI job with the hardware).
"""

from __future__ import annotations

import importlib.util

import pytest

__all__ = [
    "ENGINE_MARKERS",
    "MARKERS",
    "pytest_addoption",
    "pytest_collection_modifyitems",
    "pytest_configure",
    "pytest_runtest_setup",
]

# marker -> importable module that provides it
ENGINE_MARKERS = {
    "vllm": "vllm",
    "sglang": "sglang",
    "trtllm": "tensorrt_llm",
    "nixl": "nixl",
    "ray": "ray",
}

MARKERS = {
    "gpu": "needs an NVIDIA GPU (CUDA)",
    "vllm": "needs vLLM installed",
    "sglang": "needs SGLang installed",
    "trtllm": "needs TensorRT-LLM installed",
    "nixl": "needs NIXL installed",
    "ray": "needs Ray installed (starts a local Ray cluster)",
    "slow": "takes more than a few seconds; run with --run-slow",
    "chaos": "faults injected into a live cluster under load (CI-sized; --chaos-seconds)",
    "real_model": "serves the real SmolLM2-135M-Instruct checkpoint (fixture real_model)",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dynamo-gateway")
    group.addoption("--run-slow", action="store_true", help="run tests marked slow")
    group.addoption(
        "--require-engines",
        action="store_true",
        help="fail (instead of skip) engine/GPU tests whose engine or device is missing",
    )
    group.addoption(
        "--chaos-seconds",
        type=float,
        default=60.0,
        help="length of the chaos runs (tests marked chaos); the CI size is 60",
    )


def pytest_configure(config: pytest.Config) -> None:
    # Declared here too, so plugin packages testing with --strict-markers get them.
    for name, doc in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = config.getoption("--run-slow")
    require = config.getoption("--require-engines")
    for item in items:
        # get_closest_marker, not item.keywords: keywords also hold the names of
        # the folders above the test (plugins/vllm/... would count as `vllm`).
        if item.get_closest_marker("slow") and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow test: use --run-slow"))
        missing = [
            marker
            for marker, module in ENGINE_MARKERS.items()
            if item.get_closest_marker(marker) and importlib.util.find_spec(module) is None
        ]
        if item.get_closest_marker("gpu") and not _cuda_available():
            missing.append("gpu")
        if missing:
            reason = f"needs {', '.join(missing)} (not available here)"
            if require:
                item.stash[_MISSING] = reason
            else:
                item.add_marker(pytest.mark.skip(reason=reason))


_MISSING = pytest.StashKey[str]()


def pytest_runtest_setup(item: pytest.Item) -> None:
    reason = item.stash.get(_MISSING, None)
    if reason is not None:
        pytest.fail(f"--require-engines: {reason}", pytrace=False)
