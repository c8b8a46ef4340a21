"""What a decoder backend is: a ``supports`` check on the declared layout and one ``run``."""

from __future__ import annotations

from typing import ClassVar

import torch

from qwenvl.engine.kv_cache import AttentionMetadata, PagedKVCache
from qwenvl.models import DecoderLayout, VLModel


class DecoderBackend:
    """Runs the decoder over one step's tokens, attending through the paged cache."""

    name: ClassVar[str]

    def __init__(self, model: VLModel) -> None:
        self.model = model

    @classmethod
    def supports(cls, layout: DecoderLayout, device: torch.device, dtype: torch.dtype) -> bool:
        raise NotImplementedError

    def run(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: PagedKVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """``embeds [T, H]`` of the step's tokens end to end at ``positions [3, T]`` -> final
        hidden states ``[T, H]``."""
        raise NotImplementedError
