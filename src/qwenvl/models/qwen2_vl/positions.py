"""M-RoPE position ids (streams T, H, W) for one unpadded token sequence. Pure; runs on the CPU.

Text tokens advance all three streams together. A vision item of merged grid ``(lt, lh, lw)`` placed
at ``cur`` gets ``T = cur + trunc(ti * interval)``, ``H = cur + hi``, ``W = cur + wi``; ``interval``
is 1 except for Qwen2.5-VL videos, where it is ``second_per_grid_t * tokens_per_second`` so the time
axis counts absolute seconds. Text after an item continues at the item's largest position + 1: the
rule the released models were trained with (and vLLM's). transformers >= 5.3 continues at ``cur +
max(lh, lw)`` instead (the parity tests reproduce that rule on their side to compare).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qwenvl.errors import PromptError

Grid = tuple[int, int, int]


def get_mrope_positions(
    token_ids: Sequence[int],
    *,
    image_token_id: int,
    video_token_id: int,
    image_grids: Sequence[Grid] = (),
    video_grids: Sequence[Grid] = (),
    second_per_grid_ts: Sequence[float] | None = None,
    tokens_per_second: float | None = None,
    spatial_merge_size: int = 2,
) -> tuple[torch.Tensor, int]:
    """Positions ``[3, L]`` (int64) and ``delta`` such that decode step ``k`` sits at ``L + k +
    delta``.

    ``second_per_grid_ts``/``tokens_per_second`` are given for Qwen2.5-VL only (time-aligned
    videos). Placeholder runs must match the grids exactly; a mismatch is a PromptError.
    """
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    n = len(ids)
    out = torch.empty(3, n, dtype=torch.long)
    images, videos = iter(image_grids), iter(video_grids)
    seconds = iter(second_per_grid_ts) if second_per_grid_ts is not None else None
    is_vision = (ids == image_token_id) | (ids == video_token_id)
    cur = i = 0
    while i < n:
        if not is_vision[i]:
            j = i
            while j < n and not is_vision[j]:
                j += 1
            out[:, i:j] = torch.arange(cur, cur + j - i)
            cur += j - i
            i = j
            continue
        is_video = int(ids[i]) == video_token_id
        try:
            t, h, w = next(videos if is_video else images)
        except StopIteration:
            kind = "video" if is_video else "image"
            raise PromptError(
                f"more {kind} placeholders in the prompt than {kind}s given"
            ) from None
        lt, lh, lw = t, h // spatial_merge_size, w // spatial_merge_size
        count = lt * lh * lw
        if i + count > n or not bool((ids[i : i + count] == ids[i]).all()):
            raise PromptError(f"placeholder run at token {i} does not match grid {(t, h, w)}")
        interval = torch.tensor(1.0)
        if is_video and seconds is not None:
            if tokens_per_second is None:
                raise ValueError("tokens_per_second is required with second_per_grid_ts")
            interval = torch.tensor(float(next(seconds)), dtype=torch.float32) * tokens_per_second
        tpos = (torch.arange(lt) * interval).long()
        block = torch.stack(
            [
                tpos.view(lt, 1, 1).expand(lt, lh, lw),
                torch.arange(lh).view(1, lh, 1).expand(lt, lh, lw),
                torch.arange(lw).view(1, 1, lw).expand(lt, lh, lw),
            ]
        ).reshape(3, count)
        out[:, i : i + count] = block + cur
        cur = int(out[:, i : i + count].max()) + 1
        i += count
    for it, kind in ((images, "image"), (videos, "video")):
        if next(it, None) is not None:
            raise PromptError(f"more {kind}s given than {kind} placeholders in the prompt")
    delta = (int(out.max()) + 1 - n) if n else 0
    return out, delta
