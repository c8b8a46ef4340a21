"""Dense left-padded batches without a KV cache: whole-prompt logits for the parity tests (a test
helper: generation runs on the engine, training builds its own packed batches in
``qwenvl.train.packing``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qwenvl.processing.prompt import PromptInputs


def pad_batch(
    prompts: Sequence[PromptInputs], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad prompts into ``ids [B, L]``, ``positions [3, B, L]`` and ``valid [B, L]``."""
    width = max(len(p.token_ids) for p in prompts)
    batch = len(prompts)
    ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    positions = torch.zeros(3, batch, width, dtype=torch.long)
    valid = torch.zeros(batch, width, dtype=torch.bool)
    for b, p in enumerate(prompts):
        n = len(p.token_ids)
        ids[b, width - n :] = torch.tensor(p.token_ids)
        positions[:, b, width - n :] = p.positions
        valid[b, width - n :] = True
    return ids, positions, valid


def prefill_mask(valid: torch.Tensor) -> torch.Tensor:
    """Causal mask over a left-padded batch, ``[B, 1, L, L]``; pads attend to themselves only so
    that no row is fully masked (which would turn into NaNs).
    """
    width = valid.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    return ((causal & valid[:, None, :]) | torch.eye(width, dtype=torch.bool))[:, None]


def prompt_logits(
    model: torch.nn.Module, prompts: Sequence[PromptInputs], pad_token_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits for every prompt token of a left-padded batch (no cache): ``[B, L, V]`` and valid."""
    ids, positions, valid = pad_batch(prompts, pad_token_id)
    with torch.inference_mode():
        embeds = batch_embeds(model, prompts, list(range(len(prompts))), ids)
        logits = model(ids, positions, prefill_mask(valid), inputs_embeds=embeds)
    return logits, valid


def batch_embeds(
    model: torch.nn.Module,
    prompts: Sequence[PromptInputs],
    row_prompt: list[int],
    ids: torch.Tensor,
) -> torch.Tensor:
    """Embeddings of a padded batch whose row ``b`` holds prompt ``row_prompt[b]``.

    All images of all prompts go through the ViT in one call (videos in another), once per prompt
    even when several rows (``n > 1``) share it.
    """
    image_feats: dict[int, torch.Tensor] = {}
    video_feats: dict[int, torch.Tensor] = {}
    images = [im for p in prompts for im in p.images]
    videos = [v for p in prompts for v in p.videos]
    if images:
        feats = model.encode_vision(
            torch.cat([im.pixel_values for im in images]), [im.grid_thw for im in images]
        )
        image_feats = _split_per_prompt(
            feats, [[im.num_tokens for im in p.images] for p in prompts]
        )
    if videos:
        feats = model.encode_vision(
            torch.cat([v.pixel_values for v in videos]), [v.grid_thw for v in videos]
        )
        video_feats = _split_per_prompt(feats, [[v.num_tokens for v in p.videos] for p in prompts])
    row_images = [image_feats[i] for i in row_prompt if i in image_feats]
    row_videos = [video_feats[i] for i in row_prompt if i in video_feats]
    return model.embed(
        ids.to(model.device),
        torch.cat(row_images) if row_images else None,
        torch.cat(row_videos) if row_videos else None,
    )


def _split_per_prompt(feats: torch.Tensor, counts: list[list[int]]) -> dict[int, torch.Tensor]:
    """Split concatenated vision features back into one tensor per prompt (prompts with items)."""
    out, offset = {}, 0
    for i, c in enumerate(counts):
        n = sum(c)
        if n:
            out[i] = feats[offset : offset + n]
        offset += n
    return out


def greedy_logprob_gap_to_hf(llm, hf, prompts: Sequence[str], max_tokens: int = 12) -> float:
    """Greedy-decode ``prompts`` with ``llm`` (an ``LLM``) and check each token is transformers'
    argmax (``hf``, a model on the same weights) after the tokens before it; returns the largest
    |log-prob difference| of the chosen tokens."""
    from qwenvl import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    worst = 0.0
    for prompt, out in zip(prompts, llm.generate(list(prompts), params)):
        ids = llm.processor.prepare_text(prompt).token_ids
        gen = out.outputs[0].token_ids
        seq = torch.tensor([list(ids) + list(gen)])
        with torch.no_grad():
            logits = hf(input_ids=seq, mm_token_type_ids=torch.zeros_like(seq)).logits[0]
        ref = torch.log_softmax(logits[len(ids) - 1 : -1].double(), -1)
        assert ref.argmax(-1).tolist() == list(gen), prompt
        ours = [d[t] for d, t in zip(out.outputs[0].logprobs, gen)]
        theirs = ref[torch.arange(len(gen)), torch.tensor(gen)].tolist()
        worst = max(worst, *(abs(float(a) - b) for a, b in zip(ours, theirs)))
    return worst
