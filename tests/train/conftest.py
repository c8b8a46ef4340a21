"""Tiny SFT / DPO files (with images) for the training tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

ANSWERS = ["The red box is on the left.", "0 1 2 3", "Count the boxes.", "我们看到一个红色的盒子。"]


def write_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, color in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (56 + 28 * i, 56), color).save(folder / f"im{i}.png")


def sft_lines(with_images: bool = True) -> list[dict]:
    lines = []
    for i, answer in enumerate(ANSWERS):
        user: list | str = "Describe this image."
        if with_images and i < 3:
            user = [
                {"type": "image", "image": f"images/im{i}.png"},
                {"type": "text", "text": "Describe this image."},
            ]
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        if i == 1:  # two rounds
            messages += [
                {"role": "user", "content": "What is in the picture?"},
                {"role": "assistant", "content": "A box."},
            ]
        lines.append({"messages": messages})
    return lines


def write_jsonl(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    return path


@pytest.fixture
def sft_file(tmp_path: Path) -> Path:
    write_images(tmp_path / "images")
    return write_jsonl(tmp_path / "train.jsonl", sft_lines())


@pytest.fixture
def dpo_file(tmp_path: Path) -> Path:
    write_images(tmp_path / "images")
    lines = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": "images/im0.png"},
                        {"type": "text", "text": "What color is the box?"},
                    ],
                }
            ],
            "chosen": "The red box.",
            "rejected": "The blue box is on the right.",
        },
        {
            "messages": [{"role": "user", "content": "Count the boxes."}],
            "chosen": "0 1 2 3",
            "rejected": "emoji test",
        },
    ]
    return write_jsonl(tmp_path / "dpo.jsonl", lines)
