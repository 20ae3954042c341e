"""Token sampling for the torch reference engine.

One `SequenceSampler` per running request holds what sampling needs across steps (the
request's random generator, the tokens generated so far, the stop set, penalty counts);
one `Sampler` turns a step's logits `[S, V]` into one token per sequence.

Order of operations per row (OpenAI / vLLM semantics):

1. penalties on the raw logits: repetition (HF/vLLM style, over prompt + generated
   tokens: positive logits divided, negative multiplied), then frequency
   (`count * penalty`) and presence (`penalty` once) over the generated tokens;
2. `logit_bias`: each (id, bias) pair added to its logit (OpenAI's; -100 all but bans
   a token, +100 all but forces it);
3. `min_tokens`: every stop id gets `-inf` while fewer than `min_tokens` tokens were
   generated (eos is not a stop id under `ignore_eos`, so it is not masked then);
4. the grammar of a constrained request (`dynamo_gateway.engines.constraints`): every
   id its matcher does not allow next gets `-inf`; one bitmask [S, W] for the step,
   its constrained rows filled by their matchers (`grammar_mask()`, which an engine
   may run on another thread while the forward pass computes the logits), applied to
   those rows only;
5. logprobs, when asked, are `log_softmax` of the logits at this point: after penalties,
   bias and masks, before temperature / top-k / top-p (vLLM's default "raw" logprobs,
   plus what the request asked for; a constrained request's logprobs are those of the
   distribution it was sampled from, tokens the grammar forbids at `-inf`);
6. temperature `<= GREEDY_TEMPERATURE`: argmax (ties go to the lowest id);
7. otherwise divide by the temperature, keep the top-k logits (ties with the k-th
   value are kept too), softmax, keep the nucleus (the smallest set of most likely
   tokens whose mass reaches `top_p`, always the top token; ties with the last kept
   probability are kept too), and draw from what is left.

Randomness: the draw is inverse-CDF sampling, one uniform number per sampled row and
step: the row's cumulative distribution is computed for the whole sub-batch at once
and `searchsorted` finds the token. Only the uniforms are per request, so the device
work is batched whatever the seeds. A request with a seed draws its uniforms from its
own `torch.Generator` seeded with that seed, so it gets the same tokens alone or in any
batch (given the same logits). Those generators live on the CPU on purpose: drawing
one number from a CUDA generator is a kernel launch per row, while CPU draws cost about
a microsecond and travel to the device in one copy with the rest of the step's uniforms
(it also makes a seed mean the same uniforms on every device). Unseeded requests draw
from the `Sampler`'s own generator, seeded from the OS's randomness (`secrets`), not
from torch's global generator: model code often calls `torch.manual_seed`, and
unseeded requests must not repeat themselves after every restart.

Cost: greedy rows are one argmax over their sub-batch; sampled rows share one softmax,
cumsum and searchsorted, plus `topk` for top-k rows and a sort for top-p rows (on the
CPU a `topk` of `TOP_P_CANDIDATES` first, see there). Penalties are sparse: each
sequence keeps, incrementally, the distinct tokens they apply to and their generated
counts on the device, and a step reads and writes only those logits; so is the logit
bias. The host-side work per step is O(sequences), plus O(new tokens) for penalised
ones. A step none of whose rows has a bias, a penalty, a `min_tokens` mask or a grammar
does not even copy the logits. A constrained row costs its matcher's bitmask fill (on
the host: microseconds) and one masked pass over its row.

Logprobs are plain floats and may be `-inf` (a token masked by `min_tokens` or a
grammar, or asked for among more alternatives than there are possible tokens).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dynamo_gateway.engines.constraints import (
    ConstraintMatcher,
    apply_token_bitmask,
    fill_bitmasks,
)
from dynamo_gateway.protocol.engine import FinishReason, SamplingParams, TokenLogprob

__all__ = ["GREEDY_TEMPERATURE", "TOP_P_CANDIDATES", "GrammarMask", "Sampler", "SequenceSampler"]

#: Temperatures at or below this are greedy (vLLM's epsilon too): dividing logits by a
#: smaller number overflows float32, and the distribution is an argmax by then anyway.
GREEDY_TEMPERATURE = 1e-5

#: On the CPU, top-p first looks for the nucleus among this many most likely tokens and
#: sorts the whole vocabulary only for rows whose nucleus is larger: `topk(1024)` of a
#: 128k vocabulary costs a small fraction of a full sort, and real nuclei are small.
TOP_P_CANDIDATES = 1024

_SEED_MASK = (1 << 64) - 1  # torch seeds are uint64; OpenAI seeds may be negative int64


class SequenceSampler:
    """Per-request sampling state: seeded generator, tokens generated so far, stop set,
    and the request's grammar matcher (`constraint`) when it has one.

    The engine calls `record()` with every token it appends to the sequence (the
    `Sampler` does not record on its own; `record()` feeds the matcher), then
    `finish_reason()` with the same token.
    """

    params: SamplingParams
    stop_ids: frozenset[int]
    generated: list[int]
    constraint: ConstraintMatcher | None

    def __init__(
        self,
        params: SamplingParams,
        *,
        eos_token_ids: Sequence[int],
        prompt_token_ids: Sequence[int],
        device: torch.device,
        constraint: ConstraintMatcher | None = None,
    ) -> None:
        self.params = params
        self.constraint = constraint
        # Logit bias as parallel lists (ids, values); ids were checked at submission.
        self.bias_ids = [t for t, _ in params.logit_bias]
        self.bias_values = [float(b) for _, b in params.logit_bias]
        self.device = torch.device(device)
        stop = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop.update(eos_token_ids)
        self.stop_ids = frozenset(stop)
        self.generated = []
        # CPU on purpose, see the module docstring.
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed & _SEED_MASK)
        self.penalized = (
            params.repetition_penalty != 1.0
            or params.frequency_penalty != 0.0
            or params.presence_penalty != 0.0
        )
        # Only the repetition penalty looks at the prompt; don't keep it otherwise.
        self._prompt_ids: tuple[int, ...] = (
            tuple(prompt_token_ids) if params.repetition_penalty != 1.0 else ()
        )
        self._stop_list = sorted(self.stop_ids)
        # Penalty state, sparse and incremental: the distinct tokens the penalties look at
        # (prompt tokens under a repetition penalty, then generated ones in order of first
        # appearance) with their position here, and device buffers holding their ids and
        # how often each was generated (buffers grow by doubling; first `len(_where)`
        # entries are live). `_counted`: how many of `generated` the buffers include.
        self._where: dict[int, int] = {}
        self._ids: torch.Tensor | None = None  # [capacity] int64
        self._counts: torch.Tensor | None = None  # [capacity] float32
        self._counted = 0

    def record(self, token_id: int) -> None:
        """Append a token the engine committed to this sequence (and feed the grammar)."""
        self.generated.append(token_id)
        if self.constraint is not None:
            self.constraint.accept(token_id)

    @property
    def constrained(self) -> bool:
        """Whether the grammar masks this sequence's next token."""
        return self.constraint is not None and self.constraint.constrains

    def finish_reason(self, token_id: int, *, max_tokens: int | None = None) -> FinishReason | None:
        """Why the sequence ends with `token_id` (already recorded), or None to go on.

        `max_tokens` overrides `params.max_tokens` (the engine passes the remaining
        budget of a resumed request). A stop id cannot be sampled before `min_tokens`
        tokens exist (it is masked), so it is not checked again here. A grammar that
        is done ends the sequence with STOP whatever else holds (ERROR if the token
        broke it: `constraint.error`).
        """
        constraint = self.constraint
        if constraint is not None and constraint.ended:
            return FinishReason.ERROR if constraint.error is not None else FinishReason.STOP
        if token_id in self.stop_ids:
            return FinishReason.STOP
        limit = self.params.max_tokens if max_tokens is None else max_tokens
        if len(self.generated) >= limit:
            return FinishReason.LENGTH
        return None

    @property
    def masks_stop_ids(self) -> bool:
        """Whether the stop ids are masked this step (`min_tokens` not reached)."""
        return bool(self._stop_list) and len(self.generated) < self.params.min_tokens

    def _penalty_entries(self, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [n] int64, generated counts [n] float32) on the device: each token the
        penalties apply to, once. Brought up to date with the tokens recorded since the
        previous step only; ids outside the vocabulary are ignored."""
        if self._ids is None or self._counts is None:
            prompt = [t for t in dict.fromkeys(self._prompt_ids) if 0 <= t < vocab_size]
            capacity = max(16, 2 * len(prompt))
            self._ids = torch.zeros(capacity, dtype=torch.long, device=self.device)
            self._counts = torch.zeros(capacity, dtype=torch.float32, device=self.device)
            if prompt:
                self._ids[: len(prompt)] = torch.tensor(prompt, dtype=torch.long)
            self._where = {t: i for i, t in enumerate(prompt)}
        for t in self.generated[self._counted :]:
            if not 0 <= t < vocab_size:
                continue
            pos = self._where.get(t)
            if pos is None:
                pos = len(self._where)
                if pos == self._ids.shape[0]:
                    self._grow()
                self._where[t] = pos
                # Slices are views and the value a scalar: one small kernel each, no
                # host-to-device copy of an index tensor.
                self._ids[pos : pos + 1].fill_(t)
            self._counts[pos : pos + 1].add_(1.0)
        self._counted = len(self.generated)
        live = len(self._where)
        return self._ids[:live], self._counts[:live]

    def _grow(self) -> None:
        assert self._ids is not None and self._counts is not None
        ids = torch.zeros(2 * self._ids.shape[0], dtype=torch.long, device=self.device)
        counts = torch.zeros(2 * self._ids.shape[0], dtype=torch.float32, device=self.device)
        ids[: self._ids.shape[0]] = self._ids
        counts[: self._ids.shape[0]] = self._counts
        self._ids, self._counts = ids, counts


@dataclass(frozen=True, slots=True)
class GrammarMask:
    """A step's grammar bitmask: ``bitmask`` [S, W] int32 on the CPU, whose `rows` (the
    constrained sequences, ascending) are filled; the other rows are never read."""

    bitmask: torch.Tensor
    rows: list[int]


class Sampler:
    """Picks one token per sequence from a step's logits. Stateless but for the
    generator of unseeded requests; one per engine.

    `seed` seeds that generator (tests); by default it comes from the OS.
    """

    def __init__(self, *, seed: int | None = None) -> None:
        self._generator = torch.Generator().manual_seed(
            secrets.randbits(64) if seed is None else seed & _SEED_MASK
        )
        # The step's grammar bitmask [rows, W] int32 on the CPU, grown as batches grow.
        self._bitmask: torch.Tensor | None = None

    def grammar_mask(self, seqs: Sequence[SequenceSampler]) -> GrammarMask | None:
        """The grammar bitmask for a step sampling `seqs` (None: none is constrained).

        Needs no logits: an engine may call it on another thread while the forward pass
        runs, and hand the result to `__call__`. It reuses one buffer, so a mask is good
        until the next call.
        """
        rows = [i for i, s in enumerate(seqs) if s.constrained]
        if not rows:
            return None
        matchers = [c for c in (seqs[i].constraint for i in rows) if c is not None]
        width = matchers[0].bitmask_width
        bitmask = self._bitmask
        if bitmask is None or bitmask.shape[0] < len(seqs) or bitmask.shape[1] != width:
            # Rows outside `rows` are never read: the buffer needs no reset between steps.
            capacity = max(len(seqs), 2 * bitmask.shape[0] if bitmask is not None else 8)
            bitmask = self._bitmask = torch.full((capacity, width), -1, dtype=torch.int32)
        fill_bitmasks(matchers, bitmask, rows)
        return GrammarMask(bitmask[: len(seqs)], rows)

    def __call__(
        self,
        logits: torch.Tensor,
        seqs: Sequence[SequenceSampler],
        grammar: GrammarMask | None = None,
    ) -> list[tuple[int, TokenLogprob | None]]:
        """`logits` [S, V] (any float dtype; one row per sequence, in `seqs` order) ->
        (token id, logprob or None) per sequence. Does not `record()` the tokens.

        `grammar`: this step's `grammar_mask(seqs)` if the engine made it already; made
        here otherwise.
        """
        if logits.dim() != 2 or logits.shape[0] != len(seqs):
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} for {len(seqs)} sequences; "
                "expected [num_sequences, vocab_size]"
            )
        if not seqs:
            return []
        # Logits from a model run under inference_mode are inference tensors; staying in
        # inference mode lets us work on them (and skips autograd bookkeeping).
        with torch.inference_mode():
            if grammar is None:
                grammar = self.grammar_mask(seqs)
            return self._sample(logits, seqs, grammar)

    def _sample(
        self, logits: torch.Tensor, seqs: Sequence[SequenceSampler], grammar: GrammarMask | None
    ) -> list[tuple[int, TokenLogprob | None]]:
        num_seqs, vocab = logits.shape
        device = logits.device
        # Which rows need what, from the params alone (host lists).
        pen_rows = [i for i, s in enumerate(seqs) if s.penalized]
        mask_rows: list[int] = []
        mask_cols: list[int] = []
        for i, s in enumerate(seqs):
            if s.masks_stop_ids:
                cols = [t for t in s._stop_list if 0 <= t < vocab]
                mask_rows.extend([i] * len(cols))
                mask_cols.extend(cols)
        greedy_rows = [i for i, s in enumerate(seqs) if s.params.temperature <= GREEDY_TEMPERATURE]
        sampled_rows = [i for i, s in enumerate(seqs) if s.params.temperature > GREEDY_TEMPERATURE]
        lp_rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        bias_rows = [i for i, s in enumerate(seqs) if s.bias_ids]

        # x [S, V] float32: our own copy when rows are about to be modified in place.
        x = logits.to(
            torch.float32, copy=bool(pen_rows or mask_rows or bias_rows or grammar is not None)
        )
        if pen_rows:
            _apply_penalties(x, pen_rows, [seqs[i] for i in pen_rows])
        if bias_rows:
            _apply_bias(x, bias_rows, [seqs[i] for i in bias_rows])
        if mask_rows:
            x[_index(mask_rows, device), _index(mask_cols, device)] = -math.inf
        if grammar is not None:
            apply_token_bitmask(x, grammar.bitmask, grammar.rows)

        # argmax returns the first maximal index: ties go to the lowest id.
        if len(greedy_rows) == num_seqs:
            tokens = x.argmax(dim=-1)  # [S]
        elif len(sampled_rows) == num_seqs:
            tokens = self._draw(x, seqs)  # [S]
        else:
            tokens = torch.empty(num_seqs, dtype=torch.long, device=device)  # [S]
            idx = _index(greedy_rows, device)
            tokens[idx] = x[idx].argmax(dim=-1)
            tokens[_index(sampled_rows, device)] = self._draw(
                _rows(x, sampled_rows), [seqs[i] for i in sampled_rows]
            )

        logprobs: list[TokenLogprob | None] = [None] * num_seqs
        if not lp_rows:
            return [(t, None) for t in tokens.tolist()]
        # Launch the logprob kernels before the first device-to-host transfer.
        ks = [min(_logprobs_k(seqs[i]), vocab) for i in lp_rows]
        lp = _rows(x, lp_rows).log_softmax(dim=-1)  # [L, V]
        lp_tokens = tokens if len(lp_rows) == num_seqs else tokens[_index(lp_rows, device)]
        chosen_t = lp.gather(1, lp_tokens.unsqueeze(1)).squeeze(1)  # [L]
        top = lp.topk(max(ks), dim=-1) if max(ks) > 0 else None  # descending, [L, kmax]
        token_ids: list[int] = tokens.tolist()
        chosen: list[float] = chosen_t.tolist()
        top_vals: list[list[float]] = top.values.tolist() if top is not None else []
        top_ids: list[list[int]] = top.indices.tolist() if top is not None else []
        for j, i in enumerate(lp_rows):
            k = ks[j]
            pairs = list(zip(top_ids[j][:k], top_vals[j][:k], strict=True)) if k else []
            logprobs[i] = TokenLogprob(token_ids[i], chosen[j], pairs)
        return list(zip(token_ids, logprobs, strict=True))

    def _draw(self, x: torch.Tensor, seqs: Sequence[SequenceSampler]) -> torch.Tensor:
        """Sample rows `x` [R, V] (penalised logits) of non-greedy `seqs` -> ids [R]."""
        vocab = x.shape[1]
        device = x.device
        temps = [s.params.temperature for s in seqs]
        if all(t == temps[0] for t in temps):
            x = x / temps[0]  # [R, V], a fresh tensor from here on
        else:
            x = x / torch.tensor(temps, dtype=torch.float32, device=device).unsqueeze(1)

        k_rows = [j for j, s in enumerate(seqs) if 0 < s.params.top_k < vocab]
        if k_rows:
            sub = _rows(x, k_rows)  # [K, V]
            ks = [seqs[j].params.top_k for j in k_rows]
            kth = sub.topk(max(ks), dim=-1).values  # [K, kmax], descending
            kth = kth.gather(1, _index([k - 1 for k in ks], device).unsqueeze(1))  # [K, 1]
            # Threshold, not positions: logits tied with the k-th one stay (no arbitrary
            # tie-break, and the same set whatever the batch).
            sub = sub.masked_fill(sub < kth, -math.inf)
            x = _put_rows(x, k_rows, sub)

        probs = x.softmax(dim=-1)  # [R, V]
        p_rows = [j for j, s in enumerate(seqs) if s.params.top_p < 1.0]
        if p_rows:
            sub = _rows(probs, p_rows)  # [P, V]
            top_p = torch.tensor(
                [seqs[j].params.top_p for j in p_rows], dtype=torch.float32, device=device
            ).unsqueeze(1)  # [P, 1]
            # Under a top-k the nucleus lies within the k best (unless ties at the k-th
            # logit add more, which the fallback handles): fewer candidates suffice.
            ks = [seqs[j].params.top_k for j in p_rows]
            candidates = TOP_P_CANDIDATES
            if all(0 < k < vocab for k in ks):
                candidates = min(candidates, max(ks))
            cutoff = _nucleus_cutoff(sub, top_p, candidates)  # [P, 1]
            # No renormalisation needed: the draw scales by each row's remaining mass.
            probs = _put_rows(probs, p_rows, sub.masked_fill(sub < cutoff, 0.0))

        # Inverse-CDF draw: token = first id whose cumulative mass exceeds u * total.
        cdf = probs.cumsum(dim=-1)  # [R, V], non-decreasing
        total = cdf[:, -1:]  # [R, 1], ~1 (less after top-p)
        u = self._uniforms(seqs, device)  # [R, 1] in [0, 1)
        # u rounded to float32 may reach 1.0; stay strictly below the total so the
        # answer is a real id with non-zero probability (a zero-probability id has the
        # same cdf as its predecessor and can never be the first to exceed the target).
        target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
        ids = torch.searchsorted(cdf, target, right=True)  # [R, 1]
        return ids.squeeze(1).clamp_(max=vocab - 1)

    def _uniforms(self, seqs: Sequence[SequenceSampler], device: torch.device) -> torch.Tensor:
        """One uniform number per row [R, 1] float32 on `device`: from the row's own
        generator when seeded (one draw per step, so a seed's stream does not depend on
        the batch), else from this sampler's generator."""
        unseeded = sum(1 for s in seqs if s.generator is None)
        shared: list[float] = (
            torch.rand(unseeded, generator=self._generator, dtype=torch.float64).tolist()
            if unseeded
            else []
        )
        shared_iter = iter(shared)
        values = [
            next(shared_iter)
            if s.generator is None
            else torch.rand(1, generator=s.generator, dtype=torch.float64).item()
            for s in seqs
        ]
        return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def _apply_penalties(x: torch.Tensor, rows: list[int], seqs: Sequence[SequenceSampler]) -> None:
    """Apply the penalties of `seqs` to `rows` of x [S, V], in place (x is our copy).

    Sparse: only the (row, token) entries the penalties touch are read and written,
    O(distinct tokens of the sequences) per step rather than O(rows * V).
    """
    entries = [s._penalty_entries(x.shape[1]) for s in seqs]
    lengths = [ids.shape[0] for ids, _ in entries]
    total = sum(lengths)
    if total == 0:
        return
    device = x.device
    cols = torch.cat([ids for ids, _ in entries])  # [N] token ids
    counts = torch.cat([c for _, c in entries])  # [N] times generated
    per_row = torch.tensor(
        [
            [s.params.repetition_penalty, s.params.frequency_penalty, s.params.presence_penalty]
            for s in seqs
        ],
        dtype=torch.float32,
        device=device,
    )  # [P, 3]
    lens = torch.tensor(lengths, dtype=torch.long, device=device)  # [P]
    # output_size: no device-to-host sync to learn the result's length.
    flat_rows = _index(rows, device).repeat_interleave(lens, output_size=total)  # [N]
    flat = per_row.repeat_interleave(lens, dim=0, output_size=total)  # [N, 3]
    vals = x[flat_rows, cols]  # [N]
    rep = flat[:, 0]
    # Repetition (a no-op for rows at 1.0: x / 1 and x * 1 are exact), then frequency and
    # presence, which count generated tokens only (prompt-only entries have count 0).
    vals = torch.where(vals > 0, vals / rep, vals * rep)
    vals = vals - counts * flat[:, 1] - (counts > 0).to(torch.float32) * flat[:, 2]
    x[flat_rows, cols] = vals


