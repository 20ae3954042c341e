"""The conformance suite fails engines that break the contract.

Each class below is the toy engine with one bug; the suite runs against it in
a separate pytest process, and the test that guards that part of the contract
must fail there (and the rest pass).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SUITE = textwrap.dedent(
    """
    from __future__ import annotations

    import msgspec
    import pytest

    from dynamo_gateway.protocol.kv_events import BlockStored
    from dynamo_gateway.testing.conformance import Capabilities, EngineConformance, EngineSpec
    from dynamo_gateway_toy.engine import ToyEngine

    CAPS = Capabilities(deterministic_greedy=True, prefix_caching=True, kv_events=True)


    class IgnoresAbort(ToyEngine):
        async def abort(self, request_id):
            pass


    class ForgetsResumedTokens(ToyEngine):
        def generate(self, request):
            return super().generate(msgspec.structs.replace(request, resumed_token_ids=[]))


    class ReportsNoCache(ToyEngine):
        async def generate(self, request):
            async for out in super().generate(request):
                if out.cached_tokens is not None:
                    out.cached_tokens = 0
                yield out


    class OwnHashes(ToyEngine):
        def _publish(self, data):
            if isinstance(data, BlockStored):
                wrong = [h ^ 1 for h in data.block_hashes]
                data = msgspec.structs.replace(data, block_hashes=wrong)
            super()._publish(data)


    def spec(demo_model, cls):
        return EngineSpec(factory=cls, model=demo_model, capabilities=CAPS, plugins=[],
                          settings={"cache": {"num_kv_blocks": 256}}, max_tokens_long=256,
                          timeout_s=3.0)


    @pytest.fixture(scope="class")
    def engine_spec(request, demo_model):
        return spec(demo_model, request.cls.engine)


    class TestIgnoresAbort(EngineConformance):
        engine = IgnoresAbort


    class TestForgetsResumedTokens(EngineConformance):
        engine = ForgetsResumedTokens


    class TestReportsNoCache(EngineConformance):
        engine = ReportsNoCache


    class TestOwnHashes(EngineConformance):
        engine = OwnHashes
    """
)

EXPECTED = {
    "TestIgnoresAbort::test_abort_mid_stream",
    "TestIgnoresAbort::test_load_during_and_after",
    "TestForgetsResumedTokens::test_resumed_tokens_count_towards_max_tokens",
    "TestReportsNoCache::test_cached_tokens",
    "TestOwnHashes::test_kv_events_describe_the_cache",
}


def test_each_bug_fails_its_test(tmp_path: Path, demo_model: Path) -> None:
    (tmp_path / "test_buggy.py").write_text(SUITE)
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_default_fixture_loop_scope = function\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider",
         "-k", "abort_mid or load_during or resumed or cached_tokens or kv_events",
         "test_buggy.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"DYNAMO_GATEWAY_TEST_MODEL": str(demo_model), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    failed = {
        line.split(" ", 2)[1].split("::", 1)[1]
        for line in proc.stdout.splitlines()
        if line.startswith("FAILED ")
    }
    assert failed == EXPECTED, proc.stdout[-4000:]
