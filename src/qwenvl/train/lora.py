"""LoRA through ``peft``: wrap the Linear layers chosen by name, save/load peft adapter folders,
merge.

Our module names are the released checkpoint's (``model.layers.{i}.self_attn.q_proj``,
``visual.blocks.{j}.attn.qkv``). transformers 5 keeps the same modules under
``model.language_model.*`` / ``model.visual.*``, and peft writes adapter keys as
``base_model.model.<that path>.lora_A.weight``. Adapters are written in that form (so
``peft.PeftModel.from_pretrained`` loads them onto the transformers model) and read in either form.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qwenvl.errors import CheckpointError, ConfigError
from qwenvl.models import WeightNames, family_of

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARTS = ("llm", "vision", "merger")


@dataclass(frozen=True)
class LoraOptions:
    """``targets`` are module names (``q_proj``), dotted suffixes (``self_attn.q_proj``) or regular
    expressions matched against the whole module name, looked for only in ``parts``.

    ``parts`` defaults to the language model: Qwen2.5-VL's ViT MLPs are also called
    ``gate/up/down_proj``, and peft users (and LLaMA-Factory, ms-swift, whose vision tower is
    frozen by default) expect ``q_proj,...,down_proj`` to mean the LLM's projections. Add
    ``vision`` (``attn.qkv``, ``attn.proj``, ``mlp.*`` of the ViT blocks) and ``merger`` to
    adapt those too.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    parts: tuple[str, ...] = ("llm",)

    def __post_init__(self) -> None:
        if self.rank <= 0 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ConfigError("LoRA needs rank > 0, alpha > 0 and 0 <= dropout < 1")
        if not self.targets:
            raise ConfigError("LoRA needs at least one target module name")
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or not self.parts:
            raise ConfigError(f"LoRA parts must be some of {', '.join(PARTS)}, not {unknown}")


def part_of(name: str) -> str:
    """``vision``, ``merger`` or ``llm`` for a native parameter/module name."""
    if name.startswith("visual.merger"):
        return "merger"
    if name.startswith("visual."):
        return "vision"
    return "llm"


def _names(model: nn.Module) -> WeightNames:
    """The family's checkpoint names (peft keys adapters by the transformers 5 ones)."""
    return family_of(model.config).weights


def _matches(name: str, pattern: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    if re.escape(pattern) != pattern:  # has regex syntax
        return re.fullmatch(pattern, name) is not None
    return False


def select_targets(
    model: nn.Module, targets: Sequence[str], skip_parts: Sequence[str] = ()
) -> list[str]:
    """Names of the ``nn.Linear`` modules matching ``targets``, outside ``skip_parts``."""
    names = _names(model)
    found = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and part_of(n) not in skip_parts
        and any(_matches(n, p) or _matches(n, names.to_hf(p)) for p in targets)
    ]
    if not found:
        searched = ", ".join(p for p in PARTS if p not in skip_parts) or "no part"
        raise ConfigError(
            f"no Linear module of {searched} matches the LoRA targets {list(targets)} "
            "(--lora-parts llm,vision,merger widens the search)"
        )
    return found


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("LoRA needs peft: pip install 'qwenvl[train]'") from None
    return peft


def apply_lora(model: nn.Module, options: LoraOptions, skip_parts: Sequence[str] = ()) -> list[str]:
    """Wrap the chosen Linears of ``options.parts`` (less ``skip_parts``, the frozen ones) with
    LoRA (B = 0, so the output is unchanged); freeze every base weight. Returns the wrapped
    module names."""
    peft = _peft()
    skip = {*skip_parts, *(p for p in PARTS if p not in options.parts)}
    names = select_targets(model, options.targets, sorted(skip))
    config = peft.LoraConfig(
        r=options.rank,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=names,
    )
    model.requires_grad_(False)
    peft.inject_adapter_in_model(config, model)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    model._lora_config = config  # noqa: SLF001 - read back by save_adapter
    return names


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    for n, m in model.named_modules():
        if isinstance(m, LoraLayer):
            yield n, m


