"""The reference engine's token sampler: greedy, temperature / top-k / top-p draws,
seeds, min_tokens and stop ids, penalties, and logprobs."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_gateway.engines.reference import sampling
from dynamo_gateway.engines.reference.sampling import Sampler, SequenceSampler
from dynamo_gateway.protocol.engine import FinishReason, SamplingParams

CPU = torch.device("cpu")
EOS = 2


def make_seq(
    *, eos: Sequence[int] = (EOS,), prompt: Sequence[int] = (5, 6, 7), **params: Any
) -> SequenceSampler:
    params.setdefault("max_tokens", 64)
    return SequenceSampler(
        SamplingParams(**params), eos_token_ids=eos, prompt_token_ids=prompt, device=CPU
    )


def logits_for(probs: Sequence[float]) -> torch.Tensor:
    """One row [1, V] of logits whose softmax is `probs` (zeros become -inf)."""
    return torch.tensor([[math.log(p) if p > 0 else -math.inf for p in probs]])


def draw_many(logits_row: torch.Tensor, n: int, **params: Any) -> Counter[int]:
    """Sample n times from one row: n unseeded sequences in one batch (fast)."""
    seqs = [make_seq(**params) for _ in range(n)]
    out = Sampler(seed=1234)(logits_row.expand(n, -1), seqs)
    return Counter(t for t, _ in out)


def chi_square(counts: Counter[int], probs: Sequence[float]) -> float:
    n = sum(counts.values())
    return sum((counts.get(i, 0) - n * p) ** 2 / (n * p) for i, p in enumerate(probs) if p > 0)


def run_steps(
    sampler: Sampler, seqs: list[SequenceSampler], steps: list[torch.Tensor]
) -> list[list[int]]:
    """Sample `steps` (one [S, V] logits tensor each), recording every token."""
    tokens: list[list[int]] = [[] for _ in seqs]
    for logits in steps:
        for i, (seq, (tok, _)) in enumerate(zip(seqs, sampler(logits, seqs), strict=True)):
            seq.record(tok)
            tokens[i].append(tok)
    return tokens


# --- greedy -----------------------------------------------------------------------------


def test_greedy_is_argmax() -> None:
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(0))
    out = Sampler(seed=0)(logits, [make_seq(temperature=0.0) for _ in range(8)])
    assert [t for t, _ in out] == logits.argmax(dim=-1).tolist()
    assert all(lp is None for _, lp in out)


def test_greedy_ties_go_to_lowest_id() -> None:
    row = torch.zeros(1, 10)
    row[0, 7] = row[0, 3] = row[0, 9] = 5.0
    # Alone, and as the greedy part of a mixed batch (the sub-batch path).
    assert Sampler(seed=0)(row, [make_seq(temperature=0.0)])[0][0] == 3
    batch = torch.cat([torch.randn(1, 10), row, torch.randn(1, 10)])
    seqs = [make_seq(temperature=1.0), make_seq(temperature=0.0), make_seq(temperature=1.0)]
    assert Sampler(seed=0)(batch, seqs)[1][0] == 3


def test_tiny_temperature_is_greedy_and_input_dtype_is_free() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    expected = logits.argmax(dim=-1).tolist()
    seqs = [make_seq(temperature=1e-7, seed=i) for i in range(4)]
    assert [t for t, _ in Sampler(seed=0)(logits, seqs)] == expected
    half = logits.to(torch.bfloat16)
    got = [t for t, _ in Sampler(seed=0)(half, [make_seq(temperature=0.0) for _ in range(4)])]
    assert got == half.float().argmax(dim=-1).tolist()


# --- temperature, top-k, top-p ----------------------------------------------------------

PROBS = [0.05, 0.3, 0.1, 0.25, 0.2, 0.1]


def test_temperature_one_matches_softmax() -> None:
    counts = draw_many(logits_for(PROBS), 30_000, temperature=1.0)
    assert chi_square(counts, PROBS) < 30  # df = 5; p < 1e-4 would be 25.7


def test_temperature_scales_the_distribution() -> None:
    logits = logits_for(PROBS)
    expected = torch.softmax(logits[0] / 0.5, dim=-1).tolist()
    counts = draw_many(logits, 30_000, temperature=0.5)
    assert chi_square(counts, expected) < 30


def test_seeded_rows_match_softmax() -> None:
    # Each row draws from its own generator: the per-request path, not the shared one.
    n = 6000
    seqs = [make_seq(temperature=1.0, seed=i) for i in range(n)]
    out = Sampler(seed=0)(logits_for(PROBS).expand(n, -1), seqs)
    assert chi_square(Counter(t for t, _ in out), PROBS) < 30


def test_top_k_support_is_exactly_the_k_best() -> None:
    logits = torch.tensor([[0.1, 1.0, 0.9, -2.0, 1.1, 0.0, 0.95, 0.5]])
    counts = draw_many(logits, 5000, temperature=1.0, top_k=3)
    assert set(counts) == {4, 1, 6}
    # Within the support the relative frequencies are still softmax ones.
    kept = torch.softmax(logits[0, [4, 1, 6]], dim=-1).tolist()
    assert chi_square(Counter({i: counts[t] for i, t in enumerate([4, 1, 6])}), kept) < 25


def test_top_k_keeps_ties_and_disables_at_zero_or_vocab() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    assert set(draw_many(logits, 3000, top_k=2)) == {0, 2, 3}  # 2 and 3 tie for second
    assert set(draw_many(logits, 3000, top_k=0)) == {0, 1, 2, 3, 4}
    assert set(draw_many(logits, 3000, top_k=5)) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize(
    ("top_p", "support"),
    [
        (0.0, {3}),  # always the top token, even for a degenerate top_p
        (0.01, {3}),
        (0.4, {3}),
        (0.7, {3, 0}),  # 0.5 < 0.7 <= 0.75
        (0.8, {3, 0, 4}),  # 0.75 < 0.8 <= 0.9
        (1.0, {3, 0, 4, 1, 2}),
    ],
)
def test_top_p_keeps_the_nucleus(top_p: float, support: set[int]) -> None:
    probs = [0.25, 0.06, 0.04, 0.5, 0.15]  # descending: ids 3, 0, 4, 1, 2
    counts = draw_many(logits_for(probs), 4000, temperature=1.0, top_p=top_p)
    assert set(counts) == support
    nucleus = sorted(support)
    kept = [probs[i] / sum(probs[i] for i in nucleus) for i in nucleus]
    assert chi_square(Counter({j: counts[t] for j, t in enumerate(nucleus)}), kept) < 30


def test_top_p_after_temperature_and_top_k() -> None:
    # softmax(logits / 0.5) = [0.8, 0.2 * ...]: the nucleus at 0.7 is just the top token,
    # although at temperature 1 it would be two tokens.
    logits = logits_for([0.6, 0.3, 0.1])
    assert set(draw_many(logits, 2000, temperature=0.5, top_p=0.7)) == {0}
    assert set(draw_many(logits, 2000, temperature=1.0, top_p=0.7)) == {0, 1}
    # top-k first: among the 2 best, renormalised [2/3, 1/3]; top_p 0.9 keeps both only.
    assert set(draw_many(logits, 2000, temperature=1.0, top_k=2, top_p=0.9)) == {0, 1}
    # Ties at the k-th logit: top_k=2 keeps three tokens [.58, .21, .21], and top_p 0.95
    # needs all three (more than the k candidates the nucleus search starts with).
    tied = torch.tensor([[3.0, 2.0, 2.0, 0.0, 1.0]])
    assert set(draw_many(tied, 3000, top_k=2, top_p=0.95)) == {0, 1, 2}
    assert set(draw_many(tied, 3000, top_k=2, top_p=0.5)) == {0}


def test_top_p_candidates_and_full_sort_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    # Few candidates force the CPU's full-sort fallback for the flat row, while the
    # peaked row's nucleus fits in the candidates; in one batch, both must be exact.
    monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", 3)
    peaked = [0.6, 0.25] + [0.15 / 30] * 30  # nucleus at 0.8: ids 0, 1
    # Nearly flat, ids ascending in likelihood order: the nucleus at 0.3 is 10 tokens of
    # ~1/32 (9/32 < 0.3 <= 10/32).
    flat_logits = torch.tensor([[0.0] * 32]) + torch.linspace(0, 1e-3, 32).flip(0)
    n = 3000
    seqs = [make_seq(top_p=0.8) for _ in range(n)] + [make_seq(top_p=0.3) for _ in range(n)]
    logits = torch.cat([logits_for(peaked).expand(n, -1), flat_logits.expand(n, -1)])
    out = [t for t, _ in Sampler(seed=3)(logits, seqs)]
    assert set(out[:n]) == {0, 1}
    assert set(out[n:]) == set(range(10))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    vocab=st.integers(2, 40),
    top_k=st.integers(0, 45),
    top_p=st.floats(0.05, 1.0),
    temperature=st.floats(0.05, 3.0),
)
def test_sample_is_always_inside_top_k_and_top_p(
    seed: int, vocab: int, top_k: int, top_p: float, temperature: float
) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, vocab, generator=gen) * 3
    seqs = [
        make_seq(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed + i)
        for i in range(16)
    ]
    out = {t for t, _ in Sampler(seed=seed)(logits.expand(16, -1), seqs)}
    # Reference support: top-k by value (ties kept) on the same float32 scaled logits,
    # then the nucleus in float64 - for a slightly larger top_p, so that float32 rounding
    # at an exact boundary cannot fail the test.
    scaled = logits[0] / temperature
    if 0 < top_k < vocab:
        kth = scaled.sort(descending=True).values[top_k - 1]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    probs = torch.softmax(scaled.double(), dim=-1)
    desc = probs.sort(descending=True).values.tolist()
    mass, last = 0.0, desc[0]
    for p in desc:
        if mass >= top_p + 1e-5:
            break
        mass, last = mass + p, p
    allowed = {i for i, p in enumerate(probs.tolist()) if p >= last and p > 0}
    assert out <= allowed


# --- seeds --------------------------------------------------------------------------------


def test_seeded_request_is_reproducible_alone_and_in_a_batch() -> None:
    gen = torch.Generator().manual_seed(7)
    steps = 25
    vocab = 64
    own = [torch.randn(1, vocab, generator=gen) for _ in range(steps)]

    def target() -> SequenceSampler:
        return make_seq(temperature=0.9, top_p=0.95, top_k=40, seed=42)

    alone = run_steps(Sampler(), [target()], own)[0]

    # Same request at position 2 of a batch: greedy, unseeded, other seeds and settings.
    others = [
        make_seq(temperature=0.0),
        make_seq(temperature=1.3),
        make_seq(temperature=0.9, top_p=0.95, top_k=40, seed=43),
        make_seq(temperature=0.7, top_k=5, seed=1, logprobs=3, frequency_penalty=0.5),
    ]
    seqs = [*others[:2], target(), *others[2:]]
    batch_steps = [
        torch.cat([torch.randn(2, vocab, generator=gen), row, torch.randn(2, vocab, generator=gen)])
        for row in own
    ]
    in_batch = run_steps(Sampler(), seqs, batch_steps)[2]
    assert in_batch == alone
    # A non-degenerate check: the stream actually varies.
    assert len(set(alone)) > 5


def test_different_seeds_differ_and_same_seed_repeats() -> None:
    steps = [torch.zeros(1, 1000) for _ in range(10)]  # uniform over 1000 tokens

    def tokens(seed: int | None) -> list[int]:
        return run_steps(Sampler(), [make_seq(seed=seed)], steps)[0]

    assert tokens(1) == tokens(1)
    assert tokens(1) != tokens(2)
    assert tokens(-5) == tokens(-5)  # OpenAI seeds are signed
    assert tokens(None) != tokens(None)  # unseeded: OS randomness, not torch's global seed


# --- stop ids, min_tokens, finish reasons ----------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_masks_stop_ids_until_reached(temperature: float) -> None:
    # eos (2) is the clear argmax and stop token 4 the runner-up.
    row = torch.tensor([[1.0, 0.0, 10.0, 0.5, 9.0]])
    seq = make_seq(temperature=temperature, min_tokens=3, stop_token_ids=(4,), seed=0)
    sampler = Sampler(seed=0)
    for _ in range(3):
        tok, _ = sampler(row, [seq])[0]
        assert tok not in (EOS, 4)
        seq.record(tok)
        assert seq.finish_reason(tok) is None
    if temperature == 0.0:
        tok, _ = sampler(row, [seq])[0]
        assert tok == EOS
        seq.record(tok)
        assert seq.finish_reason(tok) is FinishReason.STOP
    else:
        later = Counter(t for t, _ in (sampler(row, [seq])[0] for _ in range(200)))
        assert later[EOS] > 100 and later[4] > 0  # both unmasked once min_tokens is reached


def test_min_tokens_then_eos_is_sampled() -> None:
    row = torch.tensor([[0.0, 0.0, 30.0, 0.0]])  # eos has all the mass
    seq = make_seq(temperature=1.0, min_tokens=2, seed=3)
    sampler = Sampler(seed=0)
    got = []
    for _ in range(3):
        tok, _ = sampler(row, [seq])[0]
        seq.record(tok)
        got.append(tok)
    assert got[:2] != [EOS, EOS] and EOS not in got[:2]
    assert got[2] == EOS
    assert seq.finish_reason(EOS) is FinishReason.STOP


def test_ignore_eos_removes_eos_from_stop_ids() -> None:
    seq = make_seq(eos=(EOS, 9), ignore_eos=True, stop_token_ids=(4,), min_tokens=5)
    assert seq.stop_ids == frozenset({4})
    # eos is not masked under min_tokens then (it is not a stop id), and does not stop.
    row = torch.tensor([[0.0, 0.0, 10.0, 0.0, 0.0]])
    tok, _ = Sampler(seed=0)(row, [seq])[0]
    assert tok == EOS
    seq.record(tok)
    assert seq.finish_reason(tok) is None
    assert make_seq(eos=(EOS, 9), stop_token_ids=(4,)).stop_ids == frozenset({EOS, 9, 4})


def test_stop_token_ids_stop() -> None:
    seq = make_seq(stop_token_ids=(11, 12))
    seq.record(3)
    assert seq.finish_reason(3) is None
    seq.record(12)
    assert seq.finish_reason(12) is FinishReason.STOP
    seq.record(EOS)
    assert seq.finish_reason(EOS) is FinishReason.STOP


def test_finish_reason_length() -> None:
    seq = make_seq(max_tokens=3)
    reasons = []
    for tok in (10, 11, 12):
        seq.record(tok)
        reasons.append(seq.finish_reason(tok))
    assert reasons == [None, None, FinishReason.LENGTH]
    # A resumed request: the engine passes the remaining budget.
    resumed = make_seq(max_tokens=10)
    resumed.record(10)
    assert resumed.finish_reason(10, max_tokens=1) is FinishReason.LENGTH
    assert resumed.finish_reason(10, max_tokens=2) is None
    # A stop id on the last allowed token is a stop.
    last = make_seq(max_tokens=1)
    last.record(EOS)
    assert last.finish_reason(EOS) is FinishReason.STOP


# --- penalties ------------------------------------------------------------------------------


def greedy_pick(seq: SequenceSampler, row: list[float]) -> int:
    return Sampler(seed=0)(torch.tensor([row]), [seq])[0][0]


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    # Token 0 is in the prompt: 2.0 / 1.2 = 1.67 < 1.9.
    assert greedy_pick(make_seq(temperature=0.0, prompt=(0,)), [2.0, 1.9]) == 0
    assert (
        greedy_pick(make_seq(temperature=0.0, prompt=(0,), repetition_penalty=1.2), [2.0, 1.9]) == 1
    )
    # Negative logits: -1.0 * 1.2 = -1.2 < -1.1.
    seq = make_seq(temperature=0.0, prompt=(0,), repetition_penalty=1.2)
    assert greedy_pick(seq, [-1.0, -1.1]) == 1
    # Generated tokens count too (recorded after the first step).
    seq = make_seq(temperature=0.0, prompt=(), repetition_penalty=1.2)
    assert greedy_pick(seq, [2.0, 1.9]) == 0
    seq.record(0)
    assert greedy_pick(seq, [2.0, 1.9]) == 1


def test_frequency_penalty_scales_with_count() -> None:
    seq = make_seq(temperature=0.0, prompt=(0, 0, 0), frequency_penalty=0.3)
    assert greedy_pick(seq, [2.0, 1.5]) == 0  # the prompt does not count
    seq.record(0)
    assert greedy_pick(seq, [2.0, 1.5]) == 0  # 2.0 - 0.3 = 1.7
    seq.record(0)
    assert greedy_pick(seq, [2.0, 1.5]) == 1  # 2.0 - 0.6 = 1.4


def test_presence_penalty_is_once_per_token() -> None:
    seq = make_seq(temperature=0.0, prompt=(0,), presence_penalty=0.4)
    assert greedy_pick(seq, [2.0, 1.7]) == 0
    for _ in range(3):
        seq.record(0)
        assert greedy_pick(seq, [2.0, 1.5]) == 0  # 2.0 - 0.4 = 1.6, whatever the count
    assert greedy_pick(seq, [2.0, 1.7]) == 1


def test_penalties_accumulate_across_steps_and_apply_to_sampling() -> None:
    # Greedy with a strong frequency penalty cycles instead of repeating one token.
    seq = make_seq(temperature=0.0, frequency_penalty=1.5)
    sampler = Sampler(seed=0)
    row = torch.tensor([[3.0, 2.9, 2.8, -5.0]])
    tokens = run_steps(sampler, [seq], [row] * 6)[0]
    assert tokens == [0, 1, 2, 0, 1, 2]
    # Sampled rows: a huge presence penalty takes token 0 out of play once it appeared
    # (unpenalised it would win ~60% of the draws).
    row = torch.tensor([[5.0] + [0.0] * 100])
    seq = make_seq(temperature=1.0, presence_penalty=100.0, seed=5)
    assert 0 in run_steps(sampler, [make_seq(temperature=1.0, seed=5)], [row] * 10)[0]
    seq.record(0)
    assert 0 not in run_steps(sampler, [seq], [row] * 10)[0]


def test_penalties_match_a_dense_reference_over_many_steps() -> None:
    # Long enough for the sparse state to grow its buffers; some steps record two tokens
    # at once; ids outside the vocabulary are ignored. The full logprob distribution
    # (logprobs=V) exposes every penalised logit.
    vocab = 50
    gen = torch.Generator().manual_seed(5)
    prompt = [int(t) for t in torch.randint(0, vocab, (30,), generator=gen)] + [999]
    params: dict[str, Any] = {
        "repetition_penalty": 1.3,
        "frequency_penalty": 0.25,
        "presence_penalty": 0.4,
    }
    seqs = [
        make_seq(temperature=0.0, prompt=prompt, logprobs=vocab, **params),
        make_seq(temperature=0.0, prompt=prompt, logprobs=vocab, frequency_penalty=0.5),
        make_seq(temperature=0.0, prompt=prompt, logprobs=vocab),  # no penalties
    ]
    sampler = Sampler(seed=0)
    for step in range(40):
        logits = torch.randn(3, vocab, generator=gen) * 3
        out = sampler(logits, seqs)
        for i, seq in enumerate(seqs):
            p = seq.params
            seen = set(prompt) | set(seq.generated) if p.repetition_penalty != 1.0 else set()
            expected_row = logits[i].tolist()
            for t in range(vocab):
                if t in seen:
                    r = p.repetition_penalty
                    v = expected_row[t]
                    expected_row[t] = v / r if v > 0 else v * r
                c = seq.generated.count(t)
                expected_row[t] -= c * p.frequency_penalty + (c > 0) * p.presence_penalty
            expected = torch.log_softmax(torch.tensor(expected_row), dim=-1)
            tok, lp = out[i]
            assert tok == int(expected.argmax())
            assert lp is not None
            got = torch.tensor([v for _, v in sorted(lp.top)])
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
            seq.record(tok)
            if step % 3 == 0:
                seq.record(int(torch.randint(0, vocab, (1,), generator=gen)))
            if step == 7:
                seq.record(vocab + 3)


def test_penalties_and_masks_leave_the_input_alone() -> None:
    logits = torch.tensor([[2.0, 1.0, 3.0, 0.5]])
    before = logits.clone()
    seq = make_seq(repetition_penalty=1.5, frequency_penalty=0.5, min_tokens=2, prompt=(0,))
    seq.record(1)
    with torch.inference_mode():  # engine logits are inference tensors
        inference_logits = logits.clone()
    Sampler(seed=0)(inference_logits, [seq])
    Sampler(seed=0)(logits, [seq])
    assert torch.equal(logits, before)
    assert torch.equal(inference_logits, before)


# --- logprobs ----------------------------------------------------------------------------


def test_logprobs_values_and_order() -> None:
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(3, 100, generator=gen)
    seqs = [
        make_seq(temperature=0.0, logprobs=5),
        make_seq(temperature=0.5, top_k=3, seed=1, logprobs=100),
        make_seq(temperature=1.0, logprobs=None),
    ]
    out = Sampler(seed=0)(logits, seqs)
    reference = torch.log_softmax(logits, dim=-1)

    tok, lp = out[0]
    assert lp is not None and lp.token_id == tok
    assert lp.logprob == pytest.approx(reference[0, tok].item(), abs=1e-5)
    assert [i for i, _ in lp.top] == reference[0].topk(5).indices.tolist()
    assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
    assert lp.top[0][0] == tok  # greedy: the chosen token is the most likely

    # The whole distribution, before temperature and top-k: it sums to one.
    tok, lp = out[1]
    assert lp is not None and len(lp.top) == 100
    assert sum(math.exp(v) for _, v in lp.top) == pytest.approx(1.0, abs=1e-4)
    assert lp.logprob == pytest.approx(reference[1, tok].item(), abs=1e-5)
    assert dict(lp.top)[tok] == pytest.approx(lp.logprob)
    assert out[2][1] is None


def test_logprobs_zero_and_clamped_k() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    tok, lp = Sampler(seed=0)(logits, [make_seq(temperature=0.0, logprobs=0)])[0]
    assert tok == 2 and lp is not None and lp.top == []
    assert lp.logprob == pytest.approx(torch.log_softmax(logits[0], dim=-1)[2].item())
    _, lp = Sampler(seed=0)(logits, [make_seq(temperature=0.0, logprobs=20)])[0]
    assert lp is not None and [i for i, _ in lp.top] == [2, 1, 0]


def test_logprobs_see_penalties_and_the_min_tokens_mask() -> None:
    logits = torch.tensor([[2.0, 1.0, 3.0, 0.5]])
    seq = make_seq(temperature=0.0, logprobs=4, min_tokens=1, prompt=(0,), repetition_penalty=2.0)
    tok, lp = Sampler(seed=0)(logits, [seq])[0]
    expected = torch.log_softmax(torch.tensor([1.0, 1.0, -math.inf, 0.5]), dim=-1)
    assert tok == 0  # ties with 1 after the penalty; eos (2) is masked
    assert lp is not None
    assert lp.logprob == pytest.approx(expected[0].item())
    assert dict(lp.top)[EOS] == -math.inf


# --- API edges -------------------------------------------------------------------------


def test_empty_batch_and_shape_errors() -> None:
    sampler = Sampler()
    assert sampler(torch.empty(0, 10), []) == []
    with pytest.raises(ValueError, match="expected"):
        sampler(torch.zeros(2, 10), [make_seq()])
    with pytest.raises(ValueError, match="expected"):
        sampler(torch.zeros(10), [make_seq()])


def test_record_appends_generated() -> None:
    seq = make_seq()
    seq.record(4)
    seq.record(4)
    assert seq.generated == [4, 4]
