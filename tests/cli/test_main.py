"""The ``qwenvl`` command line, checked against the library (``LLM.chat``) and the HF model."""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import tiny
from qwenvl import LLM, SamplingParams, kernels
from qwenvl.cli.common import ProgressBar
from qwenvl.cli.main import main

SRC = Path(__file__).resolve().parents[2] / "src"
FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
MAX_TOKENS = 8


@pytest.fixture
def png(tmp_path: Path) -> Path:
    path = tmp_path / "boxes.png"
    image = Image.new("RGB", (84, 56), (200, 30, 30))
    image.paste((20, 40, 220), (42, 0, 84, 56))
    image.save(path)
    return path


def user(text: str, *images: Path) -> dict:
    content = [{"type": "image", "image": str(im)} for im in images]
    return {"role": "user", "content": [*content, {"type": "text", "text": text}]}


def built(checkpoints, capsys, family: str) -> Path:
    """The tiny checkpoint, with anything its first build printed dropped from capsys."""
    ckpt = checkpoints(family)
    capsys.readouterr()
    return ckpt


def reply(llm: LLM, messages: list[dict]) -> str:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    return llm.chat(messages, params)[0].outputs[0].text


def chat_args(ckpt: Path, *extra: str) -> list[str]:
    return ["chat", "--model", str(ckpt), "--temperature", "0", "--max-tokens", str(MAX_TOKENS)] + [
        *extra
    ]


# --- chat ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_one_shot_equals_llm_chat(family, checkpoints, llms, png, capsys):
    ckpt = built(checkpoints, capsys, family)
    code = main(chat_args(ckpt, "--image", str(png), "Describe this image."))
    out, err = capsys.readouterr()
    assert code == 0
    assert out == reply(llms(family), [user("Describe this image.", png)]) + "\n"
    assert err == ""  # no progress bar off a terminal for a small checkpoint


