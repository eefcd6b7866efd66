"""Paths in; pixels, or a failure a person understands, out.

Discovery walks folders in a fixed order; decoding turns one file into a
(size, size, 3) uint8 RGB array as the photographer saw it: orientation
applied, any colour mode made RGB, transparency on white, 16-bit scaled to 8.
From decoding on, a bad file is a ``Failure`` record, never an exception.
"""

from __future__ import annotations

import io
import math
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Literal, TypeVar

import numpy as np

from vggfeat.errors import VggfeatError

if TYPE_CHECKING:
    from PIL import Image

#: Extensions discovery picks up in folders (any case); content decides the format.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
#: The formats Pillow may open: nothing else is parsed, whatever a file is named.
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")

T = TypeVar("T")

ResizeMode = Literal["squash", "crop", "letterbox"]
RESIZE_MODES: tuple[ResizeMode, ...] = ("squash", "crop", "letterbox")
RESAMPLING = "bilinear (antialiased)"
#: Letterbox padding: ImageNet's mean colour, which preprocessing maps to zero.
PAD_RGB = (124, 117, 104)


class InputError(VggfeatError):
    """An input path that does not exist, or a selection with no images."""


@dataclass(frozen=True)
class Source:
    """The file a row came from, with its size in bytes and modification time when read."""

    path: str
    size: int = -1
    mtime_ns: int = -1


@dataclass(frozen=True)
class Decoded:
    """One image ready for the network."""

    path: str
    pixels: np.ndarray
    """(size, size, 3) uint8, RGB."""
    size: int = -1
    """The file's size in bytes and modification time when it was read (for --update)."""
    mtime_ns: int = -1

    @property
    def source(self) -> Source:
        return Source(self.path, self.size, self.mtime_ns)


@dataclass(frozen=True)
class Failure:
    """One file that could not be used, and why, in words."""

    path: str
    reason: str
    size: int = -1
    """The file's size and modification time when it was tried; -1 where unknown."""
    mtime_ns: int = -1


def discover(inputs: Iterable[str], files_from: Iterable[str] = ()) -> list[str]:
    """Image paths from folders, files and a list of paths, in a deterministic order.

    Folders are walked recursively in sorted order, skipping hidden entries and
    never following a folder symlink into a loop; only image extensions are
    kept. Files named directly or in ``files_from`` are kept whatever their
    extension; a missing one named in ``files_from`` is kept too, and fails at
    decoding. A path named twice appears once, at its first place.

    Raises ``InputError`` for a missing input or when nothing is selected.
    """
    found: dict[str, None] = {}
    for given in inputs:
        if os.path.isdir(given):
            found.update(dict.fromkeys(_walk(given)))
        elif os.path.lexists(given):
            found[given] = None
        else:
            raise InputError(f"input {given} does not exist; give image folders or files")
    listed = 0
    for line in files_from:
        entry = line.removesuffix("\n").removesuffix("\r")
        if not entry.strip():
            continue
        listed += 1
        if os.path.isdir(entry):
            found.update(dict.fromkeys(_walk(entry)))
        else:
            found[entry] = None
    if not found and not inputs and not listed:
        raise InputError("--files-from names no file: its list is empty")
    if not found:
        raise InputError(
            "no images found in the inputs: folders are searched for "
            + ", ".join(sorted(IMAGE_EXTENSIONS))
            + " files (any case), hidden ones skipped"
        )
    return list(found)


def _walk(folder: str) -> Iterator[str]:
    """Image files under ``folder``, sorted by their path within it."""
    visited: set[tuple[int, int]] = set()

    def entries(current: str) -> Iterator[tuple[tuple[str, ...], str]]:
        try:
            info = os.stat(current)
            if (info.st_dev, info.st_ino) in visited:
                return
            visited.add((info.st_dev, info.st_ino))
            children = list(os.scandir(current))
        except OSError:
            return
        for child in children:
            if child.name.startswith("."):
                continue
            try:
                if child.is_dir():
                    for parts, path in entries(child.path):
                        yield (child.name, *parts), path
                elif os.path.splitext(child.name)[1].lower() in IMAGE_EXTENSIONS:
                    yield (child.name,), child.path
            except OSError:
                continue

    for _, path in sorted(entries(folder)):
        yield path


def decode_image(
    path: str, image_size: int, resize: ResizeMode = "squash", max_pixels: int | None = None
) -> Decoded | Failure:
    """Decode one file into network input, or say why it cannot be used.

    ``max_pixels`` bounds width x height before any pixel is decoded (Pillow's
    own limit when None), so a decompression bomb costs no memory. Pillow
    itself refuses twice its ``Image.MAX_IMAGE_PIXELS`` on opening; see
    ``pixel_limit``.
    """
    try:
        info = os.stat(path)
        size, mtime_ns = info.st_size, info.st_mtime_ns
    except OSError:
        size = mtime_ns = -1
    outcome = _decode(path, image_size, resize, max_pixels)
    if isinstance(outcome, str):
        return Failure(path, outcome, size, mtime_ns)
    return Decoded(path, outcome, size, mtime_ns)


