"""Option defaults come from the library's dataclasses, and the cli modules import no cycle."""

from __future__ import annotations

import argparse
import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qwenvl.cli.common import default
from qwenvl.cli.main import build_parser
from qwenvl.cli.serve import engine_config, server_settings
from qwenvl.engine.config import EngineConfig
from qwenvl.server.settings import ServerSettings
from qwenvl.train import LoraOptions, TrainConfig

CLI = Path(__file__).resolve().parents[2] / "src" / "qwenvl" / "cli"

# Every serve option that sets a dataclass field, written out here rather than read from the CLI.
SERVE_FIELDS = {
    "--max-model-len": (EngineConfig, "max_model_len"),
    "--max-num-seqs": (EngineConfig, "max_num_seqs"),
    "--kv-cache-memory": (EngineConfig, "kv_cache_memory"),
    "--encoder-cache-memory": (EngineConfig, "encoder_cache_memory"),
    "--api-key": (ServerSettings, "api_key"),
    "--max-waiting-requests": (ServerSettings, "max_waiting_requests"),
    "--max-body-bytes": (ServerSettings, "max_body_bytes"),
    "--max-media-bytes": (ServerSettings, "max_media_bytes"),
    "--media-timeout": (ServerSettings, "media_timeout_s"),
    "--allowed-local-media-path": (ServerSettings, "allowed_local_media_path"),
    "--allowed-media-domains": (ServerSettings, "allowed_media_domains"),
    "--allow-private-media": (ServerSettings, "allow_private_media"),
    "--default-max-tokens": (ServerSettings, "default_max_tokens"),
    "--max-image-pixels": (ServerSettings, "max_image_pixels"),
    "--fetch-workers": (ServerSettings, "fetch_workers"),
    "--header-timeout": (ServerSettings, "header_timeout_s"),
    "--body-timeout": (ServerSettings, "body_timeout_s"),
    "--metrics-without-key": (ServerSettings, "metrics_need_key"),
    "--special-tokens-in-content": (ServerSettings, "special_tokens_in_content"),
    "--no-web": (ServerSettings, "web"),
}
# Serve options that set no EngineConfig/ServerSettings field.
SERVE_OTHERS = {
    "--model",
    "--dtype",
    "--quantization",
    "--head-quantization",
    "--pack-weights",
    "--no-pack-weights",
    "--prefill-dtype",
    "--device",
    "--tensor-parallel-size",
    "--min-pixels",
    "--max-pixels",
    "--host",
    "--port",
    "--served-model-name",  # its default is --model, not ServerSettings's
}


def subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def actions(name: str) -> dict[str, argparse.Action]:
    return {flag: a for a in subparser(name)._actions for flag in a.option_strings}


def test_serve_defaults_are_the_dataclass_defaults():
    flags = actions("serve")
    assert {f for f in flags if f not in ("-h", "--help")} == {*SERVE_FIELDS, *SERVE_OTHERS}
    instances = {EngineConfig: EngineConfig(), ServerSettings: ServerSettings()}
    for flag, (cls, name) in SERVE_FIELDS.items():
        value = flags[flag].default
        expected = getattr(instances[cls], name)
        assert (tuple(value) if isinstance(value, list) else value) == expected, flag
    args = build_parser().parse_args(["serve", "--model", "m"])
    assert engine_config(args) == EngineConfig()
    assert server_settings(args) == ServerSettings(served_model_name="m")


def test_serve_options_reach_the_dataclasses(tmp_path):
    argv = ["serve", "--model", "m", "--max-model-len", "512", "--max-num-seqs", "3"]
    argv += ["--kv-cache-memory", "1000", "--encoder-cache-memory", "0", "--api-key", "k"]
    argv += ["--max-waiting-requests", "5", "--max-body-bytes", "7", "--max-media-bytes", "9"]
    argv += ["--media-timeout", "2.5", "--allowed-local-media-path", str(tmp_path)]
    argv += ["--allowed-media-domains", "a.example", "b.example", "--allow-private-media"]
    argv += ["--default-max-tokens", "11", "--max-image-pixels", "13", "--fetch-workers", "2"]
    argv += ["--header-timeout", "3.5", "--body-timeout", "4.5", "--metrics-without-key"]
    argv += ["--special-tokens-in-content"]
    args = build_parser().parse_args(argv)
    assert engine_config(args) == EngineConfig(
        max_model_len=512, max_num_seqs=3, kv_cache_memory=1000, encoder_cache_memory=0
    )
    expected = ServerSettings(
        served_model_name="m",
        api_key="k",
        max_waiting_requests=5,
        max_body_bytes=7,
        max_media_bytes=9,
        media_timeout_s=2.5,
        allowed_local_media_path=str(tmp_path),
        allowed_media_domains=("a.example", "b.example"),
        allow_private_media=True,
        default_max_tokens=11,
        max_image_pixels=13,
        fetch_workers=2,
        header_timeout_s=3.5,
        body_timeout_s=4.5,
        metrics_need_key=False,
        special_tokens_in_content=True,
    )
    assert server_settings(args) == expected


