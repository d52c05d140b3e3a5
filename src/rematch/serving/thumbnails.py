"""Small previews of an index's images, for the search page's result grid.

Only images the operator indexed can be asked for, by their position in the index (a
client never names a path), and only as a re-encoded JPEG at most ``max_side`` pixels on
a side: the original file, its path and its metadata never leave the server.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict

from PIL import Image

from rematch.data.images import ImageLoadError, open_image

THUMBNAIL_SIDE = 256
log = logging.getLogger("rematch.serving")


class ThumbnailError(LookupError):
    """No thumbnail for that position (out of range, no image, or the file cannot be read now)."""


class Thumbnails:
    """JPEG thumbnails of an index's image items, with a small LRU cache."""

    def __init__(self, index, max_side: int = THUMBNAIL_SIDE, cache_size: int = 512):
        self.index = index
        self.max_side = max_side
        self.cache_size = cache_size
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def has_image(self, position: int) -> bool:
        record = self.index.records[position]
        return bool(record.get("image")) and not record.get("image_in_memory")

    def url(self, position: int) -> str | None:
        return f"/v1/thumbnails/{position}" if self.has_image(position) else None

    def jpeg(self, position: int) -> bytes:
        """The thumbnail of the image item at ``position`` (decoded once, then cached)."""
        if not 0 <= position < len(self.index):
            raise ThumbnailError(f"no item at position {position} (the index holds {len(self.index)})")
        if not self.has_image(position):
            raise ThumbnailError(f"item {self.index.ids[position]!r} has no stored image")
        with self._lock:
            if position in self._cache:
                self._cache.move_to_end(position)
                return self._cache[position]
        data = self._render(position)
        with self._lock:
            self._cache[position] = data
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return data

    def _render(self, position: int) -> bytes:
        path = self.index.records[position]["image"]
        try:
            image = open_image(path, where=f"index item {self.index.ids[position]!r}",
                               draft_pixels=(2 * self.max_side) ** 2)
        except ImageLoadError as error:  # the detail names a server path: it goes to the log only
            log.warning("thumbnail: %s", error)
            raise ThumbnailError(f"the image of item {self.index.ids[position]!r} cannot be read on the "
                                 "server") from None
        image.thumbnail((self.max_side, self.max_side), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        return buffer.getvalue()
