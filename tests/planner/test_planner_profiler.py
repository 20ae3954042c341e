"""`dynamo-gateway profile`: measured on the mocker, whose true costs are known."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dynamo_gateway.engines.base import EngineContext
from dynamo_gateway.engines.mocker import MockerEngine
from dynamo_gateway.engines.mocker.timing import TimingModel
from dynamo_gateway.models.card import ModelCard
from dynamo_gateway.planner.config import load_config
from dynamo_gateway.planner.policies.sla import make_sla_policy
from dynamo_gateway.planner.profile import Profile
from dynamo_gateway.planner.profiler import batch_itl, measure
from dynamo_gateway.settings import load_settings


def test_batch_itl_reads_the_window_where_every_request_decodes() -> None:
    # Request 0 runs alone at 50 ms/token first, then both at 10 ms/token; request 1
    # starts late. The window where both stream is 10 ms/token for each.
    a = [0.0, 0.05, 0.10, 0.11, 0.12, 0.13, 0.14]
    b = [0.10, 0.11, 0.12, 0.13, 0.14, 0.15]
    assert batch_itl([a, b]) == pytest.approx(0.01)
    # No common window: each request's own mean.
    assert batch_itl([[0.0, 0.02], [1.0, 1.04]]) == pytest.approx(0.03)
    with pytest.raises(RuntimeError, match="too few tokens"):
        batch_itl([[0.0], [1.0]])


async def test_a_mocker_profile_matches_its_timing_model(demo_model: Path) -> None:
    settings = load_settings(engine="mocker", models=[{"path": demo_model}])
    card = ModelCard.load(demo_model)
    engine = MockerEngine(EngineContext(settings, card, "profile"))
    await engine.start()
    try:
        profile = await measure(
            engine, engine_name="mocker", model="demo", vocab_size=card.vocab_size,
            input_lengths=[64, 1024], batches=[1, 8], contexts=[256], decode_tokens=12,
            repeats=2,
        )  # fmt: skip
    finally:
        await engine.aclose()
    timing = TimingModel.from_settings(settings.mocker)
    for tokens, seconds in profile.prefill:
        truth = timing.step_seconds(tokens, 0)
        # A simulated step never ends early by more than the mocker's lag credit (5 ms)
        # and, on a loaded machine, is late by the loop's delays only.
        assert truth - 0.006 <= seconds <= 3 * truth + 0.05, (tokens, seconds, truth)
    assert profile.prefill_s(1024) > profile.prefill_s(64)
    for point in profile.decode:
        blocks = point.batch * -(-point.context // settings.cache.block_size)
        truth = timing.step_seconds(0, blocks)
        assert truth - 0.006 <= point.itl_s <= 3 * truth + 0.05, (point, truth)


def test_profile_command_writes_what_the_sla_policy_loads(demo_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "mocker.json"
    proc = subprocess.run(
        [sys.executable, "-m", "dynamo_gateway.cli", "profile", "--engine", "mocker",
         "--model", str(demo_model), "--out", str(out), "--isl", "64,512,100000",
         "--batch", "1,4", "--context", "128", "--decode-tokens", "8", "--repeats", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "skipping lengths past the model's context" in proc.stderr
    assert "100000" in proc.stderr
    profile = Profile.load(out)
    assert profile.engine == "mocker"
    assert [n for n, _ in profile.prefill] == [64, 512]
    assert {(p.batch, p.context) for p in profile.decode} == {(1, 128), (4, 128)}
    config = load_config(
        None, policy="sla", models=[{"name": "demo", "path": demo_model, "profile": out}]
    )
    policy = make_sla_policy(config)
    assert policy.profiles["demo"] == profile


def test_profile_command_refuses_bad_lists(demo_model: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dynamo_gateway.cli", "profile", "--engine", "mocker",
         "--model", str(demo_model), "--out", str(tmp_path / "p.json"), "--isl", "64,x"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "not a comma-separated list of integers" in proc.stderr
