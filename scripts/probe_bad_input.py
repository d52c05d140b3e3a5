#!/usr/bin/env python
"""Probe the ``rematch`` CLI and API with bad input, as a careless or hostile user would.

Why a script and not tests: it runs ~200 subprocesses against a small fixture world (a few
minutes of wall time even with tiny models), and its product is a *census* -- how many
cases end in a clear one-line error, a traceback, a silently wrong result, lost user files
or a hang -- which is what the "Hardening" issue measured and what a fix must move. The
regressions it finds become fast cases in ``tests/cli/test_bad_input.py`` (outputs: ``tests/cli/test_outputs.py``).

Every case is one subprocess (``python -m rematch.cli ...``, or a short API snippet) with
a time limit and an address-space cap, and is classified as

    OK         exit 0 and, where checkable, valid output (finite unit vectors, parseable JSON...)
    CLEAR      non-zero exit with one line "rematch: error: ..." (or "rematch <cmd>: ..."), an
               argparse usage error, or (``data check``) its per-row report; no traceback
    TRACEBACK  a Python traceback (or a crash by signal)
    UNCLEAR    non-zero exit, no traceback, but no clear one-line message either
    SILENT     exit 0 although the input is bad, or the output is wrong (NaN, zero vectors, a
               file that is not where the message says)
    LOSS       files of the user (a folder of their own, hashed before and after) changed
    HANG       the time limit or the memory cap was hit

Usage::

    python scripts/probe_bad_input.py [--json report.json] [--jobs 2] [--only REGEX] [--keep]

Only the standard library and the installed ``rematch`` package are used; nothing is
downloaded (HF_HUB_OFFLINE=1, a private HF_HOME and embedding cache).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import resource
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

CLASSES = ("OK", "CLEAR", "TRACEBACK", "UNCLEAR", "SILENT", "LOSS", "HANG")
MEMORY_CAP = 6 << 30
DEFAULT_TIMEOUT = 60.0
MEMORY_MARKERS = ("MemoryError", "std::bad_alloc", "Cannot allocate memory", "out of memory", "OutOfMemoryError")

World = dict  # placeholder name -> path (str), shared by all cases; plus W (the case's own dir) and U
PLACEHOLDER = re.compile(r"\{([A-Z][A-Z0-9]*)\}")


def fill(text: str, world: World) -> str:
    """Replace ``{KEY}`` by the world's path for KEY (other braces, as in JSON, are left alone)."""
    return PLACEHOLDER.sub(lambda match: str(world.get(match.group(1), match.group(0))), text)


# ============================================================================ cases


@dataclass
class Case:
    """One bad (or good) input; ``argv`` or ``code`` is formatted with the world's paths."""

    name: str
    group: str
    argv: list[str] | None = None
    code: str | None = None
    expect: str = "error"
    """error: the input is bad and must be refused; ok: it is fine and must work; either: both
    are acceptable (then, on exit 0, ``check`` must pass)."""
    setup: Callable[[Path, World], None] | None = None
    check: Callable[[Path, World, subprocess.CompletedProcess], str | None] | None = None
    """On exit 0: None when the output is right, else what is wrong (the case is then SILENT)."""
    fragments: tuple[str, ...] = ()
    """Text the error message should contain (file, row, flag); missing ones are noted as vague."""
    timeout: float = DEFAULT_TIMEOUT
    report_ok: bool = False
    """A non-zero exit with a multi-line report on stdout is the command's contract (data check)."""
    user_folder: bool = False
    cwd_user: bool = False
    protect: tuple[str, ...] = ()
    """Paths under the case dir (made by ``setup``) that must come through unchanged, like the user's folder."""
    env: dict = field(default_factory=dict)
    file_size_cap: int | None = None
    """RLIMIT_FSIZE for the case: every write past it fails as on a full disk (EFBIG for ENOSPC)."""


CASES: list[Case] = []


def cli(name: str, group: str, args: str, expect: str = "error", **options) -> None:
    """Add a CLI case; ``args`` is split like a shell line *before* placeholders are filled."""
    argv = shlex.split(args)
    user = options.pop("user_folder", False) or any("{U}" in token for token in argv)
    CASES.append(Case(name, group, argv=argv, expect=expect, user_folder=user, **options))


def api(name: str, code: str, expect: str = "error", **options) -> None:
    """Add an API case: ``code`` runs with ``np``, ``Path`` and the world's paths as ``M``, ``W``..."""
    user = options.pop("user_folder", False) or re.search(r"\bU\b", code) is not None
    CASES.append(Case(name, "api", code=code, expect=expect, user_folder=user, **options))


# ---------------------------------------------------------------------------- setup helpers


def files(**contents) -> Callable[[Path, World], None]:
    """Write files into the case directory: str -> text, bytes -> bytes, list -> jsonl rows
    (dicts dumped as JSON, strings written as raw lines); ``__`` in a name stands for ``/``."""

    def setup(work: Path, world: World) -> None:
        for name, value in contents.items():
            path = work / name.replace("__", "/")
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(value, bytes):
                path.write_bytes(value)
            elif isinstance(value, list):
                path.write_text(fill("".join((row if isinstance(row, str) else json.dumps(row)) + "\n"
                                             for row in value), world), encoding="utf-8")
            else:
                path.write_text(value, encoding="utf-8")

    return setup


def chain(*steps: Callable[[Path, World], None]) -> Callable[[Path, World], None]:
    def setup(work: Path, world: World) -> None:
        for step in steps:
            step(work, world)

    return setup


def copy_of(key: str, name: str, mutate: Callable[[Path], None] | None = None) -> Callable[[Path, World], None]:
    """A private copy of a shared fixture (``M``, ``I``...) in the case dir, then damaged by ``mutate``."""

    def setup(work: Path, world: World) -> None:
        source = Path(world[key])
        target = work / name
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
        if mutate is not None:
            mutate(target)

    return setup


def truncate(name: str, keep: float = 0.5) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        path = root / name
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])

    return mutate


def replace_file(name: str, data: bytes | str) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        path = root / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode())

    return mutate


def remove(name: str) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        path = root / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return mutate


def edit_json(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        path = root / name
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))

    return mutate


def flip_byte(name: str, offset_fraction: float = 0.6) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        path = root / name
        data = bytearray(path.read_bytes())
        data[int(len(data) * offset_fraction)] ^= 0xFF
        path.write_bytes(bytes(data))

    return mutate


def fifo(name: str) -> Callable[[Path, World], None]:
    def setup(work: Path, world: World) -> None:
        os.mkfifo(work / name)

    return setup


def symlink_loop(name: str) -> Callable[[Path, World], None]:
    def setup(work: Path, world: World) -> None:
        os.symlink(work / name, work / name)

    return setup


def png(width: int, height: int, bit_depth: int = 8, color_type: int = 2, fill: int = 128) -> bytes:
    """A valid PNG written by hand (no PIL needed; compresses well, so huge sizes stay small)."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row = bytes([0]) + bytes([fill]) * (width * channels * bit_depth // 8)
    raw = zlib.compress(row * height, 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


GOOD_PNG = png(40, 30)


def user_files(folder: Path) -> None:
    """A folder of someone's own work, with names a run could plausibly write."""
    (folder / "images").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes\n")
    (folder / ".hidden").write_text("keep me\n")
    (folder / "manifest.json").write_text('{"mine": true}\n')
    (folder / "config.yaml").write_text("mine: true\n")
    (folder / "data.jsonl").write_text('{"id": "mine", "text": "mine"}\n')
    (folder / "vectors.npy").write_bytes(b"not numpy, my own file")
    (folder / "images" / "photo.png").write_bytes(GOOD_PNG)


def lost(before: dict[str, str], after: dict[str, str]) -> bool:
    """Whether a file that was there before is gone or different (new files beside them are not a loss)."""
    return any(after.get(name) != digest for name, digest in before.items())


def tree_digest(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and not p.is_symlink()}


# ---------------------------------------------------------------------------- output checks


def npy_rows(name: str, rows: int) -> Callable:
    """The .npy at W/name holds ``rows`` finite, unit-length, not all identical vectors."""

    def check(work: Path, world: World, result) -> str | None:
        import numpy as np

        path = work / name
        if not path.is_file():
            return f"{path} was not written (the message says: {result.stdout.strip()[-120:]})"
        vectors = np.load(path)
        if vectors.shape[0] != rows:
            return f"{rows} rows expected, got {vectors.shape}"
        if not np.isfinite(vectors).all():
            return "non-finite values in the vectors"
        norms = np.linalg.norm(vectors, axis=1)
        if not np.allclose(norms, 1.0, atol=1e-3):
            return f"vectors are not unit length: {norms.tolist()}"
        if rows > 1 and np.allclose(vectors, vectors[0]):
            return "all vectors are identical"
        return None

    return check


def json_hits(work: Path, world: World, result) -> str | None:
    try:
        hits = json.loads(result.stdout)
    except json.JSONDecodeError:
        return "stdout is not JSON"
    if not hits or not all(math.isfinite(hit["score"]) for hit in hits):
        return f"no hits or non-finite scores: {hits!r}"[:200]
    return None


def file_exists(name: str) -> Callable:
    def check(work: Path, world: World, result) -> str | None:
        return None if (work / name).exists() else f"{work / name} was not written"

    return check


def stdout_json(work: Path, world: World, result) -> str | None:
    try:
        json.loads(result.stdout)
    except json.JSONDecodeError:
        return "stdout is not JSON"
    return None


def finite_summary(name: str) -> Callable:
    def check(work: Path, world: World, result) -> str | None:
        path = work / name / "summary.json"
        if not path.is_file():
            return f"{path} was not written"
        text = path.read_text()
        if re.search(r"\bNaN\b|Infinity", text):
            return "summary.json holds NaN/Infinity"
        return None

    return check


# ============================================================================ the cases

ENC = "encode --model {M} --out {W}/v.npy --allow-untrained --input"
ROW = {"id": "a", "text": "a red circle"}

# ---------------------------------------------------------------- global / parsing
cli("no-arguments", "global", "")
cli("unknown-command", "global", "frobnicate")
cli("help", "global", "--help", expect="ok")
cli("encode-missing-required", "global", "encode --model {M}", fragments=("--input",))
cli("unknown-flag", "global", "encode --model {M} --input {E} --out {W}/v.npy --bogus 1", fragments=("--bogus",))

