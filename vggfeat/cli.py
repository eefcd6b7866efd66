"""The ``vggfeat`` command: thin Click commands over the library.

Data goes to files or stdout; messages go to stderr. Every problem the user can
fix is a ``VggfeatError`` raised by the library and shown here as one line.
TensorFlow is not imported on the way to ``--help`` or an argument error.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from vggfeat import terminal
from vggfeat.architecture import DEPTHS, TOP_IMAGE_SIZE, Architecture, Catalogue, vgg
from vggfeat.engine import ENGINES, EngineOptions, engine_options, option_names
from vggfeat.errors import OptionError, VggfeatError
from vggfeat.export import FORMATS, NORMALIZATIONS
from vggfeat.heads import HEADS, SEPARATOR, parameter_options
from vggfeat.images import RESIZE_MODES
from vggfeat.network import PRECISIONS
from vggfeat.preprocessing import PREPROCESSINGS
from vggfeat.ray_engine import STALL_SECONDS
from vggfeat.runtime import BACKENDS
from vggfeat.search.index import SEARCHES
from vggfeat.sheet import SECTIONS, SINGULAR
from vggfeat.store import COMMIT_IMAGES, COMPRESSIONS, STORED_DTYPES
from vggfeat.text import tsv_field
from vggfeat.weights import published_files
from vggfeat.weights.pytorch_files import release

if TYPE_CHECKING:
    import numpy as np

    from vggfeat.search import Clustering, Group, Index, Neighbors, Vectors
    from vggfeat.sheet import Sheet

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class ExitCode(IntEnum):
    """What ``vggfeat`` exits with."""

    OK = 0
    ERROR = 1
    """A problem to fix: the message on stderr says which and how."""
    USAGE = 2
    """An unknown option or a bad value (an unknown layer, a size a layer cannot take, ...)."""
    SOME_FAILED = 3
    """``--strict`` and at least one image could not be used."""
    INTERRUPTED = 130
    """Ctrl-C: completed work is kept; the same command continues."""
    TERMINATED = 143
    """SIGTERM: as for Ctrl-C."""


class _BatchSize(click.ParamType):
    """A number of images, or ``auto``: the largest batch that is fast and fits."""

    name = "N|auto"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | None:
        if value is None or isinstance(value, int):
            return value
        if str(value).strip().lower() == "auto":
            return None
        try:
            number = int(value)
        except ValueError:
            number = 0
        if number < 1:
            self.fail(f"{value!r} is not a number of images (1 or more) or auto", param, ctx)
        return number


class _PathList(click.ParamType):
    """A file (``-``: standard input) of paths, one a line. Lines end at a newline only,
    so a name holding a carriage return is read whole; a CR before the newline (a Windows
    line end) is dropped. Bytes that are not UTF-8 stay as the file system has them."""

    name = "FILE|-"

    def convert(self, value: Any, param: Any, ctx: Any) -> list[str]:
        if isinstance(value, list):
            return value
        try:
            if value == "-":
                data = sys.stdin.buffer.read()
            else:
                with open(value, "rb") as file:
                    data = file.read()
        except OSError as error:
            self.fail(f"cannot read {value}: {error.strerror or error}", param, ctx)
        lines = data.split(b"\n")
        if lines and not lines[-1]:
            lines.pop()
        return [os.fsdecode(line.removesuffix(b"\r")) for line in lines]


class _BadOption(click.ClickException):
    """A bad option value: one line, exit 2."""

    exit_code = ExitCode.USAGE


class _Commands(click.Group):
    """Shows a ``VggfeatError`` from any command, and Click's own usage errors, as one line
    on stderr: exit 2 for a bad option value or usage, 1 for anything else."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        # --help and --version print here, before any command runs.
        try:
            return super().make_context(*args, **kwargs)
        except BrokenPipeError:
            _drop_stdout()
            raise click.exceptions.Exit(ExitCode.OK) from None
        except KeyboardInterrupt:
            raise _stopped() from None
        except click.UsageError as error:
            raise _one_line(error) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            _drop_stdout()
            ctx.exit(ExitCode.OK)
        except KeyboardInterrupt:
            raise _stopped() from None
        except click.UsageError as error:
            raise _one_line(error) from None
        except OptionError as error:
            raise _BadOption(_with_notes(error)) from error
        except VggfeatError as error:
            raise click.ClickException(_with_notes(error)) from error


def _one_line(error: click.UsageError) -> _BadOption:
    """Click's usage error (an unknown option or command, a value of the wrong kind, a
    missing input) as the one line every other refusal is, with where to read more;
    Click itself would print the usage and a hint around it."""
    command = error.ctx.command_path if error.ctx is not None else "vggfeat"
    return _BadOption(f"{error.format_message().rstrip('.')}; see '{command} --help'")


def _stopped() -> click.exceptions.Exit:
    """Ctrl-C before a command had anything to keep (Click itself would say "Aborted!", 1)."""
    click.echo("Stopped.", err=True)
    return click.exceptions.Exit(ExitCode.INTERRUPTED)


def _with_notes(error: BaseException) -> str:
    """An error's message, and on lines of their own the notes the library added (what
    else went wrong while it stopped)."""
    return "\n".join([str(error), *getattr(error, "__notes__", ())])


