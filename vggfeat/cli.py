"""The ``vggfeat`` command: thin Click commands over the library.

Data goes to files or stdout; messages go to stderr. Every problem the user can
fix is a ``VggfeatError`` raised by the library and shown here as one line.
TensorFlow is not imported on the way to ``--help`` or an argument error.
"""

from __future__ import annotations

import json
from typing import Any

import click

from vggfeat.architecture import DEPTHS, POOLINGS, TOP_IMAGE_SIZE, Architecture, Catalogue, vgg
from vggfeat.errors import VggfeatError
from vggfeat.weights import published_files

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Commands(click.Group):
    """Shows a ``VggfeatError`` from any command as one line on stderr, exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VggfeatError as error:
            raise click.ClickException(str(error)) from error


def depth_option(command):
    return click.option(
        "--depth",
        type=click.Choice([str(d) for d in DEPTHS]),
        default="16",
        show_default=True,
        callback=lambda _ctx, _param, value: int(value),
        help="Which VGG: 11, 13, 16 or 19 (configurations A, B, D, E).",
    )(command)


def image_size_option(command):
    return click.option(
        "--image-size",
        type=click.IntRange(min=1),
        default=TOP_IMAGE_SIZE,
        show_default=True,
        metavar="N",
        help="Side of the square network input in pixels: fc6-fc8 need 224, conv cuts 32 or more.",
    )(command)


@click.group(cls=_Commands, context_settings=CONTEXT)
@click.version_option(package_name="vggfeat", prog_name="vggfeat")
def cli() -> None:
    """Turn folders of images into VGG feature vectors in one HDF5 file.

    \b
    Examples:
      vggfeat info --depth 19
      vggfeat extract photos/ --layer fc7 -o features.h5
    """


@cli.command(context_settings=CONTEXT)
@depth_option
@image_size_option
@click.option("--json", "as_json", is_flag=True, help="Print the facts as one JSON object.")
def info(depth: int, image_size: int, as_json: bool) -> None:
    """Describe a VGG network: layers, shapes, costs, cut points, cached weights.

    \b
    Examples:
      vggfeat info
      vggfeat info --depth 19 --image-size 160
      vggfeat info --json | jq .total_params
    """
    architecture = vgg(depth)
    catalogue = architecture.catalogue(image_size)
    if as_json:
        click.echo(json.dumps(_info_facts(architecture, catalogue), indent=2))
    else:
        _print_info(architecture, catalogue)


def _weights_status(architecture: Architecture) -> list[dict[str, Any]]:
    status = []
    for published in published_files(architecture):
        path = published.cached_path()
        status.append(
            {
                "file": published.fname,
                "serves": "every layer" if published.include_top else "cuts up to pool5",
                "path": str(path),
                "cached": path.is_file(),
                "size_bytes": path.stat().st_size if path.is_file() else None,
            }
        )
    return status


def _info_facts(architecture: Architecture, catalogue: Catalogue) -> dict[str, Any]:
    return {
        "network": architecture.name,
        "depth": architecture.depth,
        "image_size": catalogue.image_size,
        "layers": [
            {
                "name": facts.layer.name,
                "alias": facts.layer.alias,
                "kind": facts.layer.kind,
                "output_shape": list(facts.output_shape),
                "params": facts.params,
                "macs": facts.macs,
                "feature_size": {pool: facts.feature_size(pool) for pool in POOLINGS},
            }
            for facts in catalogue.layers
        ],
        "total_params": catalogue.params,
        "total_macs": catalogue.macs,
        "cut_points": [facts.layer.alias for facts in catalogue.layers],
        "imagenet_weights": _weights_status(architecture),
    }


def _print_info(architecture: Architecture, catalogue: Catalogue) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    size = catalogue.image_size
    table = Table(
        title=f"{architecture.name} at {size}x{size}",
        title_justify="left",
        box=None,
        pad_edge=False,
        header_style="bold",
    )
    table.add_column("layer")
    table.add_column("alias")
    table.add_column("output")
    for column in ("params", "mult-adds", "features", "avg/max"):
        table.add_column(column, justify="right")
    for facts in catalogue.layers:
        pooled = facts.feature_size("avg")
        table.add_row(
            facts.layer.name,
            facts.layer.alias,
            "x".join(map(str, facts.output_shape)),
            f"{facts.params:,}",
            _giga(facts.macs),
            f"{facts.feature_size('none'):,}",
            f"{pooled:,}" if facts.layer.kind in ("conv", "pool") else "",
        )
    console.print(table)
    console.print(
        f"Total: {catalogue.params:,} parameters, {_giga(catalogue.macs)} multiply-adds per image."
    )
    if size != TOP_IMAGE_SIZE:
        console.print(f"fc6, fc7 and fc8 need {TOP_IMAGE_SIZE}x{TOP_IMAGE_SIZE} input.")
    console.print(
        "Cut points (--layer): "
        + ", ".join(facts.layer.alias for facts in catalogue.layers)
        + ", or the Keras name of any layer above."
    )
    status = _weights_status(architecture)
    if not status:
        console.print(
            f"ImageNet weights: Keras publishes none for {architecture.name}; "
            "use --weights PATH or --weights random."
        )
    for entry in status:
        state = (
            f"cached, {entry['size_bytes'] / 1e6:,.1f} MB"
            if entry["cached"]
            else "missing, downloaded on first use"
        )
        console.print(f"ImageNet weights for {entry['serves']}: {entry['path']} ({state})")


def _giga(count: int) -> str:
    return f"{count / 1e9:.2f} G" if count >= 1e7 else f"{count / 1e6:.2f} M" if count else "0"
