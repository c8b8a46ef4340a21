"""Engine settings: how much KV memory, how many tokens and sequences per step, which caches."""

from __future__ import annotations

from dataclasses import dataclass

from qwenvl.errors import ConfigError


@dataclass(frozen=True)
class EngineConfig:
    """Scheduler and cache settings of one :class:`~qwenvl.engine.engine.LLMEngine`.

    Args:
        block_size: tokens per KV block.
        kv_cache_memory: bytes of KV cache to allocate once; None measures it (on CUDA a share
            of the free memory, on CPU a share of the available RAM, never more than the
            ``max_num_seqs`` full contexts need). With tensor parallelism it is per GPU, and
            on CPUs the machine's, split over the ranks that share its RAM.
        num_kv_blocks: an exact number of blocks (wins over ``kv_cache_memory``; used by tests).
        max_num_seqs: most sequences running at once.
        max_num_batched_tokens: the per-step token budget; a longer prefill is split in chunks.
        enable_prefix_caching: reuse KV blocks of identical prefixes (images keyed by content).
        encoder_cache_memory: bytes of vision embeddings kept across requests (0 disables).
        memory_fraction: the share of free device memory (or available RAM) the KV cache may use.
        max_model_len: context limit; None means the model's ``max_position_embeddings``.
    """

    block_size: int = 16
    kv_cache_memory: int | None = None
    num_kv_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    encoder_cache_memory: int = 256 * 2**20
    memory_fraction: float = 0.3
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"EngineConfig.{name} must be a positive int, got {value!r}")
        for name in ("kv_cache_memory", "num_kv_blocks", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"EngineConfig.{name} must be a positive int or None")
        if self.encoder_cache_memory < 0:
            raise ConfigError("EngineConfig.encoder_cache_memory must be >= 0")
        if not 0 < self.memory_fraction <= 1:
            raise ConfigError("EngineConfig.memory_fraction must be in (0, 1]")
