"""Direct Preference Optimization (Rafailov et al. 2023) on (prompt, chosen, rejected) pairs.

Each pair is one packed row ``[chosen | rejected]``; the summed log-probability of each reply's
tokens comes from the same per-sample sums as SFT. The reference is a frozen copy of the starting
model, or, with LoRA, the same model with its adapters switched off (no second copy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwenvl.train.lora import adapters_disabled, has_lora
from qwenvl.train.packing import IGNORE, Batch, sample_sums, token_logprobs


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    sft_weight: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``-log sigmoid(beta * ((pc - rc) - (pr - rr)))`` per pair, and the reward margins.

    DPO only asks the chosen reply to gain on the rejected one, and it may do so by lowering
    both: on a short-answer task that breaks greedy answers. ``sft_weight`` adds
    ``sft_weight * (-pc / chosen_tokens)``, the chosen reply's mean token NLL, to each pair's loss
    (RPO, Pang et al. 2024; LLaMA-Factory's ``pref_ftx``), which holds the chosen reply up.
    """
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(beta * margin)
    if sft_weight:
        if chosen_tokens is None:
            raise ValueError("the SFT term needs the chosen replies' token counts")
        losses = losses + sft_weight * (-policy_chosen / chosen_tokens.to(policy_chosen))
    return losses, beta * margin


def chosen_tokens(batch: Batch) -> torch.Tensor:
    """Target tokens of each pair's chosen reply: ``[pairs]`` (samples alternate c, r)."""
    on = (batch.labels != IGNORE).float()
    return sample_sums(on, batch.segments, batch.num_samples)[0::2]


def pair_logprobs(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the chosen and rejected replies: ``[pairs]`` each.

    The batch's samples alternate chosen, rejected (``collate`` of ``[[c, r], ...]``)."""
    logp, segs = token_logprobs(model, batch)
    sums = sample_sums(logp, segs, batch.num_samples)
    return sums[0::2], sums[1::2]


def reference_logprobs(
    model: nn.Module, reference: nn.Module | None, batch: Batch
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        if reference is not None:
            return pair_logprobs(reference, batch)
        if not has_lora(model):
            raise ValueError("DPO without LoRA needs a reference model")
        with adapters_disabled(model):
            return pair_logprobs(model, batch)
