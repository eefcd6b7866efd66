"""What a run is asked to do: one frozen object, checked once, before any backend starts.

The command line builds ``ExtractOptions`` from its flags, and ``vggfeat.extract``
from its keywords. Every bad value is refused when it is made, as an
``OptionError`` (exit 2), before TensorFlow, JAX or Ray is imported. From it
come the settings a file records, the job an engine runs, and the engine
itself, whose own options are a dataclass of the engine's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from vggfeat.architecture import TOP_IMAGE_SIZE, Architecture, Layer, vgg
from vggfeat.engine import EngineOptions, Job, engine_options
from vggfeat.errors import OptionError
from vggfeat.heads import (
    HEADS,
    NO_POOLING,
    SEPARATOR,
    Number,
    Pooling,
    parameter_options,
    split_label,
)
from vggfeat.images import RESIZE_MODES
from vggfeat.network import PRECISIONS, Cut
from vggfeat.preprocessing import preprocessing
from vggfeat.runtime import BACKENDS, default_backend
from vggfeat.store import COMMIT_IMAGES, COMPRESSIONS, STORED_DTYPES, LayerSpec, Settings, Shard
from vggfeat.weights import KEYWORDS, WeightsRecord

#: Extensions of formats export does not write that an output is still often named for.
NOT_HDF5 = (".npz", ".json", ".pt", ".pth", ".safetensors")


@dataclass(frozen=True)
class ExtractOptions:
    """Everything ``vggfeat extract`` takes, checked and in canonical form.

    ``layers`` become the layers' canonical names (``FC7`` and ``fc2`` are
    ``fc7``), each with the head of its own it names, if any (``pool5:gem``);
    ``pool`` is the head of every other conv or pool layer, given as a
    ``Pooling`` or its text (``gem``, ``gem(p=4)``); ``head_parameters`` are
    the heads' parameters, keyed as their options (``{"gem_p": 4}`` for
    ``--gem-p 4``); ``files_from`` is read into a tuple of lines once; ``shard`` may
    be given as ``"K/N"`` and ``engine`` as a name. ``batch_size`` None picks
    the largest batch that is fast and fits in memory.
    """

    inputs: tuple[str, ...] = ()
    output: str = "features.h5"
    depth: int = 16
    batch_norm: bool = False
    layers: tuple[str, ...] = ("fc7",)
    pool: Pooling = NO_POOLING
    head_parameters: Mapping[str, Number] = field(default_factory=dict)
    weights: str = "imagenet"
    preprocessing: str | None = None
    seed: int = 0
    batch_size: int | None = None
    image_size: int = TOP_IMAGE_SIZE
    resize: str = "squash"
    precision: str = "float32"
    backend: str = field(default_factory=default_backend)
    device: str | None = None
    dtype: str = "float32"
    compression: str = "none"
    files_from: tuple[str, ...] = ()
    workers: int | None = None
    max_pixels: int | None = None
    overwrite: bool = False
    update: bool = False
    prune: bool = False
    yes: bool = False
    shard: Shard | None = None
    engine: EngineOptions = field(default_factory=lambda: engine_options("local"))
    commit_every: int = COMMIT_IMAGES
    command: str | None = None

    def __post_init__(self) -> None:
        for option, size in (("--depth", self.depth), ("--image-size", self.image_size)):
            _check_number(option, size, 1, None, required=True)
        for option, flag in (
            ("--batch-norm", self.batch_norm),
            ("--overwrite", self.overwrite),
            ("--update", self.update),
            ("--prune", self.prune),
            ("--yes", self.yes),
        ):
            if not isinstance(flag, bool):
                raise OptionError(f"{option} {flag!r} is not True or False")
        parameters = _head_parameters(self.head_parameters)
        pool = _pool(self.pool, parameters)
        self._normalize(
            head_parameters=parameters,
            pool=pool,
            layers=_labels(self.architecture, self.layers, pool),
            inputs=_paths(self.inputs),
            output=_path("--output", self.output),
            weights=_weights(self.weights),
            preprocessing=_preprocessing(self.preprocessing),
            files_from=_lines(self.files_from),
            backend=_text("--backend", self.backend or default_backend()).strip().lower(),
            device=_device(self.device),
            batch_size=None if self.batch_size == "auto" else self.batch_size,
            shard=_shard(self.shard),
            engine=engine_options(self.engine) if isinstance(self.engine, str) else self.engine,
        )
        if not isinstance(self.engine, EngineOptions):
            raise OptionError(f"engine {self.engine!r} is not an engine's name or options")
        for option, value, allowed in (
            ("resize", self.resize, RESIZE_MODES),
            ("precision", self.precision, PRECISIONS),
            ("dtype", self.dtype, STORED_DTYPES),
            ("compression", self.compression, COMPRESSIONS),
            ("backend", self.backend, BACKENDS),
        ):
            if value not in allowed:
                raise OptionError(f"--{option} {value} is not one of {', '.join(allowed)}")
        for option, number, least, most in (
            ("--batch-size", self.batch_size, 1, None),
            ("--commit-every", self.commit_every, 1, None),
            ("--workers", self.workers, 1, None),
            ("--max-pixels", self.max_pixels, 1, None),
            ("--seed", self.seed, 0, SEEDS - 1),
        ):
            _check_number(option, number, least, most)
        cuts = self.cuts()
        self.architecture.check_image_size([cut.layer for cut in cuts], self.image_size)
        _check_parameters_used(self.head_parameters, cuts)
        _check_output_name(self.output)
        _check_output_is_not_weights(self.output, self.weights)

    def _normalize(self, **values: Any) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @classmethod
    def make(
        cls,
        inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] = (),
        output: str | os.PathLike[str] = "features.h5",
        **options: Any,
    ) -> ExtractOptions:
        """Options from ``vggfeat.extract``'s arguments; an unknown keyword is a ``TypeError``,
        as in any call. (The object itself takes looser values too: paths as ``Path``s,
        ``files_from`` as an open file, ``shard`` as ``"K/N"``, ``engine`` as a name,
        ``layers`` as one name, ``batch_size`` as ``"auto"``.)"""
        unknown = sorted(set(options) - {option.name for option in fields(cls)})
        if unknown:
            raise TypeError(f"extract() got unexpected keyword arguments: {', '.join(unknown)}")
        if options.get("backend") is None:
            options.pop("backend", None)
        return cls(inputs=inputs, output=output, **options)  # type: ignore[arg-type]

    @property
    def architecture(self) -> Architecture:
        return vgg(self.depth, self.batch_norm)

    def cuts(self) -> list[Cut]:
        """Each layer asked for, with its head: its own, else ``pool`` (a map's only)."""
        cuts = []
        for label in self.layers:
            name, own = split_label(label)
            layer = self.architecture.layer(name)
            pooling = NO_POOLING
            if layer.has_map:
                pooling = self.pool if own is None else Pooling.parse(own, self.head_parameters)
            cuts.append(Cut(label, layer, pooling))
        return cuts

    @property
    def deepest(self) -> Layer:
        """The deepest layer asked for: the network is built through it."""
        return max((cut.layer for cut in self.cuts()), key=self.architecture.layers.index)

    @property
    def needs_top(self) -> bool:
        """Whether a layer of the classifier is asked for: its weights are needed too."""
        return any(cut.layer.is_top for cut in self.cuts())

    def layer_specs(self) -> tuple[LayerSpec, ...]:
        """The output's datasets: per layer, its name, Keras layer, head and shape."""
        catalogue = self.architecture.catalogue(self.image_size)
        return tuple(
            LayerSpec(cut.label, cut.layer.name, str(cut.pooling), cut.feature_shape(catalogue))
            for cut in self.cuts()
        )

    def settings(self, weights: WeightsRecord, compute_dtype: str) -> Settings:
        """What decides the numbers of the file, given what the weights are (their layout
        chooses the preprocessing unless ``preprocessing`` does) and what the layers compute
        in (the engine knows that)."""
        return Settings(
            depth=self.depth,
            batch_norm=self.batch_norm,
            preprocessing=self.preprocessing or weights.preprocessing,
            layers=self.layers,
            pooling=str(self.pool),
            heads=tuple(str(cut.pooling) for cut in self.cuts()),
            weights=weights.kind,
            weights_file=weights.file,
            weights_sha256=weights.sha256,
            seed=self.seed,
            image_size=self.image_size,
            resize=self.resize,
            compute_dtype=compute_dtype,
            dtype=self.dtype,
        )

    def job(self, datasets: Sequence[LayerSpec], settings: Settings) -> Job:
        """The engine's job, for the datasets and settings as the output has them."""
        architecture = self.architecture
        return Job(
            depth=self.depth,
            cuts=tuple(
                Cut(spec.name, architecture.layer(spec.keras_layer), Pooling.parse(spec.pooling))
                for spec in datasets
            ),
            image_size=self.image_size,
            batch_size=self.batch_size,
            weights=self.weights,
            seed=self.seed,
            precision=self.precision,
            resize=self.resize,
            max_pixels=self.max_pixels,
            workers=self.workers,
            backend=self.backend,
            device=self.device,
            compute_dtype=settings.compute_dtype,
            batch_norm=self.batch_norm,
            preprocessing=settings.preprocessing,
        )


#: Seeds ``--weights random`` takes: what NumPy's generators and an HDF5 attribute hold.
SEEDS = 2**32


def _paths(paths: Any) -> tuple[str, ...]:
    """Inputs: one path, or any number."""
    if isinstance(paths, str | bytes | os.PathLike):
        return (_path("input", paths),)
    try:
        return tuple(_path("input", path) for path in paths)
    except TypeError:
        raise OptionError(f"inputs {paths!r} is not a path or a list of paths") from None


def _path(option: str, value: Any) -> str:
    """A path given as text, bytes (as the file system has it) or a ``PathLike``."""
    if not isinstance(value, str | bytes | os.PathLike):
        raise OptionError(f"{option} {value!r} is not a path")
    return os.fsdecode(value)


def _weights(value: Any) -> str:
    """A source's keyword in lower case (``TIMM`` is ``timm``), or a path as it is given."""
    text = _path("--weights", value)
    return text.strip().lower() if text.strip().lower() in KEYWORDS else text


def _text(option: str, value: Any) -> str:
    if not isinstance(value, str):
        raise OptionError(f"{option} {value!r} is not a name")
    return value


def _shard(shard: Any) -> Shard | None:
    """A ``Shard`` checked, from one or from ``"K/N"``."""
    if shard is None:
        return None
    if isinstance(shard, str):
        return Shard.parse(shard)
    if not isinstance(shard, Shard):
        raise OptionError(f"--shard {shard!r} is not K/N")
    return Shard.parse(str(shard))


def _check_number(
    option: str, number: Any, least: int, most: int | None, required: bool = False
) -> None:
    """Refuse a value that is not a whole number from ``least`` to ``most`` (None is no
    value, unless ``required``)."""
    if number is None and not required:
        return
    if isinstance(number, bool) or not isinstance(number, int):
        raise OptionError(f"{option} {number!r} is not a whole number")
    if number < least or (most is not None and number > most):
        bounds = f"at least {least}" if most is None else f"from {least} to {most:,}"
        raise OptionError(f"{option} must be {bounds}, not {number}")


def _lines(source: Iterable[str | bytes] | None) -> tuple[str, ...]:
    """``--files-from``'s lines, read once (standard input cannot be read twice): text, or
    bytes as a file opened in binary mode gives them; a line end (LF or CRLF) dropped."""
    if source is None:
        return ()
    if isinstance(source, str | bytes):
        raise OptionError("files_from takes lines (a file or a list), not one string")
    lines = []
    for line in source:
        if not isinstance(line, str | bytes):
            raise OptionError(f"files_from line {line!r} is not a path")
        lines.append(os.fsdecode(line).removesuffix("\n").removesuffix("\r"))
    return tuple(lines)


def _labels(architecture: Architecture, names: Sequence[str], pool: Pooling) -> tuple[str, ...]:
    """Each layer's canonical name, with the head of its own it names (``pool5:gem``), once:
    another spelling of a layer and head given is refused."""
    if isinstance(names, str):
        names = (names,)
    if not names:
        raise OptionError("name at least one --layer")
    chosen: dict[tuple[str, str], str] = {}
    labels = []
    for name in names:
        written = _text("--layer", name).strip()
        layer_name, own = split_label(written)
        layer = architecture.layer(layer_name)
        if own is not None:
            own = _own_head(written, layer, own)
        head = own or (pool.name if layer.has_map else NO_POOLING.name)
        if (layer.alias, head) in chosen:
            what = "layer and head" if layer.has_map else "layer"
            raise OptionError(
                f"--layer {written} and --layer {chosen[layer.alias, head]} are the same {what}"
            )
        chosen[layer.alias, head] = written
        labels.append(layer.alias if own is None else f"{layer.alias}{SEPARATOR}{own}")
    return tuple(labels)


def _pool(pool: Any, parameters: Mapping[str, Number]) -> Pooling:
    """``--pool`` as a ``Pooling``, from one or its text; a parameter given both there and
    in ``parameters`` with another value is refused (``Pooling.parse`` checks)."""
    return Pooling.parse(str(pool) if isinstance(pool, Pooling) else pool, parameters)


def _own_head(written: str, layer: Layer, head: str) -> str:
    """The head a ``--layer NAME:HEAD`` names, checked."""
    name = head.strip().lower()
    if not name:
        raise OptionError(
            f"--layer {written} names no head after '{SEPARATOR}': give one of {', '.join(HEADS)}"
        )
    if not layer.has_map:
        raise OptionError(
            f"--layer {written}: {layer.alias} has no map over space to pool; heads apply "
            "to conv and pool layers"
        )
    if "(" in name and name.split("(")[0] in HEADS:
        options = [f"--{key.replace('_', '-')}" for key in parameter_options()]
        raise OptionError(
            f"--layer {written}: give a head's parameters with its options "
            f"({', '.join(options)}), not in --layer"
        )
    if name not in HEADS:
        raise OptionError(f"--layer {written}: {head} is not one of {', '.join(HEADS)}")
    return name


def _head_parameters(values: Any) -> Mapping[str, Number]:
    """Heads' parameters keyed as their options (``gem_p``), each checked."""
    if not isinstance(values, Mapping):
        raise OptionError(f"head_parameters {values!r} is not a mapping of names to numbers")
    known = parameter_options()
    checked: dict[str, Number] = {}
    for key, value in values.items():
        if key not in known:
            raise OptionError(
                f"head parameter {key!r} is not one of {', '.join(sorted(known)) or 'none'}"
            )
        head, parameter = known[key]
        checked[key] = parameter.checked(head.name, value)
    return MappingProxyType(checked)  # read-only, as the rest of the options are


def _check_parameters_used(parameters: Mapping[str, Number], cuts: Sequence[Cut]) -> None:
    """Refuse a head's parameter when no layer has that head: it would change nothing."""
    used = {cut.pooling.name for cut in cuts}
    for key in parameters:
        head = parameter_options()[key][0].name
        if head not in used:
            raise OptionError(
                f"--{key.replace('_', '-')} changes nothing: no conv or pool layer has the "
                f"{head} head (--pool {head}, or --layer LAYER{SEPARATOR}{head})"
            )


def _preprocessing(name: Any) -> str | None:
    """``caffe`` or ``torch``, lower case; None leaves the choice to the weights."""
    if name is None:
        return None
    return preprocessing(_text("--preprocessing", name)).name


def _device(device: str | None) -> str | None:
    """``cpu``, ``gpu`` or ``gpu:N``, lower case; ``OptionError`` for anything else."""
    if device is None:
        return None
    choice = _text("--device", device).strip().lower()
    if choice in ("cpu", "gpu") or (choice.startswith("gpu:") and choice[4:].isdigit()):
        return choice
    raise OptionError(f"--device {device} is not cpu, gpu or gpu:N")


def _check_output_is_not_weights(output: str, weights: str) -> None:
    """Refuse to write the features over the weights file they are computed with."""
    try:
        same = os.path.samefile(output, weights)
    except OSError:  # one of them is not there (or is a keyword): not the same file
        return
    if same:
        raise OptionError(
            f"-o {output} is the weights file (--weights {weights}); name another output"
        )


def _check_output_name(name: str) -> None:
    """Refuse an output that names a stream or another format: extract writes HDF5 only."""
    from vggfeat.export import EXTENSIONS, format_of

    if name == "-":
        raise OptionError(
            "-o -: extract writes an HDF5 file, not a stream; write one (-o features.h5), "
            "then 'vggfeat export features.h5 --format npy' writes it to standard output"
        )
    if not name:
        raise OptionError("-o names no file; give the HDF5 file to write, e.g. -o features.h5")
    if name.endswith(os.sep):
        raise OptionError(f"-o {name} names a folder; name the HDF5 file to write in it")
    longest = 255 - len(".parts")  # the work folder beside the output must fit too
    if len(os.fsencode(os.path.basename(name))) > longest:
        raise OptionError(f"-o {name}: the file name is too long; use at most {longest} bytes")
    suffix = Path(name).suffix.lower()
    if suffix.lstrip(".") not in EXTENSIONS and suffix not in NOT_HDF5:
        return
    stem = Path(name).with_suffix("")
    h5 = str(stem if stem.suffix.lower() in (".h5", ".hdf5") else stem.with_suffix(".h5"))
    convert = f"-o {name}" if format_of(name) else f"--format npy -o {stem}.npy"
    raise OptionError(
        f"-o {name}: extract writes HDF5 only; write {h5} and convert it with "
        f"'vggfeat export {h5} {convert}'"
    )
