"""Options shared by several commands."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..backends import registry
from ..data import default_check_images, list_images
from ..errors import FileProblem, did_you_mean

if TYPE_CHECKING:
    from ..options import OptionField, StepOptions


class BackendChoice(click.Choice):
    """The registered backends that can do ``capability``, read from the registry when the command runs."""

    def __init__(self, capability: str | None = None):
        self.capability = capability
        super().__init__((), case_sensitive=False)

    @property
    def choices(self):
        return tuple(registry.names(self.capability))

    @choices.setter
    def choices(self, value):  # click.Choice.__init__ assigns; the registry is the source
        pass

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter as exc:
            close = did_you_mean(value, self.choices)
            if close is None:
                raise
            self.fail(f"{exc.message} {close[0].upper()}{close[1:]}", param, ctx)


def options_of(cls: type[StepOptions]):
    """A decorator adding the click options of every field of ``cls`` (a :mod:`vitedge.options` dataclass),
    in field order: the field's flag, short flag, type or choices, default (shown) and help."""

    def add(f):
        for opt in reversed(cls.fields()):
            for decl in reversed(_click_options(opt)):
                f = decl(f)
        return f

    return add


def _click_options(o: OptionField) -> list:
    s = o.spec
    if s.switches:  # --int8 / --fp16 / --auto: one flag per value
        return [click.option(flag, o.name, flag_value=value, help=text) for flag, value, text in s.switches]
    decls = [d for d in (s.short, s.flag or "--" + o.name.replace("_", "-"), o.name) if d]
    if o.base_type is bool:
        return [click.option(*decls, is_flag=True, help=s.help)]
    default = s.cli_default if s.cli_default is not None else o.default
    kw: dict = {"default": default, "type": _click_type(o), "help": s.help, "metavar": s.metavar}
    if s.shown_default or default is not None:
        kw["show_default"] = s.shown_default or True
    if s.parse:
        kw["callback"] = _callback(s.parse)
    return [click.option(*decls, **kw)]


def _click_type(o: OptionField):
    s = o.spec
    if s.backends:
        return BackendChoice(s.backends)
    if s.choices:
        return click.Choice(s.choices)
    if s.path is not None:
        return click.Path(path_type=Path, **s.path)
    if o.base_type in (int, float):
        if s.cli_range:
            if o.base_type is int:
                return click.IntRange(min=None if s.minimum is None else int(s.minimum), max=None if s.maximum is None else int(s.maximum))
            return click.FloatRange(min=s.minimum, max=s.maximum)
        return o.base_type
    return None  # text (a parser or the step reads it)


def _callback(parse):
    def callback(ctx, param, value):
        try:
            return None if value is None else parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None

    return callback


def list_images_arg(folder: Path | None) -> list[Path] | None:
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
        click.option(
            "--preprocessing",
            "pre_json",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            help="JSON with img_size, resize, center_crop, interpolation, mean, std, scale, channel_order - or a Hugging Face "
            "preprocessor_config.json / timm data config (models without a manifest; flags override it).",
        ),
        click.option(
            "--interpolation",
            type=click.Choice(["nearest", "bilinear", "bicubic", "lanczos", "box"]),
            default=None,
            help="Resize interpolation (models without a manifest).",
        ),
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
    opts = {"json_path": pre_json, "interpolation": interpolation, "crop": crop, "resize": resize, "std": std, "mean": mean, "img_size": pre_img_size}
    return {k: v for k, v in opts.items() if v is not None} or None
