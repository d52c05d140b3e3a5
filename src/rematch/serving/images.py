"""Images that arrive in requests: ``data:`` URLs and local files under the operator's root.

Why not hand the string to the model as a path: a server must never open a file a client
names unless the operator allowed its directory, must not follow a symlink out of that
directory, and must refuse a 20,000 x 20,000 pixel "image" before decoding it, not after.
Everything here runs on a request's own thread, before batching, so a bad image fails
only the request that sent it; the image comes out exactly as the model's own loader
would have prepared it (same RGB conversion, same resize), so the embedding is the same
as ``ReMatchModel.encode`` on the original file.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import stat
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from rematch.data.images import PATCH_FACTOR, ImageLoadError, load_image_for_model, open_image
from rematch.serving.errors import BadValue

REMOTE_SCHEMES = ("http://", "https://", "ftp://", "file://")


def decode_request_image(value: str, param: str, *, files_root: Path | None, max_pixels: int,
                         max_file_bytes: int, model_min_pixels: int, model_max_pixels: int,
                         model_image_factor: int = PATCH_FACTOR) -> Image.Image:
    """A request's ``image`` string (data: URL or allowed local path) -> the RGB image the model sees
    (sides multiples of ``model_image_factor``, the backbone's: 28 for Qwen2-VL, 32 for Qwen3-VL)."""
    if value.startswith("data:"):
        data = decode_data_url(value, param)
    elif value.lower().startswith(REMOTE_SCHEMES):
        raise BadValue(param, "remote URLs are not fetched by this server; send the image as a data: URL")
    else:
        data = read_allowed_file(value, param, files_root, max_file_bytes)
    image = decode_bounded(data, param, max_pixels, draft_pixels=model_max_pixels)
    try:
        return load_image_for_model(open_image(image, param), model_min_pixels, model_max_pixels, where=param,
                                    factor=model_image_factor)
    except ImageLoadError as error:
        raise BadValue(param, str(error).removeprefix(f"{param}: ")) from None


def decode_data_url(url: str, param: str) -> bytes:
    """The bytes of ``data:image/...;base64,...`` (RFC 2397; only base64 payloads carry binary images)."""
    header, comma, payload = url.partition(",")
    if not comma:
        raise BadValue(param, "data URL has no ',' separating its header from the data")
    parts = header[len("data:"):].split(";")
    media_type = parts[0].strip().lower()
    if media_type and not media_type.startswith("image/"):
        raise BadValue(param, f"data URL has media type {media_type!r}; expected an image/* type")
    if "base64" not in (part.strip().lower() for part in parts[1:]):
        raise BadValue(param, "data URL must be base64-encoded (data:image/png;base64,...)")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadValue(param, "data URL payload is not valid base64") from None


def read_allowed_file(value: str, param: str, root: Path | None, max_bytes: int) -> bytes:
    """The bytes of a local file, only if it resolves (symlinks followed) to a regular file under ``root``.

    The containment check happens on the fully resolved path before anything is opened, and
    the open itself refuses a symlink in the last component (``O_NOFOLLOW``), so a link
    swapped in after the check cannot redirect it. Messages never say whether a refused
    path exists.
    """
    if root is None:
        raise BadValue(param, "local file paths are not allowed on this server (the operator can allow a "
                              "directory with --allow-files ROOT); send the image as a data: URL")
    if "\x00" in value or not value.strip():
        raise BadValue(param, "not a usable file path")
    candidate = Path(value).expanduser() if value.startswith("~") else Path(value)
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if not resolved.is_relative_to(root):
        raise BadValue(param, f"path {value!r} is outside the directory this server allows (--allow-files)")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(resolved, flags)
    except FileNotFoundError:
        raise BadValue(param, f"image file not found: {value}") from None
    except OSError as error:
        raise BadValue(param, f"cannot open image file {value}: {error.strerror}") from None
    try:  # checked on the descriptor, before wrapping it: Python's open() of a directory raises, a 500
        info = os.fstat(descriptor)
    except OSError as error:
        os.close(descriptor)
        raise BadValue(param, f"cannot read image file {value}: {error.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        os.close(descriptor)
        what = "a directory, not an image file" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise BadValue(param, f"{value} is {what}")
    with os.fdopen(descriptor, "rb") as handle:
        if info.st_size > max_bytes:
            raise BadValue(param, f"image file {value} is {info.st_size:,} bytes, over this server's limit of "
                                  f"{max_bytes:,}")
        return handle.read(max_bytes + 1)[:max_bytes]


def decode_bounded(data: bytes, param: str, max_pixels: int, draft_pixels: int | None = None) -> Image.Image:
    """Decode image bytes, refusing (from the header, before decoding) more than ``max_pixels`` pixels.

    JPEGs are decoded at reduced scale down to ``draft_pixels`` as the model's own loader does,
    so a served JPEG gives the same embedding as the file encoded locally.
    """
    if not data:
        raise BadValue(param, "image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise BadValue(param, f"image is {width} x {height} = {width * height:,} pixels, over this server's "
                                      f"limit of {max_pixels:,} (--max-image-pixels)")
            if draft_pixels and image.format == "JPEG":
                scale = math.sqrt(draft_pixels / max(1, width * height))
                if scale < 1:
                    image.draft("RGB", (max(1, int(width * scale)), max(1, int(height * scale))))
            image.load()
    except BadValue:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadValue(param, f"image is too large to decode safely ({error})") from None
    except UnidentifiedImageError:
        raise BadValue(param, "cannot decode image: not a format PIL recognises (PNG, JPEG, WebP, ...)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise BadValue(param, f"cannot decode image ({type(error).__name__}: {error})") from None
    return image
