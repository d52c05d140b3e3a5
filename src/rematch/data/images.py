"""Open any image a user may hand us as 8-bit RGB, sized for a Qwen-VL vision tower.

Why here and not in the image processor: real corpora hold grayscale, palette, RGBA,
16-bit and huge images. Converting and shrinking them with PIL *before* the processor
keeps memory bounded (a 20k x 20k photo is never turned into a float array) and gives
every failure a message that names the item and the file.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from rematch.data.items import Item, ItemError

# Qwen-VL: 14 px patches merged 2 x 2, so image sides are multiples of 28.
PATCH_FACTOR = 28
MAX_ASPECT_RATIO = 200
#: Largest image decoded at full size (8,000 x 8,000). Larger JPEGs are decoded at a reduced
#: scale (draft mode); other formats that large are refused with a clear error, since PIL
#: would first decode them whole (a 210 KB 16-bit PNG can expand to gigabytes).
MAX_DECODE_PIXELS = 64_000_000


#: Area JPEGs are decoded at when an image is only checked, not used (see :class:`DecodeCheck`).
CHECK_DRAFT_PIXELS = 64 * 64


class ImageLoadError(ItemError):
    """An image could not be opened or used; the message names the item and the file.

    ``path`` is the file (when the image came from one), so a caller that deduplicated
    items can name the row that uses the file instead of its own item index.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)


def open_image(source: str | os.PathLike | Image.Image, where: str = "item 0",
               draft_pixels: int | None = None) -> Image.Image:
    """Open ``source`` (a path or a PIL image) and return it as an 8-bit RGB image.

    ``draft_pixels`` lets JPEG files decode at a reduced scale (never below that area),
    which is what keeps a huge photo from costing gigabytes before it is resized.
    """
    if isinstance(source, Image.Image):
        image = source
    else:
        path = Path(source)
        check_image_file(path, where)
        try:
            image = Image.open(path)
            if draft_pixels and image.format == "JPEG":
                width, height = image.size
                scale = math.sqrt(draft_pixels / max(1, width * height))
                if scale < 1:
                    image.draft("RGB", (max(1, int(width * scale)), max(1, int(height * scale))))
            width, height = image.size
            if width * height > MAX_DECODE_PIXELS:
                raise ImageLoadError(f"{where}: image {path} is {width} x {height} pixels, more than the "
                                     f"{MAX_DECODE_PIXELS:,} rematch decodes; shrink it first", path)
            image.load()
        except Image.DecompressionBombError as error:
            raise ImageLoadError(f"{where}: image {path} is too large to decode safely ({error})", path) from error
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise ImageLoadError(f"{where}: cannot read image {path}: {error}", path) from error
    try:
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except (OSError, ValueError) as error:
        file = None if isinstance(source, Image.Image) else source
        raise ImageLoadError(f"{where}: cannot convert image to RGB: {error}", file) from error


