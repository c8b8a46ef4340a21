"""The one model API the rest of qwenvl uses: a family declaration and the model it builds.

A family (``qwen2_vl``, ``qwen2_5_vl``, a test's toy) subclasses :class:`ModelFamily` and registers
itself (:func:`qwenvl.models.register`) under its checkpoint ``model_type``. The engine, processor,
loader, KV cache, grounding, agents and CLI ask the family, never the config's family string or
the module tree: a new family is a new subpackage plus a registry entry.

What a family declares, in one place:
  * ``parse_config``: config.json -> a frozen :class:`ModelConfig` (or a subclass of it);
  * ``model_class``: the ``nn.Module`` (it implements :class:`VLModel`);
  * ``positions``: the M-RoPE position rule of a prompt;
  * ``weights``: the checkpoint tensor names, both ways (load and export);
  * ``kv_shape``: what one token costs in the KV cache;
  * ``grounding``: the coordinate convention of its boxes and points;
  * ``preprocess_defaults``: the vision limits and defaults when a checkpoint has no
    ``preprocessor_config.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import torch
from torch import nn

from qwenvl.models.qwen2_vl.config import ModelConfig

if TYPE_CHECKING:
    from qwenvl.models.parallel import ShardPlan
    from qwenvl.processing.image import VisionPreprocessConfig

Grid = tuple[int, int, int]
# "norm1000": boxes in special tokens on a 0..1000 scale (Qwen2-VL); "resized": JSON in pixels of
# the image as the processor resized it (Qwen2.5-VL).
GroundingStyle = Literal["norm1000", "resized"]


@dataclass(frozen=True)
class KVShape:
    """What the KV cache holds per token: ``num_layers`` keys and values of ``num_kv_heads x
    head_dim`` each."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        item = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * item


@dataclass(frozen=True)
class DecoderLayout:
    """A declared description of a decoder layer, for the backends that run it
    (``engine/backends``): a backend's ``supports()`` reads this, never the module tree."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    qkv_bias: bool = True
    o_bias: bool = False
    norm: str = "rms"  # pre-norm RMSNorm before attention and MLP
    activation: str = "silu_gated"  # down(silu(gate(x)) * up(x))
    weight_format: str = "dense"  # see qwenvl.models.formats
    tensor_parallel_size: int = 1  # > 1: the layers hold a share and meet the other ranks'


@dataclass(frozen=True)
class WeightNames:
    """Checkpoint tensor names and ours, both ways.

    Our module names are the released checkpoints' (transformers 4.x); ``aliases`` are
    ``(other prefix, our prefix)`` pairs of other layouts a checkpoint may use (transformers 5
    writes ``model.language_model.*``). ``to_hf`` gives the transformers-5 in-memory name, the
    one peft adapters are keyed by; exports keep our (released) names.
    """

    aliases: tuple[tuple[str, str], ...] = ()

    def from_hf(self, name: str) -> str:
        for theirs, ours in self.aliases:
            if name.startswith(theirs):
                return ours + name[len(theirs) :]
        return name

    def to_hf(self, name: str) -> str:
        for theirs, ours in self.aliases:
            if name.startswith(ours):
                return theirs + name[len(ours) :]
        return name


@dataclass(frozen=True)
class WeightFormat:
    """A compact weight format of the decoder's linear layers (and the LM head).

    Args:
        name: the registry name (``DecoderLayout.weight_format`` reports it to the backends).
        fuse: build q/k/v and gate/up as one module each, one weight read per step.
    """

    name: str
    fuse: bool = True

    def linear(
        self, in_features: int, out_features: int, bias: bool, parts: dict[str, int] | None = None
    ) -> nn.Module:
        """A linear layer in this format; ``parts`` (fused layers): the checkpoint linears it
        holds, in output-row order, by name (relative to the parent module) with their rows."""
        raise NotImplementedError

    def head(self, in_features: int, out_features: int) -> nn.Module | None:
        """The LM head in this format (a tied head gets its own compact copy of the embedding);
        None keeps a plain ``nn.Linear`` (tied when the checkpoint ties them)."""
        return self.linear(in_features, out_features, bias=False)


class VLModel(Protocol):
    """The model API the engine and training call (no other attribute)."""

    config: ModelConfig

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def encode_vision(
        self, pixel_values: torch.Tensor, grid_thw: list[Grid], lut: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Vision features ``[tokens, hidden]`` of the items, in order."""

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[..., hidden]`` alone."""

    def embed(
        self,
        input_ids: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        video_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the vision features scattered into the placeholder rows."""

    def decode(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, kv: Any) -> torch.Tensor:
        """The decoder step: ``[B, L, H]`` embeddings and ``[3, B, L]`` positions -> final hidden
        states, attending through ``kv`` (the engine's paged attention, or None)."""

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions [3, B, L]`` -> rotary ``cos, sin [B, 1, L, head_dim]``."""

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The norm after the last decoder layer."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states -> vocabulary logits."""

    def decoder_layout(self) -> DecoderLayout: ...

    def decoder_weights(self) -> list[dict[str, nn.Module]]:
        """Per layer, the modules a fused backend reads: ``input_norm``, ``qkv``, ``o``,
        ``post_norm``, ``gate_up``, ``down``."""


class ModelFamily:
    """A model family: subclass, fill in the class attributes, override what differs."""

    model_type: ClassVar[str]
    display_name: ClassVar[str]
    model_class: ClassVar[type[nn.Module]]
    grounding: ClassVar[GroundingStyle] = "norm1000"
    weights: ClassVar[WeightNames] = WeightNames()

    def parse_config(self, data: dict[str, Any], source: str) -> ModelConfig:
        raise NotImplementedError

    def build(self, config: ModelConfig, weight_format: WeightFormat | None = None) -> nn.Module:
        """The model with uninitialised weights (call under ``torch.device("meta")``); its
        linear layers are built in ``weight_format`` (None: dense, trainable)."""
        return self.model_class(config, weight_format)

    def positions(
        self,
        config: ModelConfig,
        token_ids: Sequence[int],
        image_grids: Sequence[Grid],
        video_grids: Sequence[Grid],
        video_seconds: Sequence[float],
    ) -> tuple[torch.Tensor, int]:
        """M-RoPE positions ``[3, L]`` and the decode delta of one prompt
        (``video_seconds``: seconds per temporal grid step of each video)."""
        raise NotImplementedError

    def shard(self, config: ModelConfig, rank: int, size: int) -> ShardPlan:
        """Rank ``rank``'s share of the model under tensor parallelism of ``size``
        (``models/parallel.py``); the default is the Qwen2 decoder's Megatron plan."""
        from qwenvl.models.parallel import qwen2_decoder_plan

        return qwen2_decoder_plan(config, rank, size)

    def kv_shape(self, config: ModelConfig) -> KVShape:
        t = config.text
        return KVShape(t.num_hidden_layers, t.num_key_value_heads, t.head_dim)

    def max_model_len(self, config: ModelConfig) -> int:
        return config.text.max_position_embeddings

    def preprocess_defaults(self) -> VisionPreprocessConfig:
        from qwenvl.processing.image import VisionPreprocessConfig

        return VisionPreprocessConfig()
