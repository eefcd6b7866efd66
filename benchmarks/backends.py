"""TensorFlow against JAX on this machine: the network alone and end to end, in one run.

    python benchmarks/backends.py                   # VGG16 to fc7, about 8 minutes on 2 cores
    python benchmarks/backends.py --profile smoke   # seconds

For each backend and precision: the network alone on a ready batch (in a
child process, since one process keeps one Keras backend) and ``vggfeat
extract`` in steady state by the suite's difference method. Appends the
table to benchmarks/RESULTS.md unless ``--no-record``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import PROFILES, ROOT, extract_steady, make_folder, show_and_record, warm_memory

BACKENDS = ("tensorflow", "jax")
PRECISIONS = ("float32", "mixed")

NETWORK_ALONE = """
import json, sys
sys.path.insert(0, {benchmarks!r})
from run import PROFILES, network_alone
print(json.dumps(network_alone(PROFILES[{profile!r}], {precision!r})))
"""


def network_alone(profile: str, backend: str, precision: str) -> float:
    code = NETWORK_ALONE.format(
        benchmarks=str(ROOT / "benchmarks"), profile=profile, precision=precision
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "KERAS_BACKEND": backend},
    )
    return float(json.loads(result.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument("--no-record", action="store_true", help="print only")
    arguments = parser.parse_args()
    profile = PROFILES[arguments.profile]
    from vggfeat.runtime import backend_version, describe_cpu

    rows = []
    with tempfile.TemporaryDirectory(prefix="vggfeat-backends-") as temp:
        work = Path(temp)
        photos = make_folder(work / "photos", profile.large_run)
        warm_memory(profile.warm_up_mb)
        for backend in BACKENDS:
            for precision in PRECISIONS:
                alone = network_alone(arguments.profile, backend, precision)
                steady, startup, _, _ = extract_steady(
                    profile, photos, work, precision, "--backend", backend
                )
                rows.append((backend, precision, alone, steady, startup))
                print(rows[-1], flush=True)
    lines = [
        f"## Backends, profile {arguments.profile}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"{describe_cpu()}; TensorFlow {backend_version('tensorflow')}, "
        f"JAX {backend_version('jax')}. VGG16 to {profile.layer} at {profile.image_size}, "
        f"batch {profile.batch_size}; extract in steady state between {profile.small_run} "
        f"and {profile.large_run} images.",
        "",
        "| backend | precision | network alone | extract (images/s) | x network | start-up |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
        *(
            f"| {b} | {p} | {alone:,.1f} | {steady:,.1f} | {steady / alone:.2f} | {start:.1f} s |"
            for b, p, alone, steady, start in rows
        ),
        "",
    ]
    show_and_record(lines, None if arguments.no_record else arguments.results)


if __name__ == "__main__":
    main()