def test_one_shot_streams_each_delta(checkpoints, llms, png, monkeypatch):
    class Recorder(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.writes: list[str] = []

        def write(self, s: str) -> int:
            self.writes.append(s)
            return super().write(s)

    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(chat_args(checkpoints("qwen2_vl"), "--image", str(png), "Count the boxes.")) == 0
    llm, messages = llms("qwen2_vl"), [user("Count the boxes.", png)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    deltas = [e.text for e in llm.stream_chat(messages, params)]
    assert len(deltas) > 1
    assert out.writes == [*deltas, "\n"]  # one write per streamed delta, as it arrives
    assert "".join(deltas) == reply(llm, messages)


def test_system_prompt_and_prompt_from_stdin(checkpoints, llms, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is in the picture?"))
    code = main(chat_args(checkpoints("qwen2_vl"), "--system", "Output the color.", "-"))
    expected = reply(
        llms("qwen2_vl"),
        [{"role": "system", "content": "Output the color."}, user("What is in the picture?")],
    )
    assert code == 0
    assert capsys.readouterr().out == expected + "\n"


def test_interactive_keeps_history(checkpoints, llms, png, monkeypatch, capsys):
    seen: list[list[dict]] = []
    stream_chat = LLM.stream_chat

    def spy(self, messages, *args, **kwargs):
        seen.append(copy.deepcopy(messages))
        return stream_chat(self, messages, *args, **kwargs)

    monkeypatch.setattr(LLM, "stream_chat", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Describe this image.\n\nCount the boxes.\n"))
    ckpt = built(checkpoints, capsys, "qwen2_5_vl")
    code = main(chat_args(ckpt, "--image", str(png)))
    out, err = capsys.readouterr()

    llm = llms("qwen2_5_vl")
    first = [user("Describe this image.", png)]
    r1 = reply(llm, first)
    second = [*first, {"role": "assistant", "content": r1}, user("Count the boxes.")]
    r2 = reply(llm, second)
    assert code == 0
    assert out == f"{r1}\n{r2}\n"
    assert err == ""  # no prompt or banner when stdin is not a terminal
    assert seen == [first, second]  # the first reply went back to the model in turn two


def test_interactive_commands(checkpoints, llms, png, monkeypatch, capsys):
    lines = [
        "Count the boxes.",
        "/image " + str(png),
        "What is in the picture?",  # gets the image and the history
        "/reset",
        "Count the boxes.",  # a fresh conversation again: same reply as the first turn
        "/exit",
        "never sent",
    ]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(chat_args(checkpoints("qwen2_vl"))) == 0
    llm = llms("qwen2_vl")
    first = [user("Count the boxes.")]
    r1 = reply(llm, first)
    r2 = reply(
        llm, [*first, {"role": "assistant", "content": r1}, user("What is in the picture?", png)]
    )
    assert capsys.readouterr().out == f"{r1}\n{r2}\n{r1}\n"


def test_interactive_bad_image_ends_the_turn_not_the_chat(
    checkpoints, llms, tmp_path, monkeypatch, capsys
):
    missing = tmp_path / "missing.png"
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {missing}\nhello\nhello\n"))
    assert main(chat_args(built(checkpoints, capsys, "qwen2_vl"))) == 0
    out, err = capsys.readouterr()
    assert out == reply(llms("qwen2_vl"), [user("hello")]) + "\n"
    assert err.startswith("error: ") and "missing.png" in err


# --- info ------------------------------------------------------------------------------------
def info_json(ckpt: Path, capsys, *extra: str) -> dict:
    assert main(["info", "--model", str(ckpt), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def hf_counts(hf) -> dict[str, int]:
    """Parameter counts of the transformers model (``parameters()`` lists tied tensors once)."""
    total = sum(p.numel() for p in hf.parameters())
    vision = sum(p.numel() for name, p in hf.named_parameters() if "visual." in name)
    return {"total": total, "vision": vision, "language": total - vision}


@pytest.mark.parametrize("family", FAMILIES)
def test_info_json_matches_config_and_hf(family, checkpoints, hf_models, capsys):
    ckpt = checkpoints(family)
    info = info_json(ckpt, capsys)
    hf = hf_models(family)
    assert info["family"] == {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL"}[family]
    assert info["model_type"] == family
    text = info["text"]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        assert text[key] == tiny.TEXT[key]
    assert text["max_position_embeddings"] == tiny.TEXT["max_position_embeddings"]
    assert text["vocab_size"] == hf.config.text_config.vocab_size
    assert info["parameters"] == hf_counts(hf)
    vision = info["vision"]
    if family == "qwen2_vl":
        assert (vision["depth"], vision["embed_dim"], vision["num_heads"]) == (2, 32, 2)
        assert "window_size" not in vision
    else:
        assert (vision["depth"], vision["embed_dim"], vision["num_heads"]) == (4, 32, 2)
        assert vision["window_size"] == 112
        assert vision["fullatt_block_indexes"] == [1, 3]
    assert (vision["patch_size"], vision["spatial_merge_size"]) == (14, 2)
    assert info["dtype"] == "float32" and info["stored_dtypes"] == ["float32"]
    assert info["weights_bytes"] == (ckpt / "model.safetensors").stat().st_size
    assert info["disk_bytes"] == sum(f.stat().st_size for f in ckpt.iterdir())
    assert info["image_limits"] == {
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "min_tokens": 3136 // (28 * 28),
        "max_tokens": 12845056 // (28 * 28),
    }
    assert info["sampling_defaults"] == {"temperature": 0.0}  # do_sample: false


def test_info_counts_tied_embeddings_once(checkpoints, hf_models, capsys):
    info = info_json(checkpoints("qwen2_vl", tie=True), capsys)
    tied = hf_counts(tiny.load_hf(checkpoints("qwen2_vl", tie=True), "qwen2_vl"))
    untied = hf_counts(hf_models("qwen2_vl"))
    assert info["text"]["tie_word_embeddings"] is True
    assert info["parameters"] == tied
    embedding = info["text"]["vocab_size"] * info["text"]["hidden_size"]
    assert tied["total"] == untied["total"] - embedding


def test_info_pixel_overrides_and_table(checkpoints, capsys):
    ckpt = checkpoints("qwen2_5_vl")
    info = info_json(ckpt, capsys, "--min-pixels", str(8 * 784), "--max-pixels", str(100 * 784))
    assert info["image_limits"]["min_tokens"] == 8
    assert info["image_limits"]["max_tokens"] == 100
    assert main(["info", "--model", str(ckpt)]) == 0
    table = capsys.readouterr().out
    assert "Qwen2.5-VL (qwen2_5_vl)" in table
    assert f"{info['parameters']['total']:,}" in table
    assert "fullatt_block_indexes" in table and "16,384 tokens" in table


# --- errors and the real entry point ----------------------------------------------------------
def run_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and "Traceback" not in err
    return err


def test_missing_folder(tmp_path, capsys):
    err = run_error(["chat", "--model", str(tmp_path / "nope"), "hi"], capsys)
    assert "not found" in err and "nope" in err
    assert "not found" in run_error(["info", "--model", str(tmp_path / "nope")], capsys)


def test_unknown_model_type(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for argv in (["chat", "--model", str(tmp_path), "hi"], ["info", "--model", str(tmp_path)]):
        err = run_error(argv, capsys)
        assert "'llama'" in err and "not supported" in err


def test_unreadable_images(checkpoints, tmp_path, capsys):
    ckpt = built(checkpoints, capsys, "qwen2_vl")
    err = run_error(chat_args(ckpt, "--image", str(tmp_path / "missing.png"), "hi"), capsys)
    assert "missing.png" in err and "not found" in err
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a picture" * 10)
    err = run_error(chat_args(ckpt, "--image", str(garbage), "hi"), capsys)
    assert "garbage.png" in err


def test_bad_options(checkpoints, capsys):
    ckpt = str(built(checkpoints, capsys, "qwen2_vl"))
    assert "top_p" in run_error(["chat", "--model", ckpt, "--top-p", "0", "hi"], capsys)
    err = run_error(
        ["info", "--model", ckpt, "--min-pixels", "9000", "--max-pixels", "100"], capsys
    )
    assert "min_pixels" in err
    with pytest.raises(SystemExit) as e:  # argparse usage errors
        main(["chat", "--model", ckpt, "--dtype", "int3", "hi"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


def test_progress_bar():
    stream = io.StringIO()
    bar = ProgressBar(stream, min_bytes=0, width=10)
    for done in (0, 25_000_000, 25_000_001, 50_000_000):  # the repeated 50.0% is not redrawn
        bar(done, 50_000_000)
    bar.close()
    assert stream.getvalue().split("\r")[1:] == [
        "loading weights [..........]   0.0% 0/50 MB",
        "loading weights [#####.....]  50.0% 25/50 MB",
        "loading weights [##########] 100.0% 50/50 MB\n",
    ]
    quiet = io.StringIO()
    small = ProgressBar(quiet)  # not a terminal and a small checkpoint: nothing drawn
    small(10, 10)
    small.close()
    assert quiet.getvalue() == ""
    partial = io.StringIO()
    stopped = ProgressBar(partial, min_bytes=0)
    stopped(5, 10)
    stopped.close()  # loading stopped short (an error): the line still ends
    assert "50.0%" in partial.getvalue() and partial.getvalue().endswith("\n")


def python_m_qwenvl(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, "-m", "qwenvl", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_python_m_qwenvl(checkpoints, llms, png, tmp_path):
    ckpt = checkpoints("qwen2_vl")
    done = python_m_qwenvl(*chat_args(ckpt, "--image", str(png), "Describe this image."))
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == reply(llms("qwen2_vl"), [user("Describe this image.", png)]) + "\n"
    failed = python_m_qwenvl("info", "--model", str(tmp_path / "nope"))
    assert failed.returncode == 2
    assert failed.stderr.startswith("error: ") and "Traceback" not in failed.stderr


# --- video -----------------------------------------------------------------------------------
@pytest.fixture
def clip(tmp_path: Path) -> Path:
    """16 frames of 64x48 at 8 fps (2 s), each a different grey."""
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=8)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(16):
            frame = Image.new("RGB", (64, 48), (i * 16, 255 - i * 16, 128))
            for p in s.encode(av.VideoFrame.from_image(frame)):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def video_user(text: str, video: Path, **options) -> dict:
    item = {"type": "video", "video": str(video), **options}
    return {"role": "user", "content": [item, {"type": "text", "text": text}]}


@pytest.mark.parametrize("family", FAMILIES)
def test_one_shot_video(family, checkpoints, llms, clip, monkeypatch, capsys):
    seen: list[list[dict]] = []
    stream_chat = LLM.stream_chat

    def spy(self, messages, *args, **kwargs):
        seen.append(copy.deepcopy(messages))
        return stream_chat(self, messages, *args, **kwargs)

    monkeypatch.setattr(LLM, "stream_chat", spy)
    ckpt = built(checkpoints, capsys, family)
    argv = ["--video", str(clip), "--fps", "4", "--max-video-tokens", "150", "What happens?"]
    assert main(chat_args(ckpt, *argv)) == 0
    out, err = capsys.readouterr()
    turn = video_user("What happens?", clip, fps=4.0, max_video_tokens=150)
    assert seen == [[turn]]
    assert out == reply(llms(family), [turn]) + "\n" and err == ""
    # 2 s at 4 fps = 8 frames (4 groups of 10x14 merged tokens = 560) do not fit 150 tokens;
    # 64x48 frames are already at the min_pixels floor (280x392), so 2 frames: 140 tokens.
    video = llms(family).processor.prepare_chat([turn]).videos[0]
    assert video.num_tokens == 140 and video.metadata.frame_indices == [0, 15]


def test_interactive_video_command(checkpoints, llms, clip, monkeypatch, capsys):
    lines = ["/video", f"/video {clip}", "What happens?", "And now?"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    ckpt = built(checkpoints, capsys, "qwen2_vl")
    assert main(chat_args(ckpt, "--max-video-tokens", "300")) == 0
    out, err = capsys.readouterr()
    llm = llms("qwen2_vl")
    first = [video_user("What happens?", clip, max_video_tokens=300)]
    r1 = reply(llm, first)
    r2 = reply(llm, [*first, {"role": "assistant", "content": r1}, user("And now?")])
    assert out == f"{r1}\n{r2}\n"
    assert err == "usage: /video PATH\n"


def test_video_errors(checkpoints, clip, tmp_path, capsys):
    ckpt = built(checkpoints, capsys, "qwen2_vl")
    argv = chat_args(ckpt, "--video", str(clip), "--max-video-tokens", "100", "hi")
    err = run_error(argv, capsys)
    assert "need 140 tokens, 40 more than the budget" in err
    err = run_error(chat_args(ckpt, "--video", str(tmp_path / "gone.mp4"), "hi"), capsys)
    assert "gone.mp4" in err and "not found" in err
    for bad in (["--fps", "0"], ["--fps", "x"], ["--max-video-tokens", "-3"]):
        with pytest.raises(SystemExit) as e:
            main(chat_args(ckpt, "--video", str(clip), *bad, "hi"))
        assert e.value.code == 2


def test_info_says_which_kernel_path_runs(checkpoints):
    """``qwenvl info`` names the CPU kernel path; the kill switch shows as such."""
    cmd = [sys.executable, "-m", "qwenvl", "info", "--model", str(checkpoints("qwen2_vl"))]
    env = {**os.environ, "QWENVL_KERNELS": "0"}
    off = json.loads(subprocess.run([*cmd, "--json"], env=env, capture_output=True).stdout)
    assert off["kernels"] == "disabled by QWENVL_KERNELS=0"
    table = subprocess.run(cmd, capture_output=True, text=True).stdout
    line = next(ln for ln in table.splitlines() if ln.strip().startswith("CPU kernels"))
    if kernels.available():  # the folder it names holds the library this process loaded
        folder = line.split(", ")[-1].rstrip(")")
        assert "CPU kernels active" in line and any(Path(folder).glob("*.so"))
    else:
        assert "unavailable" in line or "disabled" in line