def _drop_stdout() -> None:
    """The reader went away (| head): nothing is wrong. Python would complain on exit,
    flushing the pipe again, so stdout goes to /dev/null first."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


Decorated = Callable[..., Any]


def depth_option(command: Decorated) -> Decorated:
    return click.option(
        "--depth",
        type=click.Choice([str(d) for d in DEPTHS]),
        default="16",
        show_default=True,
        callback=lambda _ctx, _param, value: int(value),
        help="Which VGG: 11, 13, 16 or 19 (configurations A, B, D, E).",
    )(command)


def batch_norm_option(command: Decorated) -> Decorated:
    return click.option(
        "--batch-norm",
        is_flag=True,
        help="The batch-norm variant (torchvision's vgg16_bn): a BatchNormalization after "
        "each convolution, before its ReLU.",
    )(command)


def choice_option(
    name: str, choices: tuple[str, ...], help: str
) -> Callable[[Decorated], Decorated]:
    """An option taking one of ``choices``, the first being the default."""
    return click.option(
        name, type=click.Choice(choices), default=choices[0], show_default=True, help=help
    )


def head_options(command: Decorated) -> Decorated:
    """``--pool`` and an option for each parameter of each head (``--gem-p``), from the table."""
    for key, (head, parameter) in reversed(parameter_options().items()):
        command = click.option(
            f"--{key.replace('_', '-')}",
            key,
            type=int if parameter.integer else float,
            metavar="N" if parameter.integer else "X",
            help=f"{parameter.help}, {parameter.bounds}; for --pool {head.name} and "
            f"--layer NAME{SEPARATOR}{head.name}.  [default: {parameter.default:g}]",
        )(command)
    shown = "; ".join(f"{head.name}: {head.summary}" for head in HEADS.values())
    return click.option(
        "--pool",
        type=click.Choice(tuple(HEADS), case_sensitive=False),
        default="none",
        show_default=True,
        help=f"The head of each conv or pool layer (fully connected ones have none). {shown}.",
    )(command)


def image_size_option(command: Decorated) -> Decorated:
    return click.option(
        "--image-size",
        type=int,
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
      vggfeat devices
      vggfeat extract photos/ --layer fc7 -o features.h5
      vggfeat show features.h5
      vggfeat export features.h5 --format npy | python my_clustering.py
    """


@cli.command(context_settings=CONTEXT)
@depth_option
@batch_norm_option
@image_size_option
@click.option("--json", "as_json", is_flag=True, help="Print the facts as one JSON object.")
def info(depth: int, batch_norm: bool, image_size: int, as_json: bool) -> None:
    """Describe a VGG network: layers, shapes, costs, cut points, and the published weights
    that fit it.

    \b
    Examples:
      vggfeat info
      vggfeat info --depth 19 --image-size 160
      vggfeat info --depth 11 --batch-norm
      vggfeat info --json | jq .total_params
    """
    architecture = vgg(depth, batch_norm)
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


def _pytorch_weights(architecture: Architecture) -> list[dict[str, Any]]:
    """The PyTorch world's ImageNet files for a network: timm's safetensors, which
    ``--weights timm`` fetches, and torchvision's pickle, which vggfeat reads once converted."""
    published = release(architecture)
    size = architecture.catalogue().params * 4  # float32, as both are published
    cached = published.cached_path()
    common = {"size_bytes": size, "top1": published.top1, "preprocessing": "torch"}
    return [
        common
        | {
            "source": "timm",
            "name": published.timm_repository,
            "file": "model.safetensors",
            "url": published.timm_url,
            "layout": "timm",
            "path": str(cached),
            "cached": cached.is_file(),
            "use": "--weights timm ("
            + ("cached" if cached.is_file() else "missing, downloaded on first use")
            + f" as {cached}), or --weights PATH",
        },
        common
        | {
            "source": "torchvision",
            "name": published.name,
            "file": published.torchvision_file,
            "url": published.torchvision_url,
            "layout": "torchvision",
            "path": None,
            "cached": False,
            "use": "a pickle: convert it to safetensors with torch (docs/manual/weights.md), "
            "then --weights PATH",
        },
    ]


def _info_facts(architecture: Architecture, catalogue: Catalogue) -> dict[str, Any]:
    return {
        "network": architecture.name,
        "depth": architecture.depth,
        "batch_norm": architecture.batch_norm,
        "image_size": catalogue.image_size,
        "layers": [
            {
                "name": facts.layer.name,
                "alias": facts.layer.alias,
                "kind": facts.layer.kind,
                "output_shape": list(facts.output_shape),
                "params": facts.params,
                "macs": facts.macs,
                "feature_size": {
                    head: facts.feature_size(head)
                    for head in (HEADS if facts.layer.has_map else ["none"])
                    if facts.layer.is_cut_point
                },
            }
            for facts in catalogue.layers
        ],
        "total_params": catalogue.params,
        "total_macs": catalogue.macs,
        "cut_points": [facts.layer.alias for facts in catalogue.layers if facts.layer.is_cut_point],
        "heads": [
            {
                "name": head.name,
                "summary": head.summary,
                "parameters": {
                    parameter.name: {
                        "option": f"--{head.name}-{parameter.name}",
                        "default": parameter.default,
                        "least": parameter.least,
                        "most": parameter.most,
                    }
                    for parameter in head.parameters
                },
            }
            for head in HEADS.values()
        ],
        "imagenet_weights": _weights_status(architecture),
        "pytorch_weights": _pytorch_weights(architecture),
    }