# ---------------------------------------------------------------- tiny
cli("tiny-ok", "tiny", "tiny --out {W}/m --num-tokens 2", expect="ok", check=file_exists("m/rematch_config.json"))
cli("tiny-over-user-folder", "tiny", "tiny --out {U} --num-tokens 2", fragments=("refusing",))
cli("tiny-over-user-file", "tiny", "tiny --out {U}/notes.txt --num-tokens 2", fragments=("notes.txt",))
cli("tiny-k-negative", "tiny", "tiny --out {W}/m --num-tokens -1", fragments=("--num-tokens",))
cli("tiny-k-huge", "tiny", "tiny --out {W}/m --num-tokens 1000000000", fragments=("k",))
cli("tiny-k-zero", "tiny", "tiny --out {W}/m --num-tokens 0", expect="either", check=file_exists("m/rematch_config.json"))
cli("tiny-seed-negative", "tiny", "tiny --out {W}/m --num-tokens 2 --seed -1", expect="either",
    check=file_exists("m/rematch_config.json"))
cli("tiny-seed-overflow", "tiny", "tiny --out {W}/m --num-tokens 2 --seed 1000000000000000000000", fragments=("seed",))
cli("tiny-out-empty-string", "tiny", "tiny --out '' --num-tokens 2", cwd_user=True)
cli("tiny-out-dev-null", "tiny", "tiny --out /dev/null --num-tokens 2")
cli("tiny-out-below-a-file", "tiny", "tiny --out {U}/notes.txt/m --num-tokens 2", fragments=("notes.txt",))
cli("tiny-out-readonly", "tiny", "tiny --out /proc/m --num-tokens 2", fragments=("/proc",))
cli("tiny-out-unicode", "tiny", "tiny --out {W}/módel-模型 --num-tokens 2", expect="ok",
    check=file_exists("módel-模型/rematch_config.json"))

# ---------------------------------------------------------------- encode: files
cli("encode-ok", "encode", ENC + " {E}", expect="ok", check=npy_rows("v.npy", 6))
cli("encode-trained-lora-ok", "encode", "encode --model {T} --input {E} --out {W}/v.npy", expect="ok",
    check=npy_rows("v.npy", 6))
cli("encode-untrained-refused", "encode", "encode --model {M} --input {E} --out {W}/v.npy",
    fragments=("--allow-untrained",))
cli("encode-input-missing", "encode", ENC + " {W}/nope.jsonl", fragments=("nope.jsonl",))
cli("encode-input-empty", "encode", ENC + " {W}/in.jsonl", setup=files(**{"in.jsonl": ""}), fragments=("in.jsonl",))
cli("encode-input-directory", "encode", ENC + " {W}", fragments=("{W}",))
cli("encode-input-binary", "encode", ENC + " {W}/in.jsonl", setup=files(**{"in.jsonl": os.urandom(4096)}),
    fragments=("in.jsonl",))
cli("encode-input-utf16", "encode", ENC + " {W}/in.jsonl",
    setup=files(**{"in.jsonl": json.dumps(ROW).encode("utf-16")}), fragments=("in.jsonl",))
cli("encode-input-bom", "encode", ENC + " {W}/in.jsonl", expect="either",
    setup=files(**{"in.jsonl": b"\xef\xbb\xbf" + json.dumps(ROW).encode()}), check=npy_rows("v.npy", 1),
    fragments=("in.jsonl",))
cli("encode-input-crlf", "encode", ENC + " {W}/in.jsonl", expect="ok",
    setup=files(**{"in.jsonl": b'{"text": "a"}\r\n{"text": "b"}\r\n'}), check=npy_rows("v.npy", 2))
cli("encode-input-fifo", "encode", ENC + " {W}/in.jsonl", setup=fifo("in.jsonl"), fragments=("in.jsonl",),
    timeout=30)
cli("encode-input-devzero", "encode", ENC + " /dev/zero", fragments=("/dev/zero",), timeout=60)
cli("encode-input-huge-line", "encode", ENC + " {W}/in.jsonl",
    setup=files(**{"in.jsonl": "x" * 30_000_000}), fragments=("line 1",))
cli("encode-input-deep-nesting", "encode", ENC + " {W}/in.jsonl",
    setup=files(**{"in.jsonl": "[" * 200_000 + "]" * 200_000 + "\n"}), fragments=("line 1",))
cli("encode-input-symlink-loop", "encode", ENC + " {W}/in.jsonl", setup=symlink_loop("in.jsonl"),
    fragments=("in.jsonl",))
cli("encode-input-unicode-name", "encode", ENC + " {W}/données-数据.jsonl", expect="ok",
    setup=files(**{"données-数据.jsonl": [ROW]}), check=npy_rows("v.npy", 1))

# ---------------------------------------------------------------- encode: rows
BAD_ROWS = {
    "not-json": ("{text: 'a'}", "line 2"),
    "json-array": ('["a", "b"]', "line 2"),
    "json-number": ("42", "line 2"),
    "json-string": ('"just a string"', "line 2"),
    "text-number": ({"text": 5}, "text"),
    "text-nan": ('{"text": NaN}', "text"),
    "text-empty": ({"text": ""}, "row 1"),
    "text-whitespace": ({"text": "   \t "}, "row 1"),
    "image-number": ({"image": 5}, "image"),
    "instruction-dict": ({"text": "a", "instruction": {"a": 1}}, "instruction"),
    "unknown-field": ({"txt": "typo"}, "txt"),
    "missing-fields": ({}, "row 1"),
    "two-placeholders": ({"text": "<|image_1|> and <image>", "image": "{IMG}"}, "placeholder"),
    "placeholder-no-image": ({"text": "look <|image_1|>"}, "placeholder"),
    "control-im-end": ({"text": "stop <|im_end|> here"}, "<|im_end|>"),
    "control-vision-start": ({"text": "a <|vision_start|> b"}, "<|vision_start|>"),
    "control-image-pad": ({"text": "a <|image_pad|>"}, "<|image_pad|>"),
    "control-in-instruction": ({"text": "a", "instruction": "<|im_start|>system"}, "instruction"),
}
for label, (row, fragment) in BAD_ROWS.items():
    cli(f"encode-row-{label}", "encode-rows", ENC + " {W}/in.jsonl",
        setup=files(**{"in.jsonl": [ROW, row if isinstance(row, str) else row]}), fragments=(fragment,))

GOOD_ROWS = {
    "unicode": {"text": "Ünïcödé ✓ 数据 🚀 مرحبا \u200b\u202e"},
    "nul-char": {"text": "a\u0000b"},
    "lone-surrogate": '{"text": "bad \\ud800 surrogate"}',
    "one-mb-text": {"text": "circle " * 150_000},
    "one-mb-instruction": {"text": "a red circle", "instruction": "Find it. " * 110_000},
    "image-placeholder-only": {"text": "<|image_1|>", "image": "{IMG}"},
    "empty-image-string": {"text": "a", "image": ""},
}
for label, row in GOOD_ROWS.items():
    cli(f"encode-row-{label}", "encode-rows", ENC + " {W}/in.jsonl", expect="either",
        setup=files(**{"in.jsonl": [ROW, row]}), check=npy_rows("v.npy", 2), timeout=90)

# ---------------------------------------------------------------- encode: images
IMAGES = {
    "missing": (None, "nope.png"),
    "truncated-png": (GOOD_PNG[:60], "x.png"),
    "zero-bytes": (b"", "x.png"),
    "text-as-png": (b"this is not an image\n", "x.png"),
    "wide-1x5000": (png(5000, 1), "x.png"),
    "bomb-12000x12000": (png(12000, 12000, bit_depth=1, color_type=0, fill=0), "x.png"),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "x.svg"),
}
for label, (data, name) in IMAGES.items():
    setup = files(**{name: data}) if data is not None else None
    cli(f"encode-image-{label}", "encode-images", ENC + " {W}/in.jsonl",
        setup=chain(setup or (lambda w, world: None), files(**{"in.jsonl": [{"image": "{W}/" + name}]})),
        fragments=(name,))
cli("encode-image-fifo", "encode-images", ENC + " {W}/in.jsonl",
    setup=chain(fifo("x.png"), files(**{"in.jsonl": [{"image": "{W}/x.png"}]})), fragments=("x.png",), timeout=30)
cli("encode-image-directory", "encode-images", ENC + " {W}/in.jsonl",
    setup=files(**{"x.png__keep": "", "in.jsonl": [{"image": "{W}/x.png"}]}), fragments=("x.png",))
cli("encode-image-url", "encode-images", ENC + " {W}/in.jsonl",
    setup=files(**{"in.jsonl": [{"image": "https://example.com/cat.png"}]}), fragments=("example.com",))
cli("encode-image-relative", "encode-images", ENC + " {W}/in.jsonl", expect="either",
    setup=files(**{"pics__x.png": GOOD_PNG, "in.jsonl": [{"image": "pics/x.png"}]}), check=npy_rows("v.npy", 1),
    fragments=("pics/x.png",))
GOOD_IMAGES = {
    "16-bit-gray": png(30, 30, bit_depth=16, color_type=0, fill=200),
    "16-bit-rgba": png(30, 30, bit_depth=16, color_type=6, fill=90),
    "1x1": png(1, 1),
    "gray-alpha": png(20, 20, color_type=4),
}
for label, data in GOOD_IMAGES.items():
    cli(f"encode-image-{label}", "encode-images", ENC + " {W}/in.jsonl", expect="ok",
        setup=files(**{"x.png": data, "in.jsonl": [{"image": "{W}/x.png"}, {"text": "a red circle"}]}),
        check=npy_rows("v.npy", 2))

# ---------------------------------------------------------------- encode: flags and outputs
for value in ("0", "-1", "abc", "99999999999999999999999"):
    cli(f"encode-batch-size-{value[:8]}", "encode-flags", ENC + " {E} --batch-size " + value,
        expect="either" if value.startswith("9") else "error", check=npy_rows("v.npy", 6),
        fragments=("--batch-size",))
cli("encode-device-bogus", "encode-flags", ENC + " {E} --device tpu:9", fragments=("tpu",))
cli("encode-device-cuda-missing", "encode-flags", ENC + " {E} --device cuda:7", fragments=("cuda",))
cli("encode-out-directory", "encode-flags", "encode --model {M} --allow-untrained --input {E} --out {W}",
    fragments=("{W}",))
cli("encode-out-over-user-npy", "encode-flags", "encode --model {M} --allow-untrained --input {E} --out "
    "{U}/vectors.npy", fragments=("vectors.npy",))
cli("encode-out-over-user-text", "encode-flags", "encode --model {M} --allow-untrained --input {E} --out "
    "{U}/notes.txt", fragments=("notes.txt",))
cli("encode-out-no-suffix", "encode-flags", "encode --model {M} --allow-untrained --input {E} --out {W}/vectors",
    expect="either", check=file_exists("vectors"))
