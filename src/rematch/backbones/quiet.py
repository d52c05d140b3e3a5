"""Loading a checkpoint without transformers' "Loading weights 81/81" progress bar.

Why: every rematch command that loads a model printed that bar on stderr, between the
command's own lines, for a step that takes well under a second on the models people run
from the command line and that rematch reports itself when it fails. The bar is turned off
only around the load and back on afterwards, so a caller's own transformers bars (and a
user who disabled them) are left as they were.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def no_loading_bars() -> Iterator[None]:
    """transformers' progress bars off inside the block (if they were on), restored after it."""
    from transformers.utils import logging as transformers_logging

    if not transformers_logging.is_progress_bar_enabled():
        yield
        return
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.enable_progress_bar()