def _print_info(architecture: Architecture, catalogue: Catalogue) -> None:
    from rich.table import Table

    console = terminal.console(soft_wrap=True)
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
    for column in ("params", "mult-adds", "features"):
        table.add_column(column, justify="right")
    # One column per size a head gives: heads that give every layer the same size share one.
    columns: dict[tuple[int, ...], list[str]] = {}
    for head in HEADS:
        if head != "none":
            sizes = tuple(facts.feature_size(head) for facts in catalogue.layers)
            columns.setdefault(sizes, []).append(head)
    for heads in columns.values():
        table.add_column("pooled" if len(columns) == 1 else "/".join(heads), justify="right")
    for facts in catalogue.layers:
        pooled = [f"{facts.feature_size(heads[0]):,}" for heads in columns.values()]
        table.add_row(
            facts.layer.name,
            facts.layer.alias,
            "x".join(map(str, facts.output_shape)),
            f"{facts.params:,}",
            _giga(facts.macs),
            f"{facts.feature_size('none'):,}" if facts.layer.is_cut_point else "",
            *(pooled if facts.layer.has_map else [""] * len(pooled)),
        )
    console.print(table)
    console.print(
        f"Total: {catalogue.params:,} parameters, {_giga(catalogue.macs)} multiply-adds per image."
    )
    if size != TOP_IMAGE_SIZE:
        console.print(f"fc6, fc7 and fc8 need {TOP_IMAGE_SIZE}x{TOP_IMAGE_SIZE} input.")
    console.print(
        "Cut points (--layer): "
        + ", ".join(facts.layer.alias for facts in catalogue.layers if facts.layer.is_cut_point)
        + (", or the Keras name of any layer above but a batch norm." if architecture.batch_norm
           else ", or the Keras name of any layer above.")
    )  # fmt: skip
    if architecture.batch_norm:
        console.print(
            "Batch norm: each bn row follows its convolution, before the ReLU; a conv cut is "
            "taken after both, where a plain VGG's is."
        )
    listed = "; ".join(f"{head.name}: {head.summary}" for head in HEADS.values())
    console.print(f"Heads of conv and pool layers (--pool, or --layer NAME:HEAD): {listed}.")
    if len(columns) == 1:
        console.print(f"pooled: the features per image of {', '.join(*columns.values())}.")
    status = _weights_status(architecture)
    if not status:
        console.print(f"Keras's ImageNet weights: Keras publishes none for {architecture.name}.")
    for entry in status:
        state = (
            f"cached, {entry['size_bytes'] / 1e6:,.1f} MB"
            if entry["cached"]
            else "missing, downloaded on first use"
        )
        console.print(f"ImageNet weights for {entry['serves']}: {entry['path']} ({state})")
    console.print(f"PyTorch's ImageNet weights for {architecture.name} (torch preprocessing):")
    for entry in _pytorch_weights(architecture):
        console.print(
            f"  {entry['source']}: {entry['name']}, {entry['file']} (about "
            f"{entry['size_bytes'] / 1e6:,.0f} MB, top-1 {entry['top1']:.1f}%) from "
            f"{entry['url']}; {entry['use']}"
        )


def _giga(count: int) -> str:
    return f"{count / 1e9:.2f} G" if count >= 1e7 else f"{count / 1e6:.2f} M" if count else "0"


@cli.command(context_settings=CONTEXT)
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--failed",
    "list_failed",
    is_flag=True,
    help="List every failure: path, tab, reason (tsv-escaped); with --json, one object.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the facts as one JSON object.")
def show(file: str, list_failed: bool, as_json: bool) -> None:
    """Describe a features file: rows, layers, settings, provenance and failures.

    Reads only what it shows, so it answers at once for files of any size,
    and also for a run that has not finished (its committed rows).

    \b
    Examples:
      vggfeat show features.h5
      vggfeat show features.h5 --failed | cut -f2 | sort | uniq -c
      vggfeat show features.h5 --json | jq .layers
    """
    from vggfeat.show import describe_file

    facts = describe_file(file)
    if list_failed and as_json:
        click.echo(json.dumps(facts["failed"], indent=2, ensure_ascii=False))
        return
    if list_failed:
        # Written as is: click.echo would strip what looks like a terminal colour code
        # from a name when piped, and print a path that does not exist.
        for path, reason in facts["failed"].items():
            sys.stdout.write(f"{tsv_field(path)}\t{tsv_field(reason)}\n")
        return
    facts["failed"] = facts.pop("failures_by_reason")
    if as_json:
        click.echo(json.dumps(facts, indent=2, default=str))
        return
    click.echo(
        f"{facts['path']}: {facts['rows']:,} rows, {facts['failures']:,} failed"
        + (f", {facts['pending']:,} committed by an unfinished run" if facts["pending"] else "")
    )
    for layer in facts["layers"]:
        click.echo(
            f"  {layer['name']}: {'x'.join(map(str, layer['shape']))} {layer['dtype']}, "
            f"Keras layer {layer['keras_layer']}, head {layer['pooling']}, "
            f"{layer['bytes_on_disk'] / 1e6:,.1f} MB on disk"
        )
    for key, value in facts["attributes"].items():
        click.echo(f"  {key}: {value}")
    for number, run in enumerate(facts["runs"], start=1):
        click.echo(f"  run {number}: {_run_line(run)}")
    for reason, count in facts["failed"].items():
        click.echo(f"  failed {count:,}: {reason}")
    for line in facts["damaged"]:
        click.echo(f"Note: {line}", err=True)


def _run_line(run: dict[str, Any]) -> str:
    """One run of a file's ``/runs``: when, what it changed, what computed it, how."""
    changes = [f"{terminal.count(run.get('rows_added', 0), 'row')} added"]
    for key, word in (("rows_replaced", "replaced"), ("rows_dropped", "dropped")):
        if run.get(key):
            changes.append(f"{run[key]:,} {word}")
    device = run.get("device") or run.get("backend", "")
    return (
        f"{run.get('finished', '?')}, {', '.join(changes)}, {run.get('engine') or 'local'}"
        + (f", {device}" if device else "")
        + f": {run.get('command', '')}"
    )


