"""The main job on the built-in default: ``rematch demo`` (see :mod:`rematch.demo.pipeline`)."""

from rematch.demo.pipeline import DemoResult, run_demo
from rematch.demo.settings import ROWS, DemoSettings

__all__ = ["DemoResult", "DemoSettings", "ROWS", "run_demo"]
