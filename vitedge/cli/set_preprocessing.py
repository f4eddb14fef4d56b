"""`vitedge set-preprocessing`: correct the preprocessing recorded in an artifact's manifest."""

from __future__ import annotations

from pathlib import Path

import click

from ..parity import set_preprocessing
from ..ui import console
from ._common import preprocessing_from_cli, preprocessing_options


@click.command("set-preprocessing")
@click.argument("engine", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--reference",
    default=None,
    show_default="none: the flags and --preprocessing only",
    help="Take the preprocessing of this reference (as `vitedge check parity` reads it): timm data config JSON, Hugging Face "
    "preprocessor_config.json (or its folder), vitedge checkpoint/manifest, preset or 'reference'.",
)
@preprocessing_options
def command(engine, reference, **pre_flags):
    """Correct the preprocessing recorded in ENGINE's manifest (any artifact, its manifest or a bundle folder).

    The fields given (by --reference, --preprocessing FILE or the flags, the flags last) replace the recorded ones;
    the others stay. The manifest is rewritten at once; the engine's files are not touched. `vitedge check parity`
    prints the command that fixes what it finds.
    """
    flags = preprocessing_from_cli(**pre_flags) or {}
    json_path = flags.pop("json_path", None)
    sidecar, changed = set_preprocessing(engine, reference, json_path=json_path, **flags)
    if not changed:
        console.print(f"{sidecar} already records this preprocessing: nothing written")
        return
    for f, (old, new) in changed.items():
        console.print(f"{f}: {old} -> {new}")
    console.print(f"[green]wrote[/] {sidecar}")


# the shared preprocessing flags describe models without a manifest; here they set a manifest's fields
for _param in command.params:
    if isinstance(_param, click.Option) and _param.help:
        _param.help = _param.help.replace("models without a manifest; ", "").replace(" (models without a manifest)", "")
