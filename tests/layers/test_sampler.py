"""Tests for qwenvl/layers/sampler.py against transformers' logits processors (the reference)."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qwenvl.layers.sampler import (
    apply_penalties,
    apply_temperature,
    apply_top_k_top_p_min_p,
    compute_logprobs,
    pad_token_ids,
    sample,
)


def _assert_same_filter(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """The same tokens survive (exactly), and the survivors' values agree."""
    assert torch.equal(torch.isinf(actual), torch.isinf(expected))
    keep = ~torch.isinf(expected)
    torch.testing.assert_close(actual[keep], expected[keep])


def _hf_filter(row: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """transformers' warpers in generate()'s order, added only when active as generate() does."""
    scores = row[None].clone()
    ids = torch.zeros(1, 1, dtype=torch.long)
    if top_k != 0:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    if min_p > 0.0:
        scores = MinPLogitsWarper(min_p)(ids, scores)
    return scores[0]


def test_repetition_penalty_matches_hf() -> None:
    gen = torch.Generator().manual_seed(0)
    batch, vocab = 6, 64
    logits = torch.randn(batch, vocab, generator=gen) * 3
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (5, 0, 9, 3, 7, 1)]
    outputs = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (2, 4, 0, 6, 1, 0)]
    penalties = [1.05, 1.3, 0.8, 1.0, 2.0, 1.2]
    zeros = torch.zeros(batch)
    actual = apply_penalties(
        logits,
        pad_token_ids(prompts, vocab),
        pad_token_ids(outputs, vocab),
        torch.tensor(penalties),
        zeros,
        zeros,
    )
    for i in range(batch):
        ids = torch.tensor([prompts[i] + outputs[i]], dtype=torch.long)
        expected = RepetitionPenaltyLogitsProcessor(penalties[i])(ids, logits[i : i + 1].clone())
        torch.testing.assert_close(actual[i], expected[0], rtol=0, atol=0)


def test_presence_and_frequency_penalties_count_generated_tokens_only() -> None:
    vocab = 10
    logits = torch.zeros(2, vocab)
    prompts = [[1, 1, 2], [3]]
    outputs = [[2, 2, 2, 5], []]
    actual = apply_penalties(
        logits,
        pad_token_ids(prompts, vocab),
        pad_token_ids(outputs, vocab),
        torch.ones(2),
        torch.tensor([0.5, 0.5]),
        torch.tensor([0.25, 0.25]),
    )
    expected = torch.zeros(2, vocab)
    expected[0, 2] = -(0.5 + 3 * 0.25)
    expected[0, 5] = -(0.5 + 1 * 0.25)
    torch.testing.assert_close(actual, expected)


def test_penalties_ignore_padding_and_out_of_vocab_ids() -> None:
    logits = torch.full((1, 4), 2.0)
    ids = torch.tensor([[4, 7, 1]])  # 4 is the padding value, 7 is past the lm_head
    out = apply_penalties(logits, ids, ids, torch.tensor([2.0]), torch.ones(1), torch.ones(1))
    torch.testing.assert_close(out, torch.tensor([[2.0, 1.0 - 2.0, 2.0, 2.0]]))


def test_pad_token_ids() -> None:
    assert pad_token_ids([[1, 2], [], [3]], 9).tolist() == [[1, 2], [9, 9], [3, 9]]
    assert pad_token_ids([[], []], 9).shape == (2, 0)


def test_temperature_matches_hf() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    temps = [0.5, 1.7, 0.0]
    out = apply_temperature(logits, torch.tensor(temps))
    for i, t in enumerate(temps[:2]):
        expected = TemperatureLogitsWarper(t)(
            torch.zeros(1, 1, dtype=torch.long), logits[i : i + 1]
        )
        torch.testing.assert_close(out[i], expected[0])
    torch.testing.assert_close(out[2], logits[2])  # greedy rows are left unscaled


