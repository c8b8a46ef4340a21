"""The streaming index: lengths from headers equal the real encoder's, one pass reports every
problem, media outside the data folder are refused, and training decodes lazily."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import sft_lines, write_images, write_jsonl
from qwenvl.checkpoint import load_config
from qwenvl.processing.prompt import Processor
from qwenvl.train import TrainConfig, Trainer
from qwenvl.train.data import (
    DataError,
    Lengths,
    MediaPaths,
    TokenCounter,
    encode_conversation,
    encode_record,
    read_jsonl,
)
from qwenvl.train.dataset import Units, index_file
from video_clips import make_video


def _processor(checkpoints, family="qwen2_vl"):
    path = checkpoints(family)
    return Processor.from_pretrained(path, load_config(path))


def _varied(root: Path) -> list[dict]:
    """Images of odd sizes and orientations, per-item and per-line pixel options, fixed sizes,
    a video file, a video as frames, several rounds, text only, tools-free system turns."""
    write_images(root / "images")
    Image.new("RGB", (333, 97), "red").save(root / "images/wide.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the model sees it 97 wide, 333 high
    Image.new("RGB", (333, 97), "blue").save(root / "images/rotated.jpg", exif=exif)
    for k in range(5):
        Image.new("RGB", (90, 60), (40 * k, 0, 0)).save(root / f"images/f{k}.png")
    make_video(root / "clip.mp4", 30, 10)
    img = {"type": "image", "image": "images/wide.jpg"}
    lines = sft_lines()
    lines.append(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [
                        img,
                        {**img, "image": "images/rotated.jpg", "max_pixels": 28 * 28 * 4},
                        {"type": "text", "text": "Compare."},
                    ],
                },
                {"role": "assistant", "content": "Same size."},
            ],
            "min_pixels": 28 * 28 * 2,
        }
    )
    lines.append({"messages": [
        {"role": "user", "content": [{**img, "resized_height": 56, "resized_width": 84},
                                     {"type": "video", "video": "clip.mp4", "fps": 4}]},
        {"role": "assistant", "content": "A clip."},
        {"role": "user", "content": [{"type": "video", "fps": 2, "video":
                                      [f"images/f{k}.png" for k in range(5)]}]},
        {"role": "assistant", "content": "Frames."}]})  # fmt: skip
    return lines + _repeats()


def _repeats() -> list[dict]:
    """Lines the index pass's caches answer: the same text about other pictures (its render and
    pieces remembered, its media not), the same picture again (its size remembered), system
    prompts and rounds that recur, special-token strings typed in text, spaces and newlines at
    piece edges, several languages."""
    ask = [{"type": "image", "image": "images/im0.png"}, {"type": "text", "text": "Colour?"}]
    other = [{**ask[0], "image": "images/im2.png"}, ask[1]]
    system = {"role": "system", "content": "You are a careful assistant.\n"}
    lines = []
    for content in (ask, other, ask, list(reversed(other))):
        lines.append({"messages": [system, {"role": "user", "content": content},
                                   {"role": "assistant", "content": "Red."}]})  # fmt: skip
    lines.append({"messages": [
        system, {"role": "user", "content": "Say <|im_end|> or <|image_pad|>."},
        {"role": "assistant", "content": "  <|im_start|>system\nno<|vision_start|> \n\n"},
        {"role": "user", "content": [ask[0], {"type": "text", "text": "\n Encore ? 再来一次。"}]},
        {"role": "assistant", "content": "Red.\n"}]})  # fmt: skip
    lines.append({"messages": lines[-1]["messages"][1:], "max_pixels": 28 * 28 * 4})
    return lines


def test_indexed_lengths_equal_the_encoders(checkpoints, tmp_path):
    for family in ("qwen2_vl", "qwen2_5_vl"):
        proc = _processor(checkpoints, family)
        lines = _varied(tmp_path)
        path = write_jsonl(tmp_path / "train.jsonl", lines)
        index = index_file(path, proc)
        # the truth: the encoder, pixels and all, on each checked record
        truth = [len(encode_conversation(proc, r["messages"])) for _, r in read_jsonl(path)]
        assert [n for (n,) in index.lengths] == truth
        assert index.lines == list(range(1, len(lines) + 1))
        decoded = list(Units(index, proc))  # and decoding checks each against its index entry
        assert [len(u[0]) for u in decoded] == truth
        print(f"{family}: {len(truth)} lines, lengths {truth}")


def test_token_counter_with_warm_caches_equals_the_encoder(checkpoints, tmp_path):
    """``TokenCounter`` remembers renders, text pieces and picture sizes over a pass; counted
    twice over (cold, then every answer from its caches) it must give the encoder's lengths."""
    proc = _processor(checkpoints)
    records = [r for _, r in read_jsonl(write_jsonl(tmp_path / "t.jsonl", _varied(tmp_path)))]
    counter = TokenCounter(proc)
    truth = [len(encode_conversation(proc, r["messages"])) for r in records]
    for _ in range(2):
        assert [Lengths(proc, r["messages"], counter)(r["messages"]) for r in records] == truth
    assert counter._chats and counter._pieces and counter._sizes  # the caches were used
    # the count without the media is the encoder's text, placeholders taken out
    cfg = proc.config
    for r in records:
        ids, _ = proc.encode_chat(proc.render_marked(r["messages"], add_generation_prompt=False))
        pads = ids.count(cfg.image_token_id) + ids.count(cfg.video_token_id)
        assert counter.text(r["messages"]) == len(ids) - pads


