"""Options shared by several commands."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..backends import registry
from ..data import default_check_images, list_images
from ..errors import FileProblem
from ..ui import deprecated

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


def renamed(*old: str, to: str):
    """A decorator adding hidden options ``old`` (earlier spellings of the option ``to``, e.g. ``"--samples"``)
    that are kept for one release: each prints one deprecation line and gives its value to ``to``.

    The alias is eager, so it runs before ``to``; it hands its text over through the context's default map,
    which ``to`` reads only when it is not on the command line itself, and ``to`` then converts and checks the
    value as its own (type, range, callback): the old spelling behaves exactly as the new one.  Given beside ``to``
    itself, ``to`` wins (the alias still prints its line); two old spellings of one option are refused."""

    def alias(spelling: str):
        def callback(ctx: click.Context, param: click.Parameter, value):
            if value is None:
                return
            new = next(p for p in ctx.command.params if to in getattr(p, "opts", ()))
            moved = ctx.meta.setdefault("vitedge.renamed", {})
            if new.name in moved:
                raise click.UsageError(f"{moved[new.name]} and {spelling} are both {to} now: give it once")
            moved[new.name] = spelling
            deprecated(spelling, to)
            ctx.default_map = {**(ctx.default_map or {}), new.name: value}

        dest = "renamed_" + spelling.lstrip("-").replace("-", "_")
        return click.option(spelling, dest, hidden=True, is_eager=True, expose_value=False, callback=callback)

    def add(f):
        for spelling in old:
            f = alias(spelling)(f)
        return f

    return add


def options_of(cls: type[StepOptions]):
    """A decorator adding the click options of every field of ``cls`` (a :mod:`vitedge.options` dataclass),
    in field order: the field's flag, short flag, type or choices, default (shown), help and the hidden
    aliases of its earlier spellings."""

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
    kw: dict = {"default": default, "type": _click_type(o), "help": s.help, "metavar": s.metavar, "show_default": s.shown_default or True}
    new = s.flag or "--" + o.name.replace("_", "-")
    return [click.option(*decls, **kw)] + ([renamed(*s.renamed_from, to=new)] if s.renamed_from else [])


def _click_type(o: OptionField):
    s = o.spec
    if s.parse:
        return _Parsed(s.parse, "integer" if o.base_type is int else "text")
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
    return None  # text (the step reads it)


class _Parsed(click.ParamType):
    """A value that a :mod:`vitedge.options` parser reads from the CLI text (its ValueError's message is the error)."""

    def __init__(self, parse, name: str):
        self.parse, self.name = parse, name

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value  # a default that is already a value
        try:
            return self.parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


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
    given = "the manifest's, else assumed and printed"  # what each flag defaults to
    opts = [
        click.option(
            "--preprocessing",
            "pre_json",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            show_default="none",
            help="JSON with img_size, resize, center_crop, interpolation, mean, std, scale, channel_order - or a Hugging Face "
            "preprocessor_config.json / timm data config (models without a manifest; flags override it).",
        ),
        click.option(
            "--interpolation",
            type=click.Choice(["nearest", "bilinear", "bicubic", "lanczos", "box"]),
            default=None,
            show_default=given,
            help="Resize interpolation (models without a manifest).",
        ),
        click.option("--crop/--no-crop", default=None, show_default=given, help="Center-crop after the resize (models without a manifest)."),
        click.option(
            "--resize", type=int, default=None, show_default=given, help="Resize the shorter side to this before cropping (models without a manifest)."
        ),
        click.option("--std", default=None, show_default=given, help="Per-channel std, e.g. 0.229,0.224,0.225 (models without a manifest)."),
        click.option("--mean", default=None, show_default=given, help="Per-channel mean, e.g. 0.485,0.456,0.406 (models without a manifest)."),
        click.option("--img-size", "pre_img_size", type=int, default=None, show_default=given, help="Input resolution (models without a manifest)."),
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
