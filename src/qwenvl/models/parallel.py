"""Tensor parallelism of a model: which share of every tensor a rank holds, and how its modules
meet the other ranks' (torchtitan's split: the plan lives beside the models, the layers stay
plain and learn nothing of it).

A family's :meth:`~qwenvl.models.interface.ModelFamily.shard` returns a :class:`ShardPlan`: the
rank's own text config (its heads, KV heads and MLP width; the model is built from it at the
rank's shapes), the slice of each checkpoint tensor it reads (``slices``: the loader reads only
those bytes), the layers whose outputs are partial sums, and its vocabulary rows.
:func:`parallelize` then attaches the collectives (``layers/parallel.py``) to the built model.

KV heads: each rank keeps whole heads. With fewer KV heads than ranks (Qwen2-VL-2B has 2) a head
is replicated on ``size / kv`` ranks, each serving the query heads that read it, as vLLM does.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from torch import nn

from qwenvl.errors import ConfigError
from qwenvl.layers.parallel import (
    VocabParallelEmbedding,
    VocabShard,
    all_reduce_output,
    gather_vocab_output,
)
from qwenvl.models.qwen2_vl.config import ModelConfig

Split = tuple[Literal["out", "in"], int]  # split along output rows or input columns, from here


@dataclass(frozen=True)
class ShardPlan:
    """One rank's share of a model.

    Args:
        rank, size: this rank and the tensor-parallel size.
        config: the model config at this rank's shapes (the decoder's heads and widths, the
            vocabulary rows); ``full`` is the whole model's.
        splits: checkpoint module name -> where its linear is cut (``out``: rows from
            ``start``, ``in``: columns from ``start``); the width is the local module's.
        reduce: module names whose outputs are summed over the ranks.
        vocab: this rank's rows of the embedding and the LM head.
        vision: whether this rank holds the vision tower (rank 0 alone encodes images).
    """

    rank: int
    size: int
    config: ModelConfig
    full: ModelConfig
    splits: dict[str, Split] = field(repr=False)
    reduce: tuple[str, ...] = field(repr=False)
    vocab: VocabShard
    vision: bool

    def tensor_split(self, name: str) -> tuple[str, str, int] | None:
        """(module's tensor name, ``out``|``in``, start) for a checkpoint tensor this rank reads
        a slice of, None for one it reads whole."""
        module, _, tensor = name.rpartition(".")
        split = self.splits.get(module)
        return None if split is None else (tensor, *split)


def dense_slice(tensor: str, kind: str, start: int) -> tuple[int, int] | None:
    """(dim, start) of a plain ``[out, in]`` weight's (or its bias's) slice."""
    if tensor == "bias":
        if kind == "in":  # a row-parallel bias would be added once per rank
            raise ConfigError("a row-parallel layer with a bias is not supported")
        return 0, start
    return (0 if kind == "out" else 1), start


def qwen2_decoder_plan(
    config: ModelConfig, rank: int, size: int, vision_rank: int = 0
) -> ShardPlan:
    """The Megatron plan of a Qwen2 decoder (both families' text model)."""
    t = config.text
    heads, kv, inner, d = (
        t.num_attention_heads,
        t.num_key_value_heads,
        t.intermediate_size,
        t.head_dim,
    )
    if heads % size or inner % size or (kv % size and size % kv):
        raise ConfigError(
            f"tensor_parallel_size={size} must divide the {heads} attention heads and the MLP "
            f"width {inner}, and divide or be a multiple of the {kv} KV heads"
        )
    q_local = heads // size
    kv_local = max(1, kv // size)
    kv_first = rank * kv // size  # a replicated head: the one this rank's queries read
    inner_local = inner // size
    q0, k0, i0 = rank * q_local * d, kv_first * d, rank * inner_local
    vocab = VocabShard.of(t.vocab_size, rank, size)
    splits: dict[str, Split] = {
        "model.embed_tokens": ("out", vocab.start),
        "lm_head": ("out", vocab.start),
    }
    reduce = []
    for i in range(t.num_hidden_layers):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        splits[f"{attn}.q_proj"] = ("out", q0)
        splits[f"{attn}.k_proj"] = splits[f"{attn}.v_proj"] = ("out", k0)
        splits[f"{attn}.o_proj"] = ("in", q0)
        splits[f"{mlp}.gate_proj"] = splits[f"{mlp}.up_proj"] = ("out", i0)
        splits[f"{mlp}.down_proj"] = ("in", i0)
        reduce += [f"{attn}.o_proj", f"{mlp}.down_proj"]
    text = replace(
        t,
        vocab_size=vocab.end - vocab.start,
        num_attention_heads=q_local,
        num_key_value_heads=kv_local,
        intermediate_size=inner_local,
        head_dim=d,
    )
    return ShardPlan(
        rank=rank,
        size=size,
        config=replace(config, text=text),
        full=config,
        splits=splits,
        reduce=tuple(reduce),
        vocab=vocab,
        vision=rank == vision_rank,
    )


def parallelize(model: nn.Module, plan: ShardPlan, group: Any) -> nn.Module:
    """Attach the collectives to a model built (on the meta device) from ``plan.config``:
    the vocabulary-parallel embedding, an all-reduce after every row-parallel layer, the gather
    of the head's logits; drop the vision tower where this rank does not encode. Returns it."""
    modules = dict(model.named_modules())
    embed = modules["model.embed_tokens"]
    parent = modules["model"]
    parent.embed_tokens = VocabParallelEmbedding(plan.vocab, embed.embedding_dim, group)
    if plan.full.tie_word_embeddings and isinstance(model.lm_head, nn.Linear):
        model.lm_head.weight = parent.embed_tokens.weight
    for name in plan.reduce:
        modules[name].register_forward_hook(all_reduce_output(group))
    model.lm_head.register_forward_hook(gather_vocab_output(plan.vocab, plan.size, group))
    if not plan.vision:
        del model.visual
    model.tensor_parallel_size = plan.size
    return model
