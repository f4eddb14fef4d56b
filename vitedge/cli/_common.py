"""Options shared by several commands."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import FileProblem


class BackendChoice(click.Choice):
    """The registered backends that can do ``capability``, read from the registry when the command runs."""

    def __init__(self, capability: str | None = None):
        self.capability = capability
        super().__init__((), case_sensitive=False)

    @property
    def choices(self):
        from ..backends import registry

        return tuple(registry.names(self.capability))

    @choices.setter
    def choices(self, value):  # click.Choice.__init__ assigns; the registry is the source
        pass


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
        raise FileProblem(f"no images (jpg/png/bmp/webp) found in {folder}")
    return found


def preprocessing_options(f=None, *, img_size: bool = True):
    """Flags describing the preprocessing of a model that has no vitedge manifest.

    ``@preprocessing_options`` or ``@preprocessing_options(img_size=False)`` for a command that
    already has its own ``--img-size``."""
    if f is None:
        return lambda g: preprocessing_options(g, img_size=img_size)
    opts = [
        click.option("--preprocessing", "pre_json", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="JSON with img_size, resize, center_crop, interpolation, mean, std, scale, channel_order - or a Hugging Face preprocessor_config.json / timm data config (models without a manifest; flags override it)."),
        click.option("--interpolation", type=click.Choice(["nearest", "bilinear", "bicubic", "lanczos", "box"]), default=None,
                     help="Resize interpolation (models without a manifest)."),
        click.option("--crop/--no-crop", default=None, help="Center-crop after the resize (models without a manifest)."),
        click.option("--resize", type=int, default=None, help="Resize the shorter side to this before cropping (models without a manifest)."),
        click.option("--std", default=None, help="Per-channel std, e.g. 0.229,0.224,0.225 (models without a manifest)."),
        click.option("--mean", default=None, help="Per-channel mean, e.g. 0.485,0.456,0.406 (models without a manifest)."),
        click.option("--img-size", "pre_img_size", type=int, default=None, help="Input resolution (models without a manifest)."),
    ]
    if not img_size:
        opts.pop()
    for o in opts:
        f = o(f)
    return f


def preprocessing_from_cli(pre_json=None, interpolation=None, crop=None, resize=None, std=None, mean=None, pre_img_size=None):
    """The preprocessing options the flags give (for ``ensure_manifest``/``foreign.resolve_options``, which
    resolve them against the model's input shape and print what is assumed), or None when no flag was given."""
    opts = {"json_path": pre_json, "interpolation": interpolation, "crop": crop, "resize": resize, "std": std, "mean": mean,
            "img_size": pre_img_size}
    return {k: v for k, v in opts.items() if v is not None} or None