def check_image_file(path: Path, where: str) -> None:
    """A regular file, or a clear error: a FIFO or device named ``x.png`` would block or
    stream forever when opened, and a directory gives an unhelpful error."""
    if not path.exists():
        raise ImageLoadError(f"{where}: image file not found: {path}", path)
    if not path.is_file():
        raise ImageLoadError(f"{where}: image {path} is not a regular file", path)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha is composited on white, high bit depths rescaled."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16"):  # integer arithmetic: no float copy of a large image
        values = np.asarray(image).astype(np.uint32)
        gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
        low, high = float(values.min()), float(values.max())  # 32-bit integer or float: stretch the range
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
        gray = np.clip(np.round(scaled * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return image.convert("RGB")


def target_size(height: int, width: int, min_pixels: int, max_pixels: int,
                factor: int = PATCH_FACTOR) -> tuple[int, int]:
    """Qwen's smart resize: sides multiples of ``factor``, area within [min, max], aspect kept."""
    if min(height, width) <= 0:
        raise ValueError(f"image has an empty side ({width} x {height})")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} exceeds {MAX_ASPECT_RATIO}")
    new_h = max(factor, round(height / factor) * factor)
    new_w = max(factor, round(width / factor) * factor)
    if new_h * new_w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        new_h = max(factor, math.floor(height / beta / factor) * factor)
        new_w = max(factor, math.floor(width / beta / factor) * factor)
    elif new_h * new_w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        new_h = math.ceil(height * beta / factor) * factor
        new_w = math.ceil(width * beta / factor) * factor
    return new_h, new_w


def load_image_for_model(source: str | os.PathLike | Image.Image, min_pixels: int, max_pixels: int,
                         where: str = "item 0", factor: int = PATCH_FACTOR) -> Image.Image:
    """Open, convert and resize an image to the exact size the vision tower will see (sides
    multiples of ``factor``: the tower's patch size times its merge size)."""
    image = open_image(source, where, draft_pixels=max_pixels)
    width, height = image.size
    file_path = source if isinstance(source, (str, os.PathLike)) else None
    file = f" ({source})" if file_path is not None else ""  # which file, in a row of several
    try:
        new_h, new_w = target_size(height, width, min_pixels, max_pixels, factor)
    except ValueError as error:
        raise ImageLoadError(f"{where}: unusable image size {width} x {height}{file}: {error}",
                             file_path) from error
    if max(new_h, new_w) / min(new_h, new_w) > MAX_ASPECT_RATIO:  # rounding to 28 px can stretch it
        raise ImageLoadError(f"{where}: unusable image size {width} x {height}{file}: resized to {new_w} x {new_h}, "
                             f"an aspect ratio over {MAX_ASPECT_RATIO}", file_path)
    if (new_w, new_h) != (width, height):
        # reducing_gap lets PIL downsample huge images in cheap integer steps first.
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return image


class DecodeCheck:
    """Whether image files decode, each file checked once (JPEGs at a small draft size).

    Reading a dataset row only stats its image; this is the deeper check that finds a
    corrupt or truncated file while the row is still known, so the error names the file,
    row and field (or the row is skipped and counted) instead of failing mid-encoding.
    The memo is bounded so a pool of millions of images cannot grow it without limit.
    """

    def __init__(self, max_remembered: int = 500_000):
        self.max_remembered = max_remembered
        self._results: dict[str, str | None] = {}

    def problem(self, path: str) -> str | None:
        """None if ``path`` decodes, else why not (without the "where" prefix)."""
        if path not in self._results:
            if len(self._results) >= self.max_remembered:
                self._results.clear()
            try:
                open_image(path, where="image", draft_pixels=CHECK_DRAFT_PIXELS)
                self._results[path] = None
            except ImageLoadError as error:
                self._results[path] = str(error).split(": ", 1)[-1]
        return self._results[path]


def image_stamp(item: Item) -> str:
    """Why: embedding caches and index shards must notice an image file that changed under its
    path -- including one swapped for another of the same size and modification time, which a
    size + mtime stamp served from the cache (27 such images in one probe).

    The stamp is a hash of the file's bytes (:func:`content_digest`): of an image or video
    file, of every frame of a frame directory or frame list. "missing" if absent (encoding then
    raises a clear error); in-memory PIL images are keyed by their pixels in ``Item.cache_key``."""
    source = item.image if item.image is not None else item.video
    if source is None:
        return ""
    if isinstance(source, (str, os.PathLike)):
        return content_digest(source)
    if isinstance(source, (list, tuple)):  # a video given as frames
        stamps = [content_digest(frame) for frame in source if isinstance(frame, (str, os.PathLike))]
        return "frames:" + hashlib.sha256("\x00".join(stamps).encode()).hexdigest()[:32] if stamps else ""
    return ""


#: ``(path, device, inode, size, mtime_ns, ctime_ns) -> digest``: a file is read once per process
#: while none of these change (a cache lookup then costs a ``stat``, as the old size + mtime stamp did).
_DIGESTS: dict[tuple, str] = {}
_MAX_REMEMBERED = 1_000_000


def content_digest(path: str | os.PathLike) -> str:
    """A hash of a file's bytes (a directory: of its regular files' names and bytes, in name order).

    A FIFO, socket or device is never read (it could block or never end): its stamp names its
    kind, and encoding it fails with a clear error anyway."""
    try:
        info = os.stat(path)
    except OSError:
        return "missing"
    if stat.S_ISDIR(info.st_mode):
        digest = hashlib.sha256()
        try:
            entries = sorted(os.scandir(path), key=lambda entry: entry.name)
        except OSError:
            return "unreadable"
        for entry in entries:
            if entry.is_file():
                digest.update(f"{entry.name}\x00{content_digest(entry.path)}\x01".encode("utf-8", "surrogatepass"))
        return "dir:" + digest.hexdigest()[:32]
    if not stat.S_ISREG(info.st_mode):
        return f"special:{stat.S_IFMT(info.st_mode)}"
    key = (os.fspath(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    found = _DIGESTS.get(key)
    if found is None:
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError:
            return "unreadable"
        found = digest.hexdigest()[:32]
        if len(_DIGESTS) >= _MAX_REMEMBERED:
            _DIGESTS.clear()
        _DIGESTS[key] = found
    return found
