"""Training on conversations that open with the same long text, paying for that text once.

The ``click`` task's system message (the cookbook's ``computer_use`` tool) is ~2,200 tokens of
the demo model's small vocabulary, and each conversation's own part ~60: trained whole, a batch
costs ~40x its own tokens. Here the shared opening runs once per step without gradient, its keys
and values (after rotary) are kept per layer, and every conversation's own tokens, laid end to
end in one row, attend to those plus, causally, to their own. The logits of the own tokens are
exactly those of the whole conversation (tested); only the gradient through the opening's keys
and values is dropped: the model learns what to do after the tool text, not to re-represent it.

Both halves plug into the decoder through the ``kv`` hook the engine uses for its paged cache
(``PagedAttention.attend``), so the model code is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from qwenvl.layers.attention import causal_attention
from qwenvl.layers.rotary import apply_rotary
from qwenvl.train.data import Sample


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, d: int) -> torch.Tensor:
    """``[T, heads*D]`` -> rotary applied, ``[heads, T, D]``."""
    t = x.shape[0]
    return apply_rotary(x.reshape(t, -1, d), cos[:, None], sin[:, None]).transpose(0, 1)


def _heads(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, ...]:
    """What ``attend`` receives (``[T, heads*D]``) as ``[heads, T, D]``, q and k rotated."""
    d = cos.shape[-1]
    v = v.reshape(v.shape[0], -1, d).transpose(0, 1)
    return _rotate(q, cos, sin, d), _rotate(k, cos, sin, d), v


class _KeepOpening:
    """Causal attention over the opening alone, keeping each layer's rotated keys and values."""

    def __init__(self) -> None:
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, dtype=None
    ) -> Tensor:  # dtype: the engine's prefill hint, no use in float32 training
        q, k, v = _heads(q, k, v, cos, sin)
        self.kv[layer] = (k, v)
        out = causal_attention(q[None], k[None], v[None], None)[0]
        return out.transpose(0, 1).reshape(q.shape[1], -1)


# Per sample, per layer: ``(query position, key positions)`` pairs in the whole conversation's
# positions, where one head must look (``Recipe.attention_targets``).
Guide = Sequence[dict[int, list[tuple[int, Tensor]]]]


class _AfterOpening:
    """Each conversation's own tokens (one row, end to end) attend to the kept opening and,
    causally, to their own conversation's tokens. With ``guide``, ``look`` sums ``-log`` of
    ``head``'s attention mass on the guided keys (the recipe's guided-attention loss)."""

    def __init__(
        self,
        kept: dict[int, tuple[Tensor, Tensor]],
        lengths: list[int],
        guide: Guide = (),
        head: int = 0,
    ) -> None:
        self.kept = kept
        self.lengths = lengths
        self.guide, self.head = guide, head
        self.look: Tensor | float = 0.0
        self.looks = 0

    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, dtype=None
    ) -> Tensor:  # dtype: the engine's prefill hint, no use in float32 training
        q, k, v = _heads(q, k, v, cos, sin)
        k0, v0 = self.kept[layer]
        outs, start = [], 0
        self.heads = q.shape[0]
        for i, n in enumerate(self.lengths):
            own = slice(start, start + n)
            keys = torch.cat([k0, k[:, own]], 1)[None]
            values = torch.cat([v0, v[:, own]], 1)[None]
            mask = torch.ones(n, k0.shape[1] + n, dtype=torch.bool, device=q.device)
            mask[:, k0.shape[1] :] = torch.ones(n, n, dtype=torch.bool).tril()
            outs.append(causal_attention(q[None, :, own], keys, values, mask[None, None])[0])
            if i < len(self.guide) and layer in self.guide[i]:
                self._guided(q[self.head, own], keys[0], self.guide[i][layer], k0.shape[1])
            start += n
        return torch.cat(outs, 1).transpose(0, 1).reshape(q.shape[1], -1)

    def _guided(self, q: Tensor, keys: Tensor, pairs: list[tuple[int, Tensor]], p: int) -> None:
        """Key index = position in the conversation; a query at position ``j`` sees keys
        ``0..j``."""
        kv_head = self.head // (self.heads // keys.shape[0])
        for j, wanted in pairs:
            scores = (q[j - p].float() @ keys[kv_head, : j + 1].float().T) / q.shape[-1] ** 0.5
            logp = scores.log_softmax(-1)
            self.look = self.look - torch.logsumexp(logp[wanted], -1)
            self.looks += 1


def opening_length(samples: Sequence[Sample], vision_ids: Sequence[int]) -> int:
    """Tokens every sample shares from the start, stopping before the first vision placeholder
    (placeholders look alike but stand for each sample's own features)."""
    first = samples[0].token_ids
    n = next((i for i, t in enumerate(first) if t in vision_ids), len(first))
    for s in samples[1:]:
        n = next((i for i, (a, b) in enumerate(zip(first, s.token_ids)) if a != b or i >= n), n)
    return n


def shared_opening_logits(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    vision_ids: Sequence[int],
    guide: Guide = (),
    head: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(logits [N, vocab], labels [N], owner [N], look)`` at every trained token of
    ``samples``, in order; ``owner`` is the index of the sample a token belongs to; ``look`` the
    mean guided-attention loss of ``head`` over ``guide``'s pairs (0 without). ``vision_ids``:
    the image and video placeholder ids."""
    p = opening_length(samples, vision_ids)
    ids = samples[0].token_ids[:p]
    keep = _KeepOpening()
    with torch.no_grad():
        opening = torch.tensor([ids], device=model.device)
        opening_at = samples[0].positions[:, None, :p].to(model.device)
        model.decode(model.embed_tokens(opening), opening_at, kv=keep)
    own = [s.token_ids[p:] for s in samples]
    row = torch.tensor([[t for o in own for t in o]], device=model.device)
    pixels = [im.pixel_values for s in samples for im in s.images]
    feats = None
    if pixels:
        grids = [im.grid_thw for s in samples for im in s.images]
        feats = model.encode_vision(torch.cat(pixels).to(model.device), grids)
    positions = torch.cat([s.positions[:, p:] for s in samples], 1)[:, None].to(model.device)
    after = _AfterOpening(keep.kv, [len(o) for o in own], guide, head)
    hidden = model.decode(model.embed(row, feats), positions, kv=after)[0]
    # the token at t is predicted from t - 1: shift by one inside each sample
    rows, labels, owner, start = [], [], [], 0
    for i, s in enumerate(samples):
        targets = s.targets[p:].nonzero().flatten()
        if p and bool(s.targets[p - 1]):
            raise ValueError("a target token lies inside the shared opening")
        rows.append(start + targets - 1)
        labels.append(torch.tensor(s.token_ids[p:])[targets])
        owner.append(torch.full_like(targets, i))
        start += len(s) - p
    rows_t = torch.cat(rows)
    if bool((rows_t < 0).any()):
        raise ValueError("a sample's first own token is a target")
    logits = model.compute_logits(hidden[rows_t.to(hidden.device)])
    look = torch.as_tensor(after.look, dtype=torch.float32) / max(1, after.looks)
    return logits, torch.cat(labels), torch.cat(owner), look
