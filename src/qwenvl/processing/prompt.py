"""From chat messages (or a raw prompt plus media) to model inputs.

The chat template emits one ``<|image_pad|>`` / ``<|video_pad|>`` per item; after tokenising, each
is expanded to the item's number of merged tokens, and the M-RoPE positions are computed once, here,
on the CPU. Content items are accepted in the qwen-vl-utils form (``{"type": "image", "image":
...}``) and in the OpenAI form (``{"type": "image_url", "image_url": {"url": ...}}``), with per-item
``min_pixels``, ``max_pixels``, ``resized_height`` and ``resized_width``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from qwenvl.errors import ContextLengthError, MediaError, PromptError
from qwenvl.models import ModelConfig, family_of
from qwenvl.processing.chat_template import (
    RenderedChat,
    load_chat_template,
    render_chat,
    render_chat_marked,
)
from qwenvl.processing.image import (
    VIDEO_MIN_PIXELS,
    ImageGeometry,
    ProcessedImage,
    ProcessedVideo,
    VisionPreprocessConfig,
    image_geometry,
    preprocess_image,
)
from qwenvl.processing.media import OpenedImage, image_size, load_image, open_image
from qwenvl.processing.policy import MediaPolicy
from qwenvl.processing.video import VideoSampling, load_video, plan_from_header
from qwenvl.tokenizer import Tokenizer

IMAGE_OPTIONS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
VIDEO_OPTIONS = tuple(f.name for f in fields(VideoSampling))


@dataclass
class PromptInputs:
    """One prompt, ready for the model: token ids with expanded placeholders, pixels, positions."""

    token_ids: list[int]
    images: list[ProcessedImage] = field(default_factory=list)
    videos: list[ProcessedVideo] = field(default_factory=list)
    positions: torch.Tensor | None = None  # [3, L] int64
    rope_delta: int = 0
    text: str | None = None

    @property
    def image_geometries(self) -> list[ImageGeometry]:
        return [im.geometry for im in self.images]


@dataclass
class MediaItem:
    """One image or video of a prompt, not loaded yet: its source and per-item options."""

    kind: str  # "image" or "video"
    source: Any
    options: dict[str, Any] = field(default_factory=dict)
    where: str = ""  # for error messages, e.g. "messages[0].content[1]"


def _is_image_item(item: dict[str, Any]) -> bool:
    return item.get("type") in ("image", "image_url") or "image" in item or "image_url" in item


def _is_video_item(item: dict[str, Any]) -> bool:
    return item.get("type") in ("video", "video_url") or "video" in item or "video_url" in item


def _source_and_options(item: dict[str, Any], kind: str, names: Sequence[str]) -> tuple[Any, dict]:
    """The media payload of a content item and its per-item options (top level or in the url
    dict).
    """
    options = {k: item[k] for k in names if item.get(k) is not None}
    payload = item.get(kind)
    if payload is None:
        url_part = item.get(f"{kind}_url")
        if isinstance(url_part, dict):
            options.update({k: url_part[k] for k in names if url_part.get(k) is not None})
            payload = url_part.get("url")
        else:
            payload = url_part
    if payload is None:
        raise PromptError(f"{kind} item has no {kind} data: {sorted(item)}")
    return payload, options


class Processor:
    """Tokenizer + chat template + image preprocessing for one checkpoint."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str | None,
        vision: VisionPreprocessConfig,
        config: ModelConfig,
        media_policy: MediaPolicy | None = None,
        max_video_tokens: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.vision = vision
        self.config = config
        self.family = family_of(config)
        self.media_policy = media_policy or MediaPolicy()
        # token budget of a video item that sets none itself (None = unlimited)
        self.max_video_tokens = max_video_tokens

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        config: ModelConfig,
        *,
        media_policy: MediaPolicy | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> Processor:
        folder = Path(folder)
        from qwenvl.checkpoint import read_json

        pre = folder / "preprocessor_config.json"
        vision = (
            VisionPreprocessConfig.from_dict(read_json(pre), str(pre)) if pre.exists() else None
        )
        vision = vision or family_of(config).preprocess_defaults()
        if min_pixels is not None or max_pixels is not None:
            from dataclasses import replace

            vision = replace(
                vision,
                min_pixels=min_pixels if min_pixels is not None else vision.min_pixels,
                max_pixels=max_pixels if max_pixels is not None else vision.max_pixels,
            )
        try:
            template = load_chat_template(folder)
        except Exception:  # a base checkpoint may have no template; chat() then explains
            template = None
        return cls(Tokenizer.from_dir(folder), template, vision, config, media_policy)

    # --- media -----------------------------------------------------------------------------
    def process_image(self, source: Any, **options: Any) -> ProcessedImage:
        image = load_image(source, self.media_policy)
        return preprocess_image(image, self.vision, **options)

    def process_video(
        self, source: Any, *, max_video_tokens: int | None = None, **options: Any
    ) -> ProcessedVideo:
        """A video file, URL, data URI, bytes or list of frames, sampled as qwen-vl-utils does.

        ``options`` are per-item ``VIDEO_OPTIONS``. ``max_video_tokens`` caps the video's tokens
        (e.g. the context left); the smaller of it and ``self.max_video_tokens`` applies.
        ``video.metadata.plan`` says what was chosen.

        Raises:
            MediaError: bad source or options, or a video that cannot fit the budget.
        """
        return self._process_video_item(source, options, max_video_tokens)

    def _process_video_item(
        self, source: Any, options: dict[str, Any], cap: int | None
    ) -> ProcessedVideo:
        """The item's own ``max_video_tokens`` (else ``self.max_video_tokens``), capped by
        ``cap``."""
        opts = self._video_sampling(options, cap)
        video, meta = load_video(source, opts, self.vision, self.media_policy)
        video.metadata = meta
        return video

    def _video_sampling(self, options: dict[str, Any], cap: int | None) -> VideoSampling:
        options = dict(options)
        if options.get("max_pixels") is not None and options.get("min_pixels") is None:
            # a caller who only lowers max_pixels means "smaller frames", not a contradiction
            options["min_pixels"] = min(VIDEO_MIN_PIXELS, options["max_pixels"])
        opts = VideoSampling.from_item(options)
        budget = self.max_video_tokens if opts.max_video_tokens is None else opts.max_video_tokens
        given = [b for b in (budget, cap) if b is not None]
        return replace(opts, max_video_tokens=min(given) if given else None)

    def media_tokens(
        self,
        messages: list[dict[str, Any]],
        size_of: Callable[[Any], tuple[int, int]] | None = None,
    ) -> tuple[list[int], list[int]]:
        """The ``<|image_pad|>`` and ``<|video_pad|>`` counts of each image and video of the
        messages, from headers only (nothing decoded): what :meth:`prepare_chat` will expand
        them to, with no prompt budget. Training sizes and packs samples with it.

        ``size_of(source)`` reads a picture's (or listed video frame's) size; by default
        ``image_size(source, self.media_policy)``, which equals ``open_image(...).size``. The
        training index passes one that remembers the pictures it has read.

        Raises:
            MediaError, PromptError: an unreadable or refused item, named by its place.
        """
        size_of = size_of or (lambda source: image_size(source, self.media_policy))
        images, videos = [], []
        for item in _media_items(messages):
            try:
                if item.kind == "image":
                    geometry = image_geometry(*size_of(item.source), self.vision, **item.options)
                    self._check_resized(geometry)
                    images.append(geometry.num_tokens)
                else:
                    opts = self._video_sampling(item.options, None)
                    plan = plan_from_header(
                        item.source, opts, self.vision, self.media_policy, size_of
                    )
                    videos.append(plan.num_tokens)
            except (MediaError, PromptError) as e:
                raise type(e)(f"{item.where}: {e}") from e
        return images, videos

    # --- prompts -----------------------------------------------------------------------------
    def _template(self) -> str:
        if self.chat_template is None:
            raise PromptError(
                "this checkpoint has no chat template; use generate() with a raw prompt"
            )
        return self.chat_template

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        add_vision_id: bool = False,
    ) -> str:
        return render_chat(
            self._template(),
            _strip_payloads(messages),
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            add_vision_id=add_vision_id,
        )

    def render_marked(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        add_vision_id: bool = False,
    ) -> RenderedChat:
        """`render`, with the spans of the template's own special tokens (see
        `render_chat_marked`): what `encode_chat` needs to keep message text plain."""
        return render_chat_marked(
            self._template(),
            _strip_payloads(messages),
            self.tokenizer.special_tokens,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            add_vision_id=add_vision_id,
        )

    def encode_chat(
        self,
        chat: RenderedChat,
        *,
        special_tokens_in_content: bool = False,
        limit: int | None = None,
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets of a rendered chat: the template's markers are special
        tokens, message text is plain text unless ``special_tokens_in_content`` (trusted callers
        only: a user could then end their turn and write a system turn)."""
        control = None if special_tokens_in_content else chat.control
        return self.tokenizer.encode_marked(chat.text, control, limit=limit)

    def prepare_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        add_vision_id: bool = False,
        max_video_tokens: int | None = None,
        max_prompt_tokens: int | None = None,
        special_tokens_in_content: bool = False,
    ) -> PromptInputs:
        """Messages -> PromptInputs. Media are loaded and preprocessed in message order.

        ``max_video_tokens`` caps each video (e.g. the context left); a video item's own
        ``max_video_tokens`` (else ``self.max_video_tokens``) applies when smaller.
        ``max_prompt_tokens`` is the most the whole prompt may take (see :meth:`prepare_media`).
        Special-token strings in message text are plain text (see :meth:`encode_chat`).
        """
        chat = self.render_marked(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            add_vision_id=add_vision_id,
        )
        ids, _ = self.encode_chat(
            chat, special_tokens_in_content=special_tokens_in_content, limit=max_prompt_tokens
        )
        return self.prepare_media(
            chat.text,
            _media_items(messages),
            max_video_tokens=max_video_tokens,
            max_prompt_tokens=max_prompt_tokens,
            token_ids=ids,
        )

    def prepare_media(
        self,
        text: str,
        items: Sequence[MediaItem],
        *,
        max_video_tokens: int | None = None,
        max_prompt_tokens: int | None = None,
        token_ids: list[int] | None = None,
    ) -> PromptInputs:
        """A prompt text plus its media items (in order) -> PromptInputs, sized before decoding.

        ``token_ids`` are the text's ids when the caller encoded it (a chat, whose message text
        must stay plain); otherwise the text is a trusted raw prompt and its special-token
        strings are parsed. A text that surely needs more than ``max_prompt_tokens`` is refused
        without being tokenized whole.

        Image headers are read first and the prompt's tokens counted (text + every image); when
        that exceeds ``max_prompt_tokens`` the request is refused with the numbers before any pixel
        is decoded. Videos then share what is left: each one's sampling plan is fitted to it (or
        refused) from the container header, before frames are decoded.
        """
        if token_ids is None:
            token_ids, _ = self.tokenizer.encode_marked(text, limit=max_prompt_tokens)
        ids = token_ids
        cfg = self.config
        n_text = len(ids) - ids.count(cfg.image_token_id) - ids.count(cfg.video_token_id)
        opened: list[tuple[MediaItem, OpenedImage, ImageGeometry]] = []
        for item in items:
            if item.kind != "image":
                continue
            try:
                op = open_image(item.source, self.media_policy)
                geometry = image_geometry(*op.size, self.vision, **item.options)
                self._check_resized(geometry)
            except (MediaError, PromptError) as e:
                raise type(e)(f"{item.where}: {e}") from e
            opened.append((item, op, geometry))
        image_tokens = [g.num_tokens for _, _, g in opened]
        left = None
        if max_prompt_tokens is not None:
            need = n_text + sum(image_tokens)
            if need > max_prompt_tokens:
                detail = f"{n_text} text" + "".join(
                    f" + {t} for {it.where or f'image {k}'}"
                    for k, ((it, _, _), t) in enumerate(zip(opened, image_tokens))
                )
                raise ContextLengthError(
                    f"the prompt needs {need} tokens ({detail}) but the context has room for at "
                    f"most {max_prompt_tokens} (over by {need - max_prompt_tokens}); shorten it, "
                    "lower max_pixels or send fewer or smaller images"
                )
            left = max_prompt_tokens - need
        images = []
        for item, op, _ in opened:
            try:
                images.append(
                    preprocess_image(op.load(self.media_policy), self.vision, **item.options)
                )
            except (MediaError, PromptError) as e:
                raise type(e)(f"{item.where}: {e}") from e
        videos = []
        for item in items:
            if item.kind != "video":
                continue
            caps = [c for c in (max_video_tokens, left) if c is not None]
            try:
                if left is not None and left < 1:
                    raise ContextLengthError(
                        f"no tokens are left for this video: text and images take "
                        f"{max_prompt_tokens - left} of the {max_prompt_tokens} that fit"
                    )
                video = self._process_video_item(
                    item.source, item.options, min(caps) if caps else None
                )
            except (MediaError, PromptError) as e:
                raise type(e)(f"{item.where}: {e}") from e
            videos.append(video)
            if left is not None:
                left -= video.num_tokens
        return self.prepare_text(text, images, videos, token_ids=ids)

    def _check_resized(self, geometry: ImageGeometry) -> None:
        """Per-item options (``min_pixels``, ``resized_height``...) may not grow an image past
        the policy's pixel limit: they are bounded like the image's own size."""
        self.media_policy.check_pixels(
            geometry.resized_width,
            geometry.resized_height,
            "the options resize the image to",
            "; lower min_pixels or resized_height/width",
        )

    def prepare_text(
        self,
        text: str,
        images: Sequence[ProcessedImage] = (),
        videos: Sequence[ProcessedVideo] = (),
        *,
        token_ids: list[int] | None = None,
    ) -> PromptInputs:
        """A raw prompt with one ``<|image_pad|>``/``<|video_pad|>`` per item -> PromptInputs.

        ``token_ids``: the text's ids if already encoded (see :meth:`prepare_media`).
        """
        ids = self.tokenizer.encode(text) if token_ids is None else token_ids
        cfg = self.config
        token_ids = _expand(ids, cfg.image_token_id, [im.num_tokens for im in images], "image")
        token_ids = _expand(token_ids, cfg.video_token_id, [v.num_tokens for v in videos], "video")
        positions, delta = self.family.positions(
            cfg,
            token_ids,
            [im.grid_thw for im in images],
            [v.grid_thw for v in videos],
            [v.second_per_grid_t for v in videos],
        )
        return PromptInputs(token_ids, list(images), list(videos), positions, delta, text)


def _media_items(messages: list[dict[str, Any]]) -> list[MediaItem]:
    """The image and video items of the messages, in order, with their options."""
    items: list[MediaItem] = []
    for mi, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for ci, item in enumerate(content):
            where = f"messages[{mi}].content[{ci}]"
            try:
                if _is_image_item(item):
                    source, opts = _source_and_options(item, "image", IMAGE_OPTIONS)
                    items.append(MediaItem("image", source, opts, where))
                elif _is_video_item(item):
                    source, opts = _source_and_options(item, "video", VIDEO_OPTIONS)
                    items.append(MediaItem("video", source, opts, where))
            except (MediaError, PromptError) as e:
                raise type(e)(f"{where}: {e}") from e
    return items


def _expand(ids: list[int], token_id: int, counts: list[int], kind: str) -> list[int]:
    """Replace the k-th placeholder by ``counts[k]`` copies of it."""
    found = ids.count(token_id)
    if found != len(counts):
        raise PromptError(
            f"the prompt has {found} {kind} placeholder(s) but {len(counts)} {kind}(s)"
        )
    if not counts:
        return ids
    out: list[int] = []
    k = 0
    for t in ids:
        if t == token_id:
            out.extend([t] * counts[k])
            k += 1
        else:
            out.append(t)
    return out


def _strip_payloads(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the messages whose media items carry no pixels (the template only needs the
    kind).
    """
    if not isinstance(messages, list):
        raise PromptError("messages must be a list of {'role': ..., 'content': ...} dicts")
    out = []
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            items = []
            for item in m["content"]:
                if isinstance(item, dict) and _is_image_item(item):
                    items.append({"type": "image", "image": "<image>"})
                elif isinstance(item, dict) and _is_video_item(item):
                    items.append({"type": "video", "video": "<video>"})
                else:
                    items.append(item)
            m = {**m, "content": items}
        out.append(m)
    return out
