"""Rows of samples -> model inputs, and per-token / per-sample losses.

A row holds one sample or, with packing, several laid end to end. Every sample keeps its own
M-RoPE positions and attends only to itself (a block-diagonal causal mask), so a packed row gives
each sample exactly the logits it would get alone. Rows are right-padded; a pad token attends to
itself only, so no attention row is empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from qwenvl.train.data import Sample

IGNORE = -100


def pack(
    lengths: Sequence[int], budget: int, order: Sequence[int] | None = None
) -> list[list[int]]:
    """First-fit packing of sample indices (in ``order``) into rows of <= ``budget`` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order if order is not None else range(len(lengths)):
        n = lengths[i]
        if n > budget:
            raise ValueError(f"sample {i} has {n} tokens, more than the budget of {budget}")
        for r, left in enumerate(room):
            if n <= left:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(budget - n)
    return rows


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L]
    positions: torch.Tensor  # [3, B, L]
    mask: torch.Tensor  # [B, 1, L, L] bool, True = may attend
    labels: torch.Tensor  # [B, L]: the token predicted at each position, IGNORE where untrained
    segments: torch.Tensor  # [B, L]: index of the sample (over the batch) each token is in; -1 pad
    num_samples: int
    pixel_values: torch.Tensor | None = None
    image_grid_thw: list[tuple[int, int, int]] | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: list[tuple[int, int, int]] | None = None

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with every tensor on ``device`` (grids stay lists)."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE).sum())

    @property
    def num_tokens(self) -> int:
        return int((self.segments >= 0).sum())


def collate(rows: Sequence[Sequence[Sample]], pad_token_id: int) -> Batch:
    """Lay each row's samples end to end, right-pad the rows and build the block mask."""
    width = max(sum(len(s) for s in row) for row in rows)
    b = len(rows)
    ids = torch.full((b, width), pad_token_id, dtype=torch.long)
    positions = torch.zeros(3, b, width, dtype=torch.long)
    labels = torch.full((b, width), IGNORE, dtype=torch.long)
    segments = torch.full((b, width), -1, dtype=torch.long)
    images, videos = [], []
    k = 0
    for r, row in enumerate(rows):
        at = 0
        for s in row:
            n = len(s)
            ids[r, at : at + n] = torch.tensor(s.token_ids)
            positions[:, r, at : at + n] = s.positions
            segments[r, at : at + n] = k
            # position t predicts token t + 1 when that token is a target
            tok = torch.tensor(s.token_ids[1:])
            labels[r, at : at + n - 1] = torch.where(s.targets[1:], tok, IGNORE)
            images.extend(s.images)
            videos.extend(s.videos)
            at += n
            k += 1
    same = segments[:, :, None] == segments[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = (same & causal & (segments[:, None, :] >= 0)) | torch.eye(width, dtype=torch.bool)
    return Batch(
        ids,
        positions,
        mask[:, None],
        labels,
        segments,
        k,
        torch.cat([im.pixel_values for im in images]) if images else None,
        [im.grid_thw for im in images] or None,
        torch.cat([v.pixel_values for v in videos]) if videos else None,
        [v.grid_thw for v in videos] or None,
    )


def forward_logits(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions where some row has a target: ``[B, R, V]`` and those rows ``[R]``.

    Skipping untrained positions keeps the ``[B, L, vocab]`` tensor small on real vocabularies.
    """
    rows = (batch.labels != IGNORE).any(0).nonzero().flatten()
    logits = model(
        batch.input_ids,
        batch.positions,
        batch.mask,
        pixel_values=batch.pixel_values,
        image_grid_thw=batch.image_grid_thw,
        pixel_values_videos=batch.pixel_values_videos,
        video_grid_thw=batch.video_grid_thw,
        logit_rows=rows,
    )
    return logits, rows


def token_logprobs(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every target token, ``[B, R]`` (0 where untrained), and the segment of
    each of those positions ``[B, R]``."""
    logits, rows = forward_logits(model, batch)
    device = logits.device
    labels = batch.labels[:, rows.cpu()].to(device)
    valid = labels != IGNORE
    logp = -F.cross_entropy(
        logits.float().flatten(0, 1), labels.clamp(min=0).flatten(), reduction="none"
    ).view(labels.shape)
    return logp * valid, batch.segments[:, rows.cpu()].to(device).masked_fill(~valid, -1)


def sample_sums(values: torch.Tensor, segments: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Sum ``values`` per sample: ``[num_samples]``."""
    out = values.new_zeros(num_samples + 1)
    idx = torch.where(segments >= 0, segments, num_samples)
    return out.index_add(0, idx.flatten(), values.flatten())[:num_samples]


def sample_losses(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Summed cross-entropy of each sample's target tokens: ``[num_samples]``."""
    logp, segs = token_logprobs(model, batch)
    return -sample_sums(logp, segs, batch.num_samples)
