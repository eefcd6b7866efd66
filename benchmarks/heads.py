"""The retrieval heads: what GeM and R-MAC cost end to end, and a retrieval check without downloads.

    python benchmarks/heads.py                   # every part, about 30 minutes on 2 cores
    python benchmarks/heads.py --part network    # each head in the network, and alone
    python benchmarks/heads.py --part cost       # --pool avg, gem and rmac at pool5
    python benchmarks/heads.py --part retrieval  # recall@1 of edited copies
    python benchmarks/heads.py --profile smoke   # seconds

**Network.** In one process, the compiled network to pool5 with each head
on one ready batch, the heads taking turns batch by batch so that the
machine's drift falls on all alike; and each head alone, compiled, on the
maps it is given (pool5 at 224 and at 448), which is what it adds to a batch.

**Cost.** ``vggfeat extract --layer pool5 --pool HEAD`` at 224x224 in steady
state, by the suite's difference method (two sizes of run, each twice, the
faster counting), the heads interleaved so that the machine's drift falls on
all of them alike. The goal is GeM and R-MAC within 3% of avg.

**Retrieval.** Four edited copies of each sample photo (cropped to its
central 80%, rescaled to half size, saved as JPEG at quality 30, brightened by
a third) are the queries, and the six originals the database. One
``vggfeat extract`` computes fc7 and pool5 under avg, max, gem and rmac in
one pass, under the same weights; recall@1 is the share of copies whose
nearest original (cosine) is their own. No published weights can be
downloaded here, so the weights are ``--weights random`` unless ``--weights``
names a file: that shows the heads are wired to work, not how good ImageNet
features are.

Appends its tables to benchmarks/RESULTS.md unless ``--no-record``.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import PROFILES, ROOT, SAMPLES, make_folder, show_and_record, timed_extract, warm_memory

HEADS = ("avg", "gem", "rmac")
#: The retrieval check's descriptors: one pass, each a dataset of the same file.
DESCRIPTORS = ("fc7", "pool5:avg", "pool5:max", "pool5:gem", "pool5:rmac")


def network(profile_name: str) -> list[str]:
    """Images/s of the network to pool5 under each head, turn by turn; each head alone."""
    import tensorflow as tf

    from vggfeat.architecture import vgg
    from vggfeat.heads import Pooling
    from vggfeat.network import Cut, CutNetwork
    from vggfeat.runtime import backend_version, describe_cpu

    profile = PROFILES[profile_name]
    architecture, size, batch = vgg(16), profile.image_size, profile.batch_size
    layer = architecture.layer("pool5")
    networks = {}
    for head in HEADS:
        networks[head] = CutNetwork(
            architecture, [Cut("pool5", layer, Pooling.parse(head))], size, weights="random"
        )
        networks[head].set_batch_size(batch)
    pixels = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), np.uint8)
    seconds: dict[str, list[float]] = {head: [] for head in HEADS}
    for head in HEADS:
        networks[head](pixels)  # the first call of each is not timed
    for _ in range(profile.network_batches):
        for head in HEADS:
            started = time.perf_counter()
            networks[head](pixels)
            seconds[head].append(time.perf_counter() - started)
    alone: dict[tuple[str, int], float] = {}
    for side in (size // 32, size // 16):
        maps = np.random.default_rng(1).random((batch, side, side, 512), np.float32)
        for head in HEADS:
            pooling = Pooling.parse(head)
            compiled = tf.function(lambda x, pooling=pooling: pooling(x), jit_compile=False)
            compiled(maps)
            started = time.perf_counter()
            for _ in range(50):
                compiled(maps).numpy()
            alone[head, side] = (time.perf_counter() - started) / 50
    rates = {head: batch / float(np.median(times)) for head, times in seconds.items()}
    batch_ms = {head: 1000 * float(np.median(times)) for head, times in seconds.items()}
    small, large = size // 32, size // 16
    lines = [
        f"## Heads: in the network, profile {profile_name}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"{describe_cpu()}; TensorFlow {backend_version('tensorflow')}, float32. VGG16 to "
        f"pool5 at {size}x{size}, batches of {batch}, random weights: the median of "
        f"{profile.network_batches} batches per head, heads taking turns. Alone: the head "
        f"compiled on its own, on a batch of {batch} maps of {small}x{small}x512 (pool5 at "
        f"{size}) and of {large}x{large}x512 (pool5 at {2 * size}), the mean of 50 calls.",
        "",
        f"| head | network (images/s) | x avg | head alone, {small}x{small} (ms) | "
        f"head alone, {large}x{large} (ms) | head / batch |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for head in HEADS:
        share = 1000 * alone[head, small] / batch_ms[head]
        lines.append(
            f"| {head} | {rates[head]:.2f} | {rates[head] / rates['avg']:.3f} | "
            f"{1000 * alone[head, small]:.2f} | {1000 * alone[head, large]:.2f} | "
            f"{share:.5%} |"
        )
    return [*lines, ""]


def cost(profile_name: str, work: Path) -> list[str]:
    """Steady-state images/s of extract at pool5 under each head, interleaved."""
    profile = dataclasses.replace(PROFILES[profile_name], layer="pool5")
    photos = make_folder(work / "photos", profile.large_run)
    warm_memory(profile.warm_up_mb)
    runs: dict[str, dict[int, list[float]]] = {head: {} for head in HEADS}
    for _ in range(2):
        for head in HEADS:
            for count in (profile.small_run, profile.large_run):
                seconds, _, _ = timed_extract(
                    profile, photos, work, count, "float32", "--pool", head
                )
                runs[head].setdefault(count, []).append(seconds)
                print(head, count, f"{seconds:.1f} s", flush=True)
    rates = {
        head: (profile.large_run - profile.small_run)
        / (min(times[profile.large_run]) - min(times[profile.small_run]))
        for head, times in runs.items()
    }
    from vggfeat.runtime import backend_version, describe_cpu

    lines = [
        f"## Heads: cost, profile {profile_name}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"{describe_cpu()}; TensorFlow {backend_version('tensorflow')}, float32. "
        f"`vggfeat extract --layer pool5 --pool HEAD` at {profile.image_size}, batch "
        f"{profile.batch_size}, random weights; steady state between {profile.small_run} and "
        f"{profile.large_run} images, each size twice, heads interleaved.",
        "",
        "| head | extract (images/s) | x avg |",
        "| --- | ---: | ---: |",
    ]
    for head, rate in rates.items():
        lines.append(f"| {head} | {rate:.2f} | {rate / rates['avg']:.3f} |")
    return [*lines, ""]


def edited_copies(folder: Path) -> tuple[list[Path], list[tuple[Path, Path, str]]]:
    """The sample photos, and four edited copies of each: (copy, its original, the edit)."""
    originals = sorted(SAMPLES.glob("*/*.jpg"))
    copies = []
    folder.mkdir(parents=True, exist_ok=True)
    for original in originals:
        image = Image.open(original).convert("RGB")
        width, height = image.size
        edits = {
            "crop80": image.crop(
                (width // 10, height // 10, width - width // 10, height - height // 10)
            ),
            "half": image.resize((width // 2, height // 2), Image.Resampling.LANCZOS),
            "jpeg30": image,
            "bright": ImageEnhance.Brightness(image).enhance(4 / 3),
        }
        for edit, edited in edits.items():
            copy = folder / f"{original.stem}-{edit}.jpg"
            edited.save(copy, quality=30 if edit == "jpeg30" else 90)
            copies.append((copy, original, edit))
    return originals, copies


def retrieval(profile_name: str, work: Path, weights: str) -> list[str]:
    """Recall@1 of edited copies against their originals, per descriptor, one pass."""
    import vggfeat

    originals, copies = edited_copies(work / "copies")
    listing = work / "retrieval.txt"
    listing.write_text("".join(f"{p}\n" for p in [*originals, *(c for c, _, _ in copies)]))
    output = work / "retrieval.h5"
    layers = [argument for name in DESCRIPTORS for argument in ("--layer", name)]
    if profile_name == "smoke":  # no fc7 below 224x224
        layers = layers[2:]
    command = [
        *(sys.executable, "-m", "vggfeat", "extract", "--files-from", str(listing)),
        *("-o", str(output), "--overwrite", "--weights", weights, *layers, "--quiet"),
    ]
    size = 64 if profile_name == "smoke" else 224
    command += ["--image-size", str(size)]
    subprocess.run(command, check=True, cwd=ROOT)
    loaded = vggfeat.load(output)
    row_of = {(output.parent / p).resolve(): i for i, p in enumerate(loaded.paths)}
    database = [row_of[p.resolve()] for p in originals]
    lines = [
        f"## Heads: retrieval check, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Weights: {weights}{' (seed 0)' if weights == 'random' else ''}. Queries: "
        f"{len(copies)} edited copies of the {len(originals)} sample photos (crop to 80%, half "
        "size, JPEG quality 30, brightened by a third); database: the originals. One pass "
        f"of `vggfeat extract` at {size}x{size}; cosine similarity. Margin: the mean of "
        "(similarity to its own original) - (to the nearest other original).",
        "",
        "| descriptor | recall@1 | crop80 | half | jpeg30 | bright | margin |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in loaded.features:
        values = loaded.features[name].reshape(len(loaded.paths), -1).astype(np.float64)
        values /= np.maximum(np.linalg.norm(values, axis=1, keepdims=True), 1e-12)
        found, margins = {}, []
        for copy, original, edit in copies:
            similarity = values[database] @ values[row_of[copy.resolve()]]
            own = originals.index(original)
            found.setdefault(edit, []).append(int(np.argmax(similarity)) == own)
            margins.append(similarity[own] - np.delete(similarity, own).max())
        hits = [hit for edit in found.values() for hit in edit]
        per_edit = " | ".join(f"{np.mean(edit):.2f}" for edit in found.values())
        lines.append(f"| {name} | {np.mean(hits):.2f} | {per_edit} | {np.mean(margins):.3f} |")
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--part", choices=("network", "cost", "retrieval", "all"), default="all")
    parser.add_argument("--weights", default="random", help="random, or a weights file")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument("--no-record", action="store_true", help="print only")
    arguments = parser.parse_args()
    results = None if arguments.no_record else arguments.results
    with tempfile.TemporaryDirectory(prefix="vggfeat-heads-") as temp:
        if arguments.part in ("network", "all"):
            show_and_record(network(arguments.profile), results)
        if arguments.part in ("cost", "all"):
            show_and_record(cost(arguments.profile, Path(temp)), results)
        if arguments.part in ("retrieval", "all"):
            lines = retrieval(arguments.profile, Path(temp), arguments.weights)
            show_and_record(lines, results)


if __name__ == "__main__":
    main()
