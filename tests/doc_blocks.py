"""Helpers for the tests that run the documentation as written (test_readme, test_examples)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VITEDGE = Path(sys.executable).with_name("vitedge")
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)


def blocks(text: str, lang: str) -> list[str]:
    """The bodies of the fenced code blocks of one language, in order."""
    return [body for kind, body in FENCE.findall(text) if kind == lang]


def checkout_like(tmp: Path, folders: tuple[str, ...]) -> Path:
    """A working folder where the docs' relative paths (``recipes/``, ``examples/``...) mean what they mean in a checkout."""
    work = tmp / "work"
    work.mkdir()
    for name in folders:
        (work / name).symlink_to(ROOT / name, target_is_directory=True)
    return work