cli("encode-out-missing-parent", "encode-flags", "encode --model {M} --allow-untrained --input {E} --out "
    "{W}/new/dir/v.npy", expect="either", check=npy_rows("new/dir/v.npy", 6))
cli("encode-out-dev-full", "encode-flags", "encode --model {M} --allow-untrained --input {E} --out /dev/full",
    fragments=("/dev/full",))

# ---------------------------------------------------------------- encode: models
ENCM = "encode --input {E} --out {W}/v.npy --allow-untrained --model "
cli("model-missing-dir", "models", ENCM + "{W}/nope", fragments=("nope",))
cli("model-is-a-file", "models", ENCM + "{E}", fragments=("items.jsonl",))
cli("model-hub-typo", "models", ENCM + "Qwen/Qwen2-VL-2B-Instruc", fragments=("Qwen/Qwen2-VL-2B-Instruc",))
cli("model-hub-bad-revision", "models", ENCM + "org/name@", fragments=("@",))
cli("model-tiny-spec-ok", "models", ENCM + "tiny", expect="ok", check=npy_rows("v.npy", 6))
cli("model-tiny-spec-bad-size", "models", ENCM + "tiny:huge", fragments=("huge",))
cli("model-tiny-spec-bad-family", "models", ENCM + "tiny:tiny:llama", fragments=("llama",))
cli("model-empty-dir", "models", ENCM + "{W}/empty", setup=files(**{"empty__.keep": ""}), fragments=("empty",))
cli("model-user-folder", "models", ENCM + "{U}", fragments=("my-project",))
BROKEN_MODELS = {
    "no-config-json": remove("config.json"),
    "no-rematch-config": remove("rematch_config.json"),
    "no-heads": remove("rematch_heads.safetensors"),
    "no-weights": remove("model.safetensors"),
    "no-tokenizer": remove("tokenizer.json"),
    "no-preprocessor": remove("preprocessor_config.json"),
    "truncated-weights": truncate("model.safetensors"),
    "zero-byte-weights": replace_file("model.safetensors", b""),
    "truncated-heads": truncate("rematch_heads.safetensors"),
    "heads-text-file": replace_file("rematch_heads.safetensors", "not safetensors"),
    "broken-config-json": replace_file("config.json", "{not json"),
    "broken-rematch-config": replace_file("rematch_config.json", "{not json"),
    "broken-tokenizer": replace_file("tokenizer.json", "{not json"),
    "broken-preprocessor": replace_file("preprocessor_config.json", "{not json"),
    "rematch-config-no-hidden": edit_json("rematch_config.json", lambda d: d.pop("hidden_size")),
    "rematch-config-no-model": edit_json("rematch_config.json", lambda d: d.pop("model")),
    "rematch-config-k-text": edit_json("rematch_config.json", lambda d: d["model"].update(num_tokens="x")),
    "rematch-config-k-mismatch": edit_json("rematch_config.json", lambda d: d["model"].update(num_tokens=5)),
    "rematch-config-model-type": edit_json("rematch_config.json", lambda d: d.update(model_type="llama")),
    "rematch-config-unknown-key": edit_json("rematch_config.json", lambda d: d["model"].update(bogus=1)),
    "config-more-layers": edit_json("config.json", lambda d: (d.get("text_config", d).update(
        num_hidden_layers=d.get("text_config", d)["num_hidden_layers"] + 1), d.update(
        num_hidden_layers=d.get("num_hidden_layers", 0) + 1))),
    "config-other-hidden": edit_json("config.json", lambda d: (d.get("text_config", d).update(hidden_size=96),
                                                               d.update(hidden_size=96))),
    "config-model-type": edit_json("config.json", lambda d: d.update(model_type="bert")),
    "heads-wrong-shape": None,  # filled below: the heads of a model with another K
}
for label, mutate in BROKEN_MODELS.items():
    if mutate is None:
        continue
    cli(f"model-{label}", "models", ENCM + "{W}/m", setup=copy_of("M", "m", mutate), fragments=("m",))
cli("model-heads-wrong-shape", "models", ENCM + "{W}/m",
    setup=chain(copy_of("M", "m"), lambda w, world: shutil.copy2(Path(world["M5"]) / "rematch_heads.safetensors",
                                                                 w / "m" / "rematch_heads.safetensors")),
    fragments=("rematch_heads",))

# ---------------------------------------------------------------- info
cli("info-ok", "info", "info {M} --json", expect="ok", check=stdout_json)
cli("info-missing", "info", "info {W}/nope", fragments=("nope",))
cli("info-user-folder", "info", "info {U}", fragments=("my-project",))
cli("info-hub-typo", "info", "info org/does-not-exist", fragments=("org/does-not-exist",))
cli("info-broken-rematch-config", "info", "info {W}/m",
    setup=copy_of("M", "m", replace_file("rematch_config.json", "{")), fragments=("rematch_config.json",))
cli("info-rematch-config-version", "info", "info {W}/m",
    setup=copy_of("M", "m", edit_json("rematch_config.json", lambda d: d.update(format_version=99))),
    fragments=("format_version",))

# ---------------------------------------------------------------- merge-lora
cli("merge-ok", "merge-lora", "merge-lora {T} {W}/merged", expect="ok", check=file_exists("merged/config.json"))
cli("merge-no-lora", "merge-lora", "merge-lora {M} {W}/merged", fragments=("LoRA",))
cli("merge-over-user-folder", "merge-lora", "merge-lora {T} {U}", fragments=("refusing",))
cli("merge-over-user-file", "merge-lora", "merge-lora {T} {U}/notes.txt", fragments=("notes.txt",))
cli("merge-input-user-folder", "merge-lora", "merge-lora {U} {W}/merged", fragments=("my-project",))
cli("merge-adapter-missing", "merge-lora", "merge-lora {W}/t {W}/merged",
    setup=copy_of("T", "t", remove("adapter_model.safetensors")), fragments=("adapter",))
cli("merge-adapter-truncated", "merge-lora", "merge-lora {W}/t {W}/merged",
    setup=copy_of("T", "t", truncate("adapter_model.safetensors")), fragments=("adapter",))
cli("merge-adapter-config-broken", "merge-lora", "merge-lora {W}/t {W}/merged",
    setup=copy_of("T", "t", replace_file("adapter_config.json", "{")), fragments=("adapter_config",))

# ---------------------------------------------------------------- train
TRAIN = "train --no-progress --steps 1 --train.batch_size 2 --data {D} --out {W}/run"
cli("train-ok", "train", TRAIN, expect="ok", check=file_exists("run/model/rematch_config.json"), timeout=120)
cli("train-config-missing", "train", TRAIN + " --config {W}/nope.yaml", fragments=("nope.yaml",))
cli("train-config-directory", "train", TRAIN + " --config {W}", fragments=("{W}",))
cli("train-config-binary", "train", TRAIN + " --config {W}/c.yaml", setup=files(**{"c.yaml": os.urandom(2000)}),
    fragments=("c.yaml",))
cli("train-config-bad-yaml", "train", TRAIN + " --config {W}/c.yaml",
    setup=files(**{"c.yaml": "model:\n  num_tokens: [1\n  k: : :\n"}), fragments=("c.yaml",))
cli("train-config-list", "train", TRAIN + " --config {W}/c.yaml", setup=files(**{"c.yaml": "- 1\n- 2\n"}),
    fragments=("c.yaml",))
cli("train-config-unknown-key", "train", TRAIN + " --config {W}/c.yaml",
    setup=files(**{"c.yaml": "model:\n  num_tokenz: 4\n"}), fragments=("num_tokenz",))
cli("train-config-yaml-alias-bomb", "train", TRAIN + " --config {W}/c.yaml", setup=files(**{"c.yaml": (
    'a: &a ["x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n'
    'c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n'
    'e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n'
    'g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\nh: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\n')}), fragments=("c.yaml",))
for flag, value, fragment in [("--steps", "0", "steps"), ("--steps", "-5", "steps"), ("--steps", "abc", "--steps")]:
    cli(f"train{flag}-{value}", "train", TRAIN.replace("--steps 1", "") + f" {flag} {value}", fragments=(fragment,))
OVERRIDES = [
    ("--model.num_tokens", "abc", "model.num_tokens"), ("--model.num_tokens", "100000000", "num_tokens"),
    ("--train.batch_size", "1", "train.batch_size"), ("--nonsense.key", "1", "nonsense"),
    ("--model.max_pixels", "0", "max_pixels"), ("--model.min_pixels", "-5", "min_pixels"),
    ("--train.scheduler", "bogus", "train.scheduler"), ("--lora.r", "0", "lora.r"),
    ("--lora.dropout", "2", "lora.dropout"), ("--lora.alpha", "-1", "lora.alpha"),
    ("--lora.target_modules", "((", "target_modules"), ("--data.weights.ShapesCLS", "nan", "weights"),
    ("--data.subsets", "Bogus", "Bogus"), ("--data.split", "nope", "nope"),
    ("--data.image_root", "/nonexistent", "nonexistent"), ("--model.backbone", "{W}/nope", "nope"),
    ("--model.tiny_size", "huge", "huge"),
]
for key, value, fragment in OVERRIDES:
    cli(f"train{key}={value[:12]}", "train-overrides", TRAIN + f" {key} {value}", fragments=(fragment,), timeout=90)
cli("train-override-no-value", "train", TRAIN + " --model.num_tokens", fragments=("--model.num_tokens",))
cli("train-positional", "train", TRAIN + " extra", fragments=("extra",))
cli("train-data-missing", "train", TRAIN.replace("{D}", "{W}/nope"), fragments=("nope",))
cli("train-data-binary-jsonl", "train", TRAIN.replace("{D}", "{W}/d.jsonl"),
    setup=files(**{"d.jsonl": os.urandom(999)}), fragments=("d.jsonl",))
cli("train-data-bad-row", "train", TRAIN.replace("{D}", "{W}/d.jsonl"), setup=files(**{"d.jsonl": [
    {"qry": "a red circle", "qry_image_path": "", "pos_text": "red", "pos_image_path": ""},
    {"qry": 5, "qry_image_path": "", "pos_text": "x", "pos_image_path": ""}] * 3}), fragments=("d.jsonl",))
cli("train-data-image-missing", "train", TRAIN.replace("{D}", "{W}/d.jsonl"), setup=files(**{"d.jsonl": [
    {"qry": "<|image_1|> what", "qry_image_path": "nope.png", "pos_text": "red", "pos_image_path": ""}] * 4}),
    fragments=("nope.png",))
