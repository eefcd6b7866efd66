"""The documentation and the code agree, and the code is lint-clean."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vggfeat.cli import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
MANUAL = ROOT / "docs" / "manual"


def test_ci_runs_the_test_command_readme_gives():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = ci[-1]
    assert command == "python -m pytest"
    assert re.search(rf"^{re.escape(command)}$", README, re.MULTILINE)


def test_every_command_has_its_line_in_the_readme():
    for name in cli.commands:
        assert re.search(rf"^\| `vggfeat {name}` \| \w", README, re.MULTILINE), name


def test_sample_images_have_their_sources():
    sources = (ROOT / "sample_images" / "SOURCES.md").read_text()
    images = sorted(ROOT.glob("sample_images/*/*.jpg"))
    assert 6 <= len(images) <= 12
    for image in images:
        assert f"`{image.parent.name}/{image.name}`" in sources


def test_code_is_ruff_clean():
    pytest.importorskip("ruff", reason="ruff comes with the 'test' extra")
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


def test_code_is_typed_and_mypy_clean():
    pytest.importorskip("mypy", reason="mypy comes with the 'test' extra")
    result = subprocess.run(
        [sys.executable, "-m", "mypy"], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stdout


#: What a test must not do: end processes by name (other people's included), or assert on
#: how long something took (a busy machine makes such a test fail for nothing; a deadline
#: that only stops a hang is fine).
FORBIDDEN_IN_TESTS = {
    r"\bp(grep|kill)\b|\bkill(all)\b": "kills by name",  # spelt so as not to match itself
    r"\bassert\b[^\n]*\b(monotonic|perf_counter|time)\(\)\s*-": "asserts on how long it took",
    r"\bassert\s+sys\.platform\b": "asserts nothing",
}


def test_tests_kill_only_what_they_started_and_never_time_themselves():
    found = []
    for test in sorted((ROOT / "tests").glob("*.py")):
        text = test.read_text()
        for pattern, defect in FORBIDDEN_IN_TESTS.items():
            for match in re.finditer(pattern, text):
                line = text.count("\n", 0, match.start()) + 1
                found.append(f"{test.name}:{line} {defect}")
    assert not found, found


def test_every_option_is_described_in_the_manual():
    # The reference lists every option by construction; the other pages must say what each does.
    prose = "\n".join(
        page.read_text() for page in sorted(MANUAL.glob("*.md")) if page.name != "reference.md"
    )
    for name, command in cli.commands.items():
        for parameter in command.params:
            for option in parameter.opts:
                if option.startswith("--") and option != "--help":
                    assert option in prose, f"vggfeat {name} {option} is not in docs/manual/"


def test_the_manual_builds_strictly_with_every_option_in_its_reference(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs comes with the 'docs' extra")
    site = tmp_path / "site"
    config = ROOT / "docs" / "mkdocs.yml"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f", config, "-d", site],
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    reference = (site / "reference" / "index.html").read_text()
    for name, command in cli.commands.items():
        assert f"vggfeat {name}" in reference
        for parameter in command.params:
            for option in parameter.opts:
                assert option in reference, f"vggfeat {name} {option} is not in the reference"
    for page in MANUAL.glob("*.md"):
        built = site / ("index.html" if page.stem == "index" else f"{page.stem}/index.html")
        assert built.is_file(), f"{page.name} is not in the site"


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")))
def test_every_benchmark_imports_what_it_uses(script):
    # Importing each script (--help) catches a benchmark left behind by a renamed API in a
    # second. The benchmarks themselves run by hand: 'python benchmarks/run.py --profile
    # smoke' exercises run.py end to end in about a minute (see README, Development).
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")


def test_the_gpu_benchmark_dry_run_works(tmp_path):
    # The GPU benchmark runs rarely, on a machine lent for minutes: its dry run keeps it working.
    pytest.importorskip("jax", reason="JAX comes with the 'test' extra")
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={
            **os.environ,
            "VGGFEAT_GPU_DRY_RUN": "1",
            "TMPDIR": str(tmp_path),
            "PYTHON": sys.executable,
        },
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["dry_run"] is True and results["layer"] == "pool1"
    assert results["network alone, batch 4"] > 0
    assert results["decoding alone, 2 threads"] > 0 and results["decoding alone, 2 processes"] > 0
    assert results["extract end to end, camera-like (800x600 in the dry run)"] > 0
    assert "| network alone, batch 2 |" in (tmp_path / "out" / "results.md").read_text()