def _apply_bias(x: torch.Tensor, rows: list[int], seqs: Sequence[SequenceSampler]) -> None:
    """Add each row's logit bias to x [S, V] (our copy), in place; sparse like penalties."""
    flat_rows = [r for r, s in zip(rows, seqs, strict=True) for _ in s.bias_ids]
    cols = [t for s in seqs for t in s.bias_ids]
    values = [b for s in seqs for b in s.bias_values]
    device = x.device
    # accumulate: an id given twice gets both biases, not one of them at random.
    x.index_put_(
        (_index(flat_rows, device), _index(cols, device)),
        torch.tensor(values, dtype=torch.float32, device=device),
        accumulate=True,
    )


def _nucleus_cutoff(probs: torch.Tensor, top_p: torch.Tensor, candidates: int) -> torch.Tensor:
    """Smallest probability kept by top-p, per row: probs [P, V], top_p [P, 1] -> [P, 1].

    The nucleus is the shortest prefix of the descending probabilities whose mass
    reaches top_p (at least one token). Returning its last probability as a threshold
    keeps ties with it as well, so the kept set does not depend on how sorting breaks
    ties.
    """
    vocab = probs.shape[1]
    # On accelerators a full sort is cheap, and the fallback below would need a host sync.
    candidates = min(candidates, vocab) if probs.device.type == "cpu" else vocab
    if candidates < vocab:
        desc = probs.topk(candidates, dim=-1).values  # [P, C]
        short = (desc.cumsum(dim=-1)[:, -1:] < top_p).squeeze(1)  # nucleus goes past C
        if bool(short.any()):
            full = probs[short].sort(dim=-1, descending=True).values  # [P', V]
            cutoff = torch.empty_like(top_p)
            cutoff[short] = _prefix_cutoff(full, top_p[short])
            cutoff[~short] = _prefix_cutoff(desc[~short], top_p[~short])
            return cutoff
    else:
        desc = probs.sort(dim=-1, descending=True).values  # [P, V]
    return _prefix_cutoff(desc, top_p)


def _prefix_cutoff(desc: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """desc [P, C] descending probabilities, top_p [P, 1] -> last kept value [P, 1]."""
    cum = desc.cumsum(dim=-1)  # [P, C]
    # Mass strictly before each position; a token is kept while that is below top_p.
    before = torch.nn.functional.pad(cum[:, :-1], (1, 0))  # [P, C]
    keep = (before < top_p).sum(dim=-1, keepdim=True).clamp_(min=1)  # [P, 1]
    return desc.gather(1, keep - 1)


def _logprobs_k(seq: SequenceSampler) -> int:
    k = seq.params.logprobs
    return max(k, 0) if k is not None else 0


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows] ([len(rows), V]); x itself when rows are all of them (rows are ascending)."""
    if len(rows) == x.shape[0]:
        return x
    return x[_index(rows, x.device)]


def _put_rows(x: torch.Tensor, rows: list[int], values: torch.Tensor) -> torch.Tensor:
    """x with `rows` replaced by values (in place unless rows are all of x)."""
    if len(rows) == x.shape[0]:
        return values
    x[_index(rows, x.device)] = values
    return x
