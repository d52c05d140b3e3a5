"""Helpers the tests share (ports, subprocess deadlines, tiny servers, matching references, video clips)."""

from pathlib import Path

#: The repository root (tests live two levels below it).
REPO = Path(__file__).resolve().parents[2]