cli("train-out-user-folder", "train", TRAIN.replace("{W}/run", "{U}"), fragments=("my-project",), timeout=120)
cli("train-out-is-a-file", "train", TRAIN.replace("{W}/run", "{U}/notes.txt"), fragments=("notes.txt",))
cli("train-reuse-run-dir", "train", TRAIN, setup=lambda w, world: shutil.copytree(world["TRUN"], w / "run"),
    fragments=("--resume",), timeout=120, protect=("run/model",))
cli("train-resume-fresh-dir", "train", TRAIN + " --resume", expect="either",
    check=file_exists("run/model/rematch_config.json"), timeout=120)

# ---------------------------------------------------------------- data check / synth
cli("check-ok", "data", "data check {D}", expect="ok")
cli("check-missing", "data", "data check {W}/nope", fragments=("nope",))
cli("check-empty-dir", "data", "data check {W}/empty", setup=files(**{"empty__.keep": ""}), fragments=("empty",))
cli("check-binary-file", "data", "data check {W}/x.jsonl", setup=files(**{"x.jsonl": os.urandom(3000)}),
    report_ok=True)
cli("check-bad-rows", "data", "data check {W}/d", report_ok=True, setup=files(**{"d__S__test.jsonl": [
    {"qry_text": "q", "qry_img_path": "", "tgt_text": ["a", "b"], "tgt_img_path": ["", ""]},
    "{not json", {"qry_text": 5, "qry_img_path": "", "tgt_text": "a", "tgt_img_path": ""},
    {"qry_text": "<|image_1|>", "qry_img_path": "missing.png", "tgt_text": ["a"], "tgt_img_path": [""]}]}))
cli("check-truncated-image", "data", "data check {W}/d", report_ok=True, setup=chain(
    copy_of("D", "d"), lambda w, world: [p.write_bytes(p.read_bytes()[:50])
                                         for p in sorted((w / "d" / "images").rglob("*.png"))[:3]]))
cli("check-corrupt-parquet", "data", "data check {W}/d", report_ok=True,
    setup=files(**{"d__S__test.parquet": b"PAR1" + os.urandom(500) + b"PAR1"}))
cli("check-examples-negative", "data", "data check {D} --examples -1", fragments=("--examples",))
cli("check-split-bogus", "data", "data check {D} --split nope", fragments=("nope",))
cli("check-image-root-missing", "data", "data check {D} --image-root {W}/nope", report_ok=True)
SYNTH_FLAGS = {"--train-rows": "10", "--eval-queries": "2", "--candidates": "4", "--image-size": "28"}
SYNTH = "data synth --out {W}/s " + " ".join(f"{k} {v}" for k, v in SYNTH_FLAGS.items())
cli("synth-ok", "data", SYNTH, expect="ok", check=file_exists("s/manifest.json"))
cli("synth-over-user-folder", "data", SYNTH.replace("{W}/s", "{U}"), fragments=("my-project",))
cli("synth-out-is-a-file", "data", SYNTH.replace("{W}/s", "{U}/notes.txt"), fragments=("notes.txt",))
for flag, value in [("--train-rows", "-5"), ("--eval-queries", "-1"), ("--candidates", "0"),
                    ("--candidates", "1000000000"), ("--image-size", "0"), ("--image-size", "-3"),
                    ("--image-size", "100000"),
                    ("--seed", "-1"), ("--train-rows", "0")]:
    expect = "either" if (flag, value) in (("--seed", "-1"), ("--train-rows", "0")) else "error"
    flags = dict(SYNTH_FLAGS, **{flag: value})
    cli(f"synth{flag}={value}", "data", "data synth --out {W}/s " + " ".join(f"{k} {v}" for k, v in flags.items()),
        expect=expect, fragments=(flag,), check=file_exists("s/manifest.json"), timeout=90)

# ---------------------------------------------------------------- eval mmeb
MMEB = "eval mmeb --model {M} --allow-untrained --data {D} --out {W}/e --no-plot --cache-dir {W}/cache"
cli("mmeb-ok", "eval-mmeb", MMEB, expect="ok", check=finite_summary("e"), timeout=120)
cli("mmeb-untrained", "eval-mmeb", MMEB.replace(" --allow-untrained", ""), fragments=("--allow-untrained",))
cli("mmeb-data-missing", "eval-mmeb", MMEB.replace("{D}", "{W}/nope"), fragments=("nope",))
cli("mmeb-data-binary", "eval-mmeb", MMEB.replace("{D}", "{W}/x.jsonl"), setup=files(**{"x.jsonl": os.urandom(999)}),
    fragments=("x.jsonl",))
cli("mmeb-subset-bogus", "eval-mmeb", MMEB + " --subsets Bogus", fragments=("Bogus",))
cli("mmeb-split-bogus", "eval-mmeb", MMEB + " --split nope", fragments=("nope",))
for flag, value in [("--batch-size", "0"), ("--min-pixels", "-1"), ("--max-pixels", "0"),
                    ("--max-text-tokens", "-1"), ("--rerank", "-1")]:
    cli(f"mmeb{flag}={value}", "eval-mmeb", MMEB + f" {flag} {value}", fragments=(flag,), timeout=90)
cli("mmeb-cache-dir-is-file", "eval-mmeb", MMEB.replace("{W}/cache", "{W}/cachefile"),
    setup=files(cachefile="x"), fragments=("cachefile",), timeout=90)
cli("mmeb-out-user-folder", "eval-mmeb", MMEB.replace("{W}/e", "{U}"), expect="either",
    check=finite_summary("my-project"), timeout=120)
cli("mmeb-out-is-a-file", "eval-mmeb", MMEB.replace("{W}/e", "{U}/notes.txt"), fragments=("notes.txt",))
cli("mmeb-compare-garbage", "eval-mmeb", "eval mmeb --out {W}/a --compare {W}/b",
    setup=files(**{"a__summary.json": "{", "b__summary.json": "[]"}), fragments=("summary.json",))
cli("mmeb-model-without-data", "eval-mmeb", "eval mmeb --model {M} --out {W}/e", fragments=("--data",))
TRUNCATE_TWO_IMAGES = chain(copy_of("D", "d"), lambda w, world: [p.write_bytes(p.read_bytes()[:50])
                                                                  for p in sorted((w / "d" / "images").rglob("*.png"))[:2]])
cli("mmeb-truncated-image", "eval-mmeb", MMEB.replace("{D}", "{W}/d"), timeout=120, setup=TRUNCATE_TWO_IMAGES,
    fragments=("d/", " row ", "--skip-bad"))
cli("mmeb-truncated-image-skip-bad", "eval-mmeb", MMEB.replace("{D}", "{W}/d") + " --skip-bad", expect="ok",
    timeout=120, setup=TRUNCATE_TWO_IMAGES, check=finite_summary("e"))
cli("mmeb-bad-row", "eval-mmeb", MMEB.replace("{D}", "{W}/d"), setup=files(**{"d__S__test.jsonl": [
    {"qry_text": "q", "qry_img_path": "", "tgt_text": ["a", "b"], "tgt_img_path": ["", ""]},
    {"qry_text": 5, "qry_img_path": "", "tgt_text": ["a"], "tgt_img_path": [""]}]}), fragments=("test.jsonl",))
cli("mmeb-one-candidate", "eval-mmeb", MMEB.replace("{D}", "{W}/d"), expect="either", timeout=90,
    check=finite_summary("e"), setup=files(**{"d__S__test.jsonl": [
        {"qry_text": "q", "qry_img_path": "", "tgt_text": ["a"], "tgt_img_path": [""]}]}))

# ---------------------------------------------------------------- eval retrieval
RET = ("eval retrieval --model {M} --allow-untrained --no-cache --queries {Q} --corpus {C} --qrels {QR} "
       "--out {W}/r --json")
cli("retrieval-ok", "eval-retrieval", RET, expect="ok", check=stdout_json, timeout=90)
cli("retrieval-qrels-unknown-doc", "eval-retrieval", RET.replace("{QR}", "{W}/q.tsv"),
    setup=files(**{"q.tsv": "query-id\tcorpus-id\tscore\nq0\tnope\t1\n"}), fragments=("nope",))
cli("retrieval-qrels-empty", "eval-retrieval", RET.replace("{QR}", "{W}/q.tsv"), setup=files(**{"q.tsv": ""}),
    fragments=("q.tsv",))
cli("retrieval-qrels-score-text", "eval-retrieval", RET.replace("{QR}", "{W}/q.tsv"),
    setup=files(**{"q.tsv": "query-id\tcorpus-id\tscore\nq0\td0\thigh\n"}), fragments=("q.tsv",))
cli("retrieval-qrels-score-nan", "eval-retrieval", RET.replace("{QR}", "{W}/q.tsv"),
    setup=files(**{"q.tsv": "query-id\tcorpus-id\tscore\nq0\td0\tnan\n"}), fragments=("q.tsv",))
cli("retrieval-qrels-unknown-ext", "eval-retrieval", RET.replace("{QR}", "{W}/q.csv"),
    setup=files(**{"q.csv": "q0,d0,1\n"}), fragments=("q.csv",))
cli("retrieval-queries-no-id", "eval-retrieval", RET.replace("{Q}", "{W}/q.jsonl"),
    setup=files(**{"q.jsonl": [{"text": "a"}]}), fragments=("id",))
cli("retrieval-ks-zero", "eval-retrieval", RET + " --ks 0", fragments=("--ks",))
cli("retrieval-ks-negative", "eval-retrieval", RET + " --ks -5", fragments=("--ks",))
cli("retrieval-batch-size-zero", "eval-retrieval", RET + " --batch-size 0", fragments=("--batch-size",))
cli("retrieval-rerank-negative", "eval-retrieval", RET + " --rerank -3", fragments=("--rerank",))
cli("retrieval-out-user-folder", "eval-retrieval", RET.replace("{W}/r", "{U}"), expect="either",
    check=stdout_json, timeout=90)

# ---------------------------------------------------------------- index build
BUILD = "index build --model {M} --allow-untrained --corpus {C} --out {W}/i"
cli("build-ok", "index-build", BUILD, expect="ok", check=file_exists("i/manifest.json"))
cli("build-untrained", "index-build", BUILD.replace(" --allow-untrained", ""), fragments=("--allow-untrained",))
cli("build-corpus-missing", "index-build", BUILD.replace("{C}", "{W}/nope.jsonl"), fragments=("nope.jsonl",))
cli("build-corpus-empty", "index-build", BUILD.replace("{C}", "{W}/c.jsonl"), setup=files(**{"c.jsonl": ""}),
    fragments=("c.jsonl",))
