"""What ``vggfeat neighbors``, ``duplicates`` and ``clusters`` cost on a large file.

    python benchmarks/search.py                  # 100,000 rows of 512, as the goals say
    python benchmarks/search.py --profile smoke  # 5,000 rows of 64, seconds

Writes a features file of synthetic clustered float32 rows (a mixture of
directions of unequal weights, noise around each, and 1% of rows planted as
near-copies of others) through vggfeat's own store, then runs each command
end to end as a user would, in a process of its own, stdout to a file: its
wall time and peak resident memory (that process's VmHWM).

- neighbors: all 10-NN. Recall@10 is measured against exact search on 1,000
  sampled rows (NumPy, float64); the index's own estimate is shown beside it.
- duplicates at 0.95: the share of planted pairs that share a group.
- clusters, K = 100: the inertia, from the output's distances.

Goals, on 2 cores: neighbors under 2 minutes with recall@10 >= 0.95 and a peak
under 2 GB; duplicates under 2 minutes; clusters under 1 minute.
Appends its table to benchmarks/RESULTS.md unless ``--no-record``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from run import ROOT, profile_main


@dataclass(frozen=True)
class Profile:
    rows: int
    width: int
    directions: int
    clusters: int
    sample: int


PROFILES = {
    "cpu": Profile(100_000, 512, 1000, 100, 1000),
    "smoke": Profile(5_000, 64, 100, 10, 200),
}
PLANTED = 0.01


def make_rows(profile: Profile) -> tuple[np.ndarray, np.ndarray]:
    """Clustered rows, and the planted near-duplicate pairs (copy, original)."""
    from tests.conftest import clustered

    rows = clustered(profile.rows, profile.width, profile.directions, spread=0.9, seed=0)
    rng = np.random.default_rng(1)
    count = int(profile.rows * PLANTED)
    copies = rng.choice(profile.rows, 2 * count, replace=False)
    pairs = copies.reshape(count, 2)
    noise = rng.standard_normal((count, profile.width)).astype(np.float32)
    originals = rows[pairs[:, 1]]
    scale = 0.1 * np.linalg.norm(originals, axis=1, keepdims=True) / np.sqrt(profile.width)
    rows[pairs[:, 0]] = originals + noise * scale
    return rows, pairs


@dataclass(frozen=True)
class Run:
    seconds: float
    peak_mb: float
    search: str
    """The command's own account of its search (``--verbose``), if it gave one."""


#: vggfeat's command line, which writes its process's peak resident memory (VmHWM, which
#: an exec starts afresh, unlike ru_maxrss, which keeps this process's) to a file at exit.
LAUNCHER = """
import atexit, sys
def peak(path=sys.argv[1]):
    with open("/proc/self/status") as status, open(path, "w") as out:
        out.write(next(line for line in status if line.startswith("VmHWM:")).split()[1])
atexit.register(peak)
sys.argv = ["vggfeat", *sys.argv[2:]]
from vggfeat.__main__ import main
main()
"""


def command(args: list[str], out: Path) -> Run:
    """Run ``vggfeat ARGS`` with stdout to ``out``: wall seconds and peak resident MB."""
    peak = out.with_suffix(".peak")
    started = time.perf_counter()
    with out.open("wb") as stdout:
        done = subprocess.run(
            [sys.executable, "-c", LAUNCHER, str(peak), *args],
            stdout=stdout,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    seconds = time.perf_counter() - started
    error = done.stderr.decode()
    if done.returncode != 0:
        raise SystemExit(f"vggfeat {' '.join(args)} failed:\n{error}")
    print(error, end="", flush=True)
    search = next((line for line in error.splitlines() if line.startswith("Search: ")), "")
    return Run(seconds, int(peak.read_text()) / 1024, search.removeprefix("Search: "))


def recall_at_10(rows: np.ndarray, output: Path, paths: list[str], sample: int) -> float:
    """Of the true 10 nearest other rows of ``sample`` rows, the share the output lists."""
    x = rows.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    picked = np.random.default_rng(2).choice(len(rows), sample, replace=False)
    wanted = {paths[i]: i for i in picked}
    found: dict[int, set[int]] = {i: set() for i in picked}
    row_of = {path: i for i, path in enumerate(paths)}
    with output.open() as lines:
        for line in lines:
            query, _, neighbour, _ = line.rstrip("\n").split("\t")
            if query in wanted:
                found[wanted[query]].add(row_of[neighbour])
    hits = 0
    for i in picked:
        similarity = x @ x[i]
        similarity[i] = -np.inf
        true = set(np.argpartition(-similarity, 10)[:10].tolist())
        hits += len(true & found[i])
    return hits / (10 * sample)


def measure(profile_name: str, folder: Path) -> list[str]:
    from tests.conftest import write_features
    from vggfeat.runtime import describe_cpu

    profile = PROFILES[profile_name]
    rows, pairs = make_rows(profile)
    paths = [f"photos/{i:07d}.jpg" for i in range(profile.rows)]
    features = write_features(folder / "features.h5", paths, rows, layer="pool5")
    out = folder / "out.tsv"
    results = []

    run = command(["neighbors", str(features), "-k", "10", "--verbose"], out)
    recall = recall_at_10(rows, out, paths, profile.sample)
    results.append(("neighbors, all 10-NN", run, f"recall@10 {recall:.3f}"))

    run = command(["duplicates", str(features), "--threshold", "0.95", "--verbose"], out)
    group_of = {}
    with out.open() as lines:
        for line in lines:
            group, path, _ = line.rstrip("\n").split("\t")
            group_of[path] = group
    together = sum(
        1
        for copy, original in pairs
        if paths[copy] in group_of and group_of.get(paths[copy]) == group_of.get(paths[original])
    )
    results.append(
        ("duplicates at 0.95", run, f"{together:,} of {len(pairs):,} planted pairs grouped")
    )

    run = command(["clusters", str(features), "--clusters", str(profile.clusters)], out)
    distances = np.loadtxt(out, delimiter="\t", usecols=2, dtype=np.float64)
    inertia = float((distances**2).sum())
    results.append((f"clusters, K = {profile.clusters}", run, f"inertia {inertia:,.1f}"))

    lines = [
        f"## Search: neighbors, duplicates, clusters, profile {profile_name}, "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"{describe_cpu()}. {profile.rows:,} synthetic rows of {profile.width} float32 "
        f"around {profile.directions:,} directions, {len(pairs):,} planted near-copies; each "
        "command end to end in its own process, stdout to a file.",
        "",
        "| command | wall (s) | peak memory (MB) | quality |",
        "| --- | ---: | ---: | --- |",
    ]
    for name, run, quality in results:
        lines.append(f"| {name} | {run.seconds:.1f} | {run.peak_mb:,.0f} | {quality} |")
    lines.append("")
    lines += [f"- {name}: {run.search}" for name, run, _ in results if run.search]
    return [*lines, ""]


def main() -> None:
    profile_main(__doc__, PROFILES, measure)


if __name__ == "__main__":
    main()
