"""Vision embeddings kept across requests, keyed by the content of the preprocessed pixels.

A second question about the same image (a multi-turn chat, several users, ``n`` > 1 after a
preemption) finds its merged ViT output here and skips the vision tower. The cache is bounded in
bytes and evicts the least recently used entry.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class EncoderCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        feats = self._entries.get(key)
        if feats is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return feats

    def put(self, key: str, feats: torch.Tensor) -> None:
        size = feats.numel() * feats.element_size()
        if size > self.max_bytes or key in self._entries:
            return
        while self.used + size > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.used -= old.numel() * old.element_size()
        self._entries[key] = feats
        self.used += size

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.used = 0
