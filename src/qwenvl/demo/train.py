"""The recipe that trains the demo model from scratch on the CPU: ``python -m qwenvl.demo.train``.

Learning to read images through the language-model loss alone stalls (the decoder learns the
answer format long before it looks at the vision tokens), so the recipe follows the Qwen2.5-VL
report's staging and adds dense signals on both sides:

1. ``vision``: the ViT and merger alone, on scenes and 3x3-cell crops around single blocks, with
   probes on every merged token for what lies under it: the block's colour, digit, row and
   column (or background). The colour and digit probes are dot products with the decoder's token
   embeddings of the colour names and digits, so vision tokens start out "saying" them.
2. ``read``: the whole model on scenes of 1 to 4 blocks (list, number, count, ground).
3. ``joint``: all six tasks (count and grounding twice as often), with a curriculum from 3 blocks
   to 10.
4. ``polish``: a second, lower cosine on full scenes, weighted to the tasks still learning at the
   end of ``joint`` (number, list, count).
5. ``tools``, 6. ``tools2``: the click task (a ``computer_use`` tool call at the named block, then
   a confirmation after the tool's result), the six tasks rehearsed, the vision tower frozen.
7. ``settle``, 8. ``settle2``: lower cosines that bring the six tasks back while clicks settle.

In stages 2 to 4 the loss is the answer loss (each sample's mean token loss) plus: the probes;
the decoder's own output at every block token naming the block (``cell_reading_loss``); one
head in each of two decoder layers taught to look at the block each answer token reads
(``attention_loss``); a probe that makes the decoder name every vision token's place
(``place_loss``); one that makes grounding and ``when`` answers carry the place of the block
they read (``readout_loss``); and the tokens that write that place (a box's numbers, a second)
weighed as a whole sample (``span_loss``). The targets live in ``qwenvl.demo.supervision``.

Everything is deterministic by seed; a run resumes from its last checkpoint (``--out``); the probes
are dropped at export and the model is written in the released layout.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qwenvl.demo import checkpoint as demo_ckpt
from qwenvl.demo.prefix import shared_opening_logits
from qwenvl.demo.scenes import COLOUR_NAMES, SCALE, random_scene, render
from qwenvl.demo.supervision import (
    PLACES,
    AuxHeads,
    answer_targets,
    batch_labels,
    block_crop,
    item_labels,
    question_cue,
    sample_scenes,
)
from qwenvl.demo.tasks import TASKS, DemoSample, click_sample, make_sample
from qwenvl.layers.rotary import apply_rotary
from qwenvl.models import read_config
from qwenvl.processing.prompt import Processor
from qwenvl.train.data import Sample, encode_conversation
from qwenvl.train.packing import IGNORE, collate
from qwenvl.train.plot import plot_losses
from qwenvl.train.trainer import Progress

# Decoder layers whose first head is taught where to look (see ``Recipe.attention_loss``): in
# CUE_LAYER each answer token that reads a block attends to the words of the question that say
# which block (its colour, or its number); in GUIDED_LAYERS it attends to that block's tokens.
CUE_LAYER = 1
GUIDED_LAYERS = (2, 3)
GUIDED_HEAD = 0


@dataclass
class Stage:
    name: str
    steps: int
    batch: int
    lr: float
    vision_lr: float
    tasks: tuple[str, ...] = TASKS
    max_blocks_from: int = 10  # curriculum: max blocks per scene grows linearly to 10
    aux_weight: float = 1.0
    attention_weight: float = 1.0  # the guided-attention loss
    crops: int = 0  # extra 56x56 crops around one block each, per step (vision stage)
    max_blocks_to: int = 10
    clicks: int = 0  # ``click`` samples per step besides ``batch`` (their own forward)
    stop: int | None = None  # end here, before ``steps`` (the schedule's length)
    # start from the weights as exported (bf16), as a run continued with ``--init`` does: the
    # tool stages were first run that way, and one command reproduces them so
    from_export: bool = False
    warmup: int = 100  # steps of linear warm-up


STAGES = (
    Stage("vision", steps=400, batch=16, lr=3e-3, vision_lr=3e-3, tasks=(), crops=64),
    # few blocks, one token each: the decoder learns to look and copy on easy scenes
    Stage(
        "read",
        steps=400,
        batch=32,
        lr=1.5e-3,
        vision_lr=1e-3,
        tasks=("list", "number", "count", "ground", "ground"),
        max_blocks_from=1,
        max_blocks_to=4,
    ),
    # the two tasks that learn slowest (a count, four coordinates) get a double share
    Stage(
        "joint",
        steps=1400,
        batch=32,
        lr=1.5e-3,
        vision_lr=1e-3,
        tasks=("list", "count", "count", "number", "ground", "ground", "compare", "when"),
        max_blocks_from=3,
        aux_weight=1.0,
    ),
    # a gentler second cosine on full scenes for the tasks still learning when joint ends
    # (number's answer loss fell 0.34 -> 0.19 over joint's last 400 steps; count sat at 95 %)
    Stage(
        "polish",
        steps=500,
        batch=32,
        lr=6e-4,
        vision_lr=4e-4,
        tasks=("list", "number", "count") * 2 + ("number", "ground", "compare", "when"),
        max_blocks_from=10,
    ),
    # tool calling: the click task (``computer_use`` left_click at the named block's centre, then
    # a confirmation after the tool's result), with every earlier task rehearsed at a low rate;
    # the probes are not trained here (aux_weight 0), and the vision tower is frozen
    # (vision_lr 0): with it trained at 1e-4 through these stages, list fell 1.6 points per block
    # and 2.3 exact, and restoring the tower alone brought both back
    Stage(
        "tools",
        steps=250,
        batch=12,
        lr=4e-4,
        vision_lr=0.0,
        tasks=("list", "number", "count", "ground", "compare", "when"),
        aux_weight=0.0,
        clicks=8,
        from_export=True,
    ),
    # the same again from where ``tools`` ends (a fresh warm-up and cosine): clicks still landed
    # on a neighbouring block after 250 steps, with the click's loss still falling. Stopped at
    # 300 of an 800-step schedule: clicks were then 90 % inside, but list and number had lost
    # 5-10 points under the high learning rate
    Stage(
        "tools2",
        steps=800,
        batch=12,
        lr=4e-4,
        vision_lr=0.0,
        tasks=("list", "number", "count", "ground", "compare", "when"),
        aux_weight=0.0,
        clicks=8,
        stop=300,
    ),
    # polish's task mix again, with clicks, on a lower cosine: the earlier tasks back to their
    # shipped accuracy while the clicks settle
    Stage(
        "settle",
        steps=250,
        batch=24,
        lr=3e-4,
        vision_lr=0.0,
        tasks=("list", "number", "count") * 2 + ("number", "ground", "compare", "when"),
        aux_weight=0.0,
        clicks=6,
        from_export=True,
    ),
    # a short, low cosine on number and list, which settle left 1.7 and 0.8 points below the
    # model before the tool stages
    Stage(
        "settle2",
        steps=120,
        batch=24,
        lr=1.5e-4,
        vision_lr=0.0,
        tasks=("number", "list") * 3 + ("count", "ground", "compare", "when"),
        aux_weight=0.0,
        clicks=4,
        from_export=True,
        warmup=12,
    ),
)


class Recipe:
    """The staged run; ``world`` > 1 splits every batch over that many processes (``rank``)."""

    def __init__(
        self,
        out: Path,
        seed: int = 0,
        threads: int = 1,
        rank: int = 0,
        world: int = 1,
        init: Path | None = None,
        device: str = "cpu",
    ) -> None:
        self.out, self.seed, self.rank, self.world = out, seed, rank, world
        self.device = torch.device(device)
        torch.set_num_threads(threads)
        self.files = out / "files"
        if rank == 0 and not (self.files / "config.json").exists():
            if init is None:
                demo_ckpt.write_files(self.files)
            else:
                _copy_files(init, self.files)
        if world > 1:
            torch.distributed.barrier()
        self.config = read_config(self.files / "config.json")
        self.processor = Processor.from_pretrained(self.files, self.config)
        self.model = demo_ckpt.new_model(self.files, seed)
        if init is not None:  # a later stage, from a model written by an earlier run
            demo_ckpt.load_weights(self.model, init)
        tok = self.processor.tokenizer
        self.aux = AuxHeads(
            self.config.text.hidden_size,
            self.model.model.embed_tokens,
            [tok.encode(c) for c in COLOUR_NAMES],
            [tok.encode(str(d))[0] for d in range(10)],
        )
        self.model.to(self.device)
        self.aux.to(self.device)
        self.seen: dict[int, tuple] = {}  # guided layers' inputs of the last forward
        self.said: dict[int, torch.Tensor] = {}  # ... and their attention outputs
        for i in (CUE_LAYER, *GUIDED_LAYERS):
            self.model.model.layers[i].self_attn.register_forward_hook(self._keep_inputs)
        self.metrics: list[dict] = []
        self.written = 0  # metrics rows already in metrics.jsonl (this process)
        self.step = 0  # global step over all stages

    # --- data ---------------------------------------------------------------------------------
    def batch(self, stage: Stage, step: int) -> list[DemoSample]:
        rng = random.Random(f"{self.seed}:{stage.name}:{step}")
        progress = min(1.0, step / max(1, 0.5 * stage.steps))
        span = stage.max_blocks_to - stage.max_blocks_from
        top = round(stage.max_blocks_from + span * progress)
        out = []
        for k in range(stage.batch):
            if not stage.tasks:
                s = random_scene(rng, rng.randint(1, 10))
                image = render(s)
                out.append(DemoSample("scene", [image], None, "", "", {"scene": s}))
                out += [block_crop(s, image, rng) for _ in range(stage.crops // stage.batch)]
            else:
                out.append(
                    make_sample(
                        stage.tasks[(step * stage.batch + k) % len(stage.tasks)],
                        rng,
                        max_blocks=top,
                    )
                )
        return out + [click_sample(rng, top) for _ in range(stage.clicks)]

    # --- losses -------------------------------------------------------------------------------
    def vision_step(self, samples: Sequence[DemoSample]) -> tuple[torch.Tensor, dict]:
        items = [  # seen at half size, as the checkpoint's pixel limits show a whole scene
            self.processor.process_image(
                s.images[0],
                resized_height=s.images[0].height // SCALE,
                resized_width=s.images[0].width // SCALE,
            )
            for s in samples
        ]
        pixels = torch.cat([it.pixel_values for it in items]).to(self.device)
        grids = [it.grid_thw for it in items]
        feats = self.model.encode_vision(pixels, grids)
        labels = batch_labels([item_labels([s.info["scene"]], g) for s, g in zip(samples, grids)])
        loss = self.aux.loss(feats, labels)
        metrics = {"aux": float(loss.detach()), "tokens": feats.shape[0]}
        return loss, {**metrics, **self.aux.accuracy(feats, labels)}

    def joint_step(self, samples: Sequence[DemoSample], stage: Stage) -> tuple[torch.Tensor, dict]:
        encoded = [encode_conversation(self.processor, s.messages()) for s in samples]
        batch = collate(
            [[e] for e in encoded], self.processor.tokenizer.require_id("<|endoftext|>")
        ).to(self.device)
        m = self.model
        image_feats = video_feats = None
        aux_feats = []
        if batch.pixel_values is not None:
            image_feats = m.encode_vision(batch.pixel_values, batch.image_grid_thw)
            aux_feats.append(image_feats)
        if batch.pixel_values_videos is not None:
            video_feats = m.encode_vision(batch.pixel_values_videos, batch.video_grid_thw)
            aux_feats.append(video_feats)
        # labels in the same order: all images of the batch, then all videos
        img_labels, vid_labels, guide = [], [], []
        for s, e in zip(samples, encoded):
            per_item = sample_scenes(s)
            if s.video is not None:
                vid_labels.append(item_labels(per_item[0], e.videos[0].grid_thw))
                mine = [vid_labels[-1]]
            else:
                mine = [item_labels(sc, it.grid_thw) for sc, it in zip(per_item, e.images)]
                img_labels += mine
            guide.append(self.attention_targets(s, e, mine[0]) if len(mine) == 1 else {})
        aux_labels = img_labels + vid_labels
        embeds = m.embed(batch.input_ids, image_feats, video_feats)
        all_logits = m(batch.input_ids, batch.positions, batch.mask, inputs_embeds=embeds)
        rows = (batch.labels != IGNORE).any(0).nonzero().flatten()
        logits = all_logits[:, rows]
        labels = batch.labels[:, rows]
        tok_loss = F.cross_entropy(
            logits.float().flatten(0, 1), labels.clamp(min=0).flatten(), reduction="none"
        ).view(labels.shape) * (labels != IGNORE)
        per_sample = tok_loss.sum(1) / (labels != IGNORE).sum(1).clamp(min=1)
        lm = per_sample.mean()
        feats, lab = torch.cat(aux_feats), batch_labels(aux_labels)
        aux = self.aux.loss(feats, lab)
        cells = self.cell_reading_loss(batch.input_ids, all_logits, img_labels, vid_labels)
        aux = aux + cells
        look = self.attention_loss(guide)
        places = [self.places(e) for e in encoded]
        place = self.place_loss(places)
        read_out = self.readout_targets(samples, places, guide)
        found = self.readout_loss(read_out)
        spans = self.span_loss(batch.input_ids, all_logits, read_out)
        aux = aux + place + found
        metrics = {
            "lm": lm.item(),
            "aux": aux.item(),
            "cells": cells.item(),
            "look": look.item(),
            "place": place.item(),
            "found": found.item(),
            "spans": spans.item(),
            "tokens": batch.num_tokens,
        }
        for task in set(s.task for s in samples):
            idx = [i for i, s in enumerate(samples) if s.task == task]
            metrics[f"lm_{task}"] = per_sample[idx].mean().item()
        total = lm + spans + stage.aux_weight * aux + stage.attention_weight * look
        return total, metrics

    def click_step(self, samples: Sequence[DemoSample], stage: Stage) -> tuple[torch.Tensor, dict]:
        """``click`` samples, their long tool prompt run once per prompt style
        (``demo.prefix``), with the losses that taught grounding: each sample's mean token loss,
        the coordinate tokens' own mean (``span_loss``), and the guided heads looking at the
        named block while they are written (``attention_loss``)."""
        cfg = self.config
        answer, spans, looks = [], [], []
        for system in dict.fromkeys(s.system for s in samples):
            group = [s for s in samples if s.system == system]
            encoded = [encode_conversation(self.processor, s.messages()) for s in group]
            guide = [
                self.attention_targets(s, e, item_labels([s.info["scene"]], e.images[0].grid_thw))
                for s, e in zip(group, encoded)
            ]
            logits, labels, owner, look = shared_opening_logits(
                self.model, encoded, (cfg.image_token_id, cfg.video_token_id), guide, GUIDED_HEAD
            )
            tok = F.cross_entropy(logits.float(), labels.to(logits.device), reduction="none")
            answer.append(_mean_by(tok, owner, len(group)))
            place = torch.cat([_place_tokens(e, g) for e, g in zip(encoded, guide)])
            spans.append(_mean_by(tok[place], owner[place], len(group)))
            looks.append(look)
        per_sample, span = torch.cat(answer), torch.cat(spans)
        look = torch.stack(looks).mean()
        total = per_sample.mean() + span.mean() + stage.attention_weight * look
        m = {"lm_click": per_sample.mean().item(), "spans_click": span.mean().item()}
        return total, {**m, "look_click": look.item()}

    def cell_reading_loss(
        self,
        input_ids: torch.Tensor,
        logits: torch.Tensor,
        img_labels: Sequence[torch.Tensor],
        vid_labels: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """The decoder's own output at every block token must name the block's colour and digit.

        Without it the decoder sat at chance on reading for hundreds of steps (its answer token
        gets one weak gradient through near-uniform attention); with a target at every vision
        token it learns to carry what the ViT saw into its vocabulary, and answering becomes
        copying from a nearby position. Two targets share one softmax: the loss raises both.
        """
        total = logits.new_zeros(())
        count = 0
        for token_id, per_item in (
            (self.config.image_token_id, img_labels),
            (self.config.video_token_id, vid_labels),
        ):
            if not per_item:
                continue
            lab = torch.cat(list(per_item)).to(logits.device)
            slots = (input_ids == token_id).nonzero()  # row-major: the features' order
            on = lab[:, 0] > 0
            if not bool(on.any()):
                continue
            lg = logits[slots[on, 0], slots[on, 1]].float().log_softmax(-1)
            digit = self.aux.digit_tokens.to(lg.device)[lab[on, 1] - 1]
            colour = self.aux.colour_tokens.to(lg.device)[lab[on, 0] - 1]
            total = total - lg.gather(1, digit[:, None]).sum() - lg.gather(1, colour[:, None]).sum()
            count += int(on.sum())
        return total / max(1, 2 * count)

    def _keep_inputs(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.seen[module.layer_idx] = args[:4]  # normed x, cos, sin, mask
        self.said[module.layer_idx] = output

    def attention_targets(
        self, sample: DemoSample, encoded: Sample, labels: torch.Tensor
    ) -> dict[int, list[tuple[int, torch.Tensor]]]:
        """Per guided layer, ``(query position, key positions)`` pairs: the position before each
        answer token that reads a block, and in ``GUIDED_LAYERS`` the vision tokens of that block
        (``labels``: the sample's cell labels), in ``CUE_LAYER`` the question's tokens that name
        it."""
        spans = answer_targets(sample)
        if not spans:
            return {}
        backend = self.processor.tokenizer.backend
        enc = backend.encode(sample.answer, add_special_tokens=False)
        answer_at = encoded.targets.nonzero().flatten().tolist()
        ids = encoded.token_ids
        if [ids[j] for j in answer_at[: len(enc.ids)]] != enc.ids:
            return {}  # the answer tokenises differently in context: no guidance
        token_id = self.config.video_token_id if sample.video else self.config.image_token_id
        slots = torch.tensor([i for i, t in enumerate(ids) if t == token_id])
        per_group = encoded.videos[0].grid_thw if sample.video else encoded.images[0].grid_thw
        group = torch.arange(len(slots)) // (per_group[1] * per_group[2] // 4)
        blocks = []
        for (a, b), j in zip(enc.offsets, answer_at):
            for start, end, number, g in spans:
                if start <= a and b <= end and b > a:
                    hit = (labels[:, 4] == number) & ((group == g) if g >= 0 else True)
                    if bool(hit.any()):
                        blocks.append((j - 1, slots[hit]))
        number = sample.info.get("number")
        for j in self._confirmation_digits(sample, encoded):  # a click's reply names the block
            hit = labels[:, 4] == number
            if bool(hit.any()):
                blocks.append((j - 1, slots[hit]))
        out = {layer: blocks for layer in GUIDED_LAYERS}
        cue = question_cue(sample)
        if cue is not None and blocks:
            question = backend.encode(sample.question, add_special_tokens=False)
            n = len(question.ids)
            at = max(
                (i for i in range(len(ids) - n + 1) if ids[i : i + n] == question.ids), default=-1
            )
            words = [
                at + i for i, (a, b) in enumerate(question.offsets) if a < cue[1] and b > cue[0]
            ]
            if at >= 0 and words:
                out[CUE_LAYER] = [(q, torch.tensor(words)) for q, _ in blocks]
        return out

    def _confirmation_digits(self, sample: DemoSample, encoded: Sample) -> list[int]:
        """Positions of the number a click's confirmation names (``I clicked the box with the
        number 7.``), after the tool's result: guided like the call's coordinates (that block,
        the question's number) and in the span loss, as the reply must copy the question's number
        across a tool turn (unguided, 12.5 % of replies named the right one)."""
        if sample.task != "click" or not sample.follow_up:
            return []
        text, number = sample.follow_up[-1]["content"], str(sample.info["number"])
        enc = self.processor.tokenizer.backend.encode(text, add_special_tokens=False)
        ids, at, n = encoded.token_ids, encoded.targets.nonzero().flatten().tolist(), len(enc.ids)
        start = text.rindex(number)
        for k in range(len(at) - n, -1, -1):
            if [ids[j] for j in at[k : k + n]] == enc.ids:
                over = [
                    i
                    for i, (a, b) in enumerate(enc.offsets)
                    if a < start + len(number) and b > start
                ]
                return [at[k + i] for i in over]
        return []

    def places(self, encoded: Sample) -> tuple[torch.Tensor, torch.Tensor]:
        """Every vision token's position in the sequence and its ``(frame, row, column)`` within
        its image or video (in merged tokens; the frame is the clip's second)."""
        at, where = [], []
        ids = torch.tensor(encoded.token_ids)
        for token_id, items in (
            (self.config.image_token_id, encoded.images),
            (self.config.video_token_id, encoded.videos),
        ):
            slots = (ids == token_id).nonzero().flatten()
            start = 0
            for it in items:
                t, h, w = it.grid_thw
                n = t * (h // 2) * (w // 2)
                k = torch.arange(n)
                hw = (h // 2) * (w // 2)
                at.append(slots[start : start + n])
                where.append(torch.stack([k // hw, k % hw // (w // 2), k % (w // 2)], 1))
                start += n
        return torch.cat(at), torch.cat(where).clamp(max=PLACES - 1)

    def place_loss(self, places: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The decoder's first guided layer must know where each vision token is.

        Grounding answers pixels and ``when`` answers seconds: both read a block's place, which
        the decoder only has through M-RoPE's rotations (the ViT's rotary is relative). A probe
        on the residual stream that the guided heads copy from makes that place explicit.
        """
        x = self.seen[GUIDED_LAYERS[0]][0]
        feats = torch.cat([x[b, at] for b, (at, _) in enumerate(places)]).float()
        truth = torch.cat([w for _, w in places]).to(feats.device)
        logits = self.aux.where(feats).view(-1, 3, PLACES)
        return F.cross_entropy(logits.flatten(0, 1), truth.flatten())

    def readout_loss(self, read_out: Sequence[tuple[int, int, torch.Tensor]]) -> torch.Tensor:
        """Grounding and ``when`` answers must carry the place of the block they read.

        With the guided head on the right block and the place explicit in the block's stream,
        grounding still answered the layouts' most common box: the head copied what the block
        *is* (what ``list`` and ``number`` reward) and not where it is. A probe on the last
        guided layer's attention output at those answer tokens (``readout_targets``) must name
        the block's frame, row and column, so the copy carries the place the coordinate digits
        are written from.
        """
        out = self.said[GUIDED_LAYERS[-1]]
        if not read_out:
            return out.new_zeros((), dtype=torch.float32)
        feats = torch.stack([out[b, q] for b, q, _ in read_out]).float()
        logits = self.aux.find(feats).view(-1, 3, PLACES)
        truth = torch.stack([w for _, _, w in read_out]).flatten().to(feats.device)
        return F.cross_entropy(logits.flatten(0, 1), truth)

    @staticmethod
    def span_loss(
        input_ids: torch.Tensor,
        logits: torch.Tensor,
        read_out: Sequence[tuple[int, int, torch.Tensor]],
    ) -> torch.Tensor:
        """The mean token loss of the answer tokens that write a place (a box's numbers, a
        second), per sample, averaged over those samples.

        The answer loss is each sample's mean over its tokens: a grounding answer's ~12 number
        tokens share it with ~30 tokens of fixed JSON that are learnt in the first steps, so
        each number weighed ~20 times less than a count's one digit, and the box stayed at the
        layouts' prior while every other task learnt. This term gives them a sample's weight.
        """
        if not read_out:
            return logits.new_zeros((), dtype=torch.float32)
        rows = torch.tensor([b for b, _, _ in read_out], device=logits.device)
        at = torch.tensor([q for _, q, _ in read_out], device=logits.device)
        tok = F.cross_entropy(logits[rows, at].float(), input_ids[rows, at + 1], reduction="none")
        per_sample = tok.new_zeros(int(rows.max()) + 1).index_add_(0, rows, tok)
        count = torch.bincount(rows)
        return (per_sample[count > 0] / count[count > 0]).mean()

    @staticmethod
    def readout_targets(
        samples: Sequence[DemoSample],
        places: Sequence[tuple[torch.Tensor, torch.Tensor]],
        targets: Sequence[dict[int, list[tuple[int, torch.Tensor]]]],
    ) -> list[tuple[int, int, torch.Tensor]]:
        """``(sample, query position, (frame, row, column) of the block read)`` per supervised
        answer token of the grounding and ``when`` samples."""
        out = []
        for b, (s, per_layer) in enumerate(zip(samples, targets)):
            if s.task not in ("ground", "when"):
                continue
            at, where = places[b]
            for q, keys in per_layer.get(GUIDED_LAYERS[-1], []):
                out.append((b, q, where[(at == keys[0]).nonzero()[0, 0]]))
        return out

    def attention_loss(
        self, targets: Sequence[dict[int, list[tuple[int, torch.Tensor]]]]
    ) -> torch.Tensor:
        """Teach one head per guided layer where to look (``attention_targets``).

        The answer-only loss gives the decoder's queries one weak gradient through near-uniform
        attention over the vision tokens, and on full scenes the decoder stayed at chance;
        naming the keys to look at makes retrieval a supervised problem, in two hops when the
        question says which block (cue words, then the block). ``-log`` of the attention mass
        on the target tokens, averaged over the supervised positions of all guided layers.
        """
        total, count = torch.zeros((), device=self.device), 0
        for layer in (CUE_LAYER, *GUIDED_LAYERS):
            x, cos, sin, mask = self.seen[layer]
            attn = self.model.model.layers[layer].self_attn
            hd = attn.head_dim
            qs = slice(GUIDED_HEAD * hd, (GUIDED_HEAD + 1) * hd)
            kv_head = GUIDED_HEAD // (attn.num_heads // attn.num_kv_heads)
            ks = slice(kv_head * hd, (kv_head + 1) * hd)
            for b, per_layer in enumerate(targets):
                pairs = per_layer.get(layer, [])
                if not pairs:
                    continue
                at = torch.tensor([p for p, _ in pairs])
                q = F.linear(x[b, at], attn.q_proj.weight[qs], attn.q_proj.bias[qs])
                k = F.linear(x[b], attn.k_proj.weight[ks], attn.k_proj.bias[ks])
                q = apply_rotary(q, cos[b, 0, at], sin[b, 0, at])
                k = apply_rotary(k, cos[b, 0], sin[b, 0])
                scores = (q.float() @ k.float().T) / math.sqrt(hd)
                logp = scores.masked_fill(~mask[b, 0, at], float("-inf")).log_softmax(-1)
                want = torch.zeros_like(logp, dtype=torch.bool)
                for i, (_, keys) in enumerate(pairs):
                    want[i, keys] = True
                total = total - torch.logsumexp(logp.masked_fill(~want, float("-inf")), -1).sum()
                count += len(pairs)
        return total / max(1, count)

    # --- loop ---------------------------------------------------------------------------------
    def optimizer(self, stage: Stage) -> torch.optim.Optimizer:
        """AdamW over the stage's parameters; ``vision_lr`` 0 freezes the vision tower (no
        gradients through it, none of its weights in the optimizer)."""
        vision, llm = [], []
        for name, p in self.model.named_parameters():
            (vision if name.startswith("visual.") else llm).append(p)
        for p in vision:
            p.requires_grad_(stage.vision_lr > 0)
            p.grad = None  # an earlier stage's last gradients would count in the clipping norm
        groups = [{"params": list(self.aux.parameters()), "lr": stage.vision_lr}]
        if stage.vision_lr > 0:
            groups[0]["params"] += vision
        if stage.tasks:
            groups.append({"params": llm, "lr": stage.lr})
        for g in groups:
            g["initial_lr"] = g["lr"]
        return torch.optim.AdamW(groups, betas=(0.9, 0.98), weight_decay=0.01)

    def run(self, stages: Sequence[Stage] = STAGES, progress: bool = True) -> Path:
        state_path = self.out / "state.pt"
        done_stage, done_step, opt_state = -1, 0, None
        if state_path.exists():
            st = torch.load(state_path, weights_only=False, map_location=self.device)
            self.model.load_state_dict(st["model"])
            self.aux.load_state_dict(st["aux"])
            done_stage, done_step, opt_state = st["stage"], st["step"], st["optimizer"]
            self.metrics = st["metrics"]
        for si, stage in enumerate(stages):
            if si < done_stage:
                continue
            opt = self.optimizer(stage)
            start = 0
            if si == done_stage:
                start = done_step
                opt.load_state_dict(opt_state)
            end = stage.steps if stage.stop is None else min(stage.stop, stage.steps)
            if start >= end:
                continue
            if start == 0 and stage.from_export:
                self.round_to_export()
            shown = progress and self.rank == 0
            bar = Progress(end, "off" if not shown else "bar" if _tty() else "lines")
            self.model.train()
            t0 = time.perf_counter()
            for step in range(start, end):
                warm = min(1.0, (step + 1) / stage.warmup)
                decay = 0.5 * (1 + math.cos(math.pi * step / stage.steps))
                for g in opt.param_groups:
                    g["lr"] = g["initial_lr"] * warm * (0.1 + 0.9 * decay)
                samples = self.batch(stage, step)[self.rank :: self.world]
                clicks = [s for s in samples if s.task == "click"]
                samples = [s for s in samples if s.task != "click"]
                if stage.tasks:
                    loss, m = self.joint_step(samples, stage)
                else:
                    loss, m = self.vision_step(samples)
                if clicks:
                    click_loss, click_m = self.click_step(clicks, stage)
                    loss, m = loss + click_loss, {**m, **click_m}
                opt.zero_grad(set_to_none=True)
                loss.backward()
                self.average_gradients(opt)
                torch.nn.utils.clip_grad_norm_(
                    list(self.model.parameters()) + list(self.aux.parameters()), 1.0
                )
                opt.step()
                m["loss"] = loss.item()
                m = self.merge_metrics(m)
                m.update(
                    stage=stage.name,
                    step=step + 1,
                    lr=opt.param_groups[-1]["lr"],
                    secs=time.perf_counter() - t0,
                )
                self.metrics.append(m)
                secs = m["secs"] - (self.metrics[-2]["secs"] if step > start else 0.0)
                tokens_per_s = m["tokens"] / max(secs, 1e-9)
                bar.update(step + 1, {**m, "tokens_per_s": tokens_per_s})
                if self.rank == 0 and ((step + 1) % 50 == 0 or step + 1 == end):
                    self.save_state(si, step + 1, opt)
                    self.write_metrics()
            bar.close()
        return self.export() if self.rank == 0 else self.out / "model"

    @torch.no_grad()
    def round_to_export(self) -> None:
        """The weights as ``export`` writes them and ``--init`` reads them back (bf16)."""
        for p in self.model.parameters():
            p.copy_(p.to(torch.bfloat16))

    def merge_metrics(self, m: dict) -> dict:
        """All ranks' metrics of a step: token counts summed, per-task losses from the ranks that
        had the task, everything else averaged (each rank sees its own share of the tasks)."""
        if self.world == 1:
            return m
        every: list[dict] = [{} for _ in range(self.world)]
        torch.distributed.all_gather_object(every, m)
        out = {}
        for key in dict.fromkeys(k for r in every for k in r):
            values = [r[key] for r in every if key in r]
            out[key] = sum(values) if key == "tokens" else sum(values) / len(values)
        return out

    def average_gradients(self, opt: torch.optim.Optimizer) -> None:
        """Data parallelism: one all-reduce of every trained gradient, flattened."""
        if self.world == 1:
            return
        params = [p for g in opt.param_groups for p in g["params"]]
        for p in params:
            if p.grad is None:  # unused on this rank's share (e.g. no video in it)
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.flatten() for p in params])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    def write_metrics(self) -> None:
        """Append the new rows to ``metrics.jsonl`` (the first call of a process rewrites it)."""
        with open(self.out / "metrics.jsonl", "a" if self.written else "w") as f:
            for row in self.metrics[self.written :]:
                f.write(json.dumps(row) + "\n")
        self.written = len(self.metrics)

    def save_state(self, stage: int, step: int, opt: torch.optim.Optimizer) -> None:
        tmp = self.out / "state.pt.tmp"
        torch.save(
            {
                "model": self.model.state_dict(),
                "aux": self.aux.state_dict(),
                "stage": stage,
                "step": step,
                "optimizer": opt.state_dict(),
                "metrics": self.metrics,
            },
            tmp,
        )
        tmp.replace(self.out / "state.pt")

    def export(self, folder: Path | None = None) -> Path:
        folder = folder or self.out / "model"
        folder.mkdir(parents=True, exist_ok=True)
        for f in self.files.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        demo_ckpt.save_weights(self.model, folder, torch.bfloat16)
        plot_losses(
            [{"step": i, "loss": m["loss"]} for i, m in enumerate(self.metrics)],
            self.out / "loss.png",
        )
        return folder


def _mean_by(values: torch.Tensor, owner: torch.Tensor, count: int) -> torch.Tensor:
    """Per sample, the mean of its ``values`` (``owner``: each value's sample)."""
    owner = owner.to(values.device)
    sums = values.new_zeros(count).index_add(0, owner, values)
    return sums / torch.bincount(owner, minlength=count).clamp(min=1)


def _place_tokens(encoded: Sample, guide: dict[int, list]) -> torch.Tensor:
    """Which of a sample's target tokens write the place (a click's coordinates), in target
    order: the tokens after the guided query positions."""
    place = {q + 1 for q, _ in guide.get(GUIDED_LAYERS[0], [])}
    return torch.tensor([int(t) in place for t in encoded.targets.nonzero().flatten()])


def _tty() -> bool:
    return sys.stderr.isatty()


def _copy_files(model: Path, files: Path) -> None:
    """A model folder's files but its weights (the recipe keeps weights in its state)."""
    files.mkdir(parents=True, exist_ok=True)
    for f in model.iterdir():
        if f.is_file() and not f.name.startswith("model.safetensors"):
            (files / f.name).write_bytes(f.read_bytes())


def _worker(
    rank: int, world: int, port: int, out: Path, seed: int, stages: tuple, init: Path | None
) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        folder = Recipe(out, seed, 1, rank, world, init).run(stages)
        if rank == 0:
            print(f"model written to {folder}")
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo-run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (one process)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="data-parallel processes of one thread each (a model this small scales by "
        "processes, not threads)",
    )
    p.add_argument(
        "--init",
        type=Path,
        help="start from this model folder (e.g. the shipped demo model) instead of random "
        "weights; give the stages already done 0 steps",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where one process trains (e.g. cuda); the workers of --workers train on the CPU",
    )
    for stage in STAGES:
        p.add_argument(f"--{stage.name}-steps", type=int, default=stage.steps)
        p.add_argument(f"--{stage.name}-stop", type=int, default=stage.stop, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = tuple(
        replace(s, steps=getattr(a, f"{s.name}_steps"), stop=getattr(a, f"{s.name}_stop"))
        for s in STAGES
    )
    if a.workers > 1:
        torch.multiprocessing.spawn(
            _worker, (a.workers, _free_port(), out, a.seed, stages, a.init), nprocs=a.workers
        )
        return
    folder = Recipe(out, a.seed, a.threads, init=a.init, device=a.device).run(stages)
    print(f"model written to {folder}")


if __name__ == "__main__":
    main()
