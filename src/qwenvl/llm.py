"""The offline Python API: ``LLM(path).chat(messages, SamplingParams(...))``, in vLLM's shape."""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qwenvl.checkpoint import load_model, read_json, resolve_checkpoint
from qwenvl.engine.config import EngineConfig
from qwenvl.engine.engine import LLMEngine
from qwenvl.engine.model_runner import ModelRunner
from qwenvl.errors import CheckpointError, ConfigError, ContextLengthError, PromptError
from qwenvl.outputs import RequestOutput, StreamEvent
from qwenvl.processing.policy import MediaPolicy
from qwenvl.processing.prompt import MediaItem, Processor, PromptInputs
from qwenvl.sampling import SamplingParams
from qwenvl.structured import StructuredOutput
from qwenvl.tool_calls import attach_tool_calls, tool_call_grammar

if TYPE_CHECKING:
    from qwenvl.engine.parallel import Workers

logger = logging.getLogger(__name__)

Messages = list[dict[str, Any]]


CPU_MAX_PIXELS = 1024 * 28 * 28  # 1024 vision tokens (1280x720 -> 1176x644)
CPU_MAX_VIDEO_TOKENS = 4096


def _weight_plan(
    path: Path,
    dtype: str | torch.dtype,
    on_cpu: bool,
    quantization: str | None,
    pack_weights: bool | None,
    lora: bool,
    head_quantization: str | None = None,
) -> tuple[str | torch.dtype, str | None]:
    """(activation dtype, weight format) for a checkpoint: ``formats.plan_weights``."""
    from qwenvl.checkpoint import load_config, resolve_dtype
    from qwenvl.models.formats import plan_weights
    from qwenvl.models.quantized import quantization_config_of

    return plan_weights(
        dtype=dtype,
        stored=resolve_dtype("auto", load_config(path)),
        checkpoint_bytes=sum(f.stat().st_size for f in path.glob("*.safetensors")),
        on_cpu=on_cpu,
        quantization=quantization,
        pack_weights=pack_weights,
        lora=lora,
        quantization_config=quantization_config_of(read_json(path / "config.json")),
        head_quantization=head_quantization,
    )


def _prefill_plan(prefill_dtype: str, fmt: str | None, tensor_parallel_size: int) -> str:
    """What ``prefill_dtype`` resolves to. ``"auto"``: bfloat16 where it pays (bf16-packed
    weights, one process, a CPU with bf16 dot products), else float32. An explicit
    ``"bfloat16"`` is refused where it would change nothing."""
    if prefill_dtype not in ("auto", "float32", "bfloat16"):
        raise ConfigError(
            f"prefill_dtype must be 'auto', 'float32' or 'bfloat16', not {prefill_dtype!r}"
        )
    if prefill_dtype == "auto":
        from qwenvl.layers.packed_linear import native_bf16

        pays = fmt == "bf16" and tensor_parallel_size == 1 and native_bf16()
        return "bfloat16" if pays else "float32"
    if prefill_dtype == "bfloat16" and fmt != "bf16":
        raise ConfigError(
            "prefill_dtype='bfloat16' applies to bf16-packed decoder weights (the CPU default "
            f"for 16-bit checkpoints, or pack_weights=True); these load as {fmt or 'dense'}"
        )
    if prefill_dtype == "bfloat16" and tensor_parallel_size != 1:
        raise ConfigError("prefill_dtype='bfloat16' is not supported with tensor parallelism yet")
    return prefill_dtype


def _bf16_vision_on_first_call(visual: torch.nn.Module) -> None:
    """The vision tower's linears packed to bf16 at its first call rather than at load: a start
    that never sees a picture skips the packing (1.3 s for the 2B's tower, a third of a cold start
    to the first token)."""
    from qwenvl.layers.packed_linear import pack_linears

    def pack(module: torch.nn.Module, args: Any) -> None:
        handle.remove()
        pack_linears(module, torch.bfloat16)

    handle = visual.register_forward_pre_hook(pack)


def _with_tool_choice(
    params: list[SamplingParams], tools: list[dict[str, Any]] | None, choice: Any
) -> list[SamplingParams]:
    """``params`` constrained to a tool call when ``choice`` demands one."""
    if choice in (None, "auto", "none"):
        return params
    name = None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if choice.get("type") != "function" or not isinstance(name, str):
            raise PromptError('tool_choice must be "auto", "none", "required" or a function')
    elif choice != "required":
        raise PromptError(f"unknown tool_choice {choice!r}")
    names = [(t.get("function") or t).get("name") for t in tools or []]
    if not names or (name is not None and name not in names):
        raise PromptError(f"tool_choice={choice!r} needs tools that include it (got {names})")
    grammar = StructuredOutput(grammar=tool_call_grammar(tools or [], name))
    return [p.replace(structured=grammar) for p in params]