@cli.command(context_settings=CONTEXT)
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--format",
    "format_",
    type=click.Choice(FORMATS),
    help="What to write.  [default: from -o's extension; needed for standard output]",
)
@click.option(
    "-o",
    "--output",
    default="-",
    show_default=True,
    type=click.Path(dir_okay=False, allow_dash=True),
    metavar="PATH|-",
    help="Where to write: a file (written whole, then renamed into place) or - for stdout.",
)
@click.option("--layer", metavar="NAME", help="Which layer.  [default: the file's only one]")
@click.option(
    "--normalize", type=click.Choice(NORMALIZATIONS), help="Scale each row to unit length."
)
@click.option(
    "--no-paths", is_flag=True, help="Leave the path column out (csv, tsv, jsonl, parquet)."
)
@click.option("--no-header", is_flag=True, help="Leave the header line out (csv, tsv).")
@click.option(
    "--paths-to",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Also write each row's path to FILE, one a line (tsv-escaped), aligned with the rows.",
)
def export(
    file: str,
    format_: str | None,
    output: str,
    layer: str | None,
    normalize: str | None,
    no_paths: bool,
    no_header: bool,
    paths_to: str | None,
) -> None:
    """Write one layer of a features file as npy, csv, tsv, jsonl, fvecs or parquet.

    One row per image, in the file's row order. Text formats put the path
    first; npy keeps each row's shape (an unpooled conv map is (N, H, W, C)),
    every other format flattens it in C order. fvecs is int32 width then
    float32 values per row, as ANN benchmarks and faiss read it. Memory stays
    flat: the layer is streamed in chunks.

    \b
    Examples:
      vggfeat export features.h5 --format npy | python -c \\
          "import io, sys, numpy; print(numpy.load(io.BytesIO(sys.stdin.buffer.read())).shape)"
      vggfeat export features.h5 --format tsv --no-header | cut -f1,2
      vggfeat export features.h5 --format jsonl | jq -c '{path, n: (.fc7 | length)}'
      vggfeat export features.h5 -o fc7.npy --normalize l2 --paths-to paths.txt
      vggfeat export features.h5 -o features.parquet      # needs vggfeat[parquet]
    """
    from vggfeat.export import export as run_export
    from vggfeat.export import format_of, is_binary
    from vggfeat.store.identity import parts_folder

    to_stdout = output == "-"
    if not os.path.lexists(file) and not parts_folder(Path(file)).is_dir():
        # (An unfinished run's rows are exported before its file exists.)
        raise click.ClickException(f"{terminal.printable(file)} does not exist")
    if to_stdout and sys.stdout is None:
        raise click.ClickException("standard output is closed: give -o FILE")
    implied = None if to_stdout else format_of(output)
    any_text = output.lower().endswith(".txt") and format_ is not None and not is_binary(format_)
    if format_ and implied and implied != format_ and not any_text:
        raise _BadOption(
            f"--format {format_}, but -o {terminal.printable(output)} is named as {implied}: "
            f"name the file for {format_}, or give --format {implied}"
        )
    format_ = format_ or implied
    if format_ is None:
        where = "standard output" if to_stdout else f"-o {output}"
        raise _BadOption(f"give --format ({', '.join(FORMATS)}) for {where}")
    if to_stdout and is_binary(format_) and sys.stdout.isatty():
        raise _BadOption(
            f"{format_} is binary and standard output is a terminal: pipe it, or give -o FILE"
        )
    if paths_to == "-":
        raise _BadOption("--paths-to takes a file name; the text formats write paths to stdout")
    from vggfeat.interrupts import Terminated, stopping_on_signals

    try:
        with stopping_on_signals():
            exported = run_export(
                file,
                sys.stdout.buffer if to_stdout else output,
                format_,
                layer=layer,
                normalize=normalize,
                paths=not no_paths,
                header=not no_header,
                paths_to=paths_to,
            )
    except BrokenPipeError:
        if paths_to:
            click.echo(
                f"Note: the reader of standard output stopped early; {paths_to} was not written.",
                err=True,
            )
        raise
    except (KeyboardInterrupt, Terminated) as stop:
        written = "" if to_stdout else f" {output} was not written."
        click.echo(f"Stopped.{written}", err=True)
        sys.exit(ExitCode.TERMINATED if isinstance(stop, Terminated) else ExitCode.INTERRUPTED)
    shape = "x".join(map(str, exported.shape))
    if exported.pooling != "none":
        shape = f"{exported.pooling}, {shape}"
    for line in exported.damaged:
        click.echo(f"Note: {line}; the rows it holds are not in the export.", err=True)
    if exported.pending:
        click.echo(
            f"Note: {terminal.printable(file)} is from a run that has not finished; "
            f"{exported.pending:,} of the rows are those it has committed so far.",
            err=True,
        )
    if not to_stdout:
        click.echo(
            f"Wrote {terminal.printable(str(output))}: {terminal.count(exported.rows, 'row')} "
            f"of {exported.layer} ({shape} {exported.dtype}) as {format_}.",
            err=True,
        )


@cli.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print the facts as one JSON object.")
def devices(as_json: bool) -> None:
    """List each backend, its version and the devices it can compute on.

    When the machine has an NVIDIA GPU that a backend cannot use, says why and
    what to install.

    \b
    Examples:
      vggfeat devices
      vggfeat devices --json | jq '.[] | select(.installed) | .devices'
    """
    from vggfeat.runtime import backend_facts

    facts = [backend_facts(backend) for backend in BACKENDS]
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    for entry in facts:
        if not entry["installed"]:
            click.echo(f"{entry['backend']}: not installed ({entry['install']})")
            continue
        click.echo(f"{entry['backend']} {entry['version']}:")
        for device in entry["devices"]:
            click.echo(f"  {device['id']}: {device['name']}")
        if entry["no_gpu_because"]:
            click.echo(f"  no GPU: {entry['no_gpu_because']}")


