"""Options shared by several commands."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import VitedgeError


def _parse_batch(ctx, param, value):
    if value is None or str(value).lower() == "dynamic":
        return None
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter("use 'dynamic' or a positive integer") from None


batch_option = click.option("--batch", default="dynamic", show_default=True, callback=_parse_batch,
                            help="'dynamic' or a fixed batch size.")
images_option = click.option("--images", type=click.Path(exists=True, path_type=Path), default=None,
                             help="Folder of real images used for the checks (default: the shipped calibration images).")


def list_images_arg(folder: Path | None) -> list[Path] | None:
    from ..data import default_check_images, list_images

    if folder is None:
        return default_check_images()
    found = list_images(folder)
    if not found:
        raise VitedgeError(f"no images (jpg/png/bmp/webp) found in {folder}")
    return found
