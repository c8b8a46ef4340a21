"""LLMEngine: requests in, streamed tokens out, over one paged KV cache.

``add_request`` checks that a request can ever fit (context and KV budget) and queues its
sequences; ``step`` schedules a mix of prefill chunks and decodes, runs the model once and
returns the text deltas; ``abort`` stops a request and returns its blocks. Finished requests are
kept until their owner collects them with ``pop_finished``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from collections.abc import Sequence as Seq
from concurrent.futures import ThreadPoolExecutor

from qwenvl.engine.block_manager import BlockManager
from qwenvl.engine.config import EngineConfig
from qwenvl.engine.encoder_cache import EncoderCache
from qwenvl.engine.grammar import Grammars, compute_masks
from qwenvl.engine.kv_cache import PagedKVCache, kv_blocks_for, kv_bytes_per_block
from qwenvl.engine.model_runner import ModelRunner, sample_next
from qwenvl.engine.request import Request, Sequence, Status, vision_items
from qwenvl.engine.scheduler import Scheduler
from qwenvl.errors import PromptError
from qwenvl.models import VLModel, family_of
from qwenvl.outputs import StreamEvent
from qwenvl.processing.prompt import PromptInputs
from qwenvl.sampling import SamplingParams
from qwenvl.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(
        self,
        model: VLModel,
        tokenizer: Tokenizer,
        eos_token_ids: Seq[int],
        config: EngineConfig | None = None,
        runner: Callable[..., ModelRunner] = ModelRunner,
    ) -> None:
        """``runner``: builds the model runner from (model, kv, encoder cache); tensor
        parallelism passes one that sends each step to the other ranks."""
        self.config = config = config or EngineConfig()
        self.model = model
        self.tokenizer = tokenizer
        self.eos = set(eos_token_ids)
        family = family_of(model.config)
        self.max_model_len = config.max_model_len or family.max_model_len(model.config)
        shape = family.kv_shape(model.config)
        per_block = kv_bytes_per_block(shape, config.block_size, model.dtype)
        num_blocks = config.num_kv_blocks or kv_blocks_for(
            config, self.max_model_len, per_block, model.device
        )
        self.kv = PagedKVCache(shape, num_blocks, config.block_size, model.dtype, model.device)
        logger.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB)",
            num_blocks,
            config.block_size,
            self.kv.nbytes / 2**20,
        )
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.encoder_cache = EncoderCache(config.encoder_cache_memory)
        self.runner = runner(model, self.kv, self.encoder_cache)
        self.grammars = Grammars(tokenizer, eos_token_ids)
        self._masks = ThreadPoolExecutor(1, thread_name_prefix="qwenvl-grammar")
        self.requests: dict[str, Request] = {}
        self.finished: dict[str, Request] = {}
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self.num_steps = 0

    # --- capacity ----------------------------------------------------------------------------
    @property
    def kv_capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.config.block_size

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt that can still generate one token (context and KV budget)."""
        return min(self.max_model_len, self.kv_capacity_tokens) - 1

    # --- requests ----------------------------------------------------------------------------
    def add_request(
        self,
        prompt: PromptInputs,
        params: SamplingParams,
        request_id: str | None = None,
    ) -> str:
        """Queue a prompt; raises ``PromptError`` (with the numbers) when it can never fit."""
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.requests or request_id in self.finished:
            raise PromptError(f"request id {request_id!r} is already in use")
        n_prompt = len(prompt.token_ids)
        if n_prompt == 0:
            raise PromptError("the prompt is empty")
        if prompt.positions is None or prompt.positions.shape[-1] != n_prompt:
            raise PromptError("the prompt has no M-RoPE positions for its tokens")
        room = self.max_model_len - n_prompt
        if room < 1:
            raise PromptError(
                f"the prompt has {n_prompt} tokens: no room is left in the model's context of "
                f"{self.max_model_len} tokens"
            )
        max_new = room if params.max_tokens is None else params.max_tokens
        if max_new > room:
            raise PromptError(
                f"the prompt has {n_prompt} tokens and asks for max_tokens={params.max_tokens}, "
                f"but the context holds {self.max_model_len} (at most {room} new tokens fit)"
            )
        if n_prompt + max_new > self.kv_capacity_tokens:
            raise PromptError(
                f"the prompt has {n_prompt} tokens and asks for up to {max_new} more, but the KV "
                f"cache holds {self.kv_capacity_tokens} tokens in all; lower max_tokens or the "
                "image/video sizes, or give the engine more KV memory"
            )
        cfg = self.model.config
        items = vision_items(prompt, cfg.image_token_id, cfg.video_token_id)
        req = Request(request_id, prompt, params, items, next(self._arrivals))
        req.sequences = [Sequence.create(req, i, self.tokenizer, max_new) for i in range(params.n)]
        if params.structured is not None:  # compiled once per distinct constraint
            for seq in req.sequences:
                seq.grammar = self.grammars.matcher(params.structured)
        self.requests[request_id] = req
        for seq in req.sequences:
            self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> list[StreamEvent]:
        """Stop a request now; its blocks return to the pool. Unknown ids are ignored."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return []
        events = []
        for seq in req.sequences:
            if seq.status is not Status.FINISHED:
                self.scheduler.finish(seq)
                events.append(seq.abort())
        self.finished[request_id] = req
        return events

    def pop_finished(self, request_id: str) -> Request | None:
        return self.finished.pop(request_id, None)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # --- the loop ----------------------------------------------------------------------------
    def step(self) -> list[StreamEvent]:
        sched = self.scheduler.schedule()
        if not sched.chunks:
            if self.scheduler.has_work:  # admission guarantees a lone sequence always fits
                raise RuntimeError("the scheduler made no progress (KV cache accounting bug)")
            return []
        self.num_steps += 1
        tables = [self.blocks.block_table(c.seq.seq_id) for c in sched.chunks]
        sampling = [c.seq for c in sched.chunks if c.samples]
        constrained = [k for k, s in enumerate(sampling) if s.grammar is not None]
        masks = None
        if constrained:  # the masks are computed (GIL released) while the model step runs
            masks = self._masks.submit(compute_masks, [sampling[k].grammar for k in constrained])
        logits = self.runner.run(sched.chunks, tables)
        bs = self.config.block_size
        for c in sched.chunks:
            seq = c.seq
            before = seq.num_computed
            seq.num_computed = c.start + c.length
            if self.config.enable_prefix_caching and seq.num_computed // bs > before // bs:
                self.blocks.mark_computed(
                    seq.seq_id, seq.all_ids[: seq.num_computed], seq.request.spans
                )
        events: list[StreamEvent] = []
        if sampling:
            grammar = None if masks is None else (constrained, masks.result())
            next_ids = sample_next(sampling, logits, self.eos, grammar).tolist()
            for seq, token in zip(sampling, next_ids):
                event = seq.append(int(token), self.eos)
                if event is not None:
                    events.append(event)
                if seq.finish_reason is not None:
                    self.scheduler.finish(seq)
                    self._maybe_finish(seq.request)
        return events

    def _maybe_finish(self, req: Request) -> None:
        if req.finished and req.request_id in self.requests:
            del self.requests[req.request_id]
            req.features.clear()
            self.finished[req.request_id] = req

    # --- introspection -----------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, int]:
        return {
            "steps": self.num_steps,
            "vit_items": self.runner.vit_items,
            "encoder_cache_hits": self.encoder_cache.hits,
            "encoder_cache_misses": self.encoder_cache.misses,
            "prefix_cache_queries": self.blocks.stats.get("prefix_queries", 0),
            "prefix_cache_hits": self.blocks.stats.get("prefix_hits", 0),
            "preemptions": self.scheduler.num_preemptions,
            "free_blocks": self.blocks.num_free_blocks,
            "num_blocks": self.blocks.num_blocks,
        }