cli("build-corpus-empty-dir", "index-build", BUILD.replace("{C}", "{W}/c"), setup=files(**{"c__.keep": ""}),
    fragments=("c",))
cli("build-corpus-image-dir", "index-build", BUILD.replace("{C}", "{W}/pics"), expect="ok",
    setup=files(**{"pics__a.png": GOOD_PNG, "pics__b.png": png(30, 50, fill=20)}), check=file_exists("i/manifest.json"))
cli("build-corpus-image-dir-bad-image", "index-build", BUILD.replace("{C}", "{W}/pics"),
    setup=files(**{"pics__a.png": GOOD_PNG, "pics__b.png": b"not a png"}), fragments=("b.png",))
cli("build-corpus-binary", "index-build", BUILD.replace("{C}", "{W}/c.jsonl"), setup=files(**{"c.jsonl":
                                                                                             os.urandom(999)}),
    fragments=("c.jsonl",))
for label, rows, fragment in [
    ("no-id", [{"text": "a"}], "id"), ("duplicate-id", [{"id": 1, "text": "a"}, {"id": "1", "text": "b"}], "'1'"),
    ("id-dict", [{"id": {"a": 1}, "text": "a"}], "id"), ("id-nan", ['{"id": NaN, "text": "a"}'], "id"),
    ("reserved-metadata", [{"id": "a", "text": "a", "image_in_memory": True}], "image_in_memory"),
    ("image-missing", [{"id": "a", "image": "nope.png"}], "nope.png"),
    ("metadata-nan", ['{"id": "a", "text": "a", "score": NaN}'], "score"),
    ("control-token", [{"id": "a", "text": "<|im_end|>"}], "<|im_end|>"),
]:
    cli(f"build-row-{label}", "index-build", BUILD.replace("{C}", "{W}/c.jsonl"), setup=files(**{"c.jsonl": rows}),
        fragments=(fragment,))
cli("build-out-user-folder", "index-build", BUILD.replace("{W}/i", "{U}"), fragments=("my-project",))
cli("build-out-is-a-file", "index-build", BUILD.replace("{W}/i", "{U}/notes.txt"), fragments=("notes.txt",))
cli("build-out-existing-index", "index-build", BUILD.replace("{W}/i", "{W}/idx"), setup=copy_of("I", "idx"),
    fragments=("--overwrite",))
cli("build-out-is-corpus-dir", "index-build", BUILD.replace("{C}", "{W}/c").replace("{W}/i", "{W}/c"),
    setup=files(**{"c__c.jsonl": [{"id": "a", "text": "a"}]}), fragments=("c",))
cli("build-index-type-bogus", "index-build", BUILD + " --index-type lsh", fragments=("--index-type",))
cli("build-nlist-zero", "index-build", BUILD + " --nlist 0", fragments=("--nlist",))
cli("build-ivf-tiny-corpus", "index-build", BUILD + " --index-type ivf --nlist 1000", expect="either",
    check=file_exists("i/manifest.json"))
cli("build-hnsw-m-huge", "index-build", BUILD + " --index-type hnsw --hnsw-m 100000000", fragments=("hnsw",))
cli("build-shard-size-one", "index-build", BUILD + " --shard-size 1", expect="ok", check=file_exists("i/manifest.json"))
cli("build-image-root-missing", "index-build", BUILD.replace("{C}", "{W}/c.jsonl") + " --image-root {W}/nope",
    setup=files(**{"c.jsonl": [{"id": "a", "image": "x.png"}]}), fragments=("nope",))
cli("build-instruction-100k", "index-build", BUILD + " --instruction " + "x" * 100_000, expect="either",
    check=file_exists("i/manifest.json"), timeout=90)

# ---------------------------------------------------------------- search
SEARCH = "search --index {I} --allow-untrained --json --text circle"
cli("search-ok", "search", SEARCH, expect="ok", check=json_hits)
cli("search-untrained", "search", SEARCH.replace(" --allow-untrained", ""), fragments=("--allow-untrained",))
cli("search-no-query", "search", "search --index {I} --allow-untrained", fragments=("--text",))
cli("search-index-missing", "search", SEARCH.replace("{I}", "{W}/nope"), fragments=("nope",))
cli("search-index-is-file", "search", SEARCH.replace("{I}", "{C}"), fragments=("corpus.jsonl",))
cli("search-index-user-folder", "search", SEARCH.replace("{I}", "{U}"), fragments=("my-project",))
cli("search-k-zero", "search", SEARCH + " -k 0", fragments=("-k",))
cli("search-k-huge", "search", SEARCH + " -k 1000000000", expect="either", check=json_hits)
cli("search-rerank", "search", SEARCH + " --rerank 3", expect="ok", check=json_hits)
cli("search-rerank-negative", "search", SEARCH + " --rerank -1", fragments=("--rerank",))
cli("search-nprobe-zero", "search", SEARCH + " --nprobe 0", fragments=("--nprobe",))
cli("search-ef-search-negative", "search", SEARCH + " --ef-search -4", fragments=("--ef-search",))
cli("search-text-empty", "search", "search --index {I} --allow-untrained --text ''", fragments=("text",))
cli("search-image-missing", "search", "search --index {I} --allow-untrained --image {W}/nope.png",
    fragments=("nope.png",))
cli("search-image-truncated", "search", "search --index {I} --allow-untrained --image {W}/x.png",
    setup=files(**{"x.png": GOOD_PNG[:50]}), fragments=("x.png",))
cli("search-image-fifo", "search", "search --index {I} --allow-untrained --image {W}/x.png", setup=fifo("x.png"),
    fragments=("x.png",), timeout=30)
cli("search-text-control-token", "search", "search --index {I} --allow-untrained --text '<|im_end|>'",
    fragments=("<|im_end|>",))
cli("search-instruction-1mb", "search", SEARCH + " --instruction " + "y" * 100_000, expect="either",
    check=json_hits)
cli("search-other-model", "search", SEARCH + " --model {M5}", fragments=("fingerprint",))
BROKEN_INDEXES = {
    "truncated-faiss": truncate("index.faiss"),
    "flipped-faiss": flip_byte("index.faiss"),
    "no-faiss": remove("index.faiss"),
    "manifest-broken": replace_file("manifest.json", "{"),
    "manifest-no-files": edit_json("manifest.json", lambda d: d.pop("files")),
    "manifest-count-text": edit_json("manifest.json", lambda d: d.update(count="six")),
    "manifest-no-source": edit_json("manifest.json", lambda d: d.pop("model_source")),
    "manifest-source-gone": edit_json("manifest.json", lambda d: d.update(model_source="/nonexistent/model")),
    "manifest-index-type": edit_json("manifest.json", lambda d: d.update(index_type="ivf")),
    "items-edited": None,  # below: same size, other id (the content hash must catch it)
    "shards-only": None,
}
for label, mutate in BROKEN_INDEXES.items():
    if mutate is not None:
        cli(f"search-index-{label}", "search", SEARCH.replace("{I}", "{W}/i"), setup=copy_of("I", "i", mutate),
            fragments=("i",))


def _edit_items(root: Path) -> None:
    items = root / "items.jsonl"
    items.write_text(items.read_text().replace('"d1"', '"d9"'))


def _shards_only(root: Path) -> None:
    for name in ("manifest.json", "index.faiss", "items.jsonl"):
        (root / name).unlink()
    (root / "shards").mkdir()


cli("search-index-items-edited", "search", SEARCH.replace("{I}", "{W}/i"), setup=copy_of("I", "i", _edit_items),
    fragments=("hash",))
cli("search-index-shards-only", "search", SEARCH.replace("{I}", "{W}/i"), setup=copy_of("I", "i", _shards_only),
    fragments=("interrupted",))

# ---------------------------------------------------------------- mine
MINE = "mine --model {M} --allow-untrained --data {D} --out {W}/mined"
cli("mine-ok", "mine", MINE + " --rank-window 1:3", expect="ok", check=file_exists("mined"), timeout=120)
cli("mine-random-ok", "mine", "mine --random --data {D} --out {W}/mined --rank-window 1:3", expect="ok",
    check=file_exists("mined"), timeout=90)
cli("mine-no-model", "mine", "mine --data {D} --out {W}/mined", fragments=("--model",))
cli("mine-untrained", "mine", MINE.replace(" --allow-untrained", ""), fragments=("--allow-untrained",))
for flag, value in [("--per-row", "0"), ("--per-row", "-1"), ("--rank-window", "5:2"), ("--rank-window", "abc"),
                    ("--rank-window", "0:3"), ("--max-ratio", "nan"), ("--max-ratio", "-1"), ("--batch-size", "0"),
                    ("--shard-size", "0")]:
    cli(f"mine{flag}={value}", "mine", MINE + f" {flag} {value}", fragments=(flag,), timeout=90)
cli("mine-out-is-data", "mine", MINE.replace("{W}/mined", "{D}"), fragments=("--data",))
# an output root that holds the user's files: new files beside theirs are acceptable, a changed one is LOSS
cli("mine-out-user-folder", "mine", MINE.replace("{W}/mined", "{U}") + " --rank-window 1:3", expect="either",
    timeout=120)
cli("mine-data-missing", "mine", MINE.replace("{D}", "{W}/nope"), fragments=("nope",))

# ---------------------------------------------------------------- demo (bad flags only: a real demo takes minutes)
DEMO = "demo --quick --out {W}/demo"
for flag, value in [("--seeds", "0"), ("--seeds", "-1"), ("--steps", "0"), ("--steps", "-3"), ("--rows", "bogus"),
                    ("--seeds", "x")]:
    cli(f"demo{flag}={value}", "demo", DEMO + f" {flag} {value}", fragments=(flag.strip("-"),), timeout=90)
cli("demo-out-user-folder", "demo", DEMO.replace("{W}/demo", "{U}"), expect="either", timeout=240,
    check=file_exists("my-project/report.md"))
cli("demo-out-is-a-file", "demo", DEMO.replace("{W}/demo", "{U}/notes.txt"), fragments=("notes.txt",), timeout=90)

# ---------------------------------------------------------------- issue 27: outputs over a user's files
# The user's folder (U) holds their own file under each of the command's output names; a changed
# one is LOSS. Refusing (CLEAR) or writing only beside them (OK) keeps them.


def user_outputs(*names: str) -> Callable[[Path, World], None]:
    """Put the user's own file (or, for a name without a suffix, a folder with a file) under each name in U."""

    def setup(work: Path, world: World) -> None:
        user = Path(world["U"])
        for name in names:
            target = user / name
            if "." in name.strip("."):
                target.write_text(f"the user's own {name}\n")
            else:
                target.mkdir(exist_ok=True)
                (target / "mine.txt").write_text(f"the user's own {name}\n")

    return setup