def test_a_lone_surrogate_is_reported_by_the_counted_index_too(checkpoints, tmp_path):
    proc = _processor(checkpoints)
    path = tmp_path / "s.jsonl"
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": '
    path.write_text(good + '"yes"}]}\n' + good + '"bad \\ud800"}]}\n')
    with pytest.raises(DataError, match=r"s.jsonl:2: .*surrogate") as e:
        index_file(path, proc)
    assert "(1 problem)" in str(e.value)


def test_split_pieces_and_dpo_pairs_match_the_encoder(checkpoints, tmp_path):
    proc = _processor(checkpoints)
    write_images(tmp_path / "images")
    path = write_jsonl(tmp_path / "long.jsonl", [sft_lines()[1]])
    full = len(encode_conversation(proc, read_jsonl(path)[0][1]["messages"]))
    index = index_file(path, proc, max_len=full - 1, overlong="split")
    pieces = encode_record(proc, read_jsonl(path)[0][1], 1, max_len=full - 1, overlong="split")
    assert [n for (n,) in index.lengths] == [len(p) for p in pieces] and len(pieces) == 2
    prompt = sft_lines()[0]["messages"][:1]
    pair = {"messages": prompt, "chosen": "A red box.", "rejected": "Two blue boxes, far away."}
    dpo = index_file(write_jsonl(tmp_path / "dpo.jsonl", [pair]), proc, "dpo")
    msgs = read_jsonl(tmp_path / "dpo.jsonl", "dpo")[0][1]
    truth = tuple(
        len(encode_conversation(proc, msgs["messages"] + [msgs[k]], last_turn_only=True))
        for k in ("chosen", "rejected")
    )
    assert dpo.lengths == [truth]


def test_one_pass_reports_every_problem_without_quoting_files(checkpoints, tmp_path):
    proc = _processor(checkpoints)
    write_images(tmp_path / "images")
    (tmp_path / "images/notes.png").write_bytes(b"SECRET-TOKEN-1234 not a picture")
    good = Image.new("RGB", (64, 64), "red")
    good.save(tmp_path / "images/cut.png")
    data = (tmp_path / "images/cut.png").read_bytes()
    (tmp_path / "images/cut.png").write_bytes(data[:20])  # the header is cut
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    good.save(outside)
    lines = sft_lines()
    lines[1] = {"messages": [{"role": "user", "content": "hi"}]}
    for k, name in ((0, "images/notes.png"), (2, "images/cut.png"), (3, str(outside))):
        lines[k]["messages"][0]["content"] = [{"type": "image", "image": name},
                                              {"type": "text", "text": "?"}]  # fmt: skip
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with open(path, "ab") as f:
        f.write(b"{not json\n\xff\xfeSECRET-TOKEN-1234\n")
    with pytest.raises(DataError) as e:
        index_file(path, proc, workers=1)
    msg = str(e.value)
    print(msg)
    assert "(6 problems)" in msg
    for line, what in ((1, "notes.png"), (2, "no assistant message"), (3, "cut.png"),
                       (4, "outside the data folder"), (5, "not valid JSON"),
                       (6, "not UTF-8")):  # fmt: skip
        assert any(ln.startswith(f"{path}:{line}:") and what in ln for ln in msg.splitlines())
    assert "SECRET" not in msg and "\\x" not in msg
    # the same file with the outside picture allowed: only that line's complaint goes
    with pytest.raises(DataError) as e:
        index_file(path, proc, allow_outside=True)
    assert "(5 problems)" in str(e.value) and "outside" not in str(e.value)