@pytest.mark.parametrize("seed", range(4))
def test_top_k_top_p_min_p_match_hf(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    vocab = 1000
    settings = [  # (top_k, top_p, min_p)
        (0, 1.0, 0.0),
        (1, 1.0, 0.0),
        (40, 1.0, 0.0),
        (vocab + 5, 1.0, 0.0),
        (0, 0.9, 0.0),
        (0, 0.001, 0.0),
        (0, 1.0, 0.1),
        (50, 0.8, 0.0),
        (20, 0.95, 0.05),
        (0, 0.7, 0.2),
        (3, 0.5, 0.9),
    ]
    logits = torch.randn(len(settings), vocab, generator=gen) * 4
    out = apply_top_k_top_p_min_p(
        logits,
        torch.tensor([s[0] for s in settings]),
        torch.tensor([s[1] for s in settings]),
        torch.tensor([s[2] for s in settings]),
    )
    for i, (top_k, top_p, min_p) in enumerate(settings):
        _assert_same_filter(out[i], _hf_filter(logits[i], top_k, top_p, min_p))


def test_top_k_keeps_ties_like_hf() -> None:
    logits = torch.tensor([[3.0, 1.0, 3.0, 2.0, 3.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    out = apply_top_k_top_p_min_p(logits, torch.tensor([2, 3]), torch.ones(2), torch.zeros(2))
    for i in range(2):
        _assert_same_filter(out[i], _hf_filter(logits[i], [2, 3][i], 1.0, 0.0))


def _sample_args(batch: int, temperature: float, top_p: float, top_k: int, min_p: float):
    return (
        torch.full((batch,), temperature),
        torch.full((batch,), top_p),
        torch.full((batch,), top_k),
        torch.full((batch,), min_p),
    )


def test_greedy_rows_take_argmax() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 300, generator=gen)
    temperature = torch.tensor([0.0, 1.0, 0.0, 0.5, 0.0, 2.0])
    top_k = torch.tensor([0, 0, 5, 0, 0, 0])
    ids = sample(logits, temperature, torch.ones(6), top_k, torch.zeros(6), [None] * 6)
    assert ids.dtype == torch.long and ids.shape == (6,)
    argmax = logits.argmax(-1)
    assert torch.equal(ids[temperature == 0], argmax[temperature == 0])
    t, p, k, m = _sample_args(6, 1.0, 1.0, 0, 0.0)
    assert torch.equal(sample(logits, t, p, k, m, [None] * 6, all_greedy=True), argmax)


def test_top_k_one_is_argmax() -> None:
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(3))
    ids = sample(logits, *_sample_args(4, 1.5, 1.0, 1, 0.0), [None] * 4)
    assert torch.equal(ids, logits.argmax(-1))


def test_seeded_sampling_is_reproducible_and_batch_independent() -> None:
    vocab = 50
    row = torch.randn(1, vocab, generator=torch.Generator().manual_seed(4)) * 0.5
    other = torch.randn(3, vocab, generator=torch.Generator().manual_seed(5))

    def run(batch_logits: torch.Tensor, position: int, gens: list) -> list[int]:
        b = batch_logits.shape[0]
        args = _sample_args(b, 1.0, 0.95, 40, 0.0)
        return [sample(batch_logits, *args, gens)[position].item() for _ in range(20)]

    alone = run(row, 0, [torch.Generator().manual_seed(1234)])
    again = run(row, 0, [torch.Generator().manual_seed(1234)])
    batched = torch.cat([other[:2], row, other[2:]])
    gens = [torch.Generator().manual_seed(99), torch.Generator().manual_seed(1234)]
    neighbours = [None, *gens, None]
    in_batch = run(batched, 2, neighbours)
    assert alone == again == in_batch
    assert len(set(alone)) > 3  # it really sampled
    assert run(row, 0, [torch.Generator().manual_seed(4321)]) != alone


def _expected_distribution(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """Top-k then top-p, renormalised, written out directly over a small vocabulary."""
    probs = (logits.double() / temperature).softmax(-1)
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[order[:top_k]] = True
    probs = torch.where(keep, probs, 0.0)
    probs = probs / probs.sum()
    cumulative = 0.0
    nucleus = torch.zeros_like(keep)
    for idx in order.tolist():
        nucleus[idx] = True
        cumulative += probs[idx].item()
        if cumulative >= top_p:
            break
    probs = torch.where(nucleus, probs, 0.0)
    return probs / probs.sum()


@pytest.mark.parametrize("seeded", [False, True])
def test_empirical_distribution(seeded: bool) -> None:
    num_samples, vocab = 20_000, 8
    logits = torch.tensor([2.0, 1.5, 1.0, 0.8, 0.5, 0.0, -1.0, 3.0])
    temperature, top_k, top_p = 0.8, 6, 0.9
    expected = _expected_distribution(logits, temperature, top_k, top_p)
    assert (expected > 0).sum() < vocab  # the filters removed something
    if seeded:
        gens = [torch.Generator().manual_seed(s) for s in range(num_samples)]
    else:
        torch.manual_seed(0)
        gens = [None] * num_samples
    batch = logits.expand(num_samples, vocab)
    ids = sample(batch, *_sample_args(num_samples, temperature, top_p, top_k, 0.0), gens)
    empirical = torch.bincount(ids, minlength=vocab).double() / num_samples
    assert empirical[expected == 0].sum() == 0
    assert (empirical - expected).abs().max() < 0.02


def test_generators_must_match_batch() -> None:
    with pytest.raises(ValueError, match="generators"):
        sample(torch.zeros(2, 5), *_sample_args(2, 1.0, 1.0, 0, 0.0), [None])


def test_compute_logprobs() -> None:
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(6))
    ids = torch.tensor([5, 0, 39])
    result = compute_logprobs(logits, ids, 4)
    reference = logits.log_softmax(-1)
    torch.testing.assert_close(result.token_logprobs, reference[torch.arange(3), ids])
    values, indices = reference.topk(4, dim=-1)
    assert torch.equal(result.top_ids, indices)
    torch.testing.assert_close(result.top_logprobs, values)
    expected_ranks = [int((reference[i] > reference[i, ids[i]]).sum()) + 1 for i in range(3)]
    assert result.token_ranks.tolist() == expected_ranks
    best = compute_logprobs(logits, logits.argmax(-1), 0)
    assert best.token_ranks.tolist() == [1, 1, 1]
    assert best.top_ids.shape == (3, 0) and best.top_logprobs.shape == (3, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_seeded_sampling_on_cuda() -> None:
    logits = torch.randn(4, 1000, device="cuda")
    args = [a.cuda() for a in _sample_args(4, 1.0, 0.9, 50, 0.0)]

    def draw(seed: int) -> list[int]:
        gens = [None, torch.Generator("cuda").manual_seed(seed), None, None]
        return [sample(logits, *args, gens)[1].item() for _ in range(10)]

    assert draw(7) == draw(7)
    greedy = sample(logits, torch.zeros(4, device="cuda"), *args[1:], [None] * 4)
    assert torch.equal(greedy, logits.argmax(-1))
