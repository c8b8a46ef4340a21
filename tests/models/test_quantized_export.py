"""``qwenvl quantize`` writes GPTQ / AWQ checkpoints (``qwenvl.models.quantized_export``).

Tiny checkpoints of both families, stored in 16-bit (bf16 and fp16), are quantised by the command
itself (``qwenvl.cli.main.main``). Truths, none of them production code:

* ``rtn`` below: round-to-nearest written here from the definition (numpy, float32), giving the
  integers, fp16 scales and zero points every decoder linear must carry;
* the independent packer of the published layouts in ``test_quantized_checkpoints``: the written
  ``qweight`` / ``qzeros`` / ``scales`` / ``g_idx`` must equal its output for those integers,
  byte for byte;
* our loader reading the output back must hold exactly those integers (so the packing
  round-trips), and ``LLM`` on the output must give transformers' greedy tokens on the same
  dequantised weights written as a plain fp32 checkpoint;
* transformers itself loading the output (its GPTQ / AWQ integration runs on the gptqmodel
  package, and optimum for GPTQ): skipped where those packages are missing.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_quantized_checkpoints import pack_awq, pack_columns, pack_rows

import tiny
from qwenvl import LLM, SamplingParams, kernels
from qwenvl.checkpoint import load_model
from qwenvl.cli.main import main
from qwenvl.errors import CheckpointError
from qwenvl.models import quantized, quantized_export
from scoring import greedy_logprob_gap_to_hf

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
SOURCE_DTYPE = {"qwen2_vl": torch.bfloat16, "qwen2_5_vl": torch.float16}
# name -> (method, layout, group size). The tiny decoder's inputs are 64 and 128 wide.
CASES = {
    "gptq_int4": ("int4", "gptq", 32),
    "gptq_int4_g64": ("int4", "gptq", 64),
    "awq_int4": ("int4", "awq", 32),
    "gptq_int8": ("int8", "gptq", 32),
    "gptq_int8_per_channel": ("int8", "gptq", -1),
}
PROJ = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
PROMPTS = ["Describe this image.", "The red box is on the left", "Count the boxes: 1 2 3"]


# ------------------------------------------------------- the truth: RTN, from the definition


def rtn(w: torch.Tensor, group: int, bits: int, sym: bool, min_zero: int):
    """``w [out, in]`` -> ``q [out, in]``, fp16 ``scales`` and ``zeros [out, in / G]``.

    int4 (asymmetric): the group's range widened to hold 0, ``scale = fp16((hi - lo) / 15)``,
    ``zero = clip(round(-lo / scale), min_zero, 15)``; int8 (symmetric): ``scale =
    fp16(max|w| / 127)``, zero 128. A zero fp16 scale becomes the smallest fp16, 2**-24.
    ``q = clip(round(w / scale) + zero, 0, 2**bits - 1)``. All float32, as numpy computes it.
    """
    x = w.float().numpy()
    n_out, n_in = x.shape
    group = n_in if group == -1 else group
    x = x.reshape(n_out, n_in // group, group)
    maxq = 2**bits - 1
    if sym:
        scale = np.abs(x).max(-1) / np.float32(2 ** (bits - 1) - 1)
    else:
        lo, hi = np.minimum(x.min(-1), 0), np.maximum(x.max(-1), 0)
        scale = (hi - lo) / np.float32(maxq)
    s16 = scale.astype(np.float16)
    s16[s16 == 0] = np.float16(2.0**-24)
    s = s16.astype(np.float32)
    if sym:
        zero = np.full(s.shape, 2 ** (bits - 1), dtype=np.float32)
    else:
        zero = np.clip(np.round(-lo / s), min_zero, maxq)
    q = np.clip(np.round(x / s[..., None]) + zero[..., None], 0, maxq)
    return q.reshape(n_out, n_in).astype(np.int64), s16, zero.astype(np.int64)


def dequantise(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> torch.Tensor:
    g = q.shape[1] // scales.shape[1]
    w = (q - np.repeat(zeros, g, 1)) * np.repeat(scales.astype(np.float64), g, 1)
    return torch.from_numpy(w.astype(np.float32))


def truth(source: dict[str, torch.Tensor], case: str) -> dict[str, tuple]:
    """{linear stem: (q, scales, zeros, dequantised fp32 weight)} for every decoder linear."""
    method, layout, group = CASES[case]
    bits, sym = (4, False) if method == "int4" else (8, True)
    min_zero = 1 if layout == "gptq" else 0
    out = {}
    for name, w in source.items():
        stem = name.removesuffix(".weight")
        if name.startswith("model.layers.") and stem.split(".", 3)[-1] in PROJ:
            q, s, z = rtn(w, group, bits, sym, min_zero)
            out[stem] = (q, s, z, dequantise(q, s, z))
    return out


# ---------------------------------------------------------------- fixtures


def sixteen_bit(src: Path, out: Path, dtype: torch.dtype) -> Path:
    """A copy of a tiny checkpoint stored in ``dtype`` (config.json says so)."""
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors*"))
    tensors = load_file(src / "model.safetensors")
    save_file({k: v.to(dtype) for k, v in tensors.items()}, out / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    key = "torch_dtype" if "torch_dtype" in config else "dtype"
    config[key] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


@pytest.fixture(scope="module")
def sources(checkpoints, tmp_path_factory):
    """``sources(family)`` -> the 16-bit tiny checkpoint folder."""
    root = tmp_path_factory.mktemp("qexport_src")
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = sixteen_bit(checkpoints(family), root / family, SOURCE_DTYPE[family])
        return cache[family]

    return get


def quantize_args(src: Path, out: Path, case: str) -> list[str]:
    method, layout, group = CASES[case]
    args = ["quantize", str(src), "--method", method, "--output", str(out)]
    return args + ["--layout", layout, "--group-size", str(group)]


@pytest.fixture(scope="module")
def exported(sources, tmp_path_factory):
    """``exported(family, case)`` -> the folder ``qwenvl quantize`` wrote."""
    root = tmp_path_factory.mktemp("qexport_out")
    cache: dict[tuple[str, str], Path] = {}

    def get(family: str, case: str) -> Path:
        if (family, case) not in cache:
            out = root / f"{family}-{case}"
            assert main(quantize_args(sources(family), out, case)) == 0
            cache[family, case] = out
        return cache[family, case]

    return get


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return load_file(folder / "model.safetensors")
    shards = set(json.loads(index.read_text())["weight_map"].values())
    return {k: v for shard in sorted(shards) for k, v in load_file(folder / shard).items()}


# ---------------------------------------------------------------- (1) the loader reads it back


def _decoder_modules(model) -> list[tuple[torch.nn.Module, list[str]]]:
    out = []
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        out.append((layer.self_attn.qkv_proj, [f"{p}.self_attn.{n}_proj" for n in "qkv"]))
        out.append((layer.self_attn.o_proj, [f"{p}.self_attn.o_proj"]))
        out.append((layer.mlp.gate_up_proj, [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]))
        out.append((layer.mlp.down_proj, [f"{p}.mlp.down_proj"]))
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(CASES))
def test_loader_reads_back_the_exact_integers(family, case, sources, exported, monkeypatch):
    """Our loader (torch path: it keeps q, scales and zeros as read) holds exactly the integers
    of the test's RTN, so the dequantised weights are equal too; the rest is the source's."""
    monkeypatch.setattr(quantized, "_kernel_class", lambda *_: quantized.GroupQuantLinear)
    out = exported(family, case)
    source = load_file(sources(family) / "model.safetensors")
    known = truth(source, case)
    model, _ = load_model(out, dtype="float32")
    for mod, stems in _decoder_modules(model):
        assert isinstance(mod, quantized.GroupQuantLinear) and mod.perm is None
        q = np.concatenate([known[s][0] for s in stems])
        scales = np.concatenate([known[s][1] for s in stems]).astype(np.float32)
        zeros = np.concatenate([known[s][2] for s in stems])
        assert np.array_equal(mod.q.numpy(), q), stems
        assert np.array_equal(mod.scales.numpy(), scales), stems
        assert np.array_equal(mod.zeros.numpy(), zeros), stems
        g = mod.group_size
        w = (mod.q.double() - mod.zeros.double().repeat_interleave(g, 1)) * (
            mod.scales.double().repeat_interleave(g, 1)
        )
        deq = torch.cat([known[s][3] for s in stems])
        torch.testing.assert_close(w.float(), deq, rtol=0, atol=0)
        if mod.bias is not None:  # 16-bit biases stay as they were (fp16 holds bf16 values)
            b = torch.cat([source[f"{s}.bias"].float() for s in stems])
            torch.testing.assert_close(mod.bias, b, rtol=2**-10, atol=2**-24)
    # everything else is the source's tensor, same dtype, same bytes
    written = all_tensors(out)
    for name, t in source.items():
        if name.removesuffix(".weight") in known:
            assert name not in written
            continue
        assert written[name].dtype == t.dtype and torch.equal(written[name], t), name


@pytest.mark.parametrize("case", list(CASES))
def test_config_files_and_layout(case, sources, exported) -> None:
    method, layout, group = CASES[case]
    src, out = sources("qwen2_vl"), exported("qwen2_vl", case)
    config = json.loads((out / "config.json").read_text())
    q = config.pop("quantization_config")
    if layout == "awq":
        assert q == {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group,
            "version": "gemm",
            "zero_point": True,
            "modules_to_not_convert": ["visual", "model.visual"],
        }
    else:
        assert q == {
            "quant_method": "gptq",
            "bits": 4 if method == "int4" else 8,
            "group_size": group,
            "desc_act": False,
            "sym": method == "int8",
            "lm_head": False,
            "checkpoint_format": "gptq",
        }
    fmt = quantized.format_for(q)  # our reader takes it as written
    assert (fmt.method, fmt.group_size) == (layout, group)
    source_config = json.loads((src / "config.json").read_text())
    assert config.pop("torch_dtype") == "float16"
    source_config.pop("torch_dtype")
    assert config == source_config
    for f in src.iterdir():  # tokenizer, chat template, preprocessor, generation config
        if f.name not in ("config.json", "model.safetensors"):
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    assert not list(out.parent.glob(f".{out.name}*"))  # no temporary folder left behind


# ---------------------------------------------------------------- (2) byte for byte


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(CASES))
def test_packed_tensors_equal_the_independent_packer(family, case, sources, exported) -> None:
    method, layout, group = CASES[case]
    bits = 4 if method == "int4" else 8
    source = load_file(sources(family) / "model.safetensors")
    written = load_file(exported(family, case) / "model.safetensors")
    for stem, (q, s, z, _) in truth(source, case).items():
        if layout == "awq":
            ref = {"qweight": pack_awq(q.T), "qzeros": pack_awq(z.T)}
        else:
            n_in = q.shape[1]
            g = n_in if group == -1 else group
            ref = {
                "qweight": pack_rows(q.T, bits),
                "qzeros": pack_columns(z.T - 1, bits),
                "g_idx": torch.from_numpy((np.arange(n_in) // g).astype(np.int32)),
            }
        ref["scales"] = torch.from_numpy(np.ascontiguousarray(s.T))
        got = {k: v for k, v in written.items() if k.rsplit(".", 1)[0] == stem}
        got.pop(f"{stem}.bias", None)  # q/k/v biases: 16-bit, checked with the copied tensors
        assert sorted(got) == sorted(f"{stem}.{k}" for k in ref), stem
        for k, r in ref.items():
            t = got[f"{stem}.{k}"]
            assert t.dtype == r.dtype and t.shape == r.shape, (stem, k)
            assert t.numpy().tobytes() == r.numpy().tobytes(), (stem, k)


def test_packing_inverts_the_reader_unpackers() -> None:
    """Random integers through our writers and the reader's unpackers, for shapes beyond the
    tiny model's (several groups, many packs)."""
    gen = torch.Generator().manual_seed(0)
    n_out, n_in, group = 48, 256, 64
    for bits, min_zero in ((4, 0), (4, 1), (8, 1)):
        q = torch.randint(0, 2**bits, (n_out, n_in), generator=gen, dtype=torch.uint8)
        zeros = torch.randint(min_zero, 2**bits, (n_out, n_in // group), generator=gen)
        scales = torch.rand(n_out, n_in // group, generator=gen).half()
        g = quantized_export.GroupQuant(q, scales, zeros.to(torch.uint8))
        if bits == 4 and min_zero == 0:
            p = quantized_export.pack_awq(g)
            uq, us, uz = quantized.unpack_awq(p["qweight"], p["qzeros"], p["scales"])
        else:
            p = quantized_export.pack_gptq(g, bits, group)
            uq, us, uz, perm = quantized.unpack_gptq(
                p["qweight"], p["qzeros"], p["scales"], p["g_idx"], bits, group, 1
            )
            assert perm is None
        assert torch.equal(uq, q) and torch.equal(uz, zeros.float())
        assert torch.equal(us, scales.float())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e9])
def test_weights_fp16_scales_cannot_hold_are_refused(bad) -> None:
    w = torch.zeros(8, 64)
    w[3, 5] = bad
    with pytest.raises(CheckpointError, match="not finite or too large for fp16"):
        quantized_export.quantize_linear(w, quantized_export.ExportSpec("int8", "gptq", 32))


# ---------------------------------------------------------------- (3) against transformers


def dequantised_checkpoint(src: Path, known: dict[str, tuple], out: Path) -> Path:
    """The source with each decoder linear replaced by its dequantised weight, all in fp32."""
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors*"))
    tensors = {k: v.float() for k, v in load_file(src / "model.safetensors").items()}
    for stem, (*_, deq) in known.items():
        tensors[f"{stem}.weight"] = deq
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


@pytest.mark.parametrize(
    "family, case",
    [("qwen2_vl", "gptq_int4"), ("qwen2_5_vl", "awq_int4"), ("qwen2_vl", "gptq_int8")],
)
def test_greedy_tokens_match_transformers_on_the_dequantised_weights(
    family, case, sources, exported, tmp_path, monkeypatch
) -> None:
    """``LLM`` on the written checkpoint against transformers on its dequantised weights (the
    int4 GEMV kernel's own int8 rounding of activations is switched off, as in
    test_quantized_checkpoints: its stored weights are then multiplied as they are)."""
    monkeypatch.setattr(kernels, "available", lambda: False)
    src = sources(family)
    known = truth(load_file(src / "model.safetensors"), case)
    llm = LLM(exported(family, case))
    hf = tiny.load_hf(dequantised_checkpoint(src, known, tmp_path / "deq"), family)
    worst = greedy_logprob_gap_to_hf(llm, hf, PROMPTS)
    print(f"{family} {case}: max |logprob diff| {worst:.2e}")
    assert worst < 2e-3


def _missing_hf_packages() -> str | None:
    missing = [m for m in ("gptqmodel", "optimum") if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return (
        f"transformers loads GPTQ/AWQ checkpoints only through gptqmodel (+ optimum for GPTQ); "
        f"not installed here: {', '.join(missing)}"
    )


@pytest.mark.skipif(_missing_hf_packages() is not None, reason=str(_missing_hf_packages()))
@pytest.mark.parametrize("case", ["gptq_int4", "awq_int4", "gptq_int8"])
def test_transformers_loads_the_output(case, sources, exported, tmp_path) -> None:
    """transformers' own GPTQ / AWQ integration (gptqmodel's CPU kernels) on our output: the ViT
    and head stay dense, and its logits equal transformers' on the dequantised weights."""
    family = "qwen2_vl"
    src = sources(family)
    known = truth(load_file(src / "model.safetensors"), case)
    ref_model = tiny.load_hf(dequantised_checkpoint(src, known, tmp_path / "deq"), family)
    model = tiny.load_hf(exported(family, case), family)
    modules = dict(model.named_modules())
    assert type(modules["lm_head"]) is torch.nn.Linear
    assert type(modules["model.visual.blocks.0.attn.qkv"]) is torch.nn.Linear
    assert type(modules["model.language_model.layers.0.mlp.down_proj"]) is not torch.nn.Linear
    seq = torch.tensor([[5, 17, 33, 40, 2, 9, 120, 64]])
    with torch.no_grad():
        kw = {"input_ids": seq, "mm_token_type_ids": torch.zeros_like(seq)}
        got, ref = model(**kw).logits.float(), ref_model(**kw).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-3 * float(ref.abs().max()))
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


# ---------------------------------------------------------------- layouts of the source, shards


def test_shards_index_and_transformers5_names(checkpoints, tmp_path) -> None:
    """A nested-config source with transformers-5 tensor names and tied embeddings, written in
    several shards: released names, an index, the same tensors as one file, and it loads."""
    src5 = tiny.build_checkpoint(tmp_path / "v5", "qwen2_vl", layout="nested", names="v5", tie=True)
    src = sixteen_bit(src5, tmp_path / "v5-bf16", torch.bfloat16)
    spec = quantized_export.ExportSpec("int4", "gptq", 32)
    one = quantized_export.quantize_checkpoint(src, tmp_path / "one", spec)
    many = quantized_export.quantize_checkpoint(
        src, tmp_path / "many", spec, max_shard_bytes=40_000
    )
    assert one.files == 1 and many.files > 2
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == many.files
    tensors = all_tensors(tmp_path / "many")
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    single = load_file(tmp_path / "one" / "model.safetensors")
    assert set(single) == set(tensors) and all(torch.equal(single[k], tensors[k]) for k in single)
    assert "lm_head.weight" not in single  # tied: the head is the embedding
    assert all(
        k.startswith(("model.layers.", "model.embed_tokens", "model.norm", "visual."))
        for k in single
    )
    config = json.loads((tmp_path / "many" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq"
    assert config["dtype"] == config["text_config"].get("dtype", "float16") == "float16"
    a, b = LLM(tmp_path / "one"), LLM(tmp_path / "many")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    assert a.weight_format == "gptq:w4g32"
    assert [o.outputs[0].token_ids for o in a.generate(PROMPTS, params)] == [
        o.outputs[0].token_ids for o in b.generate(PROMPTS, params)
    ]


def test_only_the_decoder_linears_are_decoded(sources, tmp_path, monkeypatch) -> None:
    """Streaming: each decoder linear is read once, one at a time; every other tensor is copied
    as bytes, never materialised."""
    from qwenvl import weights

    read: list[tuple[int, ...]] = []
    original = weights.read_tensor

    def spy(path, spec, base, out=None):
        read.append(tuple(spec["shape"]))
        return original(path, spec, base, out)

    monkeypatch.setattr(weights, "read_tensor", spy)
    spec = quantized_export.ExportSpec("int8", "gptq", 64)
    result = quantized_export.quantize_checkpoint(sources("qwen2_vl"), tmp_path / "o", spec)
    assert len(read) == result.linears == 2 * len(PROJ)
