"""Qwen2-VL: the vision tower, the Qwen2 decoder and the glue that puts image features into the
prompt.

It implements ``qwenvl.models.interface.VLModel``, the model API the rest of qwenvl uses:
  * ``encode_vision(pixel_values, grid_thw)`` -> merged vision embeddings ``[tokens, hidden]``;
  * ``embed_tokens(input_ids)``; ``embed(input_ids, image_embeds, video_embeds)`` also scatters
    the features into the placeholder rows (training; the engine writes them by row);
  * ``decode(inputs_embeds, positions, kv)`` -> final hidden states (the decoder step), with
    positions ``[3, B, L]`` computed outside (``positions.py``);
  * ``compute_logits(hidden)``; ``forward(...)`` chains them for training and tests;
  * ``decoder_layout()`` / ``decoder_weights()`` describe the decoder to the engine's backends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from qwenvl.errors import PromptError
from qwenvl.layers.rotary import mrope_cos_sin, text_inv_freq
from qwenvl.models.interface import DecoderLayout
from qwenvl.models.qwen2_vl.config import ModelConfig
from qwenvl.models.qwen2_vl.text import TextModel
from qwenvl.models.qwen2_vl.vision import Grid, VisionTransformer
from qwenvl.processing.image import normalize_patches

if TYPE_CHECKING:
    from qwenvl.models.interface import WeightFormat
    from qwenvl.models.qwen2_vl.text import PagedAttention


class Qwen2VLForConditionalGeneration(nn.Module):
    vision_class: type[VisionTransformer] = VisionTransformer
    # Patches above which encode_vision splits an item along time (None = never); settable.
    vision_chunk_patches: int | None = 16384
    # set by models.parallel.parallelize: the ranks this model's decoder is split over
    tensor_parallel_size: int = 1

    def __init__(self, config: ModelConfig, weight_format: WeightFormat | None = None) -> None:
        super().__init__()
        self.config = config
        self.weight_format = weight_format
        self.visual = self.vision_class(config.vision)
        self.model = TextModel(config.text, weight_format)
        hidden, vocab = config.text.hidden_size, config.text.vocab_size
        head = None if weight_format is None else weight_format.head(hidden, vocab)
        if head is not None:  # a compact format's head; a tied one copies the embedding
            self.lm_head = head
        else:
            self.lm_head = nn.Linear(hidden, vocab, bias=False)
            if config.tie_word_embeddings:
                self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq = text_inv_freq(config.text.head_dim, config.text.rope_theta)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def encode_vision(
        self, pixel_values: torch.Tensor, grid_thw: list[Grid], lut: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run the ViT + merger over the items: ``[sum(t*h*w/4), hidden]``.

        ``pixel_values`` may be a video's uint8 ``patches`` with its normalisation table ``lut``
        (``ProcessedVideo``): each ViT call then normalises only its own slice.

        Items of at most ``vision_chunk_patches`` patches run together in one call; a larger
        item (a long video) runs a few whole temporal groups at a time (grid ``(t_chunk, h,
        w)``), so the ViT's activations stay bounded. Attention never crosses a temporal group
        (and Qwen2.5-VL's windows lie inside one), so the result equals the one-shot encoding.
        """
        grids = [(int(t), int(h), int(w)) for t, h, w in grid_thw]
        limit = self.vision_chunk_patches

        def rows(first: int, n: int) -> torch.Tensor:
            part = pixel_values[first : first + n]
            if lut is not None:
                part = normalize_patches(part, lut)
            return part.to(self.device)

        if limit is None or all(t * h * w <= limit for t, h, w in grids):
            return self.visual(rows(0, pixel_values.shape[0]), grids)
        unit = self.config.vision.spatial_merge_size**2
        # (first row, rows, grids) of each ViT call: runs of small items, and chunks of big ones
        calls: list[tuple[int, int, list[Grid]]] = []
        row, small_start, small = 0, 0, []
        for t, h, w in grids:
            if t * h * w <= limit:
                small.append((t, h, w))
                row += t * h * w
                continue
            if small:
                calls.append((small_start, row - small_start, small))
            step = max(1, limit // (h * w))
            for t0 in range(0, t, step):
                tc = min(step, t - t0)
                calls.append((row + t0 * h * w, tc * h * w, [(tc, h, w)]))
            row += t * h * w
            small_start, small = row, []
        if small:
            calls.append((small_start, row - small_start, small))
        out: torch.Tensor | None = None
        for first, count, call_grids in calls:
            feats = self.visual(rows(first, count), call_grids)
            if out is None:  # [sum(t*h*w) / merge^2, hidden]
                out = feats.new_empty(row // unit, feats.shape[1])
            out[first // unit : (first + count) // unit] = feats
        assert out is not None
        return out

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings alone (the engine writes vision features into their rows)."""
        return self.model.embed_tokens(input_ids)

    def embed(
        self,
        input_ids: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        video_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with vision features scattered, in order, into the placeholder rows."""
        x = self.embed_tokens(input_ids)
        for token_id, feats, kind in (
            (self.config.image_token_id, image_embeds, "image"),
            (self.config.video_token_id, video_embeds, "video"),
        ):
            slots = input_ids == token_id
            count = int(slots.sum())
            given = 0 if feats is None else feats.shape[0]
            if count != given:
                raise PromptError(f"{count} {kind} placeholder tokens but {given} {kind} features")
            if count:
                x = x.masked_scatter(slots.unsqueeze(-1), feats.to(x.dtype))
        return x

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions [3, B, L]`` -> cos/sin ``[B, 1, L, head_dim]`` in the activation dtype."""
        cos, sin = mrope_cos_sin(
            positions.to(self.device), self.inv_freq, self.config.text.mrope_section, self.dtype
        )
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def decode(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        kv: PagedAttention | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The decoder: ``[B, L, H]`` embeddings at ``positions [3, B, L]`` -> final hidden
        states. ``mask`` is boolean ``[B, 1, L, L]`` (True = may attend; None = causal); with
        ``kv`` (the engine's paged attention) B = 1 and the step's sequences lie end to end."""
        cos, sin = self.rope(positions)
        if mask is not None:
            mask = mask.to(self.device)
        return self.model(inputs_embeds, cos, sin, mask, kv)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The norm after the last layer (for backends that run the layers themselves)."""
        return self.model.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def decoder_layout(self) -> DecoderLayout:
        t = self.config.text
        fmt = self.weight_format
        return DecoderLayout(
            num_layers=t.num_hidden_layers,
            hidden_size=t.hidden_size,
            num_heads=t.num_attention_heads,
            num_kv_heads=t.num_key_value_heads,
            head_dim=t.head_dim,
            intermediate_size=t.intermediate_size,
            rms_norm_eps=t.rms_norm_eps,
            weight_format="dense" if fmt is None else fmt.name,
            tensor_parallel_size=self.tensor_parallel_size,
        )

    def decoder_weights(self) -> list[dict[str, nn.Module]]:
        """Per layer the modules a fused backend reads (compact formats: fused q/k/v, gate/up)."""
        out = []
        for layer in self.model.layers:
            attn, mlp = layer.self_attn._modules, layer.mlp._modules
            out.append(
                {
                    "input_norm": layer.input_layernorm,
                    "qkv": attn.get("qkv_proj"),
                    "o": attn["o_proj"],
                    "post_norm": layer.post_attention_layernorm,
                    "gate_up": mlp.get("gate_up_proj"),
                    "down": mlp["down_proj"],
                }
            )
        return out

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: list[Grid] | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: list[Grid] | None = None,
        logit_rows: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, L, vocab]`` (or ``[B, len(logit_rows), vocab]``) of whole sequences
        (training, tests). ``inputs_embeds`` (from ``embed``) replaces ``input_ids``
        and the pixel inputs.
        """
        if inputs_embeds is None:
            image_embeds = video_embeds = None
            if pixel_values is not None:
                image_embeds = self.encode_vision(pixel_values, image_grid_thw or [])
            if pixel_values_videos is not None:
                video_embeds = self.encode_vision(pixel_values_videos, video_grid_thw or [])
            inputs_embeds = self.embed(input_ids.to(self.device), image_embeds, video_embeds)
        hidden = self.decode(inputs_embeds, positions, mask=mask)
        if logit_rows is not None:
            hidden = hidden[:, logit_rows.to(hidden.device)]
        return self.compute_logits(hidden)
