"""CPU weight packing end to end: the bf16 default equals float32 on the same weights, and int8
stays close to bf16 (logit error and greedy agreement, pinned)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from qwenvl import LLM, SamplingParams, kernels
from qwenvl.checkpoint import load_model
from qwenvl.errors import ConfigError
from qwenvl.layers import packed_linear
from qwenvl.layers.int4_linear import Int4Linear
from qwenvl.layers.packed_linear import PackedLinear, native_bf16
from qwenvl.models import formats
from qwenvl.train.checkpoint import export_hf
from scoring import prompt_logits

pytestmark = pytest.mark.skipif(not kernels.available(), reason="GEMV kernels not built here")

# int4 against bf16 on the tiny checkpoint (4-bit weights of a random model: no redundancy to
# absorb the rounding); measured (AVX2): max logit error 0.069 of the largest logit (int8: 0.006),
# argmax agreement 1.0, greedy 12-token continuations identical for 4 of 4 prompts
INT4_MAX_REL_ERROR = 0.09
INT4_MIN_AGREEMENT = 0.97
INT4_MIN_SAME_GREEDY = 3

# prefill_dtype="bfloat16" against the float32 prefill of the same packed weights; measured here:
# max logit error 0.003 of the largest logit, argmax agreement 1.0, greedy identical for 4 of 4
BF16_PREFILL_MAX_REL_ERROR = 0.02
BF16_PREFILL_MIN_AGREEMENT = 0.95
BF16_VISION_MIN_COSINE = 0.999

PROMPTS = [
    "Describe this image.",
    "The red box is on the left",
    "Count the boxes: 1 2 3",
    "Output the color and number of each box.",
]


@pytest.fixture(scope="module")
def bf16_checkpoint(checkpoints, tmp_path_factory):
    """The tiny tied Qwen2.5-VL checkpoint saved in bf16, as the released ones are."""
    src = checkpoints("qwen2_5_vl", tie=True)
    model, _ = load_model(src, dtype="float32")
    return export_hf(model, src, tmp_path_factory.mktemp("bf16") / "ck", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def variants(bf16_checkpoint):
    # the tiny checkpoint is far below the packing threshold: lift it to test the packed path
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(formats, "PACK_MIN_BYTES", 0)
        return {
            "fp32": LLM(bf16_checkpoint, dtype="float32"),
            "packed": LLM(bf16_checkpoint, prefill_dtype="float32"),  # the exact prefill
            "int8": LLM(bf16_checkpoint, quantization="int8"),
            "int4": LLM(bf16_checkpoint, quantization="int4"),
            "bf16_prefill": LLM(bf16_checkpoint, prefill_dtype="bfloat16"),
        }


def test_small_checkpoints_are_not_packed(bf16_checkpoint) -> None:
    llm = LLM(bf16_checkpoint)
    assert llm.weight_format is None and llm.model.dtype == torch.float32


def _logits(llm: LLM) -> torch.Tensor:
    prompts = [llm.processor.prepare_text(p) for p in PROMPTS]
    logits, valid = prompt_logits(llm.model, prompts)
    return logits[valid]


def _greedy(llm: LLM, n: int = 12):
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=0)
    return llm.generate(PROMPTS, params)


def test_cpu_default_packs_bf16_and_runs_float32(variants) -> None:
    auto = variants["packed"]
    assert auto.weight_format == "bf16"
    assert auto.model.dtype == torch.float32
    assert variants["fp32"].weight_format is None


def test_bf16_packing_equals_float32_on_the_same_weights(variants) -> None:
    # bf16 weights widened are exact, so only the summation order differs
    torch.testing.assert_close(
        _logits(variants["packed"]), _logits(variants["fp32"]), rtol=0, atol=2e-5
    )
    a, b = _greedy(variants["packed"]), _greedy(variants["fp32"])  # decode runs the GEMV kernel
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        ids = x.outputs[0].token_ids
        lx = [d[t] for d, t in zip(x.outputs[0].logprobs, ids)]
        ly = [d[t] for d, t in zip(y.outputs[0].logprobs, ids)]
        assert max(abs(p - q) for p, q in zip(lx, ly)) < 1e-4


def test_int8_quality_against_bf16(variants) -> None:
    ref, q = _logits(variants["packed"]), _logits(variants["int8"])
    rel = float((q - ref).abs().max() / ref.abs().max())
    assert rel < 0.05, rel  # measured 0.0xx on this checkpoint
    agree = (q.argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree >= 0.9, agree
    a, b = _greedy(variants["packed"]), _greedy(variants["int8"])
    same = sum(x.outputs[0].token_ids == y.outputs[0].token_ids for x, y in zip(a, b))
    assert same >= len(PROMPTS) - 1


def test_pack_weights_option_overrides_the_size_rule(bf16_checkpoint, monkeypatch) -> None:
    forced = LLM(bf16_checkpoint, pack_weights=True)  # far below PACK_MIN_BYTES
    assert forced.weight_format == "bf16" and forced.model.dtype == torch.float32
    assert forced.engine.runner.backend.name == "cpu_kernels"
    monkeypatch.setattr(formats, "PACK_MIN_BYTES", 0)  # the size rule would pack it now
    plain = LLM(bf16_checkpoint, pack_weights=False)
    assert plain.weight_format is None and plain.model.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="LoRA"):
        LLM(bf16_checkpoint, pack_weights=True, lora="unused")


def test_bf16_prefill_quality_against_float32_prefill(variants) -> None:
    """``prefill_dtype="bfloat16"`` against the exact prefill of the same packed weights."""
    llm = variants["bf16_prefill"]
    layer = llm.model.model.layers[0]
    assert layer.mlp.gate_up_proj.gemm_dtype == torch.bfloat16
    assert variants["packed"].model.model.layers[0].mlp.gate_up_proj.gemm_dtype == torch.float32
    ref, q = _logits(variants["packed"]), _logits(llm)
    rel = float((q - ref).abs().max() / ref.abs().max())
    assert 1e-4 < rel < BF16_PREFILL_MAX_REL_ERROR, rel
    agree = (q.argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree >= BF16_PREFILL_MIN_AGREEMENT, agree
    a, b = _greedy(variants["packed"]), _greedy(llm)
    same = sum(x.outputs[0].token_ids == y.outputs[0].token_ids for x, y in zip(a, b))
    assert same >= len(PROMPTS) - 1


def test_bf16_prefill_vision_features_against_float32(variants) -> None:
    """The vision tower's linears as bf16 ``PackedLinear`` GEMMs and its attention in bf16 dot
    products, against its float32 linears and attention on the same (bf16 checkpoint) weights."""
    llm, ref_llm = variants["bf16_prefill"], variants["packed"]
    blocks = llm.model.visual.blocks
    grids = [(1, 16, 20), (2, 8, 8)]
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), 3 * 2 * 14 * 14)
    with torch.no_grad():
        ref = ref_llm.model.encode_vision(pixels, grids)
        ours = llm.model.encode_vision(pixels, grids)  # packs the tower on its first call
    assert isinstance(blocks[0].mlp.down_proj, PackedLinear)
    assert blocks[0].mlp.down_proj.gemm_dtype == torch.bfloat16
    assert isinstance(ref_llm.model.visual.blocks[0].mlp.down_proj, nn.Linear)
    assert blocks[0].attn.attention_dtype == torch.bfloat16  # kernels.bf16_attention, head_dim 16
    assert ref_llm.model.visual.blocks[0].attn.attention_dtype == torch.float32
    cos = F.cosine_similarity(ours, ref, dim=-1)
    rel = float((ours - ref).abs().max() / ref.abs().max())
    assert 1e-4 < rel < BF16_PREFILL_MAX_REL_ERROR and cos.min() > BF16_VISION_MIN_COSINE, (
        rel,
        cos,
    )


def test_prefill_dtype_auto_is_bf16_where_it_pays(variants, bf16_checkpoint, monkeypatch) -> None:
    """The default: bf16 prefill for bf16-packed weights on a CPU with bf16 dot products (and then
    the same model as an explicit ``prefill_dtype="bfloat16"``), float32 everywhere else."""
    monkeypatch.setattr(formats, "PACK_MIN_BYTES", 0)
    native = native_bf16()
    packed = LLM(bf16_checkpoint)
    assert packed.weight_format == "bf16"
    assert packed.prefill_dtype == ("bfloat16" if native else "float32")
    gemm = packed.model.model.layers[0].mlp.gate_up_proj.gemm_dtype
    assert gemm == (torch.bfloat16 if native else torch.float32)
    if native:
        torch.testing.assert_close(
            _logits(packed), _logits(variants["bf16_prefill"]), rtol=0, atol=0
        )
    monkeypatch.setattr(packed_linear, "native_bf16", lambda: not native)  # the other CPU kind
    assert LLM(bf16_checkpoint).prefill_dtype == ("float32" if native else "bfloat16")
    for dense in (LLM(bf16_checkpoint, dtype="float32"), LLM(bf16_checkpoint, pack_weights=False)):
        assert dense.weight_format is None and dense.prefill_dtype == "float32"


def test_bf16_prefill_packs_the_vision_tower_at_its_first_call(bf16_checkpoint) -> None:
    """Not at load: a start that never sees a picture does not pay for it."""
    llm = LLM(bf16_checkpoint, pack_weights=True, prefill_dtype="bfloat16")
    blocks = llm.model.visual.blocks
    assert isinstance(blocks[0].attn.qkv, nn.Linear)
    assert blocks[0].attn.attention_dtype == torch.bfloat16  # set at load, as the decoder's
    assert llm.model.model.layers[0].self_attn.attention_dtype == torch.bfloat16
    image = Image.new("RGB", (56, 56), "red")
    conv = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"}],
        }
    ]
    llm.chat(conv, SamplingParams(max_tokens=1))
    assert isinstance(blocks[0].attn.qkv, PackedLinear)
    assert not llm.model.visual._forward_pre_hooks  # packed once


def test_bf16_prefill_needs_bf16_packed_weights(bf16_checkpoint) -> None:
    with pytest.raises(ConfigError, match="bf16-packed"):
        LLM(bf16_checkpoint, dtype="float32", prefill_dtype="bfloat16")
    with pytest.raises(ConfigError, match="prefill_dtype must be"):
        LLM(bf16_checkpoint, prefill_dtype="float16")
    with pytest.raises(ConfigError, match="tensor parallelism"):
        LLM(bf16_checkpoint, pack_weights=True, prefill_dtype="bfloat16", tensor_parallel_size=2)


def test_quantization_errors(bf16_checkpoint) -> None:
    with pytest.raises(ConfigError, match="int4"):
        LLM(bf16_checkpoint, quantization="nf4")


def test_int4_quality_against_bf16(variants) -> None:
    llm = variants["int4"]
    assert llm.weight_format == "int4" and llm.model.dtype == torch.float32
    layer = llm.model.model.layers[0]
    assert isinstance(layer.mlp.gate_up_proj, Int4Linear)
    assert layer.mlp.down_proj.group_size == 128  # the intermediate size divides; hidden 64 not
    assert layer.self_attn.qkv_proj.group_size == 64
    assert llm.model.lm_head.mode == "bf16"  # the head stays 16-bit
    ref, q = _logits(variants["packed"]), _logits(llm)
    rel = float((q - ref).abs().max() / ref.abs().max())
    agree = float((q.argmax(-1) == ref.argmax(-1)).float().mean())
    assert rel < INT4_MAX_REL_ERROR, rel
    assert agree >= INT4_MIN_AGREEMENT, agree
    a, b = _greedy(variants["packed"]), _greedy(llm)
    same = sum(x.outputs[0].token_ids == y.outputs[0].token_ids for x, y in zip(a, b))
    assert same >= INT4_MIN_SAME_GREEDY, same


@pytest.mark.parametrize("head", ["int8", "int4"])
def test_int4_with_a_quantised_head(bf16_checkpoint, variants, head, monkeypatch) -> None:
    """``head_quantization`` packs the (tied) LM head from the embedding: its logits stay
    within the same bounds of bf16 as int4 with a bf16 head, and its product is the embedding's
    (the untouched float32 ``embed_tokens``, an independent copy) up to the format's rounding."""
    monkeypatch.setattr(formats, "PACK_MIN_BYTES", 0)
    llm = LLM(bf16_checkpoint, quantization="int4", head_quantization=head)
    assert llm.weight_format == f"int4:head-{head}"
    lm_head = llm.model.lm_head
    assert isinstance(lm_head, Int4Linear) if head == "int4" else lm_head.mode == "int8"
    emb = llm.model.model.embed_tokens.weight.double()
    x = torch.randn(3, emb.shape[1], generator=torch.Generator().manual_seed(0))
    ref = x.double() @ emb.T
    rel = float((lm_head(x).double() - ref).abs().max() / ref.abs().max())
    assert rel < {"int8": 0.02, "int4": 0.15}[head], rel  # measured 0.00x / 0.0x
    q, base = _logits(llm), _logits(variants["packed"])
    rel = float((q - base).abs().max() / base.abs().max())
    agree = float((q.argmax(-1) == base.argmax(-1)).float().mean())
    print(f"int4 + {head} head: max logit error {rel:.3f} of the largest, argmax {agree:.3f}")
    # measured: int8 head 0.069 / 1.0 (as a bf16 head); int4 head 0.096 / 0.97
    assert rel < {"int8": INT4_MAX_REL_ERROR, "int4": 0.13}[head], rel
    assert agree >= {"int8": INT4_MIN_AGREEMENT, "int4": 0.95}[head], agree
    with pytest.raises(ConfigError, match="head_quantization applies"):
        LLM(bf16_checkpoint, quantization="int8", head_quantization=head)
    with pytest.raises(ConfigError, match="unknown head_quantization"):
        LLM(bf16_checkpoint, quantization="int4", head_quantization="nf4")


@pytest.mark.parametrize("mode", ["packed", "int8", "int4"])
def test_packed_decode_steps_run_the_fused_layers(variants, mode, monkeypatch) -> None:
    """Decode steps of <= 16 tokens go through ``kernels.decode_layers``; a step of 18 takes the
    module path. Each prompt's greedy tokens equal its own run alone (batch invariance)."""
    llm = variants[mode]
    rows = []
    real = kernels.decode_layers
    monkeypatch.setattr(kernels, "decode_layers", lambda x, *a: rows.append(len(x)) or real(x, *a))
    prompts = [f"Count the boxes: {' '.join(str(j) for j in range(i % 5))}" for i in range(18)]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    together = llm.generate(prompts, params)
    assert rows.count(18) == 0  # the 18-token decode steps ran the modules
    rows.clear()
    alone = [llm.generate([p], params)[0] for p in prompts[:5]]
    assert rows == [1] * 4 * len(alone)  # every decode step of a single prompt: 4 per prompt
    for x, y in zip(together, alone):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
