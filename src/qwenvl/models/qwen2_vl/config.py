"""Frozen configs of the Qwen2-VL family (and Qwen2.5-VL, which shares them), parsed from
config.json.

Two on-disk layouts exist: the flat one of the released checkpoints (LLM fields at the top level,
``rope_scaling: {type: mrope, ...}``) and the nested one transformers 5.x writes (``text_config``
with ``rope_parameters``). Both parse to the same dataclasses. The vision field names differ between
the families: in Qwen2-VL ``vision_config.hidden_size`` is the *merger output* and
``embed_dim`` the ViT width; in Qwen2.5-VL ``hidden_size`` is the ViT width and ``out_hidden_size``
the merger output. Our dataclasses use one unambiguous vocabulary for both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qwenvl.errors import ConfigError

_MISSING = object()


def _get(
    d: dict[str, Any], key: str, source: str, default: Any = _MISSING, kind: type | tuple = ()
):
    """Fetch a field with an error that names the file and the field."""
    if key not in d or d[key] is None:
        if default is _MISSING:
            raise ConfigError(f"{source}: missing required field '{key}'")
        return default
    value = d[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if kind and (not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds):
        raise ConfigError(f"{source}: field '{key}' must be {kind}, got {value!r}")
    return value


@dataclass(frozen=True)
class TextConfig:
    """The Qwen2 language model."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    # 0: hidden_size / num_attention_heads (the released models). A tensor-parallel rank's config
    # (``models/parallel.py``) holds a share of the heads and keeps the whole model's head_dim.
    head_dim: int = 0

    def __post_init__(self) -> None:
        if not self.head_dim:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    "text config: hidden_size must be divisible by num_attention_heads"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                "text config: num_attention_heads must be a multiple of num_key_value_heads"
            )
        if len(self.mrope_section) != 3 or sum(self.mrope_section) * 2 != self.head_dim:
            raise ConfigError(
                f"text config: mrope_section {list(self.mrope_section)} needs 3 entries summing to "
                f"head_dim/2 = {self.head_dim // 2}"
            )
        if self.hidden_act != "silu":
            raise ConfigError(
                f"text config: hidden_act '{self.hidden_act}' is not supported (silu)"
            )

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str) -> TextConfig:
        """Parse from a nested ``text_config`` dict or the flat top level of a released config."""
        if d.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported")
        # 5.x: rope_parameters; released 4.x: rope_theta + rope_scaling {type: mrope, ...}.
        rope = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or {}
        if not isinstance(rope, dict) or not isinstance(scaling, dict):
            raise ConfigError(f"{source}: rope_parameters / rope_scaling must be objects")
        rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        if rope_type not in ("default", "mrope"):
            raise ConfigError(f"{source}: rope type '{rope_type}' is not supported")
        theta = rope.get("rope_theta", d.get("rope_theta", 1_000_000.0))
        section = rope.get("mrope_section", scaling.get("mrope_section", [16, 24, 24]))
        heads = _get(d, "num_attention_heads", source, kind=int)
        return cls(
            vocab_size=_get(d, "vocab_size", source, kind=int),
            hidden_size=_get(d, "hidden_size", source, kind=int),
            intermediate_size=_get(d, "intermediate_size", source, kind=int),
            num_hidden_layers=_get(d, "num_hidden_layers", source, kind=int),
            num_attention_heads=heads,
            num_key_value_heads=_get(d, "num_key_value_heads", source, heads, kind=int),
            rms_norm_eps=float(_get(d, "rms_norm_eps", source, 1e-6, kind=(int, float))),
            rope_theta=float(theta),
            mrope_section=tuple(int(x) for x in section),
            max_position_embeddings=_get(d, "max_position_embeddings", source, 32768, kind=int),
            hidden_act=_get(d, "hidden_act", source, "silu", kind=str),
        )


