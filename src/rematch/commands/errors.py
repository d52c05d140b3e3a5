"""Which exceptions are the user's input talking (a one-line message) and which are bugs (a traceback).

Every ``rematch`` command runs under one handler (:func:`rematch.cli.main`): an error about
a file, a row, a flag, a model or the disk is printed as ``rematch: error: <message>`` and
the command exits with status 1; anything else is a bug in rematch and keeps its traceback,
so it can be reported. ``--debug`` (or ``REMATCH_DEBUG=1``) shows the traceback always.

The project's own error types all derive from ValueError, OSError (FileNotFoundError...)
or FloatingPointError, and their messages name the file, row and field; the third-party
families listed here (sqlite, Arrow, zip, pickle, safetensors, faiss) are what reading a
damaged or foreign file raises.
"""

from __future__ import annotations

import pickle
import sqlite3
import sys
import zipfile

#: Error types of modules that a failing command may or may not have imported: (module, attribute).
#: A damaged safetensors file, an Arrow parse error, CUDA out of memory, an unsafe checkpoint.
_IMPORTED_ERROR_TYPES = (("rematch.training.checkpoint", "UnsafeCheckpointError"), ("pyarrow", "ArrowException"),
                         ("torch", "OutOfMemoryError"), ("safetensors", "SafetensorError"))


def _user_error_types() -> tuple[type[BaseException], ...]:
    """The user-error types. Those of optional or heavy modules count only once the module is
    imported: an error of a type from a module that was never imported cannot have been raised,
    and importing torch just to rule one out cost seconds on every failed light command
    (``rematch info`` of a missing directory waited for torch before saying so)."""
    types: list[type[BaseException]] = [ValueError, OSError, FloatingPointError, sqlite3.Error,
                                         zipfile.BadZipFile, pickle.UnpicklingError, NotImplementedError, MemoryError]
    for module_name, attribute in _IMPORTED_ERROR_TYPES:
        kind = getattr(sys.modules.get(module_name), attribute, None)
        if isinstance(kind, type) and issubclass(kind, BaseException):
            types.append(kind)
    return tuple(types)


def is_user_error(error: BaseException) -> bool:
    """True for errors about the user's input or environment (see the module docstring)."""
    if isinstance(error, _user_error_types()):
        return True
    return isinstance(error, RuntimeError) and "faiss" in str(error).lower()  # faiss reports bad files so


def one_line(error: BaseException) -> str:
    """The error's message on one line (the first line of a multi-line one), never empty."""
    text = str(error).strip()
    if isinstance(error, KeyError) or not text:
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    first = text.splitlines()[0]
    if isinstance(error, OSError) and error.filename and str(error.filename) not in first:
        first = f"{first}: {error.filename}"
    return first
