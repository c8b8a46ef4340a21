"""The CPU backend: float32 activations on the CPU with our kernels (``qwenvl.kernels``).

Decode-only steps of a model in a compact weight format (bf16, int8 or int4, GPTQ act-order
included; fused q/k/v and gate/up) run all layers in one kernel call (``kernels.decode_layers``:
threads forked once instead of ~250 torch calls, ~7 ms of a 2B-shape step on a small CPU).
Other steps run the model's modules, with one attention kernel call per layer when the step is
all decode.
"""

from __future__ import annotations

import torch

from qwenvl import kernels
from qwenvl.engine.attention import KernelPagedAttention
from qwenvl.engine.backends.torch_eager import TorchBackend
from qwenvl.engine.kv_cache import AttentionMetadata, PagedKVCache
from qwenvl.models import DecoderLayout, VLModel


def fuses(layout: DecoderLayout) -> bool:
    """Whether ``kernels.decode_layers`` computes this layer: Qwen2's pre-norm RMSNorm, q/k/v
    bias, no o bias, gated SiLU MLP (the weights must also be ones the GEMV kernels read:
    ``_gather``)."""
    return (
        layout.tensor_parallel_size == 1  # no collectives inside the fused step
        and layout.norm == "rms"
        and layout.activation == "silu_gated"
        and layout.qkv_bias
        and not layout.o_bias
    )


class CpuKernelBackend(TorchBackend):
    name = "cpu_kernels"
    attention = KernelPagedAttention

    @classmethod
    def supports(cls, layout: DecoderLayout, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cpu" and dtype == torch.float32 and kernels.available()

    def __init__(self, model: VLModel) -> None:
        super().__init__(model)
        self.layout = layout = model.decoder_layout()
        self.params: list[torch.Tensor | None] | None = None
        if fuses(layout):  # gathered once: module attribute lookups cost ~1 ms a step
            self.params = self._gather(model)

    @staticmethod
    def _gather(model: VLModel) -> list[torch.Tensor | None] | None:
        """The fused step's parameters, or None unless every decoder linear is a compact layer
        of the kernels (``kernel_params``: PackedLinear bf16/int8, Int4Linear; not a plain
        Linear or a GroupQuantLinear)."""
        params: list[torch.Tensor | None] = []
        weights = model.decoder_weights()
        linears = ("qkv", "o", "gate_up", "down")
        if not all(hasattr(w[k], "kernel_params") for w in weights for k in linears):
            return None
        for w in weights:
            params.append(w["input_norm"].weight)
            params += w["qkv"].kernel_params()
            params += w["o"].kernel_params()
            params.append(w["post_norm"].weight)
            params += w["gate_up"].kernel_params()
            params += w["down"].kernel_params()
        return params

    def run(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: PagedKVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        if self.params is None or meta.prefills or embeds.shape[0] > kernels.MAX_M:
            return super().run(embeds, positions, cache, meta)
        cos, sin = self.model.rope(positions[:, None])  # [1, 1, T, D]
        x = embeds.contiguous().clone()  # updated in place by the kernel
        kernels.decode_layers(
            x,
            cos[0, 0],
            sin[0, 0],
            self.params,
            cache.k,
            cache.v,
            meta.slots,
            meta.decode_keys,
            meta.decode_lens,
            self.layout.num_heads,
            self.layout.rms_norm_eps,
        )
        return self.model.final_norm(x)
