"""Batched token sampling on a logits tensor [B, V], in torch only and without host syncs.

Every sampling option is a per-row tensor of shape [B], so one call serves a batch of requests
with different settings. Nothing here loops over the vocabulary or reads a tensor back to the host:
the caller's read of the returned ids is the step's only sync.

The processing order follows transformers' ``generate``: penalties, then temperature, top-k,
top-p and min-p, each with the semantics of the matching ``LogitsProcessor`` (the tests compare
against them). Seeded rows draw their noise from their own ``torch.Generator``, so a seeded
request samples the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from qwenvl.sampling import GREEDY_TEMPERATURE


def pad_token_ids(
    rows: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Token-id lists as one [B, max_len] int64 tensor padded with ``vocab_size``.

    This is the input layout of :func:`apply_penalties`, which ignores ids >= ``vocab_size``.
    """
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), vocab_size, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out.to(device) if device is not None else out


def _token_counts(token_ids: torch.Tensor, vocab_size: int, dtype: torch.dtype) -> torch.Tensor:
    """How often each vocabulary id occurs per row; ids >= vocab_size (padding) are dropped."""
    batch = token_ids.shape[0]
    # One spare column absorbs the padding (and any id past the lm_head, as transformers does).
    counts = torch.zeros(batch, vocab_size + 1, dtype=dtype, device=token_ids.device)
    ids = token_ids.clamp(max=vocab_size)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=dtype))
    return counts[:, :vocab_size]  # [B, V]


def apply_penalties(
    logits: torch.Tensor,
    prompt_token_ids: torch.Tensor,
    output_token_ids: torch.Tensor,
    repetition_penalty: torch.Tensor,
    presence_penalty: torch.Tensor,
    frequency_penalty: torch.Tensor,
) -> torch.Tensor:
    """Repetition, presence and frequency penalties, per row. Returns a new tensor.

    The repetition penalty is transformers' ``RepetitionPenaltyLogitsProcessor`` over the prompt
    and the generated tokens: a positive logit of a seen token is divided by the penalty, a
    negative one multiplied. Presence and frequency penalties follow OpenAI / vLLM over the
    generated tokens only: ``logits -= presence * (count > 0) + frequency * count``.

    Args:
        logits: [B, V] float logits.
        prompt_token_ids: [B, Lp] int64, padded with ``V`` (see :func:`pad_token_ids`).
        output_token_ids: [B, Lo] int64 generated so far, padded with ``V``.
        repetition_penalty: [B] (1 = off).
        presence_penalty: [B] (0 = off).
        frequency_penalty: [B] (0 = off).

    Returns:
        [B, V] penalised logits.
    """
    vocab_size = logits.shape[-1]
    output_counts = _token_counts(output_token_ids, vocab_size, logits.dtype)  # [B, V]
    seen = _token_counts(prompt_token_ids, vocab_size, logits.dtype).gt(0) | output_counts.gt(0)
    penalty = repetition_penalty.to(logits.dtype)[:, None]  # [B, 1]
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    logits = torch.where(seen, penalised, logits)
    frequency = frequency_penalty.to(logits.dtype)[:, None]
    presence = presence_penalty.to(logits.dtype)[:, None]
    return logits - frequency * output_counts - presence * output_counts.gt(0).to(logits.dtype)


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``logits / temperature`` per row; greedy rows (temperature ~ 0) are left unscaled."""
    greedy = temperature < GREEDY_TEMPERATURE
    temperature = torch.where(greedy, torch.ones_like(temperature), temperature)
    return logits / temperature.to(logits.dtype)[:, None]


def apply_top_k_top_p_min_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Top-k, then top-p, then min-p filtering per row; removed tokens get ``-inf``.

    Semantics of transformers' ``TopKLogitsWarper`` (ties with the k-th value survive),
    ``TopPLogitsWarper`` (keep the smallest set whose probability reaches ``top_p``, at least one
    token) and ``MinPLogitsWarper``, applied in that order. ``top_k <= 0``, ``top_p >= 1`` and
    ``min_p <= 0`` turn the respective filter off for that row.

    Args:
        logits: [B, V] temperature-scaled logits.
        top_k: [B] int.
        top_p: [B] float.
        min_p: [B] float.
    """
    vocab_size = logits.shape[-1]
    neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    # One ascending sort serves both top-k and top-p, as transformers' top-p sorts ascending.
    sorted_logits, sorted_idx = logits.sort(dim=-1)  # [B, V]
    k = torch.where(top_k <= 0, vocab_size, top_k.clamp(max=vocab_size)).to(torch.long)
    kth_largest = sorted_logits.gather(1, (vocab_size - k)[:, None])  # [B, 1]
    remove = sorted_logits < kth_largest
    sorted_logits = sorted_logits.masked_fill(remove, neg_inf)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    top_p = top_p.to(logits.dtype)[:, None]
    remove |= (cumulative <= 1 - top_p) & (top_p < 1)
    remove[:, -1] = False  # the most likely token always survives
    remove = remove.scatter(1, sorted_idx, remove)  # back to vocabulary order
    logits = logits.masked_fill(remove, neg_inf)

    probs = logits.softmax(dim=-1)
    min_p = min_p.to(logits.dtype)[:, None]
    below_min_p = (probs < min_p * probs.amax(dim=-1, keepdim=True)) & (min_p > 0)
    return logits.masked_fill(below_min_p, neg_inf)


