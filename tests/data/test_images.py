"""One image decoder for every reader: EXIF orientation honoured; whatever is not a usable image (missing,
empty, too large, a decompression bomb, not an image, truncated) refused with one clear error."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tipstorch.cli import demo, main
from tipstorch.cli.model_args import open_image as cli_open_image
from tipstorch.data.folder import FolderDataset
from tipstorch.data.formats import load_rgb
from tipstorch.data.images import MAX_BYTES_ENV, MAX_PIXELS_ENV, ImageFileError, open_image
from tipstorch.data.sample import CorruptSampleError
from tipstorch.data.shards import decode_sample
from tipstorch.engine.captioning import _decode as engine_decode
from tipstorch.engine.captioning import _Sample as EngineSample

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _sideways_png(path):
    """Stored 4 wide x 2 high (red left half, blue right half) with EXIF orientation 6 ("rotate 90
    clockwise to view"): upright it is 2 wide x 4 high, red on top."""
    stored = Image.new("RGB", (4, 2), BLUE)
    stored.paste(RED, (0, 0, 2, 2))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif)
    return path


def _bomb_png(path, side=20000):
    """A PNG whose header announces side x side pixels (its data is a few bytes): a decompression bomb."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def _is_upright(image):
    pixels = np.asarray(image)
    return image.size == (2, 4) and tuple(pixels[0, 0]) == RED and tuple(pixels[3, 1]) == BLUE


@pytest.mark.parametrize("reader", ["data", "cli", "eval", "training", "demo", "engine"])
def test_every_reader_returns_the_exif_upright_image(tmp_path, reader):
    path = _sideways_png(tmp_path / "phone.png")
    assert Image.open(path).size == (4, 2)  # as stored
    read = {
        "data": lambda: open_image(path),
        "cli": lambda: cli_open_image(str(path)),
        "eval": lambda: load_rgb(path),
        "training": lambda: decode_sample("phone", path.read_bytes(), {"caption": "x"}).image,
        "demo": lambda: demo._load(str(path)),
        "engine": lambda: engine_decode(EngineSample({"__key__": "phone", "png": path.read_bytes()}, {})),
    }[reader]()
    assert _is_upright(read)


def test_label_maps_keep_their_mode_and_are_turned_upright_too(tmp_path):
    labels = Image.fromarray(np.array([[1, 1, 2, 2], [1, 1, 2, 2]], dtype=np.uint8), mode="L")
    exif = Image.Exif()
    exif[0x0112] = 6
    labels.save(tmp_path / "labels.png", exif=exif)
    image = open_image(tmp_path / "labels.png", mode=None)
    assert image.mode == "L" and np.asarray(image).tolist() == [[1, 1], [1, 1], [2, 2], [2, 2]]


def test_a_decompression_bomb_is_one_error_with_the_limit_and_how_to_raise_it(tmp_path):
    bomb = _bomb_png(tmp_path / "bomb.png")
    with pytest.raises(ImageFileError) as error:
        open_image(bomb)
    message = str(error.value)
    assert message.startswith(f"{bomb}: ") and "20000 x 20000 = 400,000,000 pixels" in message and "89,478,485" in message and MAX_PIXELS_ENV in message
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's own limit is left as it was


def test_the_pixel_limit_follows_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "small.png"
    Image.new("RGB", (10, 10)).save(path)
    monkeypatch.setenv(MAX_PIXELS_ENV, "99")
    with pytest.raises(ImageFileError, match="limit of 99 pixels"):
        open_image(path)
    monkeypatch.setenv(MAX_PIXELS_ENV, "100")
    assert open_image(path).size == (10, 10)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(ValueError, match=f"{MAX_PIXELS_ENV} must be an integer"):
        open_image(path)


def test_the_cli_reports_a_bomb_in_one_line(tmp_path):
    bomb = _bomb_png(tmp_path / "bomb.png")
    with pytest.raises(SystemExit) as error:
        main(["encode", str(bomb), "--model", "tips-tiny", "--random", "--out", str(tmp_path / "f.safetensors")])
    message = str(error.value.code)
    assert "\n" not in message and "bomb.png" in message and MAX_PIXELS_ENV in message


def test_training_and_eval_readers_skip_a_bomb_like_a_corrupt_sample(tmp_path):
    _bomb_png(tmp_path / "bomb.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    rows = [{"image": "bomb.png", "caption": "huge"}, {"image": "good.png", "caption": "fine"}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    dataset = FolderDataset(tmp_path, tmp_path / "captions.jsonl")
    assert [sample.key for sample in dataset] == ["good"]
    assert dataset.stats.skipped == 1
    with pytest.raises(CorruptSampleError, match="exceeds the limit"):
        load_rgb(tmp_path / "bomb.png")



def _png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_paths_and_bytes_decode_to_rgb(tmp_path):
    (tmp_path / "grey.png").write_bytes(_png_bytes(Image.new("L", (5, 4), 128)))
    image = open_image(tmp_path / "grey.png")
    assert image.mode == "RGB" and image.size == (5, 4)
    assert open_image(_png_bytes(Image.new("RGB", (3, 2)))).size == (3, 2)


def test_what_is_not_an_image_is_one_error_naming_the_file(tmp_path):
    (tmp_path / "notes.png").write_text("hello, not a picture")
    (tmp_path / "empty.jpg").write_bytes(b"")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    whole = _png_bytes(noise)
    cases = [
        (tmp_path / "notes.png", None, "notes.png: not an image file"),
        (tmp_path / "empty.jpg", None, "empty.jpg: the file is empty"),
        (tmp_path / "absent.png", None, "absent.png: no such file"),
        (whole[: len(whole) // 2], "cut.png", "cut.png: the image data is damaged or truncated"),
        (b"GIF89a" + b"\0" * 4, None, "image bytes: not an image file"),  # a header and nothing else
    ]
    for source, name, message in cases:
        with pytest.raises(ImageFileError, match=message) as error:
            open_image(source, name=name)
        assert error.value.where in str(error.value) and error.value.problem in str(error.value)


def test_the_file_size_limit_follows_the_environment_and_says_how_to_raise_it(tmp_path, monkeypatch):
    path = tmp_path / "photo.png"
    Image.new("RGB", (10, 10)).save(path)
    size = path.stat().st_size
    monkeypatch.setenv(MAX_BYTES_ENV, str(size - 1))
    with pytest.raises(ImageFileError) as error:
        open_image(path)
    assert f"{size:,} bytes exceeds the file-size limit of {size - 1:,} bytes" in str(error.value)
    assert f"{MAX_BYTES_ENV}=<bytes> (0 = no limit)" in str(error.value)
    monkeypatch.setenv(MAX_BYTES_ENV, "0")
    assert open_image(path).size == (10, 10)


def test_a_bomb_is_refused_from_its_header_before_decoding(monkeypatch):
    bomb = _png_bytes(Image.new("1", (9_000, 5_000)))  # 45 Mpx of zeros: a few kB of PNG
    assert len(bomb) < 100_000
    monkeypatch.setenv(MAX_PIXELS_ENV, "40000000")
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self) or None)
    with pytest.raises(ImageFileError, match="bomb.png: 9000 x 5000 = 45,000,000 pixels exceeds the limit"):
        open_image(bomb, name="bomb.png")
    assert decoded == []
