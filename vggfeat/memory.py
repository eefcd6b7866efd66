"""How many images a network call may take: what a batch costs, and what memory there is.

The catalogue knows the bytes one image may need at the peak of a forward
pass: its activations, and the widest convolution's input unfolded into
patches, which a CPU backend makes whole for a large batch. Memory is what the
machine, and any control group the process runs in (a container, a SLURM job,
systemd), still lets it have; a batch that would not fit is capped before the
first image is computed, never left to end in ``std::bad_alloc`` or the
kernel's OOM killer.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from vggfeat.atomic import size_text
from vggfeat.errors import VggfeatError

#: Images per network call when none is asked for: what is fast. On a CPU, 8 compute as
#: fast as 32 (fc7 at 224x224: 11.7 and 12.1 images/s on 2 cores) in 0.8 GB less memory.
BATCH_SIZES = {"cpu": 8, "gpu": 32}
#: What the backends hold per image for each byte of activations the catalogue counts.
#: Measured 0.27 to 0.93 with TensorFlow on a CPU (benchmarks/RESULTS.md, "Activations per
#: image"): the count is an upper bound, taken as it is.
ACTIVATION_FACTOR = 1.0
#: Memory left alone for the rest of the process and the system.
MARGIN_BYTES = 256 << 20


@dataclass(frozen=True)
class BatchChoice:
    """The batch size chosen, and the line that says why when it is not what was asked."""

    size: int
    notice: str | None = None


def choose_batch(
    requested: int | None,
    kind: str,
    image_bytes: int,
    free: int | None,
    most: int | None = None,
) -> BatchChoice:
    """The largest batch up to ``requested`` (or the fast default) whose images fit.

    ``image_bytes`` is what one image may need (``Catalogue.image_bytes``),
    ``free`` the memory there is now, None where unknown, and ``most`` the
    images the run has (a short run needs no longer batch).
    """
    wanted = requested or BATCH_SIZES[kind]
    if most:
        wanted = min(wanted, most)
    if free is None:
        return BatchChoice(wanted)
    per_image = math.ceil(image_bytes * ACTIVATION_FACTOR)
    fits = max(0, free - MARGIN_BYTES) // per_image
    if fits >= wanted:
        return BatchChoice(wanted)
    if fits < 1:
        raise VggfeatError(
            f"not enough memory for even one image at this cut: it needs about "
            f"{size_text(per_image + MARGIN_BYTES)} and {size_text(free)} is free; use a smaller "
            "--image-size or an earlier --layer, or free some memory"
        )
    if requested is None:
        return BatchChoice(fits)
    return BatchChoice(
        fits,
        f"--batch-size {requested}: {wanted} images at a time need about "
        f"{size_text(wanted * per_image)} of memory and only {size_text(free)} is free; "
        f"computing {fits} images at a time",
    )


def free_bytes() -> int | None:
    """Memory this process can still take: the machine's, within its control groups' limits."""
    found = [_meminfo_available(), *_cgroup_room()]
    known = [value for value in found if value is not None]
    return min(known) if known else None


def _meminfo_available() -> int | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    found = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE)
    return int(found[1]) * 1024 if found else None


def _cgroup_room() -> list[int | None]:
    """Room left under the memory limit of each control group this process is in, and of
    each of their ancestors (cgroup v1 and v2). Reclaimable file cache counts as room."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    rooms: list[int | None] = []
    for line in lines:
        _, controllers, where = line.split(":", 2)
        if controllers == "":
            base, limit, usage, cache = (
                "/sys/fs/cgroup",
                "memory.max",
                "memory.current",
                "inactive_file",
            )
        elif "memory" in controllers.split(","):
            base, limit, usage, cache = (
                "/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
                "total_inactive_file",
            )  # fmt: skip
        else:
            continue
        folder = Path(base + where)
        while True:
            rooms.append(_room(folder, limit, usage, cache))
            if folder == Path(base) or folder.parent == folder:
                break
            folder = folder.parent
    return rooms


def _room(folder: Path, limit_file: str, usage_file: str, cache_key: str) -> int | None:
    try:
        limit_text = (folder / limit_file).read_text().strip()
        if limit_text == "max":
            return None
        limit = int(limit_text)
        if limit >= 1 << 60:  # cgroup v1's "no limit"
            return None
        usage = int((folder / usage_file).read_text())
        stat = (folder / "memory.stat").read_text()
    except (OSError, ValueError):
        return None
    found = re.search(rf"^{cache_key} (\d+)$", stat, re.MULTILINE)
    cache = int(found[1]) if found else 0
    return max(0, limit - usage + cache)


def process_bytes() -> int:
    """This process's resident memory now, in bytes."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")
