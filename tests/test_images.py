"""Discovery and decoding: every file as the photographer saw it, or a recorded reason."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from vggfeat.errors import VggfeatError
from vggfeat.images import Decoded, Failure, decode_image, discover

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def decode(path, size=32, resize="squash", max_pixels=None) -> np.ndarray:
    result = decode_image(str(path), size, resize, max_pixels)
    assert isinstance(result, Decoded), result
    assert result.pixels.shape == (size, size, 3) and result.pixels.dtype == np.uint8
    return result.pixels.astype(int)


def failure(path, **options) -> str:
    result = decode_image(str(path), 32, **options)
    assert isinstance(result, Failure), result
    return result.reason


def halves(first, second, size=(64, 32)) -> Image.Image:
    """Left half ``first``, right half ``second``."""
    image = Image.new("RGB", size, second)
    image.paste(first, (0, 0, size[0] // 2, size[1]))
    return image


def test_exif_orientation_is_applied(tmp_path):
    # Stored red-left/blue-right; orientation 6 says "rotate 90 degrees clockwise to show".
    exif = Image.Exif()
    exif[0x0112] = 6
    halves(RED, BLUE).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    pixels = decode(tmp_path / "turned.jpg")
    assert np.abs(pixels[4:12].mean(axis=(0, 1)) - RED).max() < 30
    assert np.abs(pixels[20:28].mean(axis=(0, 1)) - BLUE).max() < 30


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    assert np.abs(decode(tmp_path / "cmyk.jpg").mean(axis=(0, 1)) - RED).max() < 10


def test_greyscale_becomes_rgb(tmp_path):
    Image.new("L", (32, 32), 77).save(tmp_path / "grey.png")
    assert (decode(tmp_path / "grey.png") == 77).all()


def test_16_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 16448, 32896, 65535]] * 4, dtype=np.uint16).repeat(8, axis=1)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    row = decode(tmp_path / "deep.png", resize="squash")[0, ::8, 0]
    assert row.tolist() == [0, 64, 128, 255]


def test_alpha_is_composited_on_white(tmp_path):
    Image.new("RGBA", (32, 32), (255, 0, 0, 128)).save(tmp_path / "half.png")
    assert np.abs(decode(tmp_path / "half.png") - (255, 127, 127)).max() <= 1
    Image.new("LA", (32, 32), (0, 0)).save(tmp_path / "clear.png")
    assert (decode(tmp_path / "clear.png") == WHITE).all()


def test_palette_images_keep_their_colours(tmp_path):
    Image.new("RGB", (32, 32), BLUE).convert("P").save(tmp_path / "palette.png")
    assert (decode(tmp_path / "palette.png") == BLUE).all()
    transparent = Image.new("P", (32, 32), 0)
    transparent.putpalette([0, 0, 0] * 256)
    transparent.save(tmp_path / "transparent.gif", transparency=0)
    assert (decode(tmp_path / "transparent.gif") == WHITE).all()


def test_animated_images_use_their_first_frame(tmp_path):
    frames = [Image.new("RGB", (32, 32), RED), Image.new("RGB", (32, 32), BLUE)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    assert np.abs(decode(tmp_path / "anim.gif") - RED).max() < 10
    assert np.abs(decode(tmp_path / "anim.webp") - RED).max() < 10


def test_every_allowed_format_decodes(tmp_path):
    for suffix in ("jpg", "png", "bmp", "gif", "webp", "tif"):
        Image.new("RGB", (40, 30), (0, 128, 0)).save(tmp_path / f"green.{suffix}")
        assert np.abs(decode(tmp_path / f"green.{suffix}") - (0, 128, 0)).max() < 10, suffix


def test_resize_modes(tmp_path):
    halves(RED, BLUE, (128, 64)).save(tmp_path / "wide.png")
    squash = decode(tmp_path / "wide.png")
    assert (squash[:, :14] == RED).all() and (squash[:, 18:] == BLUE).all()
    crop = decode(tmp_path / "wide.png", resize="crop")  # the middle 64x64: half red, half blue
    assert (crop[:, :14] == RED).all() and (crop[:, 18:] == BLUE).all()
    letterbox = decode(tmp_path / "wide.png", resize="letterbox")  # 32x16 band, padded
    assert (letterbox[:6] == (124, 117, 104)).all() and (letterbox[-6:] == (124, 117, 104)).all()
    assert (letterbox[10:22, :14] == RED).all()


def test_large_jpeg_is_decoded_at_reduced_size_faithfully(tmp_path):
    halves(RED, BLUE, (2000, 1000)).save(tmp_path / "big.jpg", quality=95)
    pixels = decode(tmp_path / "big.jpg", size=64)
    assert np.abs(pixels[:, :28].mean(axis=(0, 1)) - RED).max() < 10
    assert np.abs(pixels[:, 36:].mean(axis=(0, 1)) - BLUE).max() < 10


def test_truncated_file_is_a_failure(tmp_path):
    halves(RED, BLUE, (256, 256)).save(tmp_path / "whole.jpg", quality=95)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert failure(tmp_path / "cut.jpg") == "cannot be decoded: the file is truncated"


def test_files_that_are_not_images(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert failure(tmp_path / "empty.jpg") == "empty file"
    (tmp_path / "notes.jpg").write_text("not a photo")
    assert "not an image in a supported format" in failure(tmp_path / "notes.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "icon.ico")
    assert "not an image in a supported format" in failure(tmp_path / "icon.ico")
    assert failure(tmp_path / "missing.jpg") == "file does not exist"


def test_content_decides_the_format(tmp_path):
    Image.new("RGB", (32, 32), BLUE).save(tmp_path / "really-a.jpg", format="PNG")
    assert (decode(tmp_path / "really-a.jpg") == BLUE).all()


def test_decompression_bombs_are_refused_before_decoding(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "small.png")
    assert "10,000 pixels, over the limit of 9,999" in failure(
        tmp_path / "small.png", max_pixels=9_999
    )
    # Pillow's own limit, from a header alone: 1-bit pixels compress to almost nothing.
    Image.new("1", (20_000, 10_000)).save(tmp_path / "bomb.png")
    assert failure(tmp_path / "bomb.png").startswith(
        "over twice Pillow's limit of 89,478,485 pixels, refused as a possible decompression bomb"
    )
    Image.new("1", (10_000, 10_000)).save(tmp_path / "big.png")
    assert "100,000,000 pixels, over the limit of 89,478,485" in failure(tmp_path / "big.png")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_a_fifo_is_not_opened_and_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    assert failure(tmp_path / "pipe.jpg") == "not a regular file (a FIFO)"
    assert discover([str(tmp_path)]) == [str(tmp_path / "pipe.jpg")]


def make_tree(root) -> None:
    for name in ("b/2.jpg", "b/10.PNG", "a.jpeg", "c/d/e.webp", "space name/café 猫.jpg"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / name, format="PNG")
    (root / "notes.txt").write_text("ignored")
    (root / ".hidden.jpg").write_bytes(b"")
    (root / ".cache").mkdir()
    (root / ".cache" / "x.jpg").write_bytes(b"")


def test_discovery_is_sorted_filtered_and_recursive(tmp_path):
    make_tree(tmp_path / "photos")
    found = discover([str(tmp_path / "photos") + "/"])
    assert [os.path.relpath(p, tmp_path / "photos") for p in found] == [
        "a.jpeg",
        "b/10.PNG",
        "b/2.jpg",
        "c/d/e.webp",
        "space name/café 猫.jpg",
    ]
    assert found[0] == str(tmp_path / "photos") + "/a.jpeg"  # the input as given, joined


def test_discovery_survives_symlink_loops(tmp_path):
    make_tree(tmp_path / "photos")
    os.symlink(tmp_path / "photos", tmp_path / "photos" / "c" / "loop")
    os.symlink(tmp_path / "photos" / "b", tmp_path / "photos" / "b-again")
    found = discover([str(tmp_path / "photos")])
    assert len(found) == len(set(found)) == 5


def test_discovery_of_files_and_lists(tmp_path):
    make_tree(tmp_path)
    listed = [f"{tmp_path}/notes.txt\n", "\n", f"{tmp_path}/gone.jpg\n", f"{tmp_path}/a.jpeg\n"]
    found = discover([str(tmp_path / "a.jpeg")], listed)
    # Named files are kept whatever their extension; duplicates keep their first place.
    assert found == [str(tmp_path / "a.jpeg"), f"{tmp_path}/notes.txt", f"{tmp_path}/gone.jpg"]


def test_discovery_errors(tmp_path):
    with pytest.raises(VggfeatError, match=r"input .*nowhere does not exist"):
        discover([str(tmp_path / "nowhere")])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(VggfeatError, match="no images found"):
        discover([str(tmp_path)])


def test_squash_gives_the_pixels_of_keras_load_img_bilinear(tmp_path):
    import keras

    rng = np.random.default_rng(5)
    for size, (height, width) in [(32, (75, 100)), (48, (40, 30)), (224, (500, 375))]:
        # Smooth gradients plus noise: resampling filters disagree on both.
        ramp = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
        noisy = np.clip(ramp + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
        path = tmp_path / f"{width}x{height}.png"
        Image.fromarray(noisy).save(path)
        reference = keras.utils.load_img(path, target_size=(size, size), interpolation="bilinear")
        np.testing.assert_array_equal(decode(path, size), np.asarray(reference, int))
        # Keras's default, nearest neighbour, is another picture.
        nearest = keras.utils.load_img(path, target_size=(size, size))
        assert np.abs(decode(path, size) - np.asarray(nearest, int)).mean() > 1
