"""The reference backend: the model's own modules with torch attention over the paged cache."""

from __future__ import annotations

import torch

from qwenvl.engine.attention import TorchPagedAttention
from qwenvl.engine.backends.base import DecoderBackend
from qwenvl.engine.kv_cache import AttentionMetadata, PagedKVCache
from qwenvl.models import DecoderLayout


class TorchBackend(DecoderBackend):
    name = "torch"
    attention = TorchPagedAttention

    @classmethod
    def supports(cls, layout: DecoderLayout, device: torch.device, dtype: torch.dtype) -> bool:
        return True

    def run(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: PagedKVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        kv = self.attention(cache, meta)
        return self.model.decode(embeds[None], positions[:, None], kv)[0]