MMEB_NAMES = ("summary.json", "summary.md", "summary.png", "ShapesCLS.json", "ShapesVQA.json")
cli("out27-mmeb-user-names", "outputs", MMEB.replace("{W}/e", "{U}"), setup=user_outputs(*MMEB_NAMES),
    fragments=("my-project",), timeout=120)
cli("out27-mmeb-user-names-overwrite", "outputs", MMEB.replace("{W}/e", "{U}") + " --overwrite",
    setup=user_outputs(*MMEB_NAMES), fragments=("my-project",), timeout=120)
cli("out27-mmeb-own-output-edited", "outputs", MMEB + " --overwrite", timeout=120, fragments=("summary.md",),
    setup=lambda w, world: (subprocess.run([sys.executable, "-m", "rematch.cli", *fill(MMEB, dict(world, W=str(w)))
                                            .split()], capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1",
                                                                                      HF_HUB_OFFLINE="1")),
                            (w / "e" / "summary.md").write_text("my edits\n")), protect=("e/summary.md",))
def _v2_world(work: Path, world: World) -> None:
    """A shapes world with pages: MMEB-V2's visual-document layout."""
    subprocess.run([sys.executable, "-m", "rematch.cli", "data", "synth", "--out", str(work / "v2"),
                    "--train-rows", "4", "--eval-queries", "2", "--candidates", "4", "--image-size", "28",
                    "--pages", "2"],
                   capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


cli("out27-mmeb-v2-user-names", "outputs", "eval mmeb-v2 --model {M} --allow-untrained --data {W}/v2 --out {U} "
    "--modalities visdoc --no-cache", setup=chain(_v2_world, user_outputs("summary.json", "summary.md",
                                                                           "ShapesPages.json")),
    fragments=("my-project",), timeout=120)
cli("out27-retrieval-user-names", "outputs", RET.replace("{W}/r", "{U}"), setup=user_outputs("retrieval.json"),
    fragments=("my-project",), timeout=90)
cli("out27-generative-user-names", "outputs", "eval generative --model tiny-pretrained --scenes 1 --out {U}",
    setup=user_outputs("generative.json"), fragments=("my-project",), timeout=90)
cli("out27-demo-user-names", "outputs", DEMO.replace("{W}/demo", "{U}"), setup=user_outputs("report.md", "runs"),
    fragments=("my-project",), timeout=90)
def _users_array(work: Path, world: World) -> None:
    import numpy as np

    np.save(Path(world["U"]) / "v.npy", np.eye(3))  # a real array, but the user's own


cli("out27-encode-over-user-array", "outputs", "encode --model {M} --allow-untrained --input {E} --out {U}/v.npy",
    setup=_users_array, fragments=("v.npy", "--overwrite"))
cli("out27-mine-into-users-data", "outputs", "mine --random --data {D} --out {U} --rank-window 1:3",
    setup=user_outputs("ShapesCLS", "mining_report.json"), fragments=("my-project",), timeout=90)
cli("out27-synth-over-world-with-users-subset", "outputs", SYNTH.replace("{W}/s", "{W}/world") + " --overwrite",
    setup=lambda w, world: (shutil.copytree(world["D"], w / "world"), (w / "world" / "MySubset").mkdir(),
                            (w / "world" / "MySubset" / "train.jsonl").write_text('{"qry": "mine"}\n')),
    protect=("world/MySubset",), fragments=("MySubset",))
cli("out27-tiny-over-trained-model-with-notes", "outputs", "tiny --out {W}/t --num-tokens 2 --overwrite",
    setup=chain(copy_of("T", "t"), files(**{"t__notes.md": "what I found\n", "t__eval__summary.json": "{}\n"})),
    protect=("t/notes.md", "t/eval"), fragments=("notes.md",))
for flag in ("--overwrite", "--resume"):
    cli(f"out27-train{flag}-on-project-folder", "outputs", TRAIN.replace("{W}/run", "{U}") + " " + flag,
        setup=user_outputs("config.yaml", "losses.jsonl", "data", "model"), fragments=("my-project",), timeout=120)
    cli(f"out27-pretrain{flag}-on-project-folder", "outputs",
        "pretrain --config " + str(Path(__file__).resolve().parents[1] / "configs" / "pretrain-tiny.yaml")
        + " --out {U} --no-progress " + flag, setup=user_outputs("config.yaml", "losses.jsonl", "model"),
        fragments=("my-project",), timeout=120)
api("out27-synth-kill-9-then-rerun", r"""
import json, os, signal, subprocess, sys, time
args = ["--train-rows", "3000", "--eval-queries", "20", "--candidates", "20", "--image-size", "56"]
run = lambda out: subprocess.run([sys.executable, "-m", "rematch.cli", "data", "synth", "--out", out, *args],
                                 capture_output=True)
run(W + "/clean")
process = subprocess.Popen([sys.executable, "-m", "rematch.cli", "data", "synth", "--out", W + "/killed", *args])
deadline = time.time() + 60
while not any(p.startswith(".killed.tmp-") for p in os.listdir(W)) and time.time() < deadline:
    time.sleep(0.02)
time.sleep(0.3)
process.send_signal(signal.SIGKILL)
process.wait()
run(W + "/killed")
same = open(W + "/clean/manifest.json", "rb").read() == open(W + "/killed/manifest.json", "rb").read()
assert_silent(same, "manifest.json after kill -9 and a rerun differs from a clean run's")
assert_silent(not any(".tmp-" in p for p in os.listdir(W)), "the killed write's temporary folder was left behind")
""", expect="ok", timeout=180)

# ---------------------------------------------------------------- issue 27: stale or wrong vectors


def heads_change(change: Callable) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(root / "rematch_heads.safetensors"))
        change(tensors)
        save_file(tensors, str(root / "rematch_heads.safetensors"))

    return mutate


def from_other(key: str, name: str) -> Callable[[Path, World], None]:
    def setup(work: Path, world: World) -> None:
        shutil.copytree(world["M"], work / "m")
        shutil.copy2(Path(world[key]) / name, work / "m" / name)

    return setup


STALE_MODELS = {
    "inf-heads": heads_change(lambda t: t["query_tokens"].fill_(float("inf"))),
    "int64-heads": heads_change(lambda t: t.update(query_tokens=t["query_tokens"].long())),
    "max-text-tokens-float": edit_json("rematch_config.json", lambda d: d["model"].update(max_text_tokens=512.5)),
    "max-text-tokens-float-whole": edit_json("rematch_config.json", lambda d: d["model"].update(max_text_tokens=512.0)),
    "dtype-float64": edit_json("rematch_config.json", lambda d: d["model"].update(dtype="float64")),
    "patch-size-0": edit_json("preprocessor_config.json", lambda d: d.update(patch_size=0)),
}
for label, mutate in STALE_MODELS.items():
    cli(f"vec27-model-{label}", "vectors", ENCM + "{W}/m", setup=copy_of("M", "m", mutate), fragments=("m",))
cli("vec27-model-heads-of-another-model", "vectors", ENCM + "{W}/m",
    setup=from_other("MS", "rematch_heads.safetensors"), fragments=("rematch_heads",))
cli("vec27-model-backbone-of-another-model", "vectors", ENCM + "{W}/m", setup=from_other("MS", "model.safetensors"),
    fragments=("model.safetensors",))
for label, change in {"preprocessor": ("preprocessor_config.json", lambda d: d.update(image_mean=[0.5, 0.5, 0.5])),
                      "tokenizer": ("tokenizer.json", lambda d: d.update(
                          normalizer={"type": "Replace", "pattern": {"String": "q"}, "content": "k"})),
                      "backbone-config": ("config.json", lambda d: d["text_config"].update(rms_norm_eps=1e-3))}.items():
    cli(f"vec27-search-index-of-model-before-{label}-edit", "vectors", SEARCH + " --model {W}/m",
        setup=copy_of("M", "m", edit_json(*change)), fragments=("fingerprint",))
api("vec27-cache-image-swapped-same-size-and-mtime", r"""
from PIL import Image
from rematch.data.items import Item
from rematch.encoding.cache import CachedEncoder
from rematch import ReMatchModel
import os
Image.new("RGB", (40, 30), "red").save(W + "/a.bmp"); Image.new("RGB", (40, 30), "blue").save(W + "/b.bmp")
m = ReMatchModel.load(M, "cpu"); items = [Item(image=W + "/a.bmp")]
CachedEncoder(m, W + "/cache").encode(items, "document")
st = os.stat(W + "/a.bmp"); open(W + "/a.bmp", "wb").write(open(W + "/b.bmp", "rb").read())
os.utime(W + "/a.bmp", ns=(st.st_atime_ns, st.st_mtime_ns))
again = CachedEncoder(m, W + "/cache"); again.encode(items, "document")
assert_silent(again.stats.encoded == 1,
              "an image swapped for another of the same size and mtime was served from the cache")
""", expect="ok")
TRAIN_RESUME = TRAIN.replace("--steps 1", "--steps 2") + " --model.num_tokens 2 --resume"


def checkpoint_mutation(change: Callable[[Path], None]) -> Callable[[Path, World], None]:
    def setup(work: Path, world: World) -> None:
        shutil.copytree(world["TRUN"], work / "run")
        change(work / "run" / "checkpoints" / "step-00000001")

    return setup


