"""``rematch index ...`` commands (not implemented yet)."""

from __future__ import annotations


def register(sub) -> None:
    """No commands yet."""
