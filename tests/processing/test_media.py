"""Tests for qwenvl.processing.media: every source kind, limits and error messages (no internet)."""

from __future__ import annotations

import base64
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from media_helpers import IMAGE, PNG, encode, noise, png_with_header_size, same_pixels
from PIL import Image

from qwenvl.errors import ConfigError, MediaError, MediaTooLargeError
from qwenvl.processing.fetch import fetch_url
from qwenvl.processing.media import load_image
from qwenvl.processing.policy import MediaPolicy

# ---------------------------------------------------------------------------------------------
# every source kind


def test_pil_source_is_converted_and_copied():
    rgba = noise(channels=4)
    out = load_image(rgba)
    assert out.mode == "RGB" and out.size == rgba.size
    rgb = noise()
    out = load_image(rgb)
    assert out is not rgb and same_pixels(out, rgb)


def test_bytes_and_bytearray():
    assert same_pixels(load_image(PNG), IMAGE)
    assert same_pixels(load_image(bytearray(PNG)), IMAGE)


def test_local_paths_and_file_urls(tmp_path: Path):
    path = tmp_path / "a b.png"  # a space: file URLs percent-encode it
    path.write_bytes(PNG)
    for source in (path, str(path), path.as_uri(), f"  {path.as_uri()}  "):
        out = load_image(source)
        assert out.mode == "RGB" and same_pixels(out, IMAGE), source


def test_data_uri_and_raw_base64():
    b64 = base64.b64encode(PNG).decode()
    assert same_pixels(load_image(f"data:image/png;base64,{b64}"), IMAGE)
    assert same_pixels(load_image(f"data:image;base64,{b64}"), IMAGE)  # qwen-vl-utils' form
    assert same_pixels(load_image(b64), IMAGE)
    assert same_pixels(load_image(base64.urlsafe_b64encode(PNG).decode().rstrip("=")), IMAGE)
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
    assert same_pixels(load_image(wrapped), IMAGE)


def test_http_url(server):
    assert same_pixels(load_image(f"{server}/img.png"), IMAGE)
    assert fetch_url(f"{server}/img.png", MediaPolicy()) == PNG


def test_http_redirects(server):
    # /redirect/n answers with n + 1 redirects before the image
    assert same_pixels(load_image(f"{server}/redirect/4"), IMAGE)
    with pytest.raises(MediaError, match="too many redirects"):
        load_image(f"{server}/redirect/5")
    assert same_pixels(load_image(f"{server}/redirect/0", MediaPolicy(max_redirects=1)), IMAGE)
    with pytest.raises(MediaError, match="too many redirects"):
        load_image(f"{server}/redirect/0", MediaPolicy(max_redirects=0))
    with pytest.raises(MediaError, match="file:///etc/hostname"):
        load_image(f"{server}/to-file")


def test_exif_orientation_is_applied(tmp_path: Path):
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    image.paste((10, 10, 200), (0, 0, 10, 20))  # a blue band on the left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(image, "JPEG", exif=exif, quality=95)
    out = load_image(data)
    assert out.size == (20, 40)
    # after a clockwise turn the left edge is on top
    top, bottom = np.asarray(out)[1, 10], np.asarray(out)[-2, 10]
    assert top[2] > 150 and bottom[0] > 150
    assert load_image(Image.open(io.BytesIO(data))).size == (20, 40)


def test_modes_become_rgb():
    for image in (noise(channels=4), Image.new("L", (5, 5)), Image.new("I;16", (5, 5), 300)):
        assert load_image(encode(image)).mode == "RGB"


# ---------------------------------------------------------------------------------------------
# errors