def test_a_file_broken_after_indexing_fails_the_step_naming_its_line(checkpoints, tmp_path):
    write_images(tmp_path / "images")
    path = write_jsonl(tmp_path / "train.jsonl", sft_lines())
    cfg = TrainConfig(model=str(checkpoints("qwen2_vl")), data=str(path),
                      output=str(tmp_path / "o"), progress=False, plot=False,
                      batch_size=4, data_workers=1)  # fmt: skip
    trainer = Trainer(cfg)
    (tmp_path / "images/im1.png").write_bytes(b"gone")
    with pytest.raises(DataError, match=r"train.jsonl:2: .*im1.png"):
        trainer.run()


def test_max_steps_beyond_the_epochs_goes_on(checkpoints, tmp_path, caplog):
    write_images(tmp_path / "images")
    path = write_jsonl(tmp_path / "train.jsonl", sft_lines())
    cfg = TrainConfig(model=str(checkpoints("qwen2_vl")), data=str(path),
                      output=str(tmp_path / "o"), progress=False, plot=False,
                      batch_size=2, epochs=1, max_steps=5, data_workers=0)  # fmt: skip
    result = Trainer(cfg).run()
    epochs = [m["epoch"] for m in result.metrics if "loss" in m]
    assert epochs == [0, 0, 1, 1, 2]  # 4 lines at 2 per step: 2 steps an epoch
    assert "max_steps 5 is more than 1 epoch(s) give (2 steps)" in caplog.text
    assert json.loads((tmp_path / "o/metrics.jsonl").read_text().splitlines()[-1])["step"] == 5


def _chunks(png: bytes) -> list[bytes]:
    out, pos = [], 8
    while pos < len(png):
        n = int.from_bytes(png[pos : pos + 4], "big")
        out.append(png[pos : pos + 12 + n])
        pos += 12 + n
    return out


def test_png_sizes_from_headers_see_an_exif_rotation_before_or_after_the_pixels():
    """``OpenedImage.size`` walks a PNG's chunks instead of letting Pillow decode it to look
    for an eXIf; a rotation stored before or after IDAT must still turn the size."""
    import io

    from qwenvl.processing.media import load_image, open_image

    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (60, 20), "red").save(buf, "PNG", exif=exif)
    early = buf.getvalue()
    chunks = _chunks(early)
    kinds = [c[4:8] for c in chunks]
    assert kinds.index(b"eXIf") < kinds.index(b"IDAT")
    moved = [c for c in chunks if c[4:8] != b"eXIf"]
    late = early[:8] + b"".join(moved[:-1] + [chunks[kinds.index(b"eXIf")], moved[-1]])
    plain = io.BytesIO()
    Image.new("RGB", (60, 20), "red").save(plain, "PNG")
    for data, size in ((early, (20, 60)), (late, (20, 60)), (plain.getvalue(), (60, 20))):
        assert open_image(data).size == size == load_image(data).size


def _png(size=(60, 20), mode="RGB", **save) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new(mode, size, 1 if mode in ("1", "P", "L", "I;16") else "red").save(buf, "PNG", **save)
    return buf.getvalue()


def _with_chunk(png: bytes, kind: bytes, body: bytes, before: bytes = b"IDAT") -> bytes:
    import zlib

    chunks = _chunks(png)
    at = next(k for k, c in enumerate(chunks) if c[4:8] == before)
    new = len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")
    return png[:8] + b"".join(chunks[:at] + [new] + chunks[at:])


