"""The hot path of one engine step: lay the scheduled tokens end to end, fill in vision
embeddings (encoder cache first, the ViT for the rest), run the decoder over the paged cache
through the backend chosen for the model, and sample the next token of every sequence whose
chunk reached its end. Only the model's public methods are called (``VLModel``).
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from qwenvl.engine.backends import DecoderBackend, select_backend
from qwenvl.engine.encoder_cache import EncoderCache
from qwenvl.engine.grammar import apply_masks
from qwenvl.engine.kv_cache import AttentionMetadata, PagedKVCache
from qwenvl.engine.request import Request, Sequence
from qwenvl.engine.scheduler import ScheduledChunk
from qwenvl.layers.sampler import apply_penalties, compute_logprobs, pad_token_ids, sample
from qwenvl.models import VLModel


@dataclass
class StepInputs:
    """One step as every tensor-parallel rank runs it (rank 0 prepares it and sends it over):
    token ids and M-RoPE positions laid end to end, (block table, first position, length) of
    each chunk, the rows whose logits are sampled, and the rows vision features overwrite."""

    ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [3, T]
    layout: list[tuple[list[int], int, int]]
    rows: list[int]
    vision_rows: torch.Tensor | None  # [R] int64
    vision: torch.Tensor | None  # [R, hidden]


class ModelRunner:
    def __init__(
        self,
        model: VLModel,
        kv: PagedKVCache,
        encoder_cache: EncoderCache,
        backend: DecoderBackend | None = None,
    ) -> None:
        self.model = model
        self.kv = kv
        self.encoder_cache = encoder_cache
        self.backend = backend or select_backend(model)
        self.vit_items = 0  # items that went through the vision tower

    def run(self, chunks: Seq[ScheduledChunk], tables: Seq[list[int]]) -> torch.Tensor:
        """Logits ``[S, vocab]`` (float32) for the chunks that sample, in chunk order."""
        return self.execute(self.prepare(chunks, tables))

    @torch.inference_mode()
    def prepare(self, chunks: Seq[ScheduledChunk], tables: Seq[list[int]]) -> StepInputs:
        """The step's inputs, everything a rank needs to run it (vision features included)."""
        ids, positions, rows, layout = [], [], [], []
        offset = 0
        for c, table in zip(chunks, tables):
            end = c.start + c.length
            ids.extend(c.seq.ids(c.start, end))
            positions.append(c.seq.positions(c.start, end))
            layout.append((table, c.start, c.length))
            offset += c.length
            if c.samples:
                rows.append(offset - 1)
        vision_rows, vision = self._vision(chunks)
        return StepInputs(
            torch.tensor(ids, dtype=torch.long),
            torch.cat(positions, dim=1),
            layout,
            rows,
            vision_rows,
            vision,
        )

    @torch.inference_mode()
    def execute(self, step: StepInputs) -> torch.Tensor:
        """Run a prepared step: embeddings, vision rows, the decoder backend, the logits."""
        model = self.model
        device = model.device
        embeds = model.embed_tokens(step.ids.to(device))
        if step.vision_rows is not None:
            embeds[step.vision_rows.to(device)] = step.vision.to(device, embeds.dtype)
        meta = AttentionMetadata.build(step.layout, self.kv.block_size, device)
        hidden = self.backend.run(embeds, step.positions, self.kv, meta)
        rows = torch.tensor(step.rows, dtype=torch.long, device=device)
        return model.compute_logits(hidden[rows]).float()

    # --- vision ------------------------------------------------------------------------------
    def _vision(
        self, chunks: Seq[ScheduledChunk]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The step's rows that hold vision items (a chunk may hold part of an item) and their
        features, encoding what no cache holds. Rows, not placeholder ids, say where: a
        generated ``<|image_pad|>`` is an ordinary token."""
        overlays = []
        offset = 0
        for c in chunks:
            end = c.start + c.length
            req = c.seq.request
            for k, item in enumerate(req.items):
                lo, hi = max(c.start, item.start), min(end, item.end)
                if lo < hi:
                    overlays.append((req, k, offset + lo - c.start, lo - item.start, hi - lo))
            offset += c.length
        if not overlays:
            return None, None
        self._encode_missing({(id(r), k): (r, k) for r, k, *_ in overlays}.values())
        rows = torch.cat([torch.arange(row, row + n) for _, _, row, _, n in overlays])
        feats = torch.cat([req.features[k][a : a + n] for req, k, _, a, n in overlays])
        return rows, feats

    def _encode_missing(self, wanted: Iterable[tuple[Request, int]]) -> None:
        todo: dict[str, list[tuple[Request, int]]] = {"image": [], "video": []}
        for req, k in wanted:
            if k in req.features:
                continue
            item = req.items[k]
            cached = self.encoder_cache.get(item.key)
            if cached is not None:
                req.features[k] = cached
            else:
                todo[item.kind].append((req, k))
        for group in todo.values():
            unique: dict[str, tuple[Request, int]] = {}
            for req, k in group:  # the same image twice in one step is encoded once
                unique.setdefault(req.items[k].key, (req, k))
            if not unique:
                continue
            items = [req.items[k] for req, k in unique.values()]
            feats = self.model.encode_vision(
                torch.cat([it.pixel_values for it in items]),
                [it.grid_thw for it in items],
                lut=items[0].lut,  # videos: one processor, one normalisation table
            )
            self.vit_items += len(items)
            by_key = dict(zip(unique, feats.split([it.length for it in items])))
            for key, f in by_key.items():
                self.encoder_cache.put(key, f)
            for req, k in group:
                req.features[k] = by_key[req.items[k].key]


def sample_next(
    seqs: Seq[Sequence],
    logits: torch.Tensor,
    eos: set[int],
    grammar: tuple[Seq[int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The next token of each sequence (row ``i`` of ``logits`` belongs to ``seqs[i]``);
    records logprobs for sequences that asked for them. ``grammar``: (rows, bitmasks) of the
    constrained sequences: tokens their grammar forbids are removed before anything else, and
    their logprobs are those of the constrained distribution."""
    if grammar is not None:
        logits = apply_masks(logits, *grammar)
    raw = logits
    for k, s in enumerate(seqs):  # eos and stop ids may not end a completion before min_tokens
        if len(s.token_ids) < s.params.min_tokens:
            blocked = list(eos | set(s.params.stop_token_ids))
            logits = logits.clone() if logits is raw else logits
            logits[k, blocked] = float("-inf")
            if s.grammar is not None and bool(torch.isinf(logits[k]).all()):
                logits[k, blocked] = raw[k, blocked]  # the grammar allows only an ending
    params = [s.params for s in seqs]
    dev = logits.device
    if any(
        p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params
    ):
        vocab = logits.shape[-1]
        logits = apply_penalties(
            logits,
            pad_token_ids([s.prompt_ids for s in seqs], vocab, logits.device),
            pad_token_ids([s.token_ids for s in seqs], vocab, logits.device),
            torch.tensor([p.repetition_penalty for p in params], device=dev),
            torch.tensor([p.presence_penalty for p in params], device=dev),
            torch.tensor([p.frequency_penalty for p in params], device=dev),
        )
    next_ids = sample(
        logits,
        torch.tensor([p.temperature for p in params], device=dev),
        torch.tensor([p.top_p for p in params], device=dev),
        torch.tensor([p.top_k for p in params], device=dev),
        torch.tensor([p.min_p for p in params], device=dev),
        [s.generator for s in seqs],
        all_greedy=all(p.is_greedy for p in params),
    )
    want = [k for k, s in enumerate(seqs) if s.logprobs is not None]
    if want:
        k_top = max(seqs[k].params.logprobs for k in want)
        lp = compute_logprobs(raw[want], next_ids[want], k_top)
        for j, k in enumerate(want):
            s = seqs[k]
            top = s.params.logprobs
            entry = {  # tokens a grammar forbids (-inf) are no alternatives
                int(t): float(v)
                for t, v in zip(lp.top_ids[j, :top], lp.top_logprobs[j, :top])
                if v > float("-inf")
            }
            entry[int(next_ids[k])] = float(lp.token_logprobs[j])
            s.logprobs.append(entry)
            s.cumulative_logprob += float(lp.token_logprobs[j])
    return next_ids
