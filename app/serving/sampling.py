"""Per-request sampling parameters and the batched sampler.

One call picks the next token of every row, each with its own settings: greedy rows
(``temperature == 0``) take the arg-max; sampled rows divide by their temperature, keep their
``top_k`` best tokens (and any tied with the k-th, as HF's ``TopKLogitsWarper`` does) and the
smallest set whose probability reaches ``top_p``, then draw with their own ``torch.Generator``
(seeded by the request's ``seed``), so a seeded request draws the same tokens whatever else shares
its batch. ``min_new_tokens`` masks the end-of-sequence tokens until reached.

Temperature scales each row's logits after subtracting the row's largest one,
``(logits - max) / max(temperature, tiny)``, so the scores stay finite at any positive temperature and
a tiny one tends to greedy (the arg-max, or an even draw among tied maxima). A row whose logits are
not finite (a NaN, ``+inf``, or nothing above ``-inf``: an overflow in the model or its adapter) picks
no token: it is reported in :attr:`Sampled.failed` and the other rows are sampled as usual.

Log-probabilities are those of the model's raw distribution (``log_softmax`` of the logits, before
temperature, top-k, top-p or masking), as HF ``generate(output_logits=True)`` reports them.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        """Arg-max decoding (``temperature == 0``). ``top_k == 1`` is not: it draws among the tokens tied for
        the best score, as HF's ``TopKLogitsWarper`` keeps them (on a row without ties the same token)."""
        return self.temperature == 0.0

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The request's own random stream (``None`` for greedy requests)."""
        if self.greedy:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed if self.seed is not None else secrets.randbits(63))
        return g


@dataclass
class RowSampling:
    """What the sampler needs of one row this step."""

    params: SamplingParams
    generator: torch.Generator | None
    generated: int  # tokens generated so far (for min_new_tokens)


@dataclass
class Sampled:
    """The step's choices: ``tokens[i]``, its raw log-probability and, when asked, the top alternatives.
    Rows in ``failed`` had logits that were not finite: their entries mean nothing."""

    tokens: list[int]
    logprobs: list[float] | None
    top: list[list[tuple[int, float]]] | None
    failed: frozenset[int] = frozenset()


def non_finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """``(batch,)`` mask of the rows of ``logits`` no token can be drawn from: a NaN, ``+inf``, or every
    entry ``-inf``."""
    return ~torch.isfinite(logits.amax(dim=-1))  # (a row's max is NaN, +inf or -inf in exactly those cases)


def sample(logits: torch.Tensor, rows: Sequence[RowSampling], eos_ids: Sequence[int]) -> Sampled:
    """Next token of every row of ``logits`` ``(batch, vocab)`` (see the module docstring)."""
    logits = logits.float()
    bad = non_finite_rows(logits)
    failed = frozenset(int(i) for i in bad.nonzero().flatten().tolist()) if bool(bad.any()) else frozenset()
    if failed:  # neutral scores, so the other rows' arithmetic runs as usual
        logits = logits.masked_fill(bad.unsqueeze(1), 0.0)
    want_logprobs = any(r.params.logprobs or r.params.top_logprobs for r in rows)
    raw = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    blocked = [i for i, r in enumerate(rows) if r.generated < r.params.min_new_tokens]
    if blocked and eos_ids:
        logits = logits.clone()
        logits[torch.tensor(blocked).unsqueeze(1), torch.tensor(list(eos_ids)).unsqueeze(0)] = float("-inf")
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        chosen = _draw(logits[sampled], [rows[i] for i in sampled])
        tokens[sampled] = chosen
    token_list = [int(t) for t in tokens.tolist()]
    logprobs = top = None
    if raw is not None:
        logprobs = raw.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
        if any(r.params.top_logprobs for r in rows):  # row by row: which of tied tokens make the cut must
            top = []                                  # not depend on the other rows' k
            for i, r in enumerate(rows):
                values, ids = raw[i].topk(r.params.top_logprobs) if r.params.top_logprobs else (raw[i, :0],) * 2
                top.append(list(zip(ids.tolist(), values.tolist(), strict=True)))
    return Sampled(token_list, logprobs, top, failed)


def _draw(logits: torch.Tensor, rows: Sequence[RowSampling]) -> torch.Tensor:
    """Sample one token per row with temperature, top-k and top-p applied.

    The filtered scores go back to vocabulary order before drawing, so a row's draw depends only on
    its own logits, settings and generator, never on which other rows share the batch. Every row has
    a finite largest logit (see :func:`non_finite_rows`); scaling relative to it keeps the scores finite.
    """
    temps = torch.tensor([r.params.temperature for r in rows], dtype=logits.dtype, device=logits.device)
    temps = temps.clamp(min=torch.finfo(logits.dtype).tiny)  # 1e-50 is 0 in float32: 0/0 would be NaN
    scores = (logits - logits.max(dim=-1, keepdim=True).values) / temps.unsqueeze(1)
    vocab = scores.shape[-1]
    nucleus = any(r.params.top_p < 1.0 for r in rows)
    if nucleus or any(r.params.top_k for r in rows):
        # top-k keeps every token scoring at least the row's k-th best (ties at the cut stay, as in HF's
        # TopKLogitsWarper): a value, so which tied token survives cannot depend on the other rows' k
        ks = torch.tensor([min(r.params.top_k or vocab, vocab) for r in rows], device=scores.device).unsqueeze(1)
        if nucleus:
            kept, order = scores.sort(dim=-1, descending=True, stable=True)
            kept = kept.masked_fill(kept < kept.gather(1, ks - 1), float("-inf"))
            probs = torch.softmax(kept, dim=-1)
            before = probs.cumsum(dim=-1) - probs
            ps = torch.tensor([r.params.top_p for r in rows], dtype=probs.dtype, device=probs.device).unsqueeze(1)
            cut = before >= ps
            cut[:, 0] = False  # the likeliest token always stays (as HF's TopPLogitsWarper keeps it): a top_p
            kept = kept.masked_fill(cut, float("-inf"))  # below float32's smallest number would keep none
            scores = torch.full_like(scores, float("-inf")).scatter(1, order, kept)
        else:
            kth = scores.topk(int(ks.max()), dim=-1).values.gather(1, ks - 1)
            scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.stack([torch.multinomial(probs[i], 1, generator=r.generator).squeeze(0) for i, r in enumerate(rows)])