def _png_cases() -> dict[str, tuple[bytes, bool]]:
    """name -> (file bytes, whether the direct read answers it: else Pillow does)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("k", "v")
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb = _png()
    ihdr_bad_crc = bytearray(rgb)
    ihdr_bad_crc[29] ^= 1
    phys = _png(dpi=(72, 72))
    phys_bad_crc = bytearray(phys)
    phys_bad_crc[phys.index(b"pHYs") + 13] ^= 1
    filtered = bytearray(rgb)
    filtered[27] = 1  # IHDR filter method: Pillow refuses it
    bad_mode = bytearray(rgb)
    bad_mode[24] = 3  # 3-bit RGB is no PNG mode
    zero = bytearray(rgb)
    zero[16:20] = bytes(4)
    return {
        "rgb": (rgb, True),
        "rgba": (_png(mode="RGBA"), True),
        "grey": (_png(mode="L"), True),
        "grey 16": (_png(mode="I;16"), True),
        "bilevel": (_png(mode="1"), True),
        "palette": (_png(mode="P"), True),
        "palette+tRNS": (_png(mode="P", transparency=0), False),
        "pHYs": (phys, True),
        "gAMA sRGB cHRM": (
            _with_chunk(
                _with_chunk(_with_chunk(rgb, b"gAMA", bytes(4)), b"sRGB", b"\0"), b"cHRM", bytes(32)
            ),
            True,
        ),  # fmt: skip
        "short gAMA": (_with_chunk(rgb, b"gAMA", b"\0"), False),
        "tEXt": (_png(pnginfo=info), False),
        "text after IDAT": (_with_chunk(rgb, b"tEXt", b"k\0v", before=b"IEND"), True),
        "eXIf before IDAT": (_png(exif=exif), False),
        "eXIf after IDAT": (_with_chunk(rgb, b"eXIf", exif.tobytes()[6:], before=b"IEND"), False),
        "IHDR checksum": (bytes(ihdr_bad_crc), False),
        "pHYs checksum": (bytes(phys_bad_crc), False),
        "filter method": (bytes(filtered), False),
        "unknown mode": (bytes(bad_mode), False),
        "zero width": (bytes(zero), False),
        "cut in IHDR": (rgb[:30], False),
        "cut before IDAT": (rgb[:33], False),
        "cut in IDAT": (rgb[:45], True),  # Pillow opens it too: the pixels are not read
        "no IEND": (rgb[:-12], True),
        "not a PNG": (b"GIF89a" + rgb[6:], False),
    }


def test_png_sizes_read_directly_equal_pillows_or_leave_it_to_pillow(tmp_path, monkeypatch):
    """``image_size`` reads a plain PNG's chunks without Pillow (the index pass does it for every
    picture): on every case, good or broken, it gives ``open_image``'s size or its exact error,
    and it answers directly only the cases it is sure of."""
    from qwenvl.processing.media import _plain_png_size, image_size, open_image
    from qwenvl.processing.policy import MediaPolicy

    def outcome(f):
        try:
            return f()
        except Exception as e:
            return type(e), str(e)

    for name, (data, direct) in _png_cases().items():
        path = tmp_path / f"{name}.png"
        path.write_bytes(data)
        for policy in (MediaPolicy(), MediaPolicy(max_image_pixels=1000)):
            got = outcome(lambda: image_size(str(path), policy))  # noqa: B023
            assert got == outcome(lambda: open_image(str(path), policy).size), name  # noqa: B023
        assert (_plain_png_size(data) is not None) == direct, name
        print(name, outcome(lambda: image_size(str(path))), got)  # noqa: B023
    assert image_size(str(tmp_path / "rgb.png")) == (60, 20)
    assert image_size(str(tmp_path / "eXIf after IDAT.png")) == (20, 60)  # turned
    # a size Pillow calls a possible decompression bomb is left to Pillow (its warning, error)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert _plain_png_size(_png()) is None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert _plain_png_size(_png()) is None


def test_media_folders_resolved_once_give_the_full_resolves_answer(tmp_path):
    """``MediaPaths.inside`` answers from a folder it resolved before; links anywhere on the way,
    in and out of the data folder, must give what resolving each path in full gives."""
    root = tmp_path / "data"
    (root / "media").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    for folder in (root / "media", tmp_path / "elsewhere", root):
        Image.new("RGB", (8, 8)).save(folder / "a.png")
    (root / "media/out.png").symlink_to(tmp_path / "elsewhere/a.png")
    (root / "media/in.png").symlink_to(root / "a.png")
    (root / "linked").symlink_to(tmp_path / "elsewhere")
    (root / "loop").symlink_to(root)
    (tmp_path / "elsewhere/back.png").symlink_to(root / "media/a.png")
    names = ["media/a.png", "media/out.png", "media/in.png", "linked/a.png", "linked/back.png",
             "loop/media/a.png", "../data/a.png", "../elsewhere/a.png", "media/../a.png",
             "../data", "media", str(tmp_path / "elsewhere/a.png"), "a.png"]  # fmt: skip
    where = MediaPaths(root, False)
    for _ in range(2):  # the second round answers from the remembered folders
        for name in names:
            path = root / name
            truth = path.resolve().is_relative_to(root.resolve())
            assert where.inside(path) == truth, name
    assert not where.inside(root / "linked/a.png") and where.inside(root / "linked/back.png")