@cli.command(context_settings=CONTEXT)
@click.argument("inputs", nargs=-1, type=click.Path(), metavar="INPUT...")
@click.option(
    "-o",
    "--output",
    default="features.h5",
    show_default=True,
    type=click.Path(),
    help="The HDF5 file to write, or to continue if it exists.",
)
@depth_option
@batch_norm_option
@click.option(
    "--layer",
    "layers",
    multiple=True,
    default=["fc7"],
    show_default=True,
    metavar="NAME[:HEAD]",
    help="Cut point: fc7, pool5, conv5_3, ... or a Keras name; repeat for several in one pass. "
    f"A head after it (pool5{SEPARATOR}gem) is that layer's own, instead of --pool's.",
)
@head_options
@click.option(
    "--weights",
    default="imagenet",
    show_default=True,
    metavar="imagenet|timm|random|PATH",
    help="Keras's ImageNet weights, timm's copy of torchvision's (both downloaded once into "
    "Keras's cache), seeded random ones, or a file: Keras's .h5/.weights.h5, or torchvision's "
    "or timm's layout as .safetensors.",
)
@click.option(
    "--preprocessing",
    type=click.Choice(PREPROCESSINGS, case_sensitive=False),
    help="What the weights were trained with. caffe: BGR minus the ImageNet mean, 0-255; "
    "torch: RGB scaled to 0-1, minus mean, divided by std.  [default: caffe for Keras's "
    "files and random weights, torch for PyTorch's]",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --weights random.")
@click.option(
    "--batch-size",
    type=_BatchSize(),
    default="auto",
    metavar="N|auto",
    help="Images per network call.  [default: auto: 32 on a GPU, 8 on a CPU, fewer if memory "
    "is short]",
)
@image_size_option
@choice_option(
    "--resize",
    RESIZE_MODES,
    "squash: stretch to the square; crop: shorter side, centre crop; letterbox: fit, pad.",
)
@choice_option(
    "--precision",
    PRECISIONS,
    "mixed: float16 on a GPU; bfloat16 with TensorFlow on a CPU with AVX512_BF16 or AMX; "
    "float32 elsewhere. Faster, slightly different numbers.",
)
@click.option(
    "--backend",
    type=click.Choice(BACKENDS, case_sensitive=False),
    default=None,
    help="Keras backend for the network.  [default: $KERAS_BACKEND, else tensorflow]",
)
@click.option(
    "--device",
    metavar="cpu|gpu|gpu:N",
    help="Where the network computes.  [default: the first GPU the backend sees, else cpu]",
)
@choice_option("--dtype", STORED_DTYPES, "How features are stored; float16 halves the file.")
@choice_option(
    "--compression",
    COMPRESSIONS,
    "HDF5 compression of the features. lzf is written as gzip: only h5py reads LZF.",
)
@click.option(
    "--files-from",
    type=_PathList(),
    help="Read more inputs from a file, one path a line ('-' for stdin).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    metavar="N",
    help="Decoding threads.  [default: the number of CPUs]",
)
@click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    metavar="N",
    help="Refuse larger images as decompression bombs.  [default: Pillow's, 89,478,485]",
)
@click.option(
    "--commit-every",
    type=click.IntRange(min=1),
    default=COMMIT_IMAGES,
    show_default=True,
    metavar="N",
    help="Make completed work crash-safe every N images (or 64 MB, or 30 s).",
)
@click.option("--update", is_flag=True, help="Also read again images changed since stored.")
@click.option("--prune", is_flag=True, help="Drop rows of files that no longer exist.")
@click.option(
    "--yes", is_flag=True, help="Confirm a --prune that would drop every row of the file."
)
@click.option(
    "--shard",
    metavar="K/N",
    help="Do the K-th of N shares of the images; the last shard to finish writes OUTPUT.",
)
@choice_option(
    "--engine",
    tuple(ENGINES),
    "local: threads and one network here; ray: a Ray cluster's CPUs and GPUs (vggfeat[ray]).",
)
@click.option(
    "--ray-address",
    metavar="auto|HOST:PORT|ray://HOST:10001",
    help="The Ray cluster to use.  [default: start a local instance]",
)
@click.option(
    "--actors",
    type=click.IntRange(min=1),
    metavar="N",
    help="Networks running at most, with --engine ray.  [default: one per GPU, else CPUs/4]",
)
@click.option(
    "--gpus-per-actor",
    type=click.FloatRange(min=0),
    metavar="F",
    help="GPUs each network takes, fractions allowed (0.5).  [default: 1 with GPUs, else 0]",
)
@click.option(
    "--stall-timeout",
    type=float,
    metavar="SECONDS",
    help="With --engine ray, stop (keeping completed work) when no image is done for this "
    f"long, start-up included.  [default: {STALL_SECONDS:g}]",
)
@click.option("--verbose", is_flag=True, help="Show Ray's own progress and logs on stderr.")
@click.option("--strict", is_flag=True, help="Exit 3 if any image could not be used.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace the output (once this run completes) instead of continuing it.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress and no summary.")
def extract(
    inputs: tuple[str, ...],
    output: str,
    files_from: list[str] | None,
    strict: bool,
    quiet: bool,
    engine: str,
    ray_address: str | None,
    actors: int | None,
    gpus_per_actor: float | None,
    stall_timeout: float | None,
    verbose: bool,
    **options: Any,
) -> None:
    """Extract VGG features of every image under INPUT into one HDF5 file.

    INPUT is a folder (searched recursively, in sorted order, for .jpg .jpeg
    .png .bmp .gif .webp .tif .tiff files, hidden ones skipped) or an image
    file. Row i of every /features/<layer> dataset belongs to /paths[i];
    files that cannot be used are listed with reasons in /failed.

    Nothing completed is lost: work is committed to OUTPUT.parts/ as it goes
    and OUTPUT is written when all is done. After a crash, Ctrl-C or a full
    disk, the same command continues; on a finished file it adds new images
    (--update: changed ones too), whatever the spelling of their paths.
    Paths are stored relative to OUTPUT's folder (absolute if outside it).

    N processes with --shard 1/N ... N/N share the work, on one machine or on
    many that share a file system; the last to finish writes OUTPUT.

    \b
    Examples:
      vggfeat extract photos/ -o features.h5
      vggfeat extract photos/ --layer pool5 --pool avg --precision mixed
      vggfeat extract photos/ --layer pool5 --pool rmac --image-size 448
      vggfeat extract photos/ --layer pool5:gem --layer pool5:rmac --layer fc7
      vggfeat extract photos/ --layer fc6 --layer fc7 --dtype float16
      vggfeat extract photos/ --depth 16 --batch-norm --weights vgg16_bn.safetensors
      find photos -newer last-run | vggfeat extract --files-from - -o new.h5
      vggfeat extract photos/ --update --prune     # bring features.h5 up to date
      vggfeat extract photos/ --shard 3/16         # one of 16 jobs (SLURM, cron, ...)
      vggfeat extract /shared/photos -o /shared/f.h5 --engine ray --ray-address auto
    """
    from vggfeat.options import ExtractOptions
    from vggfeat.pipeline import Interrupted
    from vggfeat.pipeline import extract as run_extract
    from vggfeat.store import PruneEverything

    given = {key: options.pop(key) for key in parameter_options()}
    options["head_parameters"] = {key: value for key, value in given.items() if value is not None}
    if not inputs and files_from is None:
        raise click.UsageError("give at least one INPUT folder or file, or --files-from")
    try:
        chosen = ExtractOptions.make(
            inputs,
            output,
            files_from=files_from or (),
            command=shlex.join(["vggfeat", *sys.argv[1:]]),
            engine=_engine_options(
                engine,
                ray_address=ray_address,
                actors=actors,
                gpus_per_actor=gpus_per_actor,
                stall_timeout=stall_timeout,
                verbose=verbose,
            ),
            **options,
        )
    except OptionError as error:
        raise _BadOption(str(error)) from error
    view = terminal.ProgressView(quiet)
    try:
        with view:
            try:
                summary = run_extract(chosen, on_progress=view.update, on_notice=view.notice)
            except PruneEverything as refusal:
                if not (sys.stdin.isatty() and sys.stderr.isatty()):
                    raise
                view.pause()
                click.confirm(f"{refusal}. Drop them", err=True, abort=True)
                confirmed = replace(chosen, yes=True)
                summary = run_extract(confirmed, on_progress=view.update, on_notice=view.notice)
    except Interrupted as stop:
        kept = (
            f"Completed work is kept in {stop.parts}; run the same command to continue."
            if stop.parts.exists()
            else "No image was finished."
        )
        click.echo(f"Stopped. {kept}", err=True)
        for note in getattr(stop, "__notes__", ()):
            click.echo(note, err=True)
        sys.exit(stop.exit_code)
    if not quiet:
        try:
            terminal.print_summary(summary)
        except BrokenPipeError:
            terminal.drop_stderr()
    if strict and summary.failures:
        sys.exit(ExitCode.SOME_FAILED)