def _state_edit(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(checkpoint: Path) -> None:
        state = json.loads((checkpoint / "state.json").read_text())
        change(state)
        (checkpoint / "state.json").write_text(json.dumps(state))
        manifest = json.loads((checkpoint / "MANIFEST.json").read_text())
        manifest["files"]["state.json"] = (checkpoint / "state.json").stat().st_size
        manifest.pop("checksums", None)  # a careful hand: the manifest agrees
        (checkpoint / "MANIFEST.json").write_text(json.dumps(manifest))

    return mutate


for label, change, fragment in [
        ("flipped-weight-bytes", flip_byte("trainable.safetensors"), "trainable.safetensors"),
        ("step-disagrees-with-directory", _state_edit(lambda s: s.update(step=7)), "step"),
        ("garbage-data-state", _state_edit(lambda s: s.update(data_state="garbage")), "data_state"),
        ("garbage-data-state-object", _state_edit(lambda s: s.update(data_state={"format": 1, "subsets": 3})),
         "data_state")]:
    cli(f"vec27-resume-{label}", "vectors", TRAIN_RESUME, setup=checkpoint_mutation(change), fragments=(fragment,),
        timeout=120)
for label, text in {"zero-width": "\u200b\u200c\u200d", "bidi-override": "\u202e\u2066\u2069\ufeff"}.items():
    cli(f"vec27-encode-text-only-{label}", "vectors", ENC + " {W}/in.jsonl",
        setup=files(**{"in.jsonl": [ROW, {"text": text}]}), fragments=("row 1",))


def _corpus_with_fifo_and_loop(work: Path, world: World) -> None:
    (work / "pics").mkdir()
    (work / "pics" / "a.png").write_bytes(GOOD_PNG)
    os.mkfifo(work / "pics" / "pipe.png")
    os.symlink(work / "pics" / "loop.png", work / "pics" / "loop.png")


def _fifo_and_loop_reported(work: Path, world: World, result) -> str | None:
    if "skipped 2" not in result.stderr:
        return "the FIFO and the symlink loop in the corpus folder were skipped without a word"
    return None


cli("vec27-corpus-folder-fifo-and-symlink-loop", "vectors", BUILD.replace("{C}", "{W}/pics"), expect="ok",
    setup=_corpus_with_fifo_and_loop, check=_fifo_and_loop_reported, timeout=60)
cli("vec27-train-empty-config", "vectors", TRAIN + " --config {W}/c.yaml", setup=files(**{"c.yaml": ""}),
    fragments=("c.yaml",))
cli("vec27-info-nan", "vectors", "info {W}/m", setup=copy_of("M", "m", lambda root: (root / "rematch_config.json")
                                                            .write_text((root / "rematch_config.json").read_text()
                                                                        .replace('"num_tokens": 2', '"num_tokens": NaN',
                                                                                 1))), fragments=("NaN",))

# ---------------------------------------------------------------- issue 27: tracebacks for user errors


def _corrupt_cache(work: Path, world: World) -> None:
    subprocess.run([sys.executable, "-m", "rematch.cli", *fill(MMEB, dict(world, W=str(work))).split()],
                   capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))
    for database in (work / "cache").glob("*.sqlite3"):
        database.write_bytes(b"not a database" * 100)


cli("tb27-corrupt-sqlite-cache", "tracebacks", MMEB.replace("{W}/e", "{W}/e2"), setup=_corrupt_cache,
    fragments=("sqlite3",), timeout=180)
V2_SHAPE = json.dumps({"all": {"score": 0.5, "tasks": 1}, "modalities": {"image": {"score": 0.5}}})
cli("tb27-compare-v2-summary", "tracebacks", "eval mmeb --out {W}/a --compare {W}/b",
    setup=files(**{"a__summary.json": '{"subsets": {}, "groups": {}}', "b__summary.json": V2_SHAPE}),
    fragments=("summary.json",))
cli("tb27-export-eval-v2-summary", "tracebacks", "export {T} {W}/x --eval {W}/b",
    setup=files(**{"b__summary.json": V2_SHAPE}), fragments=("summary.json",))
cli("tb27-hnsw-m-1", "tracebacks", BUILD + " --index-type hnsw --hnsw-m 1", fragments=("hnsw",))
cli("tb27-all-loss-weights-0", "tracebacks", TRAIN + " --loss.contrastive 0 --loss.orthogonality 0 "
    "--loss.matching 0", fragments=("loss.",))
cli("tb27-full-disk-writing-a-checkpoint", "tracebacks", TRAIN.replace("--steps 1", "--steps 2")
    + " --train.save_every 1 --model.num_tokens 2", file_size_cap=1 << 20, fragments=("checkpoint",), timeout=120)

# ---------------------------------------------------------------- issue 27: bounds and messages
BUSY_SOCKETS: list = []


def _busy_port(work: Path, world: World) -> None:
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    BUSY_SOCKETS.append(listener)  # held open for the rest of the probe
    world["PORT"] = str(listener.getsockname()[1])


def _sparse(name: str, size: int = 3 << 30) -> Callable[[Path, World], None]:
    def setup(work: Path, world: World) -> None:
        with open(work / name, "wb") as handle:
            handle.truncate(size)

    return setup


cli("bound27-train-steps-2**70", "bounds", TRAIN.replace("--steps 1", f"--steps {2**70}"), fragments=("steps",))
cli("bound27-pretrain-steps-2**70", "bounds", "pretrain --out {W}/p --no-progress --train.steps " + str(2**70),
    fragments=("steps",))
cli("bound27-demo-steps-10**23", "bounds", DEMO + f" --steps {10**23}", fragments=("steps",))
cli("bound27-train-batch-larger-than-data", "bounds", TRAIN.replace("--train.batch_size 2", "--train.batch_size 5000"),
    fragments=("train.batch_size",), timeout=120)
cli("bound27-train-config-3gb-sparse", "bounds", TRAIN + " --config {W}/c.yaml", setup=_sparse("c.yaml"),
    fragments=("c.yaml",))
cli("bound27-info-rematch-config-3gb-sparse", "bounds", "info {W}/m",
    setup=chain(copy_of("M", "m"), _sparse("m/rematch_config.json")), fragments=("rematch_config.json",))
cli("bound27-serve-busy-port", "bounds", "serve --model {M} --allow-untrained --port {PORT}", setup=_busy_port,
    fragments=("{PORT}",), timeout=90)
LONG = "a" * 5000
for label, args in {"tiny": f"tiny --out {{W}}/{LONG}", "synth": SYNTH.replace("{W}/s", "{W}/" + LONG),
                    "mmeb": MMEB.replace("{W}/e", "{W}/" + LONG), "train": TRAIN.replace("{W}/run", "{W}/" + LONG),
                    "encode": f"encode --model {{M}} --allow-untrained --input {{E}} --out {{W}}/{LONG}.npy",
                    "index": BUILD.replace("{W}/i", "{W}/" + LONG)}.items():
    cli(f"bound27-{label}-out-5000-characters", "bounds", args, fragments=("too long",), timeout=90)
for label, flags in {"min-above-max": "--min-pixels 5000 --max-pixels 4000", "max-pixels-1": "--max-pixels 1",
                     "min-above-max-model-limits": "--input-limits model --min-pixels 5000 --max-pixels 4000"}.items():
    cli(f"bound27-mmeb-{label}", "bounds", MMEB + " " + flags, fragments=("pixels",), timeout=90)

# ---------------------------------------------------------------- API
PRELUDE = "from rematch import ReMatchModel; m = ReMatchModel.load(M, 'cpu')\n"
api("api-encode-batch-size-zero", PRELUDE + "m.encode(['a'], batch_size=0)")
api("api-encode-batch-size-float", PRELUDE + "m.encode(['a'], batch_size=2.0)")
api("api-encode-item-int", PRELUDE + "m.encode([123])")
api("api-encode-role-bogus", PRELUDE + "m.encode(['a'], role='teacher')")
api("api-encode-image-ndarray", PRELUDE + "m.encode([{'image': np.zeros((4, 4, 3))}])")
api("api-encode-pil-zero-size", PRELUDE + "from PIL import Image\nm.encode([{'image': Image.new('RGB', (0, 0))}])")
api("api-encode-pil-cmyk", PRELUDE + "from PIL import Image\nv = m.encode([{'image': Image.new('CMYK', (30, 30))}])\n"
    "check_vectors(v, 1)", expect="ok")
api("api-encode-empty-list", PRELUDE + "v = m.encode([])\nassert_silent(v.shape[0] == 0, 'shape ' + str(v.shape))",
    expect="either")
api("api-encode-generator", PRELUDE + "v = m.encode(t for t in ['a', 'b'])\ncheck_vectors(v, 2)", expect="ok")
api("api-tiny-k-negative", "from rematch import ReMatchModel; ReMatchModel.tiny(num_tokens=-1)")
api("api-tiny-size-bogus", "from rematch import ReMatchModel; ReMatchModel.tiny(size='huge')")
api("api-tiny-max-pixels-zero", "from rematch import ReMatchModel; ReMatchModel.tiny(num_tokens=2, max_pixels=0)")
api("api-from-pretrained-expect-k", "from rematch import ReMatchModel; ReMatchModel.from_pretrained(M, num_tokens=9)")
api("api-from-pretrained-missing", "from rematch import ReMatchModel; ReMatchModel.from_pretrained(W + '/nope')")
api("api-save-over-user-folder", PRELUDE + "m.save_pretrained(U)")
api("api-index-duplicate-ids", PRELUDE + "from rematch.retrieval.index import Index\n"
    "Index.build(m, ['a', 'b'], ids=['x', 'x'])")
api("api-index-search-k-zero", PRELUDE + "from rematch.retrieval.index import Index\n"
    "Index.load(I, model=m).search(['a'], k=0)")
api("api-index-search-nan-vector", "from rematch.retrieval.index import Index\n"
    "ix = Index.load(I)\nix.search_vectors(np.full((1, ix.dimension), np.nan, dtype='float32'))")
api("api-index-search-wrong-dim", "from rematch.retrieval.index import Index\n"
    "Index.load(I).search_vectors(np.ones((1, 7), dtype='float32'))")
api("api-index-wrong-model", PRELUDE.replace("M,", "M5,") + "from rematch.retrieval.index import Index\n"
    "Index.load(I, model=m)")
api("api-rerank-negative", PRELUDE + "from rematch.retrieval.index import Index\n"
    "Index.load(I, model=m).search(['a'], rerank=-2)")
api("api-load-config-bad-yaml", "from rematch.config import load_config\nPath(W, 'c.yaml').write_text('a: [1\\n')\n"
    "load_config(W + '/c.yaml')")
api("api-write-shapes-negative", "from rematch.world.tasks import write_shapes_dataset\n"
    "write_shapes_dataset(W + '/s', train_rows=-1, eval_queries=-1)")

API_HARNESS = r'''
import sys
from pathlib import Path
import numpy as np
from rematch.commands.errors import is_user_error, one_line

def assert_silent(condition, message):
    if not condition:
        print("SILENT: " + message)
        sys.exit(0)

def check_vectors(v, rows):
    assert_silent(v.shape[0] == rows, f"{rows} rows expected, got {v.shape}")
    assert_silent(bool(np.isfinite(v).all()), "non-finite vectors")
    assert_silent(bool(np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-3)), "not unit length")

WORLD = __WORLD__
globals().update(WORLD)
try:
    exec(compile(open(sys.argv[1]).read(), sys.argv[1], "exec"))
except Exception as error:
    if is_user_error(error) or isinstance(error, TypeError) and "argument" in str(error):
        print("rematch: error: " + one_line(error), file=sys.stderr)
        sys.exit(1)
    raise
'''


# ============================================================================ running


