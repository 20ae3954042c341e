"""The mocker's step-time model."""

from __future__ import annotations

import dataclasses

import pytest

from dynamo_gateway.engines.mocker.timing import TimingModel
from dynamo_gateway.settings import MockerSettings

MODEL = TimingModel(
    speedup=1.0,
    prefill_base_ms=5.0,
    prefill_ms_per_token=0.04,
    prefill_ms_per_token2=1.0e-6,
    decode_base_ms=8.0,
    decode_ms_per_kv_block=0.0025,
)


def test_idle_step_is_free() -> None:
    assert MODEL.step_ms(0, 0) == 0.0
    assert MODEL.step_seconds(0, 0) == 0.0


def test_prefill_only() -> None:
    # 5 + 0.04 * 1000 + 1e-6 * 1000**2 = 5 + 40 + 1
    assert MODEL.step_ms(1000, 0) == pytest.approx(46.0)
    assert MODEL.step_ms(1, 0) == pytest.approx(5.040001)


def test_decode_only() -> None:
    # 8 + 0.0025 * 400
    assert MODEL.step_ms(0, 400) == pytest.approx(9.0)


def test_mixed_step_pays_both() -> None:
    assert MODEL.step_ms(1000, 400) == pytest.approx(55.0)


def test_speedup_divides_and_converts_to_seconds() -> None:
    fast = dataclasses.replace(MODEL, speedup=100.0)
    assert fast.step_seconds(1000, 400) == pytest.approx(MODEL.step_seconds(1000, 400) / 100)
    assert fast.step_seconds(1000, 400) == pytest.approx(0.055 / 100)
    assert MODEL.step_seconds(0, 400) == pytest.approx(0.009)


def test_from_settings_copies_every_coefficient() -> None:
    cfg = MockerSettings(
        speedup=4,
        prefill_base_ms=1,
        prefill_ms_per_token=2,
        prefill_ms_per_token2=3,
        decode_base_ms=4,
        decode_ms_per_kv_block=5,
    )
    model = TimingModel.from_settings(cfg)
    # (1 + 2*10 + 3*100) + (4 + 5*2) = 321 + 14
    assert model.step_ms(10, 2) == pytest.approx(335.0)
    assert model.step_seconds(10, 2) == pytest.approx(0.335 / 4)


def test_defaults_match_settings_defaults() -> None:
    assert TimingModel.from_settings(MockerSettings()) == TimingModel()