def test_missing_file_and_directory(tmp_path: Path):
    with pytest.raises(MediaError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(MediaError, match="not found"):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(MediaError, match="not found"):
        load_image((tmp_path / "missing.png").as_uri())
    with pytest.raises(MediaError, match="directory"):
        load_image(tmp_path)
    with pytest.raises(MediaError, match="directory"):
        load_image(str(tmp_path))


def test_truncated_jpeg_is_an_error(tmp_path: Path):
    data = encode(noise(64, 64), "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="truncated") as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(MediaError, match="truncated"):
        load_image(Image.open(io.BytesIO(data[: len(data) // 2])))


def test_truncated_png_is_an_error():
    data = encode(noise(64, 64))
    with pytest.raises(MediaError):
        load_image(data[: len(data) - 200])


def test_not_an_image():
    with pytest.raises(MediaError, match="not an image"):
        load_image(b"%PDF-1.4 definitely not a picture")
    with pytest.raises(MediaError, match="empty"):
        load_image(b"")


def test_invalid_base64():
    with pytest.raises(MediaError, match="invalid base64"):
        load_image("!!not*base64!!" * 200)
    with pytest.raises(MediaError, match="invalid base64"):
        load_image("data:image/png;base64,@@@@")
    with pytest.raises(MediaError, match="media type"):
        load_image("data:text/plain;base64,aGVsbG8=")
    with pytest.raises(MediaError, match="malformed"):
        load_image("data:image/png;base64")
    # short strings that are neither files nor base64 images get a clear "not found"
    with pytest.raises(MediaError, match="not found|neither"):
        load_image("photos/cat.jpg")
    with pytest.raises(MediaError, match="neither"):
        load_image("abcd")


def test_pixel_limit_checked_from_header():
    with pytest.raises(MediaTooLargeError, match="pixels") as info:
        load_image(PNG, MediaPolicy(max_image_pixels=100))
    assert "max_image_pixels" in str(info.value)
    # header claims 9000x9000 (81 Mpx): rejected by our default limit before decoding
    with pytest.raises(MediaTooLargeError, match="81000000 pixels"):
        load_image(png_with_header_size(9000, 9000))
    with pytest.raises(MediaTooLargeError, match="pixels"):
        load_image(Image.new("1", (9000, 9000)))


def test_short_base64_pixel_bomb_keeps_its_type():
    # ~100 characters: short enough to be taken for a path too, yet it is a (bomb) image
    bomb = base64.b64encode(png_with_header_size(9000, 9000)).decode()
    assert len(bomb) < 1024
    with pytest.raises(MediaTooLargeError, match="81000000 pixels"):
        load_image(bomb)


def test_pil_decompression_bomb_error_becomes_media_error():
    # 400 Mpx: over 2x PIL's MAX_IMAGE_PIXELS, so Image.open itself raises
    with pytest.raises(MediaTooLargeError, match="decompression bomb") as info:
        load_image(png_with_header_size(20000, 20000), MediaPolicy(max_image_pixels=10**9))
    assert isinstance(info.value.__cause__, Image.DecompressionBombError)


def test_pil_decompression_bomb_warning_as_error_becomes_media_error():
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(MediaTooLargeError, match="decompression bomb"):
            load_image(png_with_header_size(10000, 10000))


def test_byte_limits(tmp_path: Path, server):
    # every size limit raises MediaTooLargeError: the server answers that type with 413
    policy = MediaPolicy(max_bytes=1000)
    with pytest.raises(MediaTooLargeError, match="max_bytes"):
        load_image(PNG, policy)
    path = tmp_path / "x.png"
    path.write_bytes(PNG)
    with pytest.raises(MediaTooLargeError, match="max_bytes"):
        load_image(path, policy)
    with pytest.raises(MediaTooLargeError, match="max_bytes"):
        load_image(base64.b64encode(PNG).decode(), policy)
    with pytest.raises(MediaTooLargeError, match="max_bytes"):
        load_image(f"data:image/png;base64,{base64.b64encode(PNG).decode()}", policy)
    with pytest.raises(MediaTooLargeError, match="1000 bytes"):
        load_image("data:image/png," + "%00" * 1500, policy)  # percent-encoded, not base64
    with pytest.raises(MediaTooLargeError, match="max_bytes"):
        fetch_url(f"{server}/big", policy)  # rejected from Content-Length
    with pytest.raises(MediaTooLargeError, match="max_bytes"):
        fetch_url(f"{server}/stream", policy)  # counted while streaming
    assert len(fetch_url(f"{server}/stream", MediaPolicy(max_bytes=5000))) == 5000


def test_unsupported_schemes_and_types():
    for url in ("ftp://example.com/x.png", "s3://bucket/key.png", "gopher://x"):
        with pytest.raises(MediaError, match="unsupported URL scheme"):
            load_image(url)
    with pytest.raises(MediaError, match="unsupported URL scheme"):
        fetch_url("file:///etc/hostname", MediaPolicy())
    with pytest.raises(MediaError, match="unsupported image source"):
        load_image(123)  # type: ignore[arg-type]
    with pytest.raises(MediaError, match="empty"):
        load_image("   ")


def test_policy_switches(tmp_path: Path, server):
    path = tmp_path / "x.png"
    path.write_bytes(PNG)
    no_files = MediaPolicy(allow_local_files=False)
    for source in (path, str(path), path.as_uri()):
        with pytest.raises(MediaError, match="disabled"):
            load_image(source, no_files)
    assert same_pixels(load_image(PNG, no_files), IMAGE)  # bytes need no file access
    with pytest.raises(MediaError, match="disabled"):
        load_image(f"{server}/img.png", MediaPolicy(allow_http=False))


def test_policy_validation():
    with pytest.raises(ConfigError):
        MediaPolicy(timeout_s=0)
    with pytest.raises(ConfigError):
        MediaPolicy(max_bytes=-1)
    with pytest.raises(ConfigError):
        MediaPolicy(max_redirects=-1)


def test_errors_are_media_errors_with_causes(tmp_path: Path):
    # Callers catch MediaError (a ValueError) only; library exceptions stay as the __cause__.
    with pytest.raises(MediaError) as info:
        load_image(b"\x89PNG\r\n\x1a\n garbage")
    assert isinstance(info.value, ValueError)
    assert info.value.__cause__ is not None
