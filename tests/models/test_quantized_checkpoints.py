"""Released AWQ / GPTQ checkpoints load as they are on disk (``qwenvl.models.quantized``).

The tiny checkpoints of both families are quantised here (round-to-nearest per group) to known
integers ``q``, fp16 ``scales`` and integer zero points, and written in each published on-disk
layout by a packer in this file (AWQ gemm's interleaved nibbles; auto-gptq's input-packed
``qweight`` with zeros minus one, 4- and 8-bit, act-order ``g_idx``; ``gptq_v2``). Truths:

* the known integers themselves (the unpacking must give them back exactly), and each loaded
  decoder linear's output against ``x @ W^T + b`` with ``W`` dequantised here from them;
* transformers 5.23 running the dequantised weights, written as a plain fp32 checkpoint (greedy
  tokens equal, log-probs within 2e-3). transformers' own AWQ/GPTQ loading is not a truth here:
  it needs the gptqmodel package (and optimum for GPTQ), which this CPU environment lacks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from qwenvl import LLM, SamplingParams, kernels
from qwenvl.errors import ConfigError
from qwenvl.models import formats, quantized
from scoring import greedy_logprob_gap_to_hf

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # column of each nibble, lowest nibble first

# name -> (quant_method, bits, symmetric, act-order, checkpoint_format, config layout, group).
# The tiny decoder's inputs are 64 and 128 wide: with group 32, or 128 (the releases' size; a
# 64-wide input is then one group), every 4-bit linear is an Int4Linear; 8-bit is GroupQuantLinear.
VARIANTS = {
    "awq": ("awq", 4, False, False, None, "flat", 32),
    "awq_g128": ("awq", 4, False, False, None, "flat", 128),
    "gptq_int4": ("gptq", 4, True, False, "gptq", "flat", 32),
    "gptq_int4_g128": ("gptq", 4, True, False, "gptq", "flat", 128),
    "gptq_int8": ("gptq", 8, True, False, "gptq", "flat", 32),
    "gptq_int4_act_order": ("gptq", 4, False, True, "gptq", "nested", 32),
    "gptq_int8_act_order": ("gptq", 8, False, True, "gptq", "flat", 32),
    "gptq_v2_int4": ("gptq", 4, False, False, "gptq_v2", "flat", 32),
}
PROJ = {
    "self_attn.q_proj": "attn_in",
    "self_attn.k_proj": "attn_in",
    "self_attn.v_proj": "attn_in",
    "self_attn.o_proj": "o_in",
    "mlp.gate_proj": "mlp_in",
    "mlp.up_proj": "mlp_in",
    "mlp.down_proj": "down_in",
}
INT4_REL_TOL = 1e-2


def _kernel_takes(n_in: int, group: int, bits: int) -> bool:
    """Whether the kernels' int4 / 8-bit group layout takes this group size (else the torch
    path runs)."""
    try:
        (kernels.int4_shape if bits == 4 else kernels.int8_group_shape)(8, n_in, group)
    except (AttributeError, ValueError):
        return False
    return True


PROMPTS = ["Describe this image.", "The red box is on the left", "Count the boxes: 1 2 3"]


# ---------------------------------------------------------------- quantising and packing


def quantise(w: torch.Tensor, g_idx: np.ndarray, bits: int, sym: bool, min_zero: int):
    """``w [out, in]`` -> known ``q [in, out]``, ``zeros [groups, out]`` (ints), ``scales
    [groups, out]`` (fp16) and the dequantised ``[out, in]`` fp32 weight."""
    wt = w.t().double().numpy()  # [in, out]
    n_in, n_out = wt.shape
    groups, maxq = int(g_idx.max()) + 1, 2**bits - 1
    q = np.zeros((n_in, n_out), dtype=np.int64)
    zeros = np.zeros((groups, n_out), dtype=np.int64)
    scales = np.zeros((groups, n_out), dtype=np.float16)
    for g in range(groups):
        rows = np.nonzero(g_idx == g)[0]
        block = wt[rows]
        if sym:
            zero = np.full(n_out, 2 ** (bits - 1))
            scale = np.maximum(np.abs(block).max(0), 1e-4) / (2 ** (bits - 1) - 1)
        else:
            lo, hi = np.minimum(block.min(0), 0), np.maximum(block.max(0), 0)
            scale = np.maximum(hi - lo, 1e-4) / maxq
        scale = scale.astype(np.float16)
        if not sym:
            zero = np.clip(np.round(-lo / scale.astype(np.float64)), min_zero, maxq)
        q[rows] = np.clip(np.round(block / scale.astype(np.float64)) + zero, 0, maxq)
        zeros[g], scales[g] = zero, scale
    deq = (q - zeros[g_idx]) * scales[g_idx].astype(np.float64)
    return q, zeros, scales, torch.from_numpy(deq.T.astype(np.float32)).contiguous()


def _int32(words: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(words.astype(np.uint32).view(np.int32).copy())


def pack_awq(values: np.ndarray) -> torch.Tensor:
    """``[rows, out]`` 4-bit values -> int32 ``[rows, out / 8]``: nibble i (bits 4i..4i+3) of
    word c holds column ``8c + AWQ_PACK_ORDER[i]``."""
    words = np.zeros((values.shape[0], values.shape[1] // 8), dtype=np.uint64)
    for i, col in enumerate(AWQ_PACK_ORDER):
        words |= values[:, col::8].astype(np.uint64) << np.uint64(4 * i)
    return _int32(words)


def pack_rows(values: np.ndarray, bits: int) -> torch.Tensor:
    """auto-gptq ``qweight``: ``[in, out]`` -> int32 ``[in * bits / 32, out]``, input ``r * n +
    j`` in bits ``j * bits`` of word row ``r``."""
    n = 32 // bits
    words = np.zeros((values.shape[0] // n, values.shape[1]), dtype=np.uint64)
    for j in range(n):
        words |= values[j::n].astype(np.uint64) << np.uint64(bits * j)
    return _int32(words)


def pack_columns(values: np.ndarray, bits: int) -> torch.Tensor:
    """auto-gptq ``qzeros``: ``[groups, out]`` -> int32 ``[groups, out * bits / 32]``."""
    return pack_rows(values.T, bits).t().contiguous()


def quantised_checkpoint(src: Path, out: Path, variant: str, seed: int = 0):
    """Write ``src`` quantised in ``variant``'s layout to ``out`` (fp16 elsewhere, as released)
    and its dequantised twin as a plain fp32 checkpoint to ``out.with_name(... + "-deq")``.
    Returns (quantised folder, dequantised folder, known {linear: (q, zeros, scales, g_idx,
    dequantised weight, bias)})."""
    method, bits, sym, act, layout, config_layout, group = VARIANTS[variant]
    rng = np.random.default_rng(seed)
    tensors = load_file(src / "model.safetensors")
    packed: dict[str, torch.Tensor] = {}
    dense: dict[str, torch.Tensor] = {}
    known = {}
    orders: dict[tuple[str, str], np.ndarray] = {}
    for name, t in tensors.items():
        stem = name.removesuffix(".weight")
        kind = PROJ.get(stem.split(".", 3)[-1]) if stem.startswith("model.layers.") else None
        if kind is None or not name.endswith(".weight"):
            packed[name] = t.half()
            dense[name] = t.half().float()  # the same values, in fp32
            continue
        n_in = t.shape[1]
        G = min(group, n_in)
        if act:  # GPTQ act-order: groups by a permuted order, shared by linears of one input
            key = (stem.rsplit(".", 2)[0], kind)
            if key not in orders:
                orders[key] = rng.permutation(n_in)
            g_idx = np.empty(n_in, dtype=np.int64)
            g_idx[orders[key]] = np.arange(n_in) // G
        else:
            g_idx = np.arange(n_in) // G
        v1 = method == "gptq" and layout == "gptq"
        q, zeros, scales, deq = quantise(t, g_idx, bits, sym, min_zero=1 if v1 else 0)
        if method == "awq":
            packed[f"{stem}.qweight"] = pack_awq(q)
            packed[f"{stem}.qzeros"] = pack_awq(zeros)
        else:
            packed[f"{stem}.qweight"] = pack_rows(q, bits)
            packed[f"{stem}.qzeros"] = pack_columns(zeros - (1 if v1 else 0), bits)
            packed[f"{stem}.g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
        packed[f"{stem}.scales"] = torch.from_numpy(scales)
        dense[name] = deq
        bias = tensors.get(f"{stem}.bias")
        known[stem] = (q, zeros, scales, g_idx, deq, None if bias is None else bias.half().float())

    if config_layout == "nested":
        src = tiny.build_checkpoint(out.with_name(out.name + "-src"), _family(src), layout="nested")
    qdir, ddir = out, out.with_name(out.name + "-deq")
    for folder in (qdir, ddir):
        shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.safetensors*"))
    qconfig = {"quant_method": method, "bits": bits, "group_size": group}
    if method == "awq":
        qconfig.update(version="gemm", zero_point=True, modules_to_not_convert=["visual"])
    else:
        qconfig.update(desc_act=act, sym=sym, lm_head=False, checkpoint_format=layout)
    config = json.loads((src / "config.json").read_text())
    if config_layout == "nested":
        config["text_config"]["quantization_config"] = qconfig
        config["dtype"] = config["text_config"]["dtype"] = "float16"
    else:
        config["quantization_config"] = qconfig
        config["torch_dtype"] = "float16"
    (qdir / "config.json").write_text(json.dumps(config, indent=2))
    save_file(packed, qdir / "model.safetensors", metadata={"format": "pt"})
    save_file(dense, ddir / "model.safetensors", metadata={"format": "pt"})
    return qdir, ddir, known


def _family(folder: Path) -> str:
    return json.loads((folder / "config.json").read_text())["model_type"]


@pytest.fixture(scope="module")
def quantised(checkpoints, tmp_path_factory):
    """``quantised(family, variant)`` -> (quantised folder, dequantised folder, known)."""
    root = tmp_path_factory.mktemp("quantised")
    cache: dict[tuple[str, str], tuple] = {}

    def get(family: str, variant: str):
        if (family, variant) not in cache:
            out = root / f"{family}-{variant}"
            cache[family, variant] = quantised_checkpoint(checkpoints(family), out, variant)
        return cache[family, variant]

    return get


# ---------------------------------------------------------------- (a) unpacking


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_unpacking_gives_back_the_known_integers(variant, quantised) -> None:
    qdir, _, known = quantised("qwen2_vl", variant)
    method, bits, _, act, layout, _, group = VARIANTS[variant]
    tensors = load_file(qdir / "model.safetensors")
    for stem, (q, zeros, scales, g_idx, deq, _) in known.items():
        G = min(group, q.shape[0])
        t = {k: tensors[f"{stem}.{k}"] for k in ("qweight", "qzeros", "scales")}
        if method == "awq":
            uq, us, uz = quantized.unpack_awq(t["qweight"], t["qzeros"], t["scales"])
            perm = None
        else:
            offset = 1 if layout == "gptq" else 0
            uq, us, uz, perm = quantized.unpack_gptq(
                t["qweight"], t["qzeros"], t["scales"], tensors[f"{stem}.g_idx"], bits, G, offset
            )
        assert (perm is not None) == (act and q.shape[0] > G)
        order = np.arange(q.shape[0]) if perm is None else perm.numpy()
        if act:  # the inputs sorted by group, each group contiguous
            assert (np.diff(g_idx[order]) >= 0).all()
        assert uq.dtype == torch.uint8
        assert np.array_equal(uq.numpy(), q[order].T), stem
        assert np.array_equal(uz.numpy(), zeros.T), stem
        assert np.array_equal(us.numpy(), scales.T.astype(np.float32)), stem
        # and the weight they stand for, in the checkpoint's input order
        w = (uq.double() - uz.double().repeat_interleave(G, 1)) * us.double().repeat_interleave(
            G, 1
        )
        full = torch.empty_like(w)
        full[:, torch.from_numpy(order)] = w
        torch.testing.assert_close(full.float(), deq, rtol=0, atol=0)


def _linears(llm: LLM) -> dict[str, tuple[torch.nn.Module, list[str]]]:
    """Our decoder linear modules by their checkpoint stem(s): fused ones list their parts."""
    out = {}
    for i, layer in enumerate(llm.model.model.layers):
        p = f"model.layers.{i}"
        out[f"{p}.qkv"] = (layer.self_attn.qkv_proj, [f"{p}.self_attn.{n}_proj" for n in "qkv"])
        out[f"{p}.o"] = (layer.self_attn.o_proj, [f"{p}.self_attn.o_proj"])
        parts = [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]
        out[f"{p}.gate_up"] = (layer.mlp.gate_up_proj, parts)
        out[f"{p}.down"] = (layer.mlp.down_proj, [f"{p}.mlp.down_proj"])
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loaded_linears_compute_the_dequantised_weights(family, variant, quantised) -> None:
    qdir, _, known = quantised(family, variant)
    llm = LLM(qdir)
    method, bits, _, _, layout, _, group = VARIANTS[variant]
    assert llm.weight_format == f"{layout or method}:w{bits}g{group}"
    assert llm.model.dtype == torch.float32  # CPU: float32 activations over integer weights
    head = llm.model.lm_head  # the checkpoint's fp16 head, exactly, read by the fp16 GEMV
    assert head.mode == "fp16" and head.weight.dtype == torch.float16
    for mod, stems in _linears(llm).values():
        w = torch.cat([known[s][4] for s in stems])
        biases = [known[s][5] for s in stems]
        b = None if biases[0] is None else torch.cat(biases)
        xin = torch.randn(5, w.shape[1], generator=torch.Generator().manual_seed(1))
        ref = torch.nn.functional.linear(xin, w, b)
        blocks = type(mod).__name__ in ("QuantizedInt4Linear", "QuantizedInt8GroupLinear")
        assert blocks == _kernel_takes(w.shape[1], min(group, w.shape[1]), bits)
        if blocks:  # the kernels keep (scale, -zero * scale) in fp16: the weight within that
            perm = mod.perm if mod.perm is not None else slice(None)
            got = mod.dense_weight(torch.float32)
            tol = 2e-3 * float(w.abs().max())
            torch.testing.assert_close(got, w[:, perm], rtol=0, atol=tol)
            # and its product; the decode kernel (<= 16 rows) rounds x to int8 per group
            rel = float((mod(xin) - ref).abs().max() / ref.abs().max())
            print(f"{family} {variant} {type(mod).__name__} {tuple(w.shape)}: rel error {rel:.1e}")
            assert rel < INT4_REL_TOL
        else:  # the torch path computes exactly this product
            torch.testing.assert_close(mod(xin), ref, rtol=1e-5, atol=1e-5)
        # nothing the size of a full-precision weight stays behind
        for name, buf in mod.named_buffers():
            assert not (buf.is_floating_point() and buf.numel() >= w.numel()), name


# ---------------------------------------------------------------- (b) against transformers


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_tokens_match_transformers_on_the_dequantised_weights(
    family, variant, quantised, monkeypatch
) -> None:
    """The unpacked weights, run in float32. The int4 GEMV kernel rounds activations to int8 per
    group (its own approximation, measured at 1-2e-3 in log-prob here, enough to flip a near-tie
    of this random model), so it is switched off: Int4Linear then multiplies its stored weight."""
    monkeypatch.setattr(kernels, "available", lambda: False)
    qdir, ddir, _ = quantised(family, variant)
    llm = LLM(qdir)
    hf = tiny.load_hf(ddir, family)
    worst = greedy_logprob_gap_to_hf(llm, hf, PROMPTS)  # greedy = transformers' argmax
    print(f"{family} {variant}: max |logprob diff| {worst:.2e}")
    assert worst < 2e-3


@pytest.mark.parametrize(
    "variant", ["gptq_int4_act_order", "awq", "gptq_v2_int4", "gptq_int8", "gptq_int8_act_order"]
)
def test_checkpoints_decode_in_the_fused_step(variant, quantised, monkeypatch) -> None:
    """Where every decoder linear is an Int4Linear / Int8GroupLinear (act-order included: the
    kernel gathers ``x[:, perm]``), decode steps run the fused whole-decoder kernel, which
    computes exactly what the layer-by-layer kernels compute (checked against float64 in
    tests/kernels), so the tokens and log-probs are the same with the fused step switched off."""
    from qwenvl.engine.backends.cpu_kernels import CpuKernelBackend

    qdir, _, _ = quantised("qwen2_vl", variant)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
    llm = LLM(qdir)
    backend = llm.engine.runner.backend
    assert isinstance(backend, CpuKernelBackend) and backend.params is not None
    calls = []
    real = kernels.decode_layers
    monkeypatch.setattr(kernels, "decode_layers", lambda *a: calls.append(1) or real(*a))
    fused = llm.generate(PROMPTS, params)
    assert len(calls) >= 9  # every decode step after the prefill
    backend.params = None  # the module path: one linear_int4 call per linear
    unfused = llm.generate(PROMPTS, params)
    for a, b in zip(fused, unfused):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs


def test_fp16_scales_survive_a_bfloat16_config(quantised, tmp_path) -> None:
    """A GPTQ file whose config says bfloat16 (fp16 scales on disk, as gptqmodel writes them)
    keeps its scales exact: the stored 8-bit weight, (q - 128) * fp16 scale, equals the
    dequantised one to the bit (bf16-rounded scales missed by ~2^-9 relative)."""
    qdir, _, known = quantised("qwen2_vl", "gptq_int8")
    relabelled = tmp_path / "bf16-config"
    shutil.copytree(qdir, relabelled)
    config = json.loads((relabelled / "config.json").read_text())
    config["torch_dtype"] = "bfloat16"
    (relabelled / "config.json").write_text(json.dumps(config))
    mod, stems = _linears(LLM(relabelled))["model.layers.0.down"]
    assert torch.equal(mod.dense_weight(torch.float32), known[stems[0]][4])


def test_info_shows_the_format_and_bytes_per_weight(quantised) -> None:
    """AWQ 4-bit in groups of 32: half a byte of nibbles, an fp16 scale and a 4-bit zero per 32
    weights: 0.5 + 2/32 + 0.5/32 = 0.578125 bytes a weight, by hand."""
    from qwenvl.cli.info import describe_checkpoint, format_info

    qdir, _, known = quantised("qwen2_vl", "awq")
    info = describe_checkpoint(qdir)
    fmt = info["weight_format"]
    assert fmt["name"] == "awq:w4g32" and fmt["bits"] == 4 and fmt["group_size"] == 32
    assert fmt["quantized_weights"] == sum(v[4].numel() for v in known.values())
    assert fmt["bytes_per_weight"] == 0.5781
    assert "awq:w4g32 (4-bit, group 32: 0.578 bytes/weight" in format_info(info)


# ---------------------------------------------------------------- (c) refusals and parsing


@pytest.mark.parametrize(
    "qconfig, message",
    [
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes"),
        ({"quant_method": "exl2", "bits": 4.0}, "exl2"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "FP8"),
        ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, "compressed-tensors"),
        ({"quant_method": "gguf"}, "GGUF"),
        ({"quant_method": "some_new_method"}, "some_new_method"),
        ({"bits": 4}, "no quant_method"),
        ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "version 'gemv'"),
        ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "3-bit"),
        ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "marlin"),
        ({"quant_method": "gptq", "bits": 4, "lm_head": True}, "lm_head"),
    ],
)
def test_other_methods_are_refused(qconfig, message) -> None:
    with pytest.raises(ConfigError, match=message):
        quantized.format_for(qconfig)


def test_refused_before_loading(checkpoints, tmp_path) -> None:
    folder = tmp_path / "bnb"
    shutil.copytree(checkpoints("qwen2_vl"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="bitsandbytes.*not supported"):
        LLM(folder)


def test_load_model_reads_the_checkpoint_format(quantised) -> None:
    """``load_model`` alone (no ``LLM``) loads a GPTQ folder in its own format: its logits equal
    the dense model's on the test's dequantised weights."""
    from qwenvl.checkpoint import load_model

    qdir, ddir, _ = quantised("qwen2_vl", "gptq_int8")
    model, _ = load_model(qdir, dtype="float32")
    dense, _ = load_model(ddir, dtype="float32")
    ids = torch.arange(5, 85)[None]  # > 64 rows: the exact dequantised GEMM, not the GEMV
    pos = torch.arange(80).expand(3, 1, -1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, pos), dense(ids, pos), rtol=0, atol=1e-4)


def test_quantised_checkpoints_are_not_requantised(quantised) -> None:
    qdir, _, _ = quantised("qwen2_vl", "gptq_int4")
    with pytest.raises(ConfigError, match="already quantised"):
        LLM(qdir, quantization="int8")
    with pytest.raises(ConfigError, match="already quantised"):
        LLM(qdir, pack_weights=True)
    with pytest.raises(ConfigError, match="LoRA"):
        LLM(qdir, lora="unused")


def test_config_parsing() -> None:
    released_awq = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 128,
        "version": "gemm",
        "zero_point": True,
        "modules_to_not_convert": ["visual"],
    }
    fmt = quantized.format_for(released_awq)
    assert (fmt.name, fmt.method, fmt.bits, fmt.group_size) == ("awq:w4g128", "awq", 4, 128)
    assert fmt.head(64, 512).mode == "16bit"  # the head keeps the checkpoint's 16-bit values
    released_gptq = {"quant_method": "gptq", "bits": 8, "group_size": 128, "desc_act": False}
    assert quantized.format_for(released_gptq).name == "gptq:w8g128"  # no checkpoint_format: v1
    v2 = dict(released_gptq, checkpoint_format="gptq_v2", group_size=-1)
    assert quantized.format_for(v2).name == "gptq_v2:w8g-1"
    for name in ("awq:w4g128", "gptq:w8g128", "gptq_v2:w8g-1"):
        assert formats.get_format(name) == quantized.format_named(name)
        assert formats.get_format(name).name == name
    assert quantized.quantization_config_of({"text_config": {"quantization_config": v2}}) == v2
    assert quantized.quantization_config_of({"model_type": "qwen2_vl"}) is None


def _fused_gptq_tensors(
    n_in: int, parts: dict[str, int], group: int, orders: dict[str, np.ndarray]
):
    """Packed GPTQ v1 4-bit tensors of a fused layer's parts (act-order ``orders`` per part)
    and the dequantised ``[out, in]`` weight of each."""
    rng = np.random.default_rng(3)
    packed, deq = {}, {}
    for name, rows in parts.items():
        g_idx = np.empty(n_in, dtype=np.int64)
        g_idx[orders[name]] = np.arange(n_in) // group
        w = torch.from_numpy(rng.normal(size=(rows, n_in)).astype(np.float32))
        q, zeros, scales, deq[name] = quantise(w, g_idx, 4, False, min_zero=1)
        packed[f"{name}.qweight"] = pack_rows(q, 4)
        packed[f"{name}.qzeros"] = pack_columns(zeros - 1, 4)
        packed[f"{name}.scales"] = torch.from_numpy(scales)
        packed[f"{name}.g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
        packed[f"{name}.bias"] = torch.randn(rows).half()
    return packed, deq


def _fused_layer(packed, n_in, parts):
    fmt = formats.get_format("gptq:w4g128")
    with torch.device("meta"):
        m = fmt.linear(n_in, sum(parts.values()), bias=True, parts=parts)
    for name, t in m.allocate("cpu", torch.float16).items():
        t.copy_(packed[name])
    return m


def test_act_order_fused_layer_shares_one_input_order(monkeypatch) -> None:
    """q/k/v with one act-order permutation over two groups of 128 (the int4 kernels' group):
    one ``perm`` for the fused layer, and its product equals the dequantised weights'."""
    monkeypatch.setattr(kernels, "available", lambda: False)  # the stored weight, no x rounding
    n_in, parts = 256, {"q_proj": 64, "k_proj": 32, "v_proj": 32}
    order = np.random.default_rng(0).permutation(n_in)
    packed, deq = _fused_gptq_tensors(n_in, parts, 128, dict.fromkeys(parts, order))
    m = _fused_layer(packed, n_in, parts)
    m.finish_loading()
    assert m.perm is not None and not torch.equal(m.perm, torch.arange(n_in))
    x = torch.randn(20, n_in)
    w = torch.cat([deq[n] for n in parts])
    b = torch.cat([packed[f"{n}.bias"].float() for n in parts])
    ref = torch.nn.functional.linear(x, w, b)
    tol = 2e-3 * float(ref.abs().max())
    torch.testing.assert_close(m(x), ref, rtol=0, atol=tol)


def test_act_order_parts_with_different_orders_are_refused() -> None:
    from qwenvl.errors import CheckpointError

    n_in, parts = 256, {"gate_proj": 32, "up_proj": 32}
    rng = np.random.default_rng(1)
    orders = {"gate_proj": rng.permutation(n_in), "up_proj": rng.permutation(n_in)}
    packed, _ = _fused_gptq_tensors(n_in, parts, 128, orders)
    m = _fused_layer(packed, n_in, parts)
    with pytest.raises(CheckpointError, match="act-order .* differs between gate_proj and up_proj"):
        m.finish_loading()