@dataclass(frozen=True)
class VisionConfig:
    """The ViT and its patch merger, in one vocabulary for both families."""

    depth: int
    embed_dim: int  # ViT width
    num_heads: int
    intermediate_size: int  # MLP hidden width
    out_hidden_size: int  # merger output = LLM width
    hidden_act: str  # quick_gelu (Qwen2-VL MLP) or silu (Qwen2.5-VL SwiGLU)
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    rope_theta: float = 10000.0
    # Qwen2.5-VL only
    window_size: int | None = None
    fullatt_block_indexes: tuple[int, ...] = ()
    tokens_per_second: float | None = None
    gated_mlp: bool = False
    rms_norm: bool = False

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ConfigError("vision config: width must be divisible by num_heads")
        if self.head_dim % 4:
            raise ConfigError("vision config: head_dim must be divisible by 4 (2-D rotary)")

    @staticmethod
    def _common(
        d: dict[str, Any], src: str, default_act: str, defaults: dict[str, Any]
    ) -> dict[str, Any]:
        """The fields both families name alike (``default_act`` and ``defaults``: transformers'
        values where the config omits a field, as the released Qwen2-VL configs do)."""
        rope = d.get("rope_parameters") or {}
        return dict(
            depth=_get(d, "depth", src, defaults.get("depth", _MISSING), kind=int),
            num_heads=_get(d, "num_heads", src, defaults.get("num_heads", _MISSING), kind=int),
            hidden_act=_get(d, "hidden_act", src, default_act, kind=str),
            patch_size=_get(d, "patch_size", src, d.get("spatial_patch_size", 14), kind=int),
            temporal_patch_size=_get(d, "temporal_patch_size", src, 2, kind=int),
            spatial_merge_size=_get(d, "spatial_merge_size", src, 2, kind=int),
            in_channels=_get(d, "in_channels", src, d.get("in_chans", 3), kind=int),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
        )

    @classmethod
    def from_qwen2_vl(cls, d: dict[str, Any], source: str) -> VisionConfig:
        """Qwen2-VL: ``embed_dim`` is the ViT width, ``hidden_size`` the merger output. The 7B
        and 72B releases' ``vision_config`` holds only ``in_chans``, ``model_type`` and
        ``spatial_patch_size``: the rest are transformers' ``Qwen2VLVisionConfig`` defaults
        (the one ViT of the family: depth 32, width 1280, 16 heads, output 3584)."""
        src = f"{source} (vision_config)"
        width = _get(d, "embed_dim", src, 1280, kind=int)
        return cls(
            embed_dim=width,
            intermediate_size=int(width * _get(d, "mlp_ratio", src, 4, kind=(int, float))),
            out_hidden_size=_get(d, "hidden_size", src, 3584, kind=int),
            **cls._common(d, src, "quick_gelu", {"depth": 32, "num_heads": 16}),
        )

    @classmethod
    def from_qwen2_5_vl(cls, d: dict[str, Any], source: str) -> VisionConfig:
        """Qwen2.5-VL: ``hidden_size`` is the ViT width, ``out_hidden_size`` the merger output;
        windowed attention, RMSNorm and a gated MLP."""
        src = f"{source} (vision_config)"
        fullatt = _get(d, "fullatt_block_indexes", src, kind=list)
        return cls(
            embed_dim=_get(d, "hidden_size", src, kind=int),
            intermediate_size=_get(d, "intermediate_size", src, kind=int),
            out_hidden_size=_get(d, "out_hidden_size", src, kind=int),
            window_size=_get(d, "window_size", src, kind=int),
            fullatt_block_indexes=tuple(int(i) for i in fullatt),
            tokens_per_second=float(_get(d, "tokens_per_second", src, kind=(int, float))),
            gated_mlp=True,
            rms_norm=True,
            **cls._common(d, src, "silu", {}),
        )


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model needs: the two towers plus the special token ids that glue them."""

    family: str  # the checkpoint's model_type: qwenvl.models.get_family(family) knows the rest
    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False
    torch_dtype: str | None = None
    eos_token_ids: tuple[int, ...] = field(default=(151645,))

    def __post_init__(self) -> None:
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ConfigError(
                f"vision merger output ({self.vision.out_hidden_size}) must equal the LLM "
                f"hidden_size ({self.text.hidden_size})"
            )

    @classmethod
    def from_hf(
        cls,
        d: dict[str, Any],
        source: str,
        parse_vision: Callable[[dict[str, Any], str], VisionConfig],
    ) -> ModelConfig:
        """The fields every family shares; ``parse_vision`` reads the family's own
        ``vision_config`` (``qwenvl.models.parse_config`` picks the family)."""
        nested = isinstance(d.get("text_config"), dict)
        text_dict = d["text_config"] if nested else d
        vision_dict = _get(d, "vision_config", source, kind=dict)
        text = TextConfig.from_hf(text_dict, f"{source} (text_config)" if nested else source)
        tie = d.get("tie_word_embeddings", text_dict.get("tie_word_embeddings", False))
        eos = text_dict.get("eos_token_id", d.get("eos_token_id", 151645))
        eos_ids = tuple(eos) if isinstance(eos, list) else (int(eos),)
        dtype = d.get("dtype", d.get("torch_dtype", text_dict.get("dtype")))
        return cls(
            family=d["model_type"],
            text=text,
            vision=parse_vision(vision_dict, source),
            image_token_id=_get(d, "image_token_id", source, 151655, kind=int),
            video_token_id=_get(d, "video_token_id", source, 151656, kind=int),
            vision_start_token_id=_get(d, "vision_start_token_id", source, 151652, kind=int),
            vision_end_token_id=_get(d, "vision_end_token_id", source, 151653, kind=int),
            tie_word_embeddings=bool(tie),
            torch_dtype=dtype if isinstance(dtype, str) else None,
            eos_token_ids=eos_ids,
        )