def has_lora(model: nn.Module) -> bool:
    return any(True for _ in lora_layers(model)) if _has_peft() else False


def _has_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The base model's behaviour (DPO's implicit reference)."""
    layers = [m for _, m in lora_layers(model)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)
            # enable_adapters(True) re-enables grads on every adapter; keep the frozen ones frozen
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.requires_grad_(True)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain Linear back."""
    for name, layer in list(lora_layers(model)):
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    if hasattr(model, "_lora_config"):
        del model._lora_config
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA weights keyed by our names (``model.layers.0.self_attn.q_proj.lora_A.weight``)."""
    out = {}
    for n, p in model.named_parameters():
        if "lora_" in n:
            out[n.replace(".default", "")] = p
    return out


def save_adapter(
    model: nn.Module,
    folder: str | Path,
    base_model: str | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) whose
    names are those of the transformers 5 model. ``weights``: the adapter tensors by our names
    (``adapter_state``'s), when the model's own are sharded (FSDP gathers them first)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model._lora_config  # noqa: SLF001
    tensors = {}
    names = _names(model)
    for n, p in (adapter_state(model) if weights is None else weights).items():
        module, _, leaf = n.partition(".lora_")
        key = PEFT_PREFIX + names.to_hf(module) + ".lora_" + leaf
        tensors[key] = p.detach().to("cpu", torch.float32).contiguous()
    save_file(tensors, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    d = config.to_dict()
    d["target_modules"] = sorted(names.to_hf(t) for t in config.target_modules)
    d["base_model_name_or_path"] = base_model
    d["inference_mode"] = True
    d["peft_type"] = "LORA"
    for k, v in list(d.items()):
        if isinstance(v, set):
            d[k] = sorted(v)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(d, indent=2, default=str))
    return folder


def load_adapter(model: nn.Module, folder: str | Path) -> list[str]:
    """Wrap ``model`` with the adapter in ``folder`` (ours or any peft LoRA adapter written for a
    Qwen2-VL / Qwen2.5-VL transformers model) and load its weights. Not merged."""
    peft = _peft()
    folder = Path(folder)
    cfg_path = folder / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder}: no {ADAPTER_CONFIG}")
    raw = json.loads(cfg_path.read_text())
    if raw.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{folder}: only LoRA adapters are supported")
    weights_path = folder / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise CheckpointError(f"{folder}: no {ADAPTER_WEIGHTS}")
    names = _names(model)
    tensors = {
        names.from_hf(k.removeprefix(PEFT_PREFIX)): v for k, v in load_file(weights_path).items()
    }
    modules = sorted({k.partition(".lora_")[0] for k in tensors})
    known = dict(model.named_modules())
    missing = [m for m in modules if m not in known]
    if missing:
        raise CheckpointError(f"{folder}: adapter modules not in the model: {missing[:5]}")
    config = peft.LoraConfig(
        r=raw["r"],
        lora_alpha=raw["lora_alpha"],
        lora_dropout=raw.get("lora_dropout", 0.0),
        target_modules=modules,
        use_rslora=raw.get("use_rslora", False),
        rank_pattern=raw.get("rank_pattern") or {},
        alpha_pattern=raw.get("alpha_pattern") or {},
    )
    peft.inject_adapter_in_model(config, model)
    params = dict(model.named_parameters())
    state = {}
    for k, v in tensors.items():
        module, _, leaf = k.partition(".lora_")
        kind, _, rest = leaf.partition(".")
        name = f"{module}.lora_{kind}.default.{rest}"
        if name not in params:
            raise CheckpointError(f"{folder}: unexpected adapter tensor {k}")
        state[name] = v
    wanted = {n for n in params if "lora_" in n}
    if wanted != set(state):
        raise CheckpointError(
            f"{folder}: adapter tensors missing: {sorted(wanted - set(state))[:5]}"
        )
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.requires_grad_(False)
    model._lora_config = config  # noqa: SLF001
    return modules
