"""The documentation and the code agree, and the code is lint-clean."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from vggfeat.cli import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_test_command_readme_gives():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = ci[-1]
    assert command == "python -m pytest"
    assert re.search(rf"^    {re.escape(command)} ", README, re.MULTILINE)


def test_every_command_has_a_readme_section():
    for name in cli.commands:
        assert f"### `vggfeat {name}`" in README


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