def test_train_defaults_are_the_dataclass_defaults():
    args = vars(
        build_parser().parse_args(["train", "--model", "m", "--data", "d", "--output", "o"])
    )
    config = TrainConfig(model="m", data="d", output="o")
    fields = set(TrainConfig.__dataclass_fields__) - {"model", "data", "output", "lora"}
    compared = fields & set(args)
    assert len(compared) >= 30  # every option named like its field
    for name in compared:
        assert args[name] == getattr(config, name), name
    lora = LoraOptions()
    assert (args["lora_rank"], args["lora_alpha"], args["lora_dropout"]) == (
        lora.rank,
        lora.alpha,
        lora.dropout,
    )
    assert tuple(args["lora_targets"].split(",")) == lora.targets


def test_default_reads_defaults_and_factories():
    @dataclass
    class Example:
        required: int
        plain: int = 3
        made: list[int] = field(default_factory=lambda: [1, 2])

    assert default(Example, "plain") == 3
    assert default(Example, "made") == [1, 2]
    with pytest.raises(ValueError, match="no default"):
        default(Example, "required")
    with pytest.raises(ValueError, match="no field 'missing'"):
        default(Example, "missing")


# --- the import graph of qwenvl.cli ----------------------------------------------------------
def cli_imports(source: str, modules: set[str]) -> set[str]:
    """The qwenvl.cli modules ``source`` imports, at any level (inside functions and
    ``TYPE_CHECKING`` blocks too); ``__init__`` stands for the package itself."""
    found: set[str] = set()

    def add(dotted: str) -> None:
        parts = dotted.split(".")
        if parts[:2] == ["qwenvl", "cli"]:
            found.add(parts[2] if len(parts) > 2 else "__init__")

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative to qwenvl.cli (its modules sit directly in the package)
                base = ".".join(["qwenvl", "cli"][: 3 - node.level] + ([base] if base else []))
            for alias in node.names:  # from qwenvl.cli import serve: the module serve
                add(f"{base}.{alias.name}" if base == "qwenvl.cli" else base)
                if base == "qwenvl" and alias.name == "cli":
                    add("qwenvl.cli")
    return {m if m in modules else "__init__" for m in found}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a path that ends where it starts, or None when it has none."""
    state: dict[str, str] = {}  # absent: unvisited, "open": on the current path, "done"

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    names = set(sources)
    return {name: cli_imports(text, names) - {name} for name, text in sources.items()}


def test_the_cycle_check_sees_function_level_imports():
    sources = {
        "__init__": '"""package"""',
        "main": "from qwenvl.cli.serve import add_serve\n",
        "serve": "def f():\n    from qwenvl.cli import main as cli\n",
        "common": "from . import serve\nfrom .main import x\n",
    }
    graph = import_graph(sources)
    assert graph == {
        "__init__": set(),
        "main": {"serve"},
        "serve": {"main"},
        "common": {"serve", "main"},
    }
    assert find_cycle(graph) == ["main", "serve", "main"]
    del sources["serve"]
    assert find_cycle(import_graph(sources)) is None


def test_cli_modules_import_no_cycle():
    sources = {path.stem: path.read_text() for path in CLI.glob("*.py")}
    assert {"main", "common", "serve", "train", "ground", "info"} <= set(sources)
    graph = import_graph(sources)
    assert find_cycle(graph) is None, find_cycle(graph)
    assert not any("main" in deps for deps in graph.values())  # only the entry point is main
    assert graph["common"] <= {"__init__"}  # common is the base every subcommand builds on
