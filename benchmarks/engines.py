"""The price of the Ray engine on one machine: ``--engine ray`` against ``--engine local``.

    python benchmarks/engines.py                  # VGG16 to fc7, 64 and 320 images, about 6 min
    python benchmarks/engines.py --profile smoke  # seconds

Both engines run on the same folder in the same run, by the suite's steady-state
method (two runs of different sizes, each twice; the difference in images over
the difference in time, so that start-up, Ray's included, is not counted), and
their features are compared. Appends the table to benchmarks/RESULTS.md unless
``--no-record``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import PROFILES, ROOT, extract_steady, machine, make_folder, show_and_record, warm_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument("--no-record", action="store_true", help="print only")
    arguments = parser.parse_args()
    profile = PROFILES[arguments.profile]

    import vggfeat

    with tempfile.TemporaryDirectory(prefix="vggfeat-engines-") as temp:
        work = Path(temp)
        photos = make_folder(work / "photos", profile.large_run)
        warm_memory(profile.warm_up_mb)
        local, local_start, _, local_output = extract_steady(profile, photos, work, "float32")
        ray, ray_start, _, ray_output = extract_steady(
            profile, photos, work, "float32", "--engine", "ray"
        )
        a = vggfeat.load(local_output).features[profile.layer]
        b = vggfeat.load(ray_output).features[profile.layer]
        difference = float(np.max(np.abs(a - b)) / max(1e-12, float(np.max(np.abs(a)))))
    facts = machine()
    lines = [
        f"## Engines, profile {arguments.profile}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {facts['cpu']}; GPU: {facts.get('gpu') or 'none'}.",
        f"VGG16 to {profile.layer} at {profile.image_size}, batch {profile.batch_size}, "
        f"float32, steady state between {profile.small_run} and {profile.large_run} images.",
        "",
        "| engine | images/s | start-up | x local |",
        "| --- | ---: | ---: | ---: |",
        f"| local | {local:,.1f} | {local_start:.1f} s | 1.00 |",
        f"| ray (local instance) | {ray:,.1f} | {ray_start:.1f} s | {ray / local:.2f} |",
        "",
        f"Largest difference between the engines' features: {difference:.1e} of the largest value.",
        "",
    ]
    show_and_record(lines, None if arguments.no_record else arguments.results)


if __name__ == "__main__":
    main()
