"""The overload client's verdicts (`dynamo_gateway.bench.overload`), without sockets."""

from __future__ import annotations

from collections import Counter

from dynamo_gateway.bench.overload import ClientKind, Mix, Outcome, classify, tally


def test_kinds_follow_the_mix_fractions() -> None:
    mix = Mix(slow=0.2, vanish=0.3)
    kinds = Counter(mix.kind(i, 1000) for i in range(1000))
    assert abs(kinds[ClientKind.VANISH] - 300) <= 5
    assert abs(kinds[ClientKind.SLOW] - 200) <= 5
    assert abs(kinds[ClientKind.NORMAL] - 500) <= 5


def test_shed_needs_retry_after_and_an_openai_error_body() -> None:
    good = Outcome(ClientKind.NORMAL, status=429, retry_after="1", error_type="rate_limit_error")
    assert classify(good) == "shed"
    assert classify(Outcome(ClientKind.NORMAL, status=503, error_type="x")) == (
        "503 without a Retry-After"
    )
    assert classify(Outcome(ClientKind.NORMAL, status=429, retry_after="soon", error_type="x")) == (
        "429 without a Retry-After"
    )
    assert classify(Outcome(ClientKind.NORMAL, status=429, retry_after="1")) == (
        "429 without an OpenAI error body"
    )
    assert classify(Outcome(ClientKind.NORMAL, status=500)) == "HTTP 500"


def test_served_means_done_unless_the_client_left_on_purpose() -> None:
    assert classify(Outcome(ClientKind.SLOW, status=200, events=21, done=True)) == "served"
    assert classify(Outcome(ClientKind.VANISH, status=200, events=3)) == "served"
    assert classify(Outcome(ClientKind.NORMAL, status=200, events=3)) == (
        "stream ended without [DONE]"
    )
    timed_out = Outcome(ClientKind.NORMAL, status=200, failure="timeout")
    t = tally([timed_out, Outcome(ClientKind.VANISH, status=200)])
    assert (t.served, t.shed, t.failed) == (1, 0, 1)
    assert t.failures == Counter({"timeout": 1})