#: Flags of engines' own options, and the field of the options class each sets.
ENGINE_FLAGS = {
    "ray_address": "address",
    "actors": "actors",
    "gpus_per_actor": "gpus_per_actor",
    "stall_timeout": "stall_timeout",
    "verbose": "verbose",
}


def _engine_options(name: str, **flags: Any) -> EngineOptions:
    """The chosen engine's options from its flags; flags of other engines refused."""
    given = {
        flag: value for flag, value in flags.items() if value is not None and value is not False
    }
    fields = option_names(name)
    foreign = [flag for flag in given if ENGINE_FLAGS[flag] not in fields]
    if foreign:
        owners = [e for e in ENGINES if e != name and all(ENGINE_FLAGS[f] in option_names(e)
                                                              for f in foreign)]  # fmt: skip
        shown = " and ".join("--" + flag.replace("_", "-") for flag in foreign)
        verb = "works" if len(foreign) == 1 else "work"
        raise OptionError(f"{shown} {verb} with --engine {' or '.join(owners) or 'other'} only")
    return engine_options(name, **{ENGINE_FLAGS[flag]: value for flag, value in given.items()})


# Searching the features: neighbors, duplicates, clusters ------------------------------------


def result_options(command: Decorated) -> Decorated:
    """The options every search command takes: which layer, and how to show the results."""
    options = [
        click.option(
            "--layer", metavar="NAME", help="Which layer.  [default: the file's only one]"
        ),
        click.option(
            "--format",
            "format_",
            type=click.Choice(SEARCH_FORMATS),
            default="tsv",
            show_default=True,
            help="tsv: a line per result, tab-separated, paths tsv-escaped; jsonl: an object "
            "per line.",
        ),
        click.option(
            "--html",
            type=click.Path(dir_okay=False),
            metavar="SHEET.html",
            help="Also write a contact sheet: one self-contained page of thumbnails.",
        ),
        click.option(
            "--html-limit",
            type=click.IntRange(min=1),
            default=SECTIONS,
            show_default=True,
            metavar="N",
            help="Queries, groups or clusters the sheet shows at most (all go to stdout).",
        ),
        click.option(
            "--verbose",
            is_flag=True,
            help="Also say how the results were found: a search's index, probes and recall; "
            "k-means' iterations and inertia.",
        ),
        click.option("-q", "--quiet", is_flag=True, help="No progress and no summary."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def search_option(command: Decorated) -> Decorated:
    return click.option(
        "--search",
        type=click.Choice(SEARCHES),
        default="auto",
        show_default=True,
        help="exact: compare with every row; approximate: an IVF index, its recall measured; "
        "auto: exact while that is quick (about 20,000 rows of 512 against each other), else "
        "approximate.",
    )(command)


SEARCH_FORMATS = ("tsv", "jsonl")


def stoppable(command: Decorated) -> Decorated:
    """SIGTERM stops the command as Ctrl-C does: "Stopped.", exit 143, no sheet half
    written (Ctrl-C is the command group's)."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        from vggfeat.interrupts import Terminated, stopping_on_signals

        try:
            with stopping_on_signals():
                return command(*args, **kwargs)
        except Terminated:
            click.echo("Stopped.", err=True)
            sys.exit(ExitCode.TERMINATED)

    return run


class _SearchRun:
    """What the three search commands share: the checks made before anything is read,
    the layer read with progress, results written to stdout, the sheet, the notes."""

    def __init__(
        self, file: str, html: str | None, quiet: bool, verbose: bool, faiss: bool = True
    ) -> None:
        from vggfeat.search import require_faiss
        from vggfeat.sheet import check_target

        if sys.stdout is None and html is None:
            raise click.ClickException(
                "standard output is closed, so the results would be lost: redirect it to a "
                "file, or give --html"
            )
        self.file = file
        self.html = html
        self.sheet = check_target(html, file) if html is not None else None
        self.quiet = quiet
        self.verbose = verbose
        if faiss:
            require_faiss()
        self.view = terminal.StepView(quiet)
        self.err = terminal.console(stderr=True, highlight=False, soft_wrap=True, markup=False)
        self.out = _Results()

    def read(self, layer: str | None, expect: Callable[[int], None]) -> Vectors:
        from vggfeat.search import read_vectors

        with self.view:
            vectors = read_vectors(self.file, layer, expect, on_step=self.view.update)
        for line in vectors.damaged:
            self.say(f"Note: {line}; the rows it holds are left out.")
        if vectors.pending:
            self.say(
                f"Note: {terminal.printable(self.file)} is from a run that has not finished; "
                f"{vectors.pending:,} of the rows are those it has committed so far."
            )
        if vectors.left_out:
            one = len(vectors.left_out) == 1
            self.say(
                f"Note: {terminal.count(len(vectors.left_out), 'row')} of {vectors.layer} "
                f"{'has' if one else 'have'} no direction (all zeros, or NaN or an infinity) "
                f"and {'is' if one else 'are'} left out{'' if one else ', the first'}: "
                f"{terminal.printable(vectors.left_out[0])}."
            )
        return vectors

    def say(self, line: str) -> None:
        if self.quiet:
            return
        try:
            self.err.print(line)
        except BrokenPipeError:
            terminal.drop_stderr()
            self.quiet = True

    def report(self, index: Index) -> None:
        if self.verbose:
            self.say(f"Search: {index.report.describe()}.")

    def write_sheet(self, sheet: Sheet, vectors: Vectors) -> None:
        from vggfeat.sheet import write_sheet

        if self.sheet is None:
            return
        with self.view:
            pages = write_sheet(sheet, self.sheet, vectors, on_step=self.view.update)
        shown = sum(len(section.tiles) for section in sheet.sections)
        more = f" and {terminal.count(len(pages) - 1, 'more page')}" if len(pages) > 1 else ""
        noun = sheet.noun if sheet.found != 1 else SINGULAR[sheet.noun]
        self.say(
            f"Wrote {terminal.printable(str(self.html))}{more}: "
            f"{len(sheet.sections):,} of {sheet.found:,} {noun}, "
            f"{terminal.count(shown, 'thumbnail')}."
        )


class _Results:
    """Standard output for results. A reader that goes away (| head) ends the writing,
    not the command: a sheet asked for is still written."""

    def __init__(self) -> None:
        self.closed = sys.stdout is None
        self._stream = None if self.closed else sys.stdout.buffer

    def write(self, lines: list[str]) -> None:
        if self.closed or not lines or self._stream is None:
            return
        with self._failing():
            self._stream.write(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))

    def flush(self) -> None:
        if self.closed or self._stream is None:
            return
        with self._failing():
            self._stream.flush()

    @contextlib.contextmanager
    def _failing(self) -> Iterator[None]:
        """A closed pipe closes the results; any other failure (a full disk) is an error
        naming standard output. Either way, what is still buffered goes nowhere."""
        try:
            yield
        except BrokenPipeError:
            _drop_stdout()
            self.closed = True
        except OSError as error:
            _drop_stdout()
            self.closed = True
            raise VggfeatError(f"cannot write standard output: {error.strerror or error}") from None


def _similarity(value: float) -> str:
    return f"{value:.6f}"


@cli.command(context_settings=CONTEXT)
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "-k",
    "k",
    type=int,
    default=10,
    show_default=True,
    metavar="K",
    help="Neighbours of each row.",
)
@click.option(
    "--of",
    "of",
    multiple=True,
    metavar="PATH",
    help="Only the neighbours of this image; repeat for several. As the file stores it, or a "
    "path from here.",
)
@search_option
@result_options
@stoppable
def neighbors(
    file: str,
    k: int,
    of: tuple[str, ...],
    layer: str | None,
    format_: str,
    html: str | None,
    html_limit: int,
    search: str,
    verbose: bool,
    quiet: bool,
) -> None:
    """The K nearest other rows of every row of a features file (or of --of's), by cosine
    similarity.

    Writes path, rank, neighbour and similarity, tab-separated, a line per neighbour,
    nearest first; paths are as the file stores them (relative to its folder).

    \b
    Examples:
      vggfeat neighbors features.h5 -k 5 | head
      vggfeat neighbors features.h5 --of photos/cat.jpg -k 20 | cut -f3
      vggfeat neighbors features.h5 --format jsonl | jq -c '{path, best: .neighbors[0]}'
      vggfeat neighbors features.h5 --html neighbours.html --html-limit 100
    """
    from vggfeat.search import NeighborSearch, check_k, rows_of
    from vggfeat.sheet import neighbors_sheet

    check_k(k, k + 1, file)  # -k 0 refused before the file is read
    run = _SearchRun(file, html, quiet, verbose)
    vectors = run.read(layer, lambda rows: check_k(k, rows, file))
    queries = rows_of(vectors, of) if of else None
    with run.view:
        found = NeighborSearch(vectors, k, queries, search, on_step=run.view.update)
        shown: list[Neighbors] = []
        for result in found:
            if len(shown) < html_limit and run.sheet is not None:
                shown.append(result)
            elif run.out.closed:
                break
            run.out.write(_neighbor_lines(vectors, result, format_))
    run.out.flush()
    run.report(found.index)
    count = len(found.queries)
    run.say(
        f"{k:,} nearest neighbour{'s' if k != 1 else ''} of "
        f"{'each of ' if count != 1 else ''}{terminal.count(count, 'row')} of {vectors.layer} "
        f"in {terminal.printable(file)}."
    )
    facts = [f"Layer {vectors.layer}, {k:,} neighbours, {found.index.report.describe()}."]
    run.write_sheet(neighbors_sheet(vectors, shown, count, facts), vectors)


def _neighbor_lines(vectors: Vectors, result: Neighbors, format_: str) -> list[str]:
    path = vectors.paths[result.query]
    pairs = list(zip(result.rows.tolist(), result.similarities.tolist(), strict=True))
    if format_ == "jsonl":
        neighbours = [
            {"rank": rank, "path": vectors.paths[row], "similarity": round(similarity, 6)}
            for rank, (row, similarity) in enumerate(pairs, start=1)
        ]
        return [json.dumps({"path": path, "neighbors": neighbours}, ensure_ascii=False)]
    query = tsv_field(path)
    return [
        f"{query}\t{rank}\t{tsv_field(vectors.paths[row])}\t{_similarity(similarity)}"
        for rank, (row, similarity) in enumerate(pairs, start=1)
    ]


@cli.command(context_settings=CONTEXT)
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--threshold",
    type=float,
    default=0.95,
    show_default=True,
    metavar="S",
    help="Cosine similarity, -1 to 1, at or above which two images are near-duplicates.",
)
@search_option
@result_options
@stoppable
def duplicates(
    file: str,
    threshold: float,
    layer: str | None,
    format_: str,
    html: str | None,
    html_limit: int,
    search: str,
    verbose: bool,
    quiet: bool,
) -> None:
    """Groups of near-duplicates in a features file, biggest first.

    Two images whose cosine similarity is at --threshold or above are linked, and a
    group is all the images linked to each other, directly or through others. Writes
    group, path and similarity to the group's first image (the first in the file),
    tab-separated, a line per image; the summary on stderr counts the groups.

    \b
    Examples:
      vggfeat duplicates features.h5
      vggfeat duplicates features.h5 --threshold 0.9 --html duplicates.html
      vggfeat duplicates features.h5 | awk -F'\\t' '$3 < 1' | cut -f2   # all but each first
    """
    from vggfeat.search import DuplicateSearch, check_threshold
    from vggfeat.sheet import duplicates_sheet

    check_threshold(threshold)
    run = _SearchRun(file, html, quiet, verbose)
    vectors = run.read(layer, lambda rows: None)
    with run.view:
        search_run = DuplicateSearch(vectors, threshold, search, on_step=run.view.update)
        groups = search_run.groups()
    for number, group in enumerate(groups, start=1):
        if run.out.closed:
            break
        run.out.write(_group_lines(vectors, number, group, format_))
    run.out.flush()
    run.report(search_run.index)
    images = sum(len(group.rows) for group in groups)
    run.say(
        f"{terminal.count(len(groups), 'group')} of near-duplicates at {threshold:g} or above "
        f"among {terminal.count(len(vectors), 'row')} of {vectors.layer}: "
        f"{terminal.count(images, 'image')} in all, {images - len(groups):,} of which could be "
        "removed, keeping each group's first."
    )
    facts = [
        f"Layer {vectors.layer}, similarity {threshold:g} or above, "
        f"{search_run.index.report.describe()}.",
        f"{terminal.count(images, 'image')} in {terminal.count(len(groups), 'group')}; "
        f"{images - len(groups):,} could be removed, keeping each group's first.",
    ]
    run.write_sheet(duplicates_sheet(vectors, groups, html_limit, facts), vectors)


def _group_lines(vectors: Vectors, number: int, group: Group, format_: str) -> list[str]:
    pairs = list(zip(group.rows.tolist(), group.similarities.tolist(), strict=True))
    if format_ == "jsonl":
        return [
            json.dumps(
                {
                    "group": number,
                    "paths": [vectors.paths[row] for row, _ in pairs],
                    "similarities": [round(similarity, 6) for _, similarity in pairs],
                },
                ensure_ascii=False,
            )
        ]
    return [
        f"{number}\t{tsv_field(vectors.paths[row])}\t{_similarity(similarity)}"
        for row, similarity in pairs
    ]


@cli.command(context_settings=CONTEXT)
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--clusters",
    "clusters",
    type=int,
    required=True,
    metavar="K",
    help="How many clusters.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the k-means.")
@result_options
@stoppable
def clusters(
    file: str,
    clusters: int,
    seed: int,
    layer: str | None,
    format_: str,
    html: str | None,
    html_limit: int,
    verbose: bool,
    quiet: bool,
) -> None:
    """k-means clusters of the rows of a features file, numbered by size, biggest first.

    Rows are compared by direction (each scaled to unit length). Writes path, cluster
    and distance to the cluster's centre, tab-separated, cluster by cluster, nearest
    the centre first.

    \b
    Examples:
      vggfeat clusters features.h5 --clusters 20 --html clusters.html
      vggfeat clusters features.h5 --clusters 20 | awk -F'\\t' '$2 == 1' | head   # cluster 1
      vggfeat clusters features.h5 --clusters 20 | cut -f2 | uniq -c              # sizes
    """
    from vggfeat.search import check_clusters, kmeans
    from vggfeat.sheet import clusters_sheet

    check_clusters(clusters, clusters, file)  # --clusters 0 refused before the file is read
    run = _SearchRun(file, html, quiet, verbose, faiss=False)  # k-means is NumPy's
    vectors = run.read(layer, lambda rows: check_clusters(clusters, rows, file))
    check_clusters(clusters, len(vectors), file, len(vectors.left_out))
    with run.view:
        clustering = kmeans(vectors.rows, clusters, seed, on_step=run.view.update)
    for cluster in range(len(clustering.sizes)):
        if run.out.closed:
            break
        members = clustering.nearest_centre(cluster, len(vectors))
        run.out.write(_cluster_lines(vectors, cluster, members, clustering, format_))
    run.out.flush()
    sizes = clustering.sizes
    if verbose:
        run.say(
            f"k-means: {terminal.count(clustering.iterations, 'iteration')}, inertia "
            f"{clustering.inertia:,.4f} "
            "(the sum of squared distances to the centres)."
        )
    if clustering.empty:
        run.say(
            f"Note: the rows hold fewer distinct values than {clusters:,}: "
            f"{terminal.count(clustering.empty, 'cluster')} left empty and dropped."
        )
    run.say(
        f"{terminal.count(len(sizes), 'cluster')} of {terminal.count(len(vectors), 'row')} of "
        f"{vectors.layer}: sizes {int(sizes[0]):,} to {int(sizes[-1]):,}."
    )
    facts = [
        f"Layer {vectors.layer}, k-means with {clusters:,} clusters (seed {seed}), sizes "
        f"{int(sizes[0]):,} to {int(sizes[-1]):,}; the numbers under the images are their "
        "distances to the centre."
    ]
    run.write_sheet(clusters_sheet(vectors, clustering, html_limit, facts), vectors)


def _cluster_lines(
    vectors: Vectors, cluster: int, members: np.ndarray, clustering: Clustering, format_: str
) -> list[str]:
    if format_ == "jsonl":
        return [
            json.dumps(
                {
                    "path": vectors.paths[row],
                    "cluster": cluster + 1,
                    "distance": round(float(clustering.distances[row]), 6),
                },
                ensure_ascii=False,
            )
            for row in members.tolist()
        ]
    return [
        f"{tsv_field(vectors.paths[row])}\t{cluster + 1}\t{clustering.distances[row]:.6f}"
        for row in members.tolist()
    ]
