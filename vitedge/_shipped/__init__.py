"""The data vitedge ships with: the recipes and the digits calibration images.

They live at the top of the repository, in ``recipes/`` and ``calibration_data/`` (the README, the
docs and users refer to them there), and that is the only copy.  ``pyproject.toml`` maps the two
folders into this package at build time, as the sub-packages ``vitedge._shipped.recipes`` and
``vitedge._shipped.calibration_data`` (the ``__init__.py`` in each folder makes it one), and the
code reads them with :mod:`importlib.resources` from the installed package: in a wheel they are
``vitedge/_shipped/recipes`` and ``vitedge/_shipped/calibration_data``, in an editable install
(``pip install -e .``) the repository folders themselves.  Either way the two folders are siblings,
so the ``../calibration_data/...`` paths in the shipped recipes resolve in both.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

FOLDERS = ("recipes", "calibration_data")


def folder(name: str) -> Path:
    """The shipped folder ``name`` (one of :data:`FOLDERS`) as a file-system path."""
    if name not in FOLDERS:
        raise ValueError(f"{name!r} is not a shipped folder ({', '.join(FOLDERS)})")
    try:
        root = resources.files(f"{__name__}.{name}")
    except ModuleNotFoundError:
        # An editable install made before these folders became package data: its import hook does not
        # know the sub-package.  The checkout's folder is right there; say how to fix the install.
        root = Path(__file__).resolve().parents[2] / name
        logging.getLogger("vitedge").warning("vitedge's shipped %s are not in its installed package; using %s (re-run `pip install -e .` to fix)", name, root)
    if not isinstance(root, Path):
        raise RuntimeError(f"vitedge's shipped {name} are not plain files ({root!r}): install vitedge unzipped")
    return root