@dataclass
class Outcome:
    name: str
    group: str
    kind: str
    returncode: int | None
    seconds: float
    last_line: str
    note: str = ""
    command: str = ""


def build_world(root: Path, env: dict) -> World:
    """The shared fixtures: models, data, corpus, index. Cases only read them (checked at the end)."""
    world: World = {"ROOT": str(root)}

    def run(*args: str) -> None:
        result = subprocess.run([sys.executable, "-m", "rematch.cli", *args], env=env, capture_output=True,
                                text=True, timeout=600)
        if result.returncode != 0:
            raise SystemExit(f"fixture step failed: rematch {' '.join(args)}\n{result.stderr[-3000:]}")

    world["M"], world["M5"], world["MS"] = str(root / "model"), str(root / "model-k5"), str(root / "model-seed7")
    run("tiny", "--out", world["M"], "--k", "2")
    run("tiny", "--out", world["M5"], "--k", "5")
    run("tiny", "--out", world["MS"], "--k", "2", "--seed", "7")  # heads and backbone to swap in (issue 27)
    world["D"] = str(root / "mmeb")
    run("data", "synth", "--out", world["D"], "--train-rows", "20", "--eval-queries", "5", "--candidates", "8",
        "--image-size", "56")
    world["TRUN"] = str(root / "trained-run")
    run("train", "--no-progress", "--steps", "1", "--train.batch_size", "2", "--data", world["D"], "--out",
        world["TRUN"], "--model.num_tokens", "2")
    world["T"] = str(Path(world["TRUN"]) / "model")
    images = sorted((Path(world["D"]) / "images").rglob("*.png"))
    world["IMG"] = str(images[0])
    corpus = root / "corpus.jsonl"
    rows = [{"id": f"d{i}", "text": f"a {color} {shape}", "source": "probe"} for i, (color, shape) in
            enumerate([("red", "circle"), ("blue", "square"), ("green", "triangle"), ("red", "square")])]
    rows += [{"id": "d4", "image": str(images[1])}, {"id": "d5", "image": str(images[2]), "text": "<|image_1|> it"}]
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
    world["C"] = str(corpus)  # ids and metadata: for index build and eval retrieval
    items = root / "items.jsonl"  # the same items without metadata: for encode, which takes item fields only
    items.write_text("".join(json.dumps({k: v for k, v in row.items() if k != "source"}) + "\n" for row in rows))
    world["E"] = str(items)
    queries = root / "queries.jsonl"
    queries.write_text("".join(json.dumps({"id": f"q{i}", "text": text}) + "\n"
                               for i, text in enumerate(["red circle", "blue square", "an image"])))
    world["Q"] = str(queries)
    qrels = root / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td1\t1\nq2\td4\t1\n")
    world["QR"] = str(qrels)
    world["I"] = str(root / "index")
    run("index", "build", "--model", world["M"], "--allow-untrained", "--corpus", world["C"], "--out", world["I"])
    return world


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    os.setsid()  # its own process group, so a timeout can end everything it started


def _limits(case: Case) -> Callable[[], None]:
    def limit() -> None:
        _limit_memory()
        if case.file_size_cap is not None:
            import signal

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the cap fails instead of killing
            resource.setrlimit(resource.RLIMIT_FSIZE, (case.file_size_cap, case.file_size_cap))

    return limit


def run_case(case: Case, world: World, work_root: Path, env: dict, number: int) -> Outcome:
    work = work_root / f"{number:03d}-{re.sub(r'[^A-Za-z0-9_.=-]', '_', case.name)}"
    work.mkdir(parents=True)
    user = work / "my-project"
    values = dict(world, W=str(work), U=str(user))
    if case.user_folder or case.cwd_user:
        user_files(user)
    if case.setup is not None:
        case.setup(work, values)
    before = tree_digest(user)
    protected = {name: tree_digest(work / name) for name in case.protect}
    if case.code is not None:
        script = work / "case.py"
        script.write_text(case.code)
        command = [sys.executable, "-c", API_HARNESS.replace("__WORLD__", repr(values)), str(script)]
    else:
        command = [sys.executable, "-m", "rematch.cli", *[fill(token, values) for token in case.argv]]
    shown = " ".join(shlex.quote(token[:80]) for token in command[2 if case.code is None else 3:])
    started = time.perf_counter()
    timed_out = False
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               errors="replace", env=dict(env, **case.env), preexec_fn=_limits(case),
                               cwd=str(user if case.cwd_user else work), stdin=subprocess.DEVNULL)
    try:
        stdout, stderr = process.communicate(timeout=case.timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, 9)
        stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    changed = lost(before, tree_digest(user)) or any(lost(digest, tree_digest(work / name))
                                                     for name, digest in protected.items())
    kind, note = classify(case, result, timed_out, changed, work, values)
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else (stdout.strip().splitlines() or [""])[-1]
    return Outcome(case.name, case.group, kind, None if timed_out else result.returncode, round(seconds, 1),
                   last[:300], note, shown[:400])


def classify(case: Case, result: subprocess.CompletedProcess, timed_out: bool, changed: bool, work: Path,
             world: World) -> tuple[str, str]:
    stderr = result.stderr
    if changed:
        return "LOSS", "the user's files (or a protected earlier result) changed"
    if timed_out:
        return "HANG", f"no result within {case.timeout:.0f} s"
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if result.returncode == -9 or any(marker in last for marker in MEMORY_MARKERS):
        return "HANG", "memory cap hit"
    if "Traceback (most recent call last)" in stderr:
        return "TRACEBACK", ""
    if result.returncode == 0:
        if "SILENT: " in result.stdout:
            return "SILENT", result.stdout.split("SILENT: ", 1)[1].strip()[:200]
        if case.expect == "error":
            return "SILENT", "bad input accepted (exit 0)"
        if case.check is not None:
            problem = case.check(work, world, result)
            if problem:
                return "SILENT", problem
        return "OK", ""
    if result.returncode < 0:
        return "TRACEBACK", f"killed by signal {-result.returncode}"
    note = "valid input refused" if case.expect == "ok" else ""
    argparse_error = result.returncode == 2 and "usage:" in stderr and ": error:" in last
    rematch_lines = [line for line in lines if line.startswith("rematch")]
    one_line = bool(lines) and last.startswith("rematch") and ": " in last and len(rematch_lines) == 1
    if argparse_error or one_line:
        missing = [fill(fragment, world) for fragment in case.fragments if fill(fragment, world) not in last]
        if missing and not argparse_error:
            note = (note + "; " if note else "") + f"message lacks {missing}"
        return "CLEAR", note
    if case.report_ok and result.returncode == 1 and "bad row" in result.stdout:
        return "CLEAR", note
    return "UNCLEAR", note or "no one-line error"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None, help="write the full report (every case) to this JSON file")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
    parser.add_argument("--only", default=None, help="regex: run only cases whose name matches")
    parser.add_argument("--keep", action="store_true", help="keep the temporary world (its path is printed)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    cases = [case for case in CASES if args.only is None or re.search(args.only, case.name)]
    if args.list:
        for case in cases:
            print(f"{case.group:<16} {case.name}")
        print(f"{len(cases)} cases")
        return 0
    root = Path(tempfile.mkdtemp(prefix="rematch-probe-"))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HF_HOME=str(root / "hf-home"), REMATCH_CACHE_DIR=str(root / "embedding-cache"),
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    env.pop("REMATCH_DEBUG", None)
    started = time.perf_counter()
    print(f"building the fixture world in {root} ...", flush=True)
    world = build_world(root / "world", env)
    fixtures_before = {key: tree_digest(Path(world[key])) for key in ("M", "M5", "MS", "T", "D", "C", "E", "I", "Q",
                                                                      "QR")}
    print(f"fixtures ready in {time.perf_counter() - started:.0f} s; running {len(cases)} cases, "
          f"{args.jobs} at a time", flush=True)
    lock = threading.Lock()
    outcomes: list[Outcome | None] = [None] * len(cases)

    def one(number: int) -> None:
        try:
            outcome = run_case(cases[number], world, root / "cases", env, number)
        except Exception as error:  # noqa: BLE001 - a broken case must not stop the census
            outcome = Outcome(cases[number].name, cases[number].group, "UNCLEAR", None, 0.0,
                              f"probe error: {type(error).__name__}: {error}", "the probe itself failed")
        outcomes[number] = outcome
        with lock:
            done = sum(o is not None for o in outcomes)
            print(f"[{done:>3}/{len(cases)}] {outcome.kind:<9} {outcome.seconds:>5.1f}s  {outcome.name}", flush=True)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(one, range(len(cases))))
    fixture_changes = [key for key, digest in fixtures_before.items() if tree_digest(Path(world[key])) != digest]
    results = [o for o in outcomes if o is not None]
    counts = {kind: sum(o.kind == kind for o in results) for kind in CLASSES}
    vague = [o for o in results if o.kind == "CLEAR" and "lacks" in o.note]
    print("\n" + " ".join(f"{kind} {counts[kind]}" for kind in CLASSES) + f"   (total {len(results)})")
    groups = sorted({o.group for o in results})
    print(f"\n{'group':<16}" + "".join(f"{kind:>10}" for kind in CLASSES))
    for group in groups:
        print(f"{group:<16}" + "".join(f"{sum(o.kind == kind and o.group == group for o in results):>10}"
                                       for kind in CLASSES))
    bad = [o for o in results if o.kind not in ("OK", "CLEAR")]
    if bad:
        print("\nnot OK and not CLEAR:")
        for o in bad:
            print(f"  {o.kind:<9} {o.name}: {o.note + ' | ' if o.note else ''}{o.last_line[:220]}")
    refused = [o for o in results if o.kind == "CLEAR" and "valid input refused" in o.note]
    if refused:
        print("\nvalid input refused:")
        for o in refused:
            print(f"  {o.name}: {o.last_line[:220]}")
    if vague:
        print(f"\nCLEAR but the message lacks the expected file/row/flag ({len(vague)}):")
        for o in vague:
            print(f"  {o.name}: {o.note} | {o.last_line[:200]}")
    if fixture_changes:
        print(f"\nWARNING: shared fixtures changed during the run: {fixture_changes}")
    elapsed = time.perf_counter() - started
    print(f"\n{len(results)} cases in {elapsed / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "counts": counts, "total": len(results), "seconds": round(elapsed, 1), "vague_clear": len(vague),
            "fixture_changes": fixture_changes,
            "cases": [o.__dict__ for o in results]}, indent=2, ensure_ascii=False) + "\n")
        print(f"report: {args.json}")
    if args.keep:
        print(f"kept {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