def _apply_cpu_limits(processor: Processor) -> None:
    vision = processor.vision
    if vision.max_pixels > CPU_MAX_PIXELS:
        processor.vision = replace(vision, max_pixels=max(CPU_MAX_PIXELS, vision.min_pixels))
    if processor.max_video_tokens is None:
        processor.max_video_tokens = CPU_MAX_VIDEO_TOKENS


class LLM:
    """A loaded checkpoint with its tokenizer, chat template and image processor.

    Args:
        model: a checkpoint folder or a Hugging Face model id; None = the bundled demo model.
        dtype: ``auto`` (the checkpoint's), ``float32``, ``bfloat16`` or ``float16``.
        device: where the weights live (``cpu``, ``cuda``...).
        min_pixels, max_pixels: default image pixel limits (per-item options still override them).
        media_policy: limits and permissions for loading images (timeouts, sizes, URL schemes).
        progress: called with (bytes loaded, total bytes) while the weights load.
        engine_config: KV cache budget, batch limits and caches of the engine
            (:class:`~qwenvl.engine.config.EngineConfig`).
        lora: a peft LoRA adapter folder (``qwenvl train --lora``), applied without merging.
        quantization: ``"int8"`` stores the language model's linear weights as int8 with one
            scale per output channel (weight-only; activations stay in ``dtype``), halving the
            bytes a decode step reads again; ``"int4"`` quantises them at load to 4 bits in groups
            of 128 (0.53 bytes a weight). None keeps them in ``dtype``, except on the CPU (below).
            AWQ and GPTQ checkpoints load in their own format without this.
        head_quantization: with ``quantization="int4"``, ``"int8"`` or ``"int4"`` quantises the
            LM head too (default: it stays 16-bit; llama.cpp's Q4 files hold it in 6 bits).
        pack_weights: True stores the language model's linear weights in bf16 under float32
            activations (the CPU decode layout), False never; None decides as below.
        tensor_parallel_size: split the language model over this many processes (GPUs
            ``cuda:0..N-1``, or CPU processes talking over gloo): this process is rank 0 and
            starts the others, or, under ``torchrun``, joins torchrun's ranks (the size must be
            its world size). Call :meth:`shutdown` (or use ``with``) to end them.
        prefill_dtype: ``"bfloat16"`` runs the prefill GEMMs of bf16-packed decoder weights and
            the vision tower's linears (its weights stored in bf16) in bf16: activations and GEMM
            outputs rounded to bf16, about 3x float32's speed on CPUs with AVX512-BF16 or AMX,
            slower elsewhere; on CPUs with AVX512-BF16 the attention of the vision tower and of
            the decoder's prefills runs in bf16 dot products too (``kernels.bf16_attention``).
            ``"float32"`` keeps them exact.
            ``"auto"`` (default): bfloat16 where it pays (bf16-packed weights, one process, a CPU
            with bf16 dot products: ``packed_linear.native_bf16()``), else float32; the choice is
            ``self.prefill_dtype``. Decoding, norms and the residual stream stay float32 either
            way.

    CPU defaults (``dtype="auto"``, a 16-bit checkpoint of at least
    ``qwenvl.models.formats.PACK_MIN_BYTES``, a C++ compiler for our kernels):
    the decoder's linear weights stay bf16 (decoding streams 2 bytes a weight through our GEMV
    kernels) while every activation runs in float32; the prefill GEMMs and the ViT run in bf16
    where the CPU has bf16 dot products (``prefill_dtype``), in float32 elsewhere, which CPUs
    without them compute faster and more exactly than bf16. Pass ``dtype`` to
    choose one dtype for everything instead. Images default to at most ``CPU_MAX_PIXELS`` and
    videos to ``CPU_MAX_VIDEO_TOKENS`` tokens, so a CPU answer stays within about a minute on a
    2B model; ``min_pixels``/``max_pixels`` and per-item options override it.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "cpu",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        media_policy: MediaPolicy | None = None,
        progress: Callable[[int, int], None] | None = None,
        engine_config: EngineConfig | None = None,
        lora: str | Path | None = None,
        quantization: str | None = None,
        pack_weights: bool | None = None,
        head_quantization: str | None = None,
        tensor_parallel_size: int = 1,
        prefill_dtype: str = "auto",
    ) -> None:
        if model is None:  # the bundled demo model: a fresh install answers something real
            from qwenvl import demo

            model = demo.default_model_path()
            if not model.is_dir():
                raise CheckpointError(
                    f"no model given and the demo model is not bundled here ({model}); pass a "
                    "checkpoint folder or Hugging Face id, or train it: python -m qwenvl.demo.train"
                )
        self._name = model
        self.path = resolve_checkpoint(model)
        on_cpu = torch.device(device).type == "cpu"
        dtype, fmt = _weight_plan(
            self.path,
            dtype,
            on_cpu,
            quantization,
            pack_weights,
            lora is not None,
            head_quantization,
        )
        self.prefill_dtype = _prefill_plan(prefill_dtype, fmt, tensor_parallel_size)
        self.workers: Workers | None = None
        runner: Callable[..., ModelRunner] = ModelRunner
        if tensor_parallel_size != 1:
            if lora is not None:
                raise ConfigError("a LoRA adapter cannot be served with tensor parallelism yet")
            engine_config, runner = self._start_ranks(
                tensor_parallel_size, dtype, fmt, device, engine_config, progress
            )
        else:
            self.model, self.config = load_model(
                self.path, dtype=dtype, device=device, progress=progress, weight_format=fmt
            )
        self.weight_format = fmt  # "bf16", "int8", a checkpoint's "awq:w4g128"... or None
        if self.prefill_dtype == "bfloat16":
            from qwenvl.layers.attention import set_attention_dtype
            from qwenvl.layers.packed_linear import set_gemm_dtype

            set_gemm_dtype(self.model, torch.bfloat16)
            set_attention_dtype(self.model, torch.bfloat16)  # the decoder's prefills, the ViT
            _bf16_vision_on_first_call(self.model.visual)
        if lora is not None:  # a peft LoRA adapter folder, served unmerged
            from qwenvl.train.lora import load_adapter

            load_adapter(self.model, lora)
        self.processor = Processor.from_pretrained(
            self.path,
            self.config,
            media_policy=media_policy,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
        )
        if on_cpu and min_pixels is None and max_pixels is None:
            _apply_cpu_limits(self.processor)
        self.tokenizer = self.processor.tokenizer
        gen_path = self.path / "generation_config.json"
        self.generation_config = read_json(gen_path) if gen_path.exists() else {}
        self.default_sampling = SamplingParams.from_generation_config(self.generation_config)
        self.eos_token_ids = self._eos_ids()
        self.engine = LLMEngine(
            self.model, self.tokenizer, self.eos_token_ids, engine_config, runner=runner
        )
        self.max_model_len = self.engine.max_model_len

    def _start_ranks(
        self,
        size: int,
        dtype: str | torch.dtype,
        fmt: str | None,
        device: str | torch.device,
        engine_config: EngineConfig | None,
        progress: Callable[[int, int], None] | None,
    ) -> tuple[EngineConfig, Callable[..., ModelRunner]]:
        """Tensor parallelism (``engine/parallel.py``): start the other ranks, load this rank's
        share; returns the engine settings with the KV blocks all ranks agreed on, and the
        runner that sends each step to them."""
        from qwenvl.checkpoint import load_config
        from qwenvl.engine import parallel
        from qwenvl.models import family_of

        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ConfigError(f"tensor_parallel_size must be a positive int, got {size!r}")
        self.config = load_config(self.path)  # the whole model's; the model holds its share
        family_of(self.config).shard(self.config, 0, size)  # a size that cannot split fails here
        engine_config = engine_config or EngineConfig()
        name = str(self._name)
        load = parallel.Load(
            str(self.path), name, dtype, fmt, torch.device(device).type, engine_config
        )
        group, self.workers = parallel.start(size, load)
        weakref.finalize(self, self.workers.shutdown)
        try:
            self.model, blocks = parallel.load_shard(load, group, progress)
        except BaseException:
            self.workers.shutdown()
            raise
        runner = functools.partial(parallel.ParallelRunner, workers=self.workers)
        return replace(engine_config, num_kv_blocks=blocks), runner

    def warm_up(self) -> float:
        """Do once what a first request would otherwise wait for: build the CPU kernels, and run
        a short text prompt and a small picture through the tokenizer, the vision tower, a
        prefill and two decode steps. Returns the seconds it took. ``qwenvl serve`` calls it
        before it reports ready."""
        import time

        from PIL import Image

        from qwenvl import kernels

        start = time.perf_counter()
        if self.model.device.type == "cpu":
            kernels.available()  # builds the extension on first use (tens of seconds)
        picture = Image.new("RGB", (56, 56), (127, 127, 127))
        warm = [
            [{"role": "user", "content": "Hello."}],
            [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": picture}, {"type": "text", "text": "?"}],
                }
            ],
        ]
        self.chat(warm, SamplingParams(temperature=0, max_tokens=2))
        return time.perf_counter() - start

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (nothing to do at size 1); the LLM cannot generate
        afterwards. Also called on leaving ``with LLM(...) as llm:`` and at exit."""
        if self.workers is not None:
            self.workers.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _eos_ids(self) -> list[int]:
        eos = self.generation_config.get("eos_token_id", list(self.config.eos_token_ids))
        ids = set(eos if isinstance(eos, list) else [eos])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

    # --- public API --------------------------------------------------------------------------
    def chat(
        self,
        messages: Messages | Sequence[Messages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        add_generation_prompt: bool = True,
        add_vision_id: bool = False,
        special_tokens_in_content: bool = False,
    ) -> list[RequestOutput]:
        """Generate a reply for one conversation or a list of them (batched).

        ``tool_choice`` (with ``tools``): ``"auto"`` or None lets the model decide, ``"required"``
        or ``{"type": "function", "function": {"name": ...}}`` constrains the reply to one call
        whose arguments are valid against that tool's ``parameters`` schema.

        Special-token strings in message text (``<|im_end|>``...) are read as plain text, so
        whoever writes a message cannot end its turn or fake another role; only trusted callers
        should set ``special_tokens_in_content=True`` (transformers' behaviour). ``generate``'s raw
        prompts are trusted: their special-token strings are the markers.
        """
        conversations = self._conversations(messages)
        params = _with_tool_choice(
            self._params(sampling_params, len(conversations)), tools, tool_choice
        )
        prompts = self._prepare_chats(
            conversations,
            params,
            tools,
            add_generation_prompt,
            add_vision_id,
            special_tokens_in_content,
        )
        return self._run(prompts, params, tools=tools)

    def generate(
        self,
        prompts: str | dict[str, Any] | Sequence[str | dict[str, Any]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Continue raw prompts. A prompt is a string, or ``{"prompt": str, "multi_modal_data":
        {"image": [...], "video": [...]}}`` with one ``<|image_pad|>`` per image in the text."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = self._params(sampling_params, len(prompts))
        inputs = [
            self._prepare_raw(p, self.prompt_budget(sp.max_tokens))
            for p, sp in zip(prompts, params)
        ]
        return self._run(inputs, params)

    def stream_chat(
        self,
        messages: Messages,
        sampling_params: SamplingParams | None = None,
        *,
        tools: list[dict[str, Any]] | None = None,
        add_vision_id: bool = False,
        special_tokens_in_content: bool = False,
    ) -> Iterator[StreamEvent]:
        """Yield text deltas of one conversation's reply as they are generated (message text is
        plain text, as in :meth:`chat`)."""
        conversations = self._conversations(messages)
        params = self._params(sampling_params, len(conversations))
        prompts = self._prepare_chats(
            conversations, params, tools, True, add_vision_id, special_tokens_in_content
        )
        yield from self._generator(prompts, params)

    # --- internals ---------------------------------------------------------------------------
    def prompt_budget(self, max_tokens: int | None) -> int:
        """The most tokens a prompt may take so that ``max_tokens`` still fit after it.

        Raises:
            ContextLengthError: ``max_tokens`` leaves no room for any prompt.
        """
        wanted = max(1, max_tokens or 1)
        room = self.engine.max_prompt_tokens + 1  # context or KV capacity, whichever is smaller
        if wanted >= room:
            raise ContextLengthError(
                f"max_tokens={max_tokens} leaves no room for a prompt: the context holds "
                f"{self.max_model_len} tokens and the KV cache {self.engine.kv_capacity_tokens}"
            )
        return room - wanted

    @staticmethod
    def _conversations(messages: Any) -> list[Messages]:
        if not isinstance(messages, (list, tuple)) or not messages:
            raise PromptError("messages must be a non-empty list of messages (or of conversations)")
        return [messages] if isinstance(messages[0], dict) else list(messages)

    def _prepare_chats(
        self,
        conversations: list[Messages],
        params: list[SamplingParams],
        tools: Any,
        add_generation_prompt: bool,
        add_vision_id: bool,
        special_tokens_in_content: bool = False,
    ) -> list[PromptInputs]:
        """Conversations -> prompts; each is sized from its media headers against the context
        (minus its ``max_tokens``) before any pixel is decoded."""
        prompts = []
        for i, (conv, p) in enumerate(zip(conversations, params)):
            try:
                prompts.append(
                    self.processor.prepare_chat(
                        conv,
                        tools=tools,
                        add_generation_prompt=add_generation_prompt,
                        add_vision_id=add_vision_id,
                        max_prompt_tokens=self.prompt_budget(p.max_tokens),
                        special_tokens_in_content=special_tokens_in_content,
                    )
                )
            except PromptError as e:
                if len(conversations) > 1:
                    raise PromptError(f"conversation {i}: {e}") from e
                raise
        return prompts

    def _prepare_raw(self, prompt: str | dict[str, Any], budget: int) -> PromptInputs:
        if isinstance(prompt, str):
            return self.processor.prepare_media(prompt, [], max_prompt_tokens=budget)
        if not isinstance(prompt, dict) or not isinstance(prompt.get("prompt"), str):
            raise PromptError("a prompt must be a string or a dict with a 'prompt' string")
        data = prompt.get("multi_modal_data") or {}
        images = data.get("image", [])
        videos = data.get("video", [])
        images = images if isinstance(images, list) else [images]
        videos = (
            videos
            if isinstance(videos, list) and videos and isinstance(videos[0], list)
            else ([videos] if videos else [])
        )
        items = [MediaItem("image", im, {}, f"image {k}") for k, im in enumerate(images)]
        items += [MediaItem("video", v, {}, f"video {k}") for k, v in enumerate(videos)]
        return self.processor.prepare_media(prompt["prompt"], items, max_prompt_tokens=budget)

    def _params(
        self, sampling_params: SamplingParams | Sequence[SamplingParams] | None, n: int
    ) -> list[SamplingParams]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            p = (sampling_params or SamplingParams()).merged_with_defaults(self.default_sampling)
            return [p] * n
        params = list(sampling_params)
        if len(params) != n:
            raise PromptError(f"{len(params)} SamplingParams for {n} prompts")
        return [p.merged_with_defaults(self.default_sampling) for p in params]

    def _add(self, prompts: list[PromptInputs], params: list[SamplingParams]) -> list[str]:
        """Queue every prompt or none: a request that cannot fit aborts those already added."""
        ids: list[str] = []
        try:
            for i, (p, sp) in enumerate(zip(prompts, params)):
                try:
                    ids.append(self.engine.add_request(p, sp))
                except PromptError as e:
                    raise PromptError(f"prompt {i}: {e}" if len(prompts) > 1 else str(e)) from e
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)
                self.engine.pop_finished(rid)
            raise
        return ids

    def _events(self, ids: list[str]) -> Iterator[StreamEvent]:
        """Step the engine until the given requests finish, yielding their events; closing the
        iterator early aborts whatever is still running."""
        waiting = set(ids)
        try:
            while waiting & self.engine.requests.keys():
                for event in self.engine.step():
                    if event.request_id in waiting:
                        yield event
        finally:
            for rid in ids:
                self.engine.abort(rid)

    def _generator(
        self, prompts: list[PromptInputs], sampling_params: Any
    ) -> Iterator[StreamEvent]:
        ids = self._add(prompts, sampling_params)
        try:
            yield from self._events(ids)
        finally:
            for rid in ids:
                self.engine.pop_finished(rid)

    def _run(
        self, prompts: list[PromptInputs], sampling_params: Any, tools: Any = None
    ) -> list[RequestOutput]:
        ids = self._add(prompts, sampling_params)
        for _ in self._events(ids):
            pass
        outputs = []
        for rid, p in zip(ids, prompts):
            req = self.engine.pop_finished(rid)
            assert req is not None
            completions = req.outputs()
            attach_tool_calls(completions, tools)
            outputs.append(
                RequestOutput(
                    request_id=rid,
                    prompt=p.text,
                    prompt_token_ids=p.token_ids,
                    outputs=completions,
                    images=p.image_geometries,
                    family=self.config.family,
                )
            )
        return outputs
