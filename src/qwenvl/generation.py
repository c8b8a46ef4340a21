"""A KV-cached generation loop over one static batch of prompts.

Prompts of different lengths are left-padded into one batch; the vision encoder runs once per
request (not once per sampled completion), prefill fills a preallocated cache, and decode steps
append one token per row. Finished rows leave the batch. Each prompt carries its own M-RoPE delta:
the k-th new token of a row sits at position ``prompt_len + k + delta`` on all three streams.

The engine issue replaces this loop with continuous batching over a paged cache.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from qwenvl.errors import PromptError
from qwenvl.layers.sampler import apply_penalties, compute_logprobs, pad_token_ids, sample
from qwenvl.models.qwen2_vl.text import KVCache
from qwenvl.outputs import CompletionOutput, StreamEvent
from qwenvl.processing.prompt import PromptInputs
from qwenvl.sampling import SamplingParams
from qwenvl.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class _Row:
    """One completion being generated."""

    request: int
    index: int
    prompt: PromptInputs
    params: SamplingParams
    max_new: int
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of text already streamed
    pending: list[int] = field(default_factory=list)  # token ids not yet streamed
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0

    def output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.text,
            token_ids=list(self.token_ids),
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            logprobs=self.logprobs,
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
        )


class BatchGenerator:
    """Iterate to stream ``StreamEvent``s; ``results`` holds the completions per request at the
    end.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        prompts: Sequence[PromptInputs],
        params: Sequence[SamplingParams],
        eos_token_ids: Sequence[int],
        max_model_len: int,
        pad_token_id: int = 0,
    ) -> None:
        if len(prompts) != len(params):
            raise ValueError("one SamplingParams per prompt is required")
        self.model = model
        self.tokenizer = tokenizer
        self.prompts = list(prompts)
        self.eos = set(eos_token_ids)
        self.max_model_len = max_model_len
        self.pad_token_id = pad_token_id
        self.rows: list[_Row] = []
        for i, (prompt, p) in enumerate(zip(self.prompts, params)):
            n_prompt = len(prompt.token_ids)
            room = max_model_len - n_prompt
            if room < 1:
                raise PromptError(
                    f"prompt {i} has {n_prompt} tokens: no room is left in the model's context "
                    f"of {max_model_len} tokens"
                )
            max_new = room if p.max_tokens is None else p.max_tokens
            if max_new > room:
                raise PromptError(
                    f"prompt {i} has {n_prompt} tokens and asks for max_tokens={p.max_tokens}, "
                    f"but the context holds {max_model_len} (at most {room} new tokens fit)"
                )
            gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
            for j in range(p.n):
                self.rows.append(
                    _Row(
                        request=i,
                        index=j,
                        prompt=prompt,
                        params=p,
                        max_new=max_new,
                        detok=IncrementalDetokenizer(
                            tokenizer, skip_special_tokens=p.skip_special_tokens
                        ),
                        generator=gen,
                        logprobs=[] if p.logprobs is not None else None,
                    )
                )
        self.results: list[list[CompletionOutput]] = [[] for _ in self.prompts]

    # ------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[StreamEvent]:
        model = self.model
        rows = self.rows
        device = model.device
        lengths = [len(r.prompt.token_ids) for r in rows]
        ids, positions, valid = pad_batch([r.prompt for r in rows], self.pad_token_id)
        batch, width = ids.shape

        with torch.inference_mode():
            embeds = batch_embeds(model, self.prompts, [r.request for r in rows], ids)
            total = width + max(r.max_new for r in rows)
            cache = KVCache(model.config.text, batch, total, model.dtype, device)
            logits = model(
                ids,
                positions,
                prefill_mask(valid),
                cache=cache,
                start=0,
                last_only=True,
                inputs_embeds=embeds,
            )[:, -1]
            active = list(range(batch))
            key_valid = torch.cat([valid, torch.ones(batch, total - width, dtype=torch.bool)], 1)
            step = 0
            while True:
                next_ids = self._sample([rows[a] for a in active], logits)
                events, keep = [], []
                for k, a in enumerate(active):
                    event = self._append(rows[a], int(next_ids[k]))
                    if event is not None:
                        events.append(event)
                    if rows[a].finish_reason is None:
                        keep.append(k)
                yield from events
                if not keep:
                    break
                if len(keep) < len(active):
                    sel = torch.tensor(keep)
                    cache.select(sel.to(device))
                    next_ids = next_ids[sel]
                    active = [active[k] for k in keep]
                start = width + step
                pos = (
                    torch.tensor([lengths[a] + step + rows[a].prompt.rope_delta for a in active])
                    .view(1, -1, 1)
                    .expand(3, -1, 1)
                )
                m = key_valid[active, : start + 1].view(len(active), 1, 1, start + 1)
                logits = model(
                    next_ids.view(-1, 1), pos, m, cache=cache, start=start, last_only=True
                )[:, -1]
                step += 1
        for r in rows:
            self.results[r.request].append(r.output())

    def run(self) -> list[list[CompletionOutput]]:
        for _ in self:
            pass
        return self.results

    # ------------------------------------------------------------------------------------------
    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        raw = logits
        vocab = logits.shape[-1]
        for k, r in enumerate(rows):  # eos and stop ids may not end a completion before min_tokens
            if len(r.token_ids) < r.params.min_tokens:
                blocked = list(self.eos | set(r.params.stop_token_ids))
                logits = logits.clone() if logits is raw else logits
                logits[k, blocked] = float("-inf")
        if any(
            r.params.repetition_penalty != 1.0
            or r.params.presence_penalty
            or r.params.frequency_penalty
            for r in rows
        ):
            logits = apply_penalties(
                logits,
                pad_token_ids([r.prompt.token_ids for r in rows], vocab, logits.device),
                pad_token_ids([r.token_ids for r in rows], vocab, logits.device),
                torch.tensor([r.params.repetition_penalty for r in rows]),
                torch.tensor([r.params.presence_penalty for r in rows]),
                torch.tensor([r.params.frequency_penalty for r in rows]),
            )
        next_ids = sample(
            logits,
            torch.tensor([r.params.temperature for r in rows]),
            torch.tensor([r.params.top_p for r in rows]),
            torch.tensor([r.params.top_k for r in rows]),
            torch.tensor([r.params.min_p for r in rows]),
            [r.generator for r in rows],
            all_greedy=all(r.params.is_greedy for r in rows),
        )
        want = [k for k, r in enumerate(rows) if r.logprobs is not None]
        if want:
            k_top = max(rows[k].params.logprobs for k in want)
            lp = compute_logprobs(raw[want], next_ids[want], k_top)
            for j, k in enumerate(want):
                r = rows[k]
                entry = {
                    int(t): float(v)
                    for t, v in zip(
                        lp.top_ids[j, : r.params.logprobs], lp.top_logprobs[j, : r.params.logprobs]
                    )
                }
                entry[int(next_ids[k])] = float(lp.token_logprobs[j])
                r.logprobs.append(entry)
                r.cumulative_logprob += float(lp.token_logprobs[j])
        return next_ids

    def _append(self, r: _Row, token: int) -> StreamEvent | None:
        """Add a token to a row, apply the stop rules, and return the text to stream (if any)."""
        p = r.params
        r.token_ids.append(token)
        r.pending.append(token)
        if token in self.eos and not p.ignore_eos:
            r.finish_reason, r.stop_reason = "stop", None
        elif token in p.stop_token_ids:
            r.finish_reason, r.stop_reason = "stop", token
        is_stop_token = r.finish_reason is not None
        if not is_stop_token or not p.skip_special_tokens:
            r.text += r.detok.add(token)
        if p.stop and not is_stop_token:
            self._check_stop_strings(r)
        if r.finish_reason is None and len(r.token_ids) >= r.max_new:
            r.finish_reason = "length"
        if r.finish_reason is not None:
            r.text += (
                r.detok.flush() if r.stop_reason is None or isinstance(r.stop_reason, int) else ""
            )
        # Hold back text that could still become a stop string, so it is never streamed.
        hold = 0 if r.finish_reason else max((len(s) for s in p.stop), default=1) - 1
        upto = max(r.emitted, len(r.text) - hold)
        delta = r.text[r.emitted : upto]
        r.emitted = upto
        if not delta and r.finish_reason is None:
            return None
        event = StreamEvent(r.request, r.index, delta, r.pending, r.finish_reason)
        r.pending = []
        return event

    @staticmethod
    def _check_stop_strings(r: _Row) -> None:
        for s in r.params.stop:
            # only the tail can hold a new match
            pos = r.text.find(s, max(0, r.emitted - len(s)))
            if pos >= 0:
                end = pos + len(s) if r.params.include_stop_str_in_output else pos
                r.text = r.text[:end]
                r.finish_reason, r.stop_reason = "stop", s
                return


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
