"""The recipe that trains the demo model from scratch on the CPU: ``python -m qwenvl.demo.train``.

Learning to read images through the language-model loss alone stalls (the decoder learns the
answer format long before it looks at the vision tokens), so the recipe follows the Qwen2.5-VL
report's staging with a dense signal for the vision side:

1. ``vision``: the ViT and merger alone, on single images, with auxiliary linear heads on every
   merged vision token that predict what lies under it: the block's colour, digit, row and column
   (or background). Cheap, and it makes the vision tokens carry linearly readable facts.
2. ``joint``: the whole model on the task mix (``qwenvl.demo.tasks``) with the language-model loss
   (each sample's mean token loss, so one-token answers count as much as long lists) plus the
   auxiliary loss, smaller learning rates for the vision side, and a curriculum from small
   pyramids to full ones.

The auxiliary heads are dropped at export. Everything is deterministic by seed; a run resumes from
its last checkpoint (``--out``); the final model is written in the released layout.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from qwenvl.demo import checkpoint as demo_ckpt
from qwenvl.demo.scenes import COLOUR_NAMES, PATCH, Scene, random_scene, render
from qwenvl.demo.tasks import TASKS, DemoSample, make_sample
from qwenvl.models.qwen2_vl.config import ModelConfig
from qwenvl.processing.prompt import Processor
from qwenvl.train.data import encode_conversation
from qwenvl.train.packing import IGNORE, collate
from qwenvl.train.plot import plot_losses
from qwenvl.train.trainer import Progress

HEADS = {"colour": len(COLOUR_NAMES) + 1, "digit": 11, "row": 5, "col": 5}
MERGED_PX = 28


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
    crops: int = 0  # extra 56x56 crops around one block each, per step (vision stage)
    max_blocks_to: int = 10
    sides: tuple[int, ...] = ()  # image sides to pick from (default: the full 224-280 scenes)


STAGES = (
    Stage("vision", steps=600, batch=8, lr=3e-3, vision_lr=3e-3, tasks=(), crops=128),
    # small pictures of 1-3 blocks, many per step: the decoder learns to read on cheap samples
    Stage(
        "read",
        steps=500,
        batch=48,
        lr=1.5e-3,
        vision_lr=1e-3,
        tasks=("list", "number", "count"),
        max_blocks_from=1,
        max_blocks_to=3,
        sides=(56, 84, 112),
    ),
    Stage(
        "joint", steps=800, batch=8, lr=1.5e-3, vision_lr=1e-3, max_blocks_from=1, aux_weight=1.0
    ),
)


class AuxHeads(nn.Module):
    """Probes on merged vision tokens: what lies under each one.

    With ``embed`` (the decoder's token embeddings) and the token ids of the colour names and
    digits, the colour and digit logits are dot products with those embeddings: the vision
    tokens are pulled towards the very vectors the decoder reads and (tied) writes for "red" or
    "7", so answering becomes copying, which a decoder learns far sooner than a new mapping.
    """

    def __init__(
        self,
        dim: int,
        embed: nn.Embedding | None = None,
        colour_ids: Sequence[Sequence[int]] = (),
        digit_ids: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, sum(HEADS.values()))
        self.embed = [embed]  # a list: not a submodule (the model owns and saves it)
        self.colour_ids = [list(ids) for ids in colour_ids]
        self.digit_ids = list(digit_ids)
        # the one token the decoder names a colour (its first) or a digit with, by class - 1
        self.colour_tokens = torch.tensor([ids[0] for ids in self.colour_ids], dtype=torch.long)
        self.digit_tokens = torch.tensor(self.digit_ids, dtype=torch.long)
        self.background = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(()))

    def _bridged(self, x: torch.Tensor, head: int) -> torch.Tensor | None:
        table = self.embed[0]
        if table is None:
            return None
        w = table.weight.float()
        if head == 0:
            rows = [self.background] + [w[ids].mean(0) for ids in self.colour_ids]
        else:
            rows = [self.background] + [w[i] for i in self.digit_ids]  # 0 = background
        return self.scale * (x @ torch.stack(rows).T)

    def logits(self, feats: torch.Tensor, labels: torch.Tensor) -> list:
        """Per-token logits, except the digit's: one per block, from the mean of its tokens.

        A digit covers only some of its block's tokens; asking every token for it is asking
        for a label it cannot see. Pooled, the model may keep the digit where it sees it, and
        the decoder's attention over a block's tokens does the same pooling.
        """
        feats = feats.float()
        out = list(self.proj(feats).split(list(HEADS.values()), dim=-1))
        bridged = self._bridged(feats, 0)
        if bridged is not None:
            out[0] = bridged
        block = labels[:, 4]
        on_block = block >= 0
        ids, inverse = torch.unique(block[on_block], return_inverse=True)
        feats = feats[on_block]
        pooled = feats.new_zeros(len(ids), feats.shape[1]).index_add_(0, inverse, feats)
        pooled = pooled / torch.bincount(inverse, minlength=len(ids)).unsqueeze(1)
        digit = labels[on_block, 1].new_zeros(len(ids)).scatter_(0, inverse, labels[on_block, 1])
        digit_logits = self._bridged(pooled, 1)
        if digit_logits is None:
            digit_logits = self.proj(pooled).split(list(HEADS.values()), dim=-1)[1]
        out[1] = (digit_logits, digit)
        return out

    def loss(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Colour (or background) on every token; row and column on block tokens only, so the
        few block tokens are not drowned by the background ones; the digit per block."""
        logits = self.logits(feats, labels)
        on_block = labels[:, 0] > 0
        total = F.cross_entropy(logits[0], labels[:, 0])
        if bool(on_block.any()):
            total = total + F.cross_entropy(*logits[1])
            for i in range(2, len(HEADS)):
                total = total + F.cross_entropy(logits[i][on_block], labels[on_block, i])
        return total / len(HEADS)

    @torch.no_grad()
    def accuracy(self, feats: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        logits = self.logits(feats, labels)
        on_block = labels[:, 0] > 0
        out = {}
        for i, (name, lg) in enumerate(zip(HEADS, logits)):
            if i == 1:
                pred, truth = lg[0].argmax(-1), lg[1]
            else:
                pred, truth = lg[on_block].argmax(-1), labels[on_block, i]
            out[name] = float((pred == truth).float().mean()) if len(truth) else 0.0
        return out


def cell_labels(scene: Scene, grid_h: int, grid_w: int) -> torch.Tensor:
    """``[grid_h * grid_w, 5]`` labels of the merged tokens of ``scene`` resized to the grid:
    colour, digit, row, column (each 0 for the background) and the block's id (-1).

    A cell belongs to the block covering most of it (at least 30 %), else to the background.
    """
    sx = grid_w * MERGED_PX / scene.width
    sy = grid_h * MERGED_PX / scene.height
    out = torch.zeros(grid_h * grid_w, len(HEADS) + 1, dtype=torch.long)
    out[:, 4] = -1
    area = MERGED_PX * MERGED_PX
    for i in range(grid_h):
        for j in range(grid_w):
            cx1, cy1 = j * MERGED_PX, i * MERGED_PX
            best, best_cover = None, 0.3 * area
            for b in scene.blocks:
                x1, y1, x2, y2 = b.box[0] * sx, b.box[1] * sy, b.box[2] * sx, b.box[3] * sy
                w = min(x2, cx1 + MERGED_PX) - max(x1, cx1)
                h = min(y2, cy1 + MERGED_PX) - max(y1, cy1)
                if w > 0 and h > 0 and w * h > best_cover:
                    best, best_cover = b, w * h
            if best is not None:
                out[i * grid_w + j] = torch.tensor(
                    [
                        COLOUR_NAMES.index(best.colour) + 1,
                        best.number + 1,
                        best.row + 1,
                        best.col + 1,
                        best.number,  # distinct within a scene: the block's id
                    ]
                )
    return out


def sample_scenes(sample: DemoSample) -> list[list[Scene]]:
    """Per vision item of the sample, the scene of each temporal group (images: one)."""
    info = sample.info
    if sample.task == "compare":
        return [[info["scenes"][0]], [info["scenes"][1]]]
    if sample.video is not None:
        s: Scene = info["scene"]
        shown = info["shown"]  # per frame, the visible block indices
        groups = [shown[g] for g in range(0, len(shown), 2)]
        return [[replace(s, blocks=tuple(s.blocks[i] for i in g)) for g in groups]]
    return [[info["scene"]]]


CROP = 56


def block_crop(scene: Scene, image: Image.Image, rng: random.Random) -> DemoSample:
    """A 56x56 cut around one block of ``scene``, on the patch lattice (so the digit meets the
    patches as in the whole picture): 16 patches that teach the digit for the price of 1/16 of
    a scene."""
    b = rng.choice(scene.blocks)
    cx, cy = (b.box[0] + b.box[2]) / 2, (b.box[1] + b.box[3]) / 2
    x0 = min(max(0, PATCH * round((cx - CROP / 2) / PATCH)), scene.width - CROP)
    y0 = min(max(0, PATCH * round((cy - CROP / 2) / PATCH)), scene.height - CROP)
    blocks = tuple(
        replace(o, box=(o.box[0] - x0, o.box[1] - y0, o.box[2] - x0, o.box[3] - y0))
        for o in scene.blocks
        if o.box[2] > x0 and o.box[0] < x0 + CROP and o.box[3] > y0 and o.box[1] < y0 + CROP
    )
    crop = replace(scene, width=CROP, height=CROP, blocks=blocks)
    cut = image.crop((x0, y0, x0 + CROP, y0 + CROP))
    return DemoSample("scene", [cut], None, "", "", {"scene": crop})


def item_labels(scenes: list[Scene], grid: tuple[int, int, int], merge: int = 2) -> torch.Tensor:
    _, h, w = grid
    return torch.cat([cell_labels(s, h // merge, w // merge) for s in scenes])


def batch_labels(per_item: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenated item labels with block ids made unique across the batch (a video's
    frames pool each block over all the frames it is in)."""
    out, offset = [], 0
    for lab in per_item:
        lab = lab.clone()
        on = lab[:, 4] >= 0
        lab[on, 4] += offset
        offset += 10
        out.append(lab)
    return torch.cat(out)


class Recipe:
    """The staged run; ``world`` > 1 splits every batch over that many processes (``rank``)."""

    def __init__(
        self, out: Path, seed: int = 0, threads: int = 1, rank: int = 0, world: int = 1
    ) -> None:
        self.out, self.seed, self.rank, self.world = out, seed, rank, world
        torch.set_num_threads(threads)
        self.files = out / "files"
        if rank == 0 and not (self.files / "config.json").exists():
            demo_ckpt.write_files(self.files)
        if world > 1:
            torch.distributed.barrier()
        self.config = ModelConfig.from_file(self.files / "config.json")
        self.processor = Processor.from_pretrained(self.files, self.config)
        self.model = demo_ckpt.new_model(self.files, seed)
        tok = self.processor.tokenizer
        self.aux = AuxHeads(
            self.config.text.hidden_size,
            self.model.model.embed_tokens,
            [tok.encode(c) for c in COLOUR_NAMES],
            [tok.encode(str(d))[0] for d in range(10)],
        )
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
                        sides=stage.sides,
                    )
                )
        return out

    # --- losses -------------------------------------------------------------------------------
    def vision_step(self, samples: Sequence[DemoSample]) -> tuple[torch.Tensor, dict]:
        items = [self.processor.process_image(s.images[0]) for s in samples]
        pixels = torch.cat([it.pixel_values for it in items])
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
        )
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
        img_labels, vid_labels = [], []
        for s, e in zip(samples, encoded):
            per_item = sample_scenes(s)
            if s.video is not None:
                vid_labels.append(item_labels(per_item[0], e.videos[0].grid_thw))
            else:
                img_labels += [item_labels(sc, it.grid_thw) for sc, it in zip(per_item, e.images)]
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
        metrics = {
            "lm": float(lm),
            "aux": float(aux),
            "cells": float(cells),
            "tokens": batch.num_tokens,
        }
        for task in set(s.task for s in samples):
            idx = [i for i, s in enumerate(samples) if s.task == task]
            metrics[f"lm_{task}"] = float(per_sample[idx].mean())
        return lm + stage.aux_weight * aux, metrics

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
            lab = torch.cat(list(per_item))
            slots = (input_ids == token_id).nonzero()  # row-major: the features' order
            on = lab[:, 0] > 0
            if not bool(on.any()):
                continue
            lg = logits[slots[on, 0], slots[on, 1]].float().log_softmax(-1)
            digit = self.aux.digit_tokens[lab[on, 1] - 1]
            colour = self.aux.colour_tokens[lab[on, 0] - 1]
            total = total - lg.gather(1, digit[:, None]).sum() - lg.gather(1, colour[:, None]).sum()
            count += int(on.sum())
        return total / max(1, 2 * count)

    # --- loop ---------------------------------------------------------------------------------
    def optimizer(self, stage: Stage) -> torch.optim.Optimizer:
        vision, llm = [], []
        for name, p in self.model.named_parameters():
            (vision if name.startswith("visual.") else llm).append(p)
        groups = [
            {"params": vision + list(self.aux.parameters()), "lr": stage.vision_lr},
        ]
        if stage.tasks:
            groups.append({"params": llm, "lr": stage.lr})
        for g in groups:
            g["initial_lr"] = g["lr"]
        return torch.optim.AdamW(groups, betas=(0.9, 0.98), weight_decay=0.01)

    def run(self, stages: Sequence[Stage] = STAGES, progress: bool = True) -> Path:
        state_path = self.out / "state.pt"
        done_stage, done_step, opt_state = -1, 0, None
        if state_path.exists():
            st = torch.load(state_path, weights_only=False)
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
            if start >= stage.steps:
                continue
            bar = Progress(stage.steps, progress and self.rank == 0)
            self.model.train()
            t0 = time.perf_counter()
            for step in range(start, stage.steps):
                warm = min(1.0, (step + 1) / 100)
                decay = 0.5 * (1 + math.cos(math.pi * step / stage.steps))
                for g in opt.param_groups:
                    g["lr"] = g["initial_lr"] * warm * (0.1 + 0.9 * decay)
                samples = self.batch(stage, step)[self.rank :: self.world]
                if stage.tasks:
                    loss, m = self.joint_step(samples, stage)
                else:
                    loss, m = self.vision_step(samples)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                self.average_gradients(opt)
                torch.nn.utils.clip_grad_norm_(
                    list(self.model.parameters()) + list(self.aux.parameters()), 1.0
                )
                opt.step()
                m.update(
                    stage=stage.name,
                    step=step + 1,
                    loss=float(loss),
                    lr=opt.param_groups[-1]["lr"],
                    secs=time.perf_counter() - t0,
                )
                self.metrics.append(m)
                secs = m["secs"] - (self.metrics[-2]["secs"] if step > start else 0.0)
                tokens_per_s = self.world * m["tokens"] / max(secs, 1e-9)
                bar.update(step + 1, {**m, "tokens_per_s": tokens_per_s})
                if self.rank == 0 and ((step + 1) % 50 == 0 or step + 1 == stage.steps):
                    self.save_state(si, step + 1, opt)
                    self.write_metrics()
            bar.close()
        return self.export() if self.rank == 0 else self.out / "model"

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


def _worker(rank: int, world: int, port: int, out: Path, seed: int, stages: tuple) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        folder = Recipe(out, seed, 1, rank, world).run(stages)
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
    p.add_argument("--vision-steps", type=int, default=STAGES[0].steps)
    p.add_argument("--read-steps", type=int, default=STAGES[1].steps)
    p.add_argument("--joint-steps", type=int, default=STAGES[2].steps)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = (
        replace(STAGES[0], steps=a.vision_steps),
        replace(STAGES[1], steps=a.read_steps),
        replace(STAGES[2], steps=a.joint_steps),
    )
    if a.workers > 1:
        torch.multiprocessing.spawn(
            _worker, (a.workers, _free_port(), out, a.seed, stages), nprocs=a.workers
        )
        return
    folder = Recipe(out, a.seed, a.threads).run(stages)
    print(f"model written to {folder}")


if __name__ == "__main__":
    main()
