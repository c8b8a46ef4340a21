"""Pieces of OpenAI response bodies shared by chat and completions, streamed or not: ids and
heads, usage, logprobs, tool calls, and the ``qwenvl`` extension (what the model saw, grounding).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

from qwenvl.grounding import ground
from qwenvl.processing.prompt import PromptInputs
from qwenvl.server.errors import APIError
from qwenvl.server.state import ServerState
from qwenvl.server.tool_parser import ToolCallStream
from qwenvl.tool_calls import extract_tool_calls

logger = logging.getLogger(__name__)


def head(state: ServerState, id_: str, object_: str) -> dict[str, Any]:
    """The fields every response body and every chunk of a stream starts with."""
    return {
        "id": id_,
        "object": object_,
        "created": int(time.time()),
        "model": state.settings.served_model_name,
    }


def usage(prompt: PromptInputs, completion_tokens: int) -> dict[str, int]:
    """OpenAI's token counts (the prompt's include its image and video tokens)."""
    n = len(prompt.token_ids)
    return {
        "prompt_tokens": n,
        "completion_tokens": completion_tokens,
        "total_tokens": n + completion_tokens,
    }


# --- logprobs --------------------------------------------------------------------------------
def logprobs_content(
    state: ServerState, token_ids: list[int], logprobs: list[dict[int, float]], top: int
) -> list[dict[str, Any]]:
    """Chat's logprobs: each token with its ``top`` alternatives (-inf clamped to -9999, which
    JSON can hold)."""
    tok = state.llm.tokenizer

    def entry(tid: int, lp: float) -> dict[str, Any]:
        text = tok.decode([tid])
        return {"token": text, "logprob": max(lp, -9999.0), "bytes": list(text.encode())}

    out = []
    for tid, lps in zip(token_ids, logprobs):
        e = entry(tid, lps.get(tid, float("-inf")))
        ranked = sorted(lps.items(), key=lambda kv: -kv[1])[:top]
        e["top_logprobs"] = [entry(t, lp) for t, lp in ranked]
        out.append(e)
    return out


def completion_logprobs(
    state: ServerState, token_ids: list[int], logprobs: list[dict[int, float]], top: int
) -> dict[str, Any]:
    """The same numbers in the legacy completions layout (parallel lists and text offsets)."""
    content = logprobs_content(state, token_ids, logprobs, top)
    offsets, pos = [], 0
    for c in content:
        offsets.append(pos)
        pos += len(c["token"])
    return {
        "tokens": [c["token"] for c in content],
        "token_logprobs": [c["logprob"] for c in content],
        "top_logprobs": [{t["token"]: t["logprob"] for t in c["top_logprobs"]} for c in content],
        "text_offset": offsets,
    }


# --- tool calls ------------------------------------------------------------------------------
def message_of(text: str, tools_on: bool) -> tuple[dict[str, Any], bool]:
    """The assistant message of one choice, and whether it holds tool calls."""
    if not tools_on:
        return {"role": "assistant", "content": text, "tool_calls": []}, False
    content, calls = extract_tool_calls(text)
    if not calls:
        return {"role": "assistant", "content": text, "tool_calls": []}, False
    return {
        "role": "assistant",
        "content": content,
        "tool_calls": [c.to_openai() for c in calls],
    }, True


def tool_deltas(stream: ToolCallStream, calls: list) -> list[dict[str, Any]]:
    """``calls`` (the stream's newest) as chunk deltas, indexed among all of its calls."""
    first = len(stream.calls) - len(calls)
    return [{"index": first + k, **c.to_openai()} for k, c in enumerate(calls)]


# --- the qwenvl extension --------------------------------------------------------------------
def seen(prompt: PromptInputs) -> dict[str, Any]:
    """The ``qwenvl`` extension: what the model saw of each image and video."""
    images = [
        {
            "original_width": g.original_width,
            "original_height": g.original_height,
            "resized_width": g.resized_width,
            "resized_height": g.resized_height,
            "tokens": g.num_tokens,
        }
        for g in prompt.image_geometries
    ]
    videos = []
    for v in prompt.videos:
        meta = v.metadata
        item: dict[str, Any] = {
            "original_width": v.original_width,
            "original_height": v.original_height,
            "resized_width": v.resized_width,
            "resized_height": v.resized_height,
            "frames": v.num_frames,
            "tokens": v.num_tokens,
        }
        if meta is not None:
            item.update(
                timestamps=[round(t, 3) for t in meta.timestamps],
                frame_indices=list(meta.frame_indices),
                source_fps=meta.fps,
                sample_fps=meta.sample_fps,
                duration=meta.duration,
            )
        videos.append(item)
    return {"images": images, "videos": videos}


def grounding_of(text: str, prompt: PromptInputs, image: int, family: str) -> list[dict]:
    """The boxes and points in ``text``, in the original pixels of image ``image`` (400 when the
    request has no such image; a reply that does not parse grounds nothing)."""
    if image >= len(prompt.images):
        raise APIError(
            400,
            f"qwenvl.grounding_image={image} but the request has {len(prompt.images)} image(s)",
            param="qwenvl.grounding_image",
        )
    out = []
    try:
        objects = ground(text, prompt.images[image].geometry, family)
    except Exception as e:  # the reply is model output: never let it fail the request
        logger.warning("grounding parse failed: %r", e)
        objects = []
    for obj in objects:
        d = asdict(obj)
        d["kind"] = type(obj).__name__.lower()
        out.append(d)
    return out