def _decode(
    path: str, image_size: int, resize: ResizeMode, max_pixels: int | None
) -> np.ndarray | str:
    """The network input of one file, or the reason it has none."""
    return _with_image(path, max_pixels, lambda image: _to_network_input(image, image_size, resize))


@dataclass(frozen=True)
class Thumbnail:
    """A small JPEG of an image, upright."""

    jpeg: bytes
    width: int
    height: int


def thumbnail(path: str, side: int = 128, max_pixels: int | None = None) -> Thumbnail | str:
    """A JPEG of the image at ``path``, upright (EXIF orientation applied) and at most
    ``side`` pixels on its longer side, or the reason there is none, as for decoding."""
    return _with_image(path, max_pixels, lambda image: _thumbnail_jpeg(image, side))


def _with_image(path: str, max_pixels: int | None, use: Callable[[Image.Image], T]) -> T | str:
    """``use`` applied to the image at ``path``, opened safely; or why it cannot be."""
    from PIL import Image, UnidentifiedImageError

    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with _open_regular(path) as file, Image.open(file, formats=FORMATS) as image:
            width, height = image.size
            if limit and width * height > limit:
                return (
                    f"{width}x{height} is {width * height:,} pixels, over the limit of "
                    f"{limit:,} (raise it with --max-pixels if the file is trusted)"
                )
            return use(image)
    except _NotRegular as error:
        return str(error)
    except FileNotFoundError:
        return "file does not exist"
    except PermissionError:
        return "permission denied"
    except UnidentifiedImageError:
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            return "empty file"
        return "not an image in a supported format (JPEG, PNG, GIF, BMP, WebP, TIFF)"
    except Image.DecompressionBombError:
        return (
            f"over twice Pillow's limit of {Image.MAX_IMAGE_PIXELS:,} pixels, refused as a "
            "possible decompression bomb (raise it with --max-pixels if the file is trusted)"
        )
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        return f"cannot be decoded: {_describe(error)}"


def _thumbnail_jpeg(image: Image.Image, side: int) -> Thumbnail:
    from PIL import Image, ImageOps

    if image.format == "JPEG":
        image.draft("RGB", (side, side))  # decode at 1/8 scale where that is still enough
    image = _as_rgb(ImageOps.exif_transpose(image))
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=75, optimize=True)
    return Thumbnail(out.getvalue(), *image.size)


@contextmanager
def pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Let Pillow open images up to ``max_pixels`` while the block runs, if above its limit.

    Pillow's limit is process-wide: it is raised only when asked for, never
    lowered, and restored afterwards, as is the warnings filter.
    """
    import warnings

    from PIL import Image

    previous = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        # decode_image records images over the limit as failures; Pillow's warning would repeat it.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if max_pixels and previous and max_pixels > previous:
            Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


class _NotRegular(OSError):
    pass


def _open_regular(path: str) -> IO[bytes]:
    """Open ``path`` for reading only if it is a regular file; never blocks on a FIFO."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            if stat.S_ISDIR(mode):
                raise _NotRegular("a folder, not an image")
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) else ""
            raise _NotRegular(f"not a regular file ({kind or 'special file'})")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _describe(error: BaseException) -> str:
    text = str(error).strip()
    if "truncated" in text:
        return "the file is truncated"
    return text or type(error).__name__


def _to_network_input(image: Image.Image, image_size: int, resize: ResizeMode) -> np.ndarray:
    from PIL import Image, ImageOps

    if image.format == "JPEG":
        # Decode at 1/2, 1/4 or 1/8 scale in the DCT domain while the result
        # stays at least as large as the resize needs: exact enough, far faster.
        image.draft("RGB", _resize_target(image.size, image_size, resize))
    image = ImageOps.exif_transpose(image)
    image = _as_rgb(image)
    width, height = image.size
    target = _resize_target((width, height), image_size, resize)
    image = image.resize(target, Image.Resampling.BILINEAR)
    if resize == "crop":
        left, top = (target[0] - image_size) // 2, (target[1] - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
    elif resize == "letterbox":
        canvas = Image.new("RGB", (image_size, image_size), PAD_RGB)
        canvas.paste(image, ((image_size - target[0]) // 2, (image_size - target[1]) // 2))
        image = canvas
    return np.asarray(image, dtype=np.uint8)


def _resize_target(size: tuple[int, int], image_size: int, resize: ResizeMode) -> tuple[int, int]:
    """The (width, height) to resize to before cropping or padding."""
    width, height = size
    if resize == "squash":
        return image_size, image_size
    scale = image_size / (min(width, height) if resize == "crop" else max(width, height))
    round_ = math.ceil if resize == "crop" else round
    return max(1, round_(width * scale)), max(1, round_(height * scale))


def _as_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: alpha over white, 16-bit scaled, CMYK converted."""
    from PIL import Image

    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16-bit (and 32-bit) greyscale: scale the full range to 8 bits, do not clip.
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if values.max(initial=0) > 255 or image.mode.startswith("I;16") else 255.0
        grey = np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)
        image = Image.fromarray(grey, "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image
