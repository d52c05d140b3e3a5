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
import zipfile


def _user_error_types() -> tuple[type[BaseException], ...]:
    from rematch.training.checkpoint import UnsafeCheckpointError

    types: list[type[BaseException]] = [ValueError, OSError, FloatingPointError, sqlite3.Error,
                                         zipfile.BadZipFile, pickle.UnpicklingError, UnsafeCheckpointError,
                                         NotImplementedError, MemoryError]
    try:
        import pyarrow

        types.append(pyarrow.ArrowException)
    except ImportError:  # pragma: no cover - pyarrow comes with datasets
        pass
    try:
        import torch

        types.append(torch.OutOfMemoryError)
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    try:  # a damaged .safetensors file (the loaders name the file; this catches any other reader)
        from safetensors import SafetensorError

        types.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors comes with transformers
        pass
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