def _random_sample(
    probs: torch.Tensor, generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """One draw per row from ``probs`` [B, V] via the exponential race (argmax of p / Exp(1)).

    Equivalent to ``torch.multinomial`` row by row, but a seeded row needs only its own generator
    and no other row's draws, so its samples do not depend on the batch.
    """
    noise = torch.empty_like(probs)
    if any(g is None for g in generators):
        noise.exponential_()
    for row, generator in enumerate(generators):
        if generator is not None:
            noise[row].exponential_(generator=generator)
    # exponential_ can return exactly 0; 0 / 0 would be NaN, which argmax would pick.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return probs.div(noise).argmax(dim=-1)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    min_p: torch.Tensor,
    generators: Sequence[torch.Generator | None],
    *,
    all_greedy: bool = False,
) -> torch.Tensor:
    """Pick one token per row.

    Rows with ``temperature < GREEDY_TEMPERATURE`` (i.e. 0) take the argmax. The others are
    scaled by temperature, filtered by top-k, top-p and min-p, and sampled with the row's own
    generator, or with torch's default generator where it is None.

    Args:
        logits: [B, V] float32 logits (after :func:`apply_penalties`, if any).
        temperature: [B] float.
        top_p: [B] float, 1 = off.
        top_k: [B] int, 0 = off.
        min_p: [B] float, 0 = off.
        generators: B entries; a seeded request's generator, on the logits' device, or None.
        all_greedy: the caller knows every row is greedy; skips the filtering and the draw.

    Returns:
        [B] int64 token ids, on the logits' device.
    """
    if len(generators) != logits.shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {logits.shape[0]}")
    greedy_ids = logits.argmax(dim=-1)
    if all_greedy:
        return greedy_ids
    scaled = apply_temperature(logits, temperature)
    filtered = apply_top_k_top_p_min_p(scaled, top_k, top_p, min_p)
    random_ids = _random_sample(filtered.softmax(dim=-1), generators)
    return torch.where(temperature < GREEDY_TEMPERATURE, greedy_ids, random_ids)


class Logprobs(NamedTuple):
    """Log-probabilities of one step for each row (see :func:`compute_logprobs`)."""

    token_logprobs: torch.Tensor  # [B] of the chosen token
    token_ranks: torch.Tensor  # [B] 1-based rank of the chosen token (1 = most likely)
    top_ids: torch.Tensor  # [B, k] ids of the k most likely tokens, most likely first
    top_logprobs: torch.Tensor  # [B, k]


def compute_logprobs(logits: torch.Tensor, ids: torch.Tensor, k: int) -> Logprobs:
    """Log-probabilities of the chosen tokens and each row's top ``k``.

    Pass the model's raw logits: the values are ``log_softmax`` of the model distribution before
    penalties, temperature and filtering. This is vLLM v1's default (``logprobs_mode=
    "raw_logprobs"``) and does not change with the sampling options.

    Args:
        logits: [B, V] raw model logits.
        ids: [B] int64 chosen token ids.
        k: number of top entries per row (0 gives empty [B, 0] tensors).
    """
    logprobs = logits.float().log_softmax(dim=-1)  # [B, V]
    chosen = logprobs.gather(1, ids[:, None].to(torch.long))  # [B, 1]
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    top_logprobs, top_ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return Logprobs(chosen.squeeze(1), ranks, top_ids, top_logprobs)


__all__ = [
    "Logprobs",
    "apply_penalties",
    "apply_temperature",
    "apply_top_k_top_p_min_p",
    "compute_logprobs",
    "pad_token_ids",
    "sample",
]
