"""Every example in the README and the manual runs, and prints what the page shows.

A page's examples run in order in a fresh folder holding a copy of ``sample_images/``,
each shell command in its own ``bash -c`` (so a ``cd`` lasts one command). What it
prints on standard output and error, together as a terminal shows them, must be what the
page shows, each stream in its own order, after this normalisation, applied to both:

- durations (``3.1 s``, ``2 min``), rates (``8.7 images/s``) and versions (``TensorFlow
  2.21.0``) become placeholders; a progress line before the last is dropped, since how
  many a run prints depends on its speed; the CPU's description becomes ``CPU``;
- numbers with a decimal point agree to 1e-4 relative or 1e-6 absolute: float32
  sums differ in their last digits with how the machine's math library splits the
  work, and features of random weights are small;
- on the page, ``...`` stands for any text in a line, and a line of ``...`` alone for
  any lines.

Python blocks run with ``python`` in the same folder and must succeed. A shell block no
test can run (one that installs, or needs a cluster of machines) is marked so by the line
before it, ``<!-- not run: why -->``; a shell block without that mark fails this test.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: The pages whose examples take longest come first, so that the suite's two workers
#: start them early (tests/conftest.py sends the groups out in this order).
SLOWEST = ["many-machines.md", "extracting.md", "using.md"]
PAGES = [
    *(ROOT / "docs" / "manual" / name for name in SLOWEST),
    ROOT / "README.md",
    *sorted(p for p in (ROOT / "docs" / "manual").glob("*.md") if p.name not in SLOWEST),
]

#: Languages of blocks that are examples; every other language is a listing.
SHELL = {"console", "bash", "sh", "shell", "zsh", ""}
NOT_RUN = re.compile(r"^<!-- not run: (.+) -->$")

#: Programs the examples call that are not Python's, with the Debian package of each.
PROGRAMS = {"jq": "jq", "h5dump": "hdf5-tools", "Rscript": "r-cran-hdf5r"}

#: Where an example's home is, as the pages show it (the test gives it an empty one).
HOME = "/home/you"


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    language: str
    lines: tuple[str, ...]
    #: Why it is not run, from the line before it; empty where it is.
    not_run: str

    @property
    def runs(self) -> bool:
        return self.language in ("console", "python") and not self.not_run

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a page, in order, each marked as run or not."""
    found = []
    lines = page.read_text().splitlines()
    index = 0
    while index < len(lines):
        fence = re.match(r"^(\s*)(```+)\s*([\w-]*)", lines[index])
        if not fence:
            index += 1
            continue
        indent, ticks, language = fence.groups()
        start = index
        body = []
        index += 1
        while index < len(lines) and not lines[index].strip().startswith(ticks):
            body.append(lines[index][len(indent) :])
            index += 1
        mark = NOT_RUN.match(lines[start - 1].strip()) if start else None
        found.append(Block(page, start + 1, language, tuple(body), mark[1] if mark else ""))
        index += 1
    return found


@dataclass(frozen=True)
class Command:
    text: str
    expected: tuple[str, ...]
    line: int


def commands(block: Block) -> list[Command]:
    """A console block's commands: ``$ `` starts one, ``> `` continues it, the rest is output."""
    found: list[Command] = []
    text: list[str] = []
    expected: list[str] = []
    line = 0
    for number, row in enumerate(block.lines, block.line + 1):
        if row.startswith("$ "):
            if text:
                found.append(Command("\n".join(text), tuple(expected), line))
            text, expected, line = [row[2:]], [], number
        elif row.startswith("> ") and text and not expected:
            text.append(row[2:])
        elif text:
            expected.append(row)
        else:
            raise AssertionError(f"{block.where}: output before any $ command: {row!r}")
    if text:
        found.append(Command("\n".join(text), tuple(expected), line))
    return found


PLACEHOLDERS = [
    (re.compile(r"\d[\d,]*(\.\d+)? images/s"), "<rate>"),
    (re.compile(r"\b\d+(\.\d+)? (s|ms|min|h)\b"), "<time>"),
    (re.compile(r"\b(TensorFlow|tensorflow|JAX|jax|Keras|keras) \d+\.\d+(\.\d+)?\S*"), r"\1 <v>"),
    (re.compile(r"\bCPU, \d+ cores?(, [A-Z][A-Z0-9_]+)*"), "CPU"),
]
PROGRESS = re.compile(r"^(\d+)/(\d+) images, ")
NUMBER = re.compile(r"(-?\d+\.\d+(?:[eE][-+]?\d+)?)")


def normalised(lines: list[str] | tuple[str, ...]) -> list[str]:
    kept = []
    for line in lines:
        progress = PROGRESS.match(line)
        if progress and progress[1] != progress[2]:
            continue
        for pattern, placeholder in PLACEHOLDERS:
            line = pattern.sub(placeholder, line)
        kept.append(line.rstrip())
    while kept and not kept[-1]:
        kept.pop()
    return kept


def same_line(expected: str, actual: str) -> bool:
    if "..." in expected:
        pattern = ".*".join(re.escape(part) for part in expected.split("..."))
        return re.fullmatch(pattern, actual) is not None
    want, got = NUMBER.split(expected), NUMBER.split(actual)
    if len(want) != len(got):
        return False
    for position, (a, b) in enumerate(zip(want, got, strict=True)):
        if position % 2 == 0:
            if a != b:
                return False
        elif not math.isclose(float(a), float(b), rel_tol=1e-4, abs_tol=1e-6):
            return False
    return True


def matches(expected: list[str], out: list[str], err: list[str]) -> bool:
    """Whether ``expected`` is ``out`` and ``err`` interleaved, each in its own order.

    Standard output and error reach a terminal in an order a pipeline's timing decides
    (``vggfeat neighbors ... | head`` prints its summary before or after ``head`` writes),
    so the page may show them in either. A line of ``...`` stands for any lines of either.
    """

    @cache
    def match(i: int, j: int, k: int) -> bool:
        if i == len(expected):
            return j == len(out) and k == len(err)
        if expected[i] == "...":
            return (
                match(i + 1, j, k)
                or (j < len(out) and match(i, j + 1, k))
                or (k < len(err) and match(i, j, k + 1))
            )
        return (j < len(out) and same_line(expected[i], out[j]) and match(i + 1, j + 1, k)) or (
            k < len(err) and same_line(expected[i], err[k]) and match(i + 1, j, k + 1)
        )

    return match(0, 0, 0)


def environment(folder: Path) -> dict[str, str]:
    """This Python's commands first; an empty home, so no cached weights or settings show."""
    home = folder.parent / "home"
    home.mkdir(exist_ok=True)
    keep = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("VGGFEAT_", "KERAS_", "PYTEST_", "COLUMNS", "LINES"))
    }
    return {
        **keep,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(home),
        "LC_ALL": "C.UTF-8",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


def run_page(page: Path, folder: Path) -> None:
    env = environment(folder)
    home = env["HOME"]
    for block in blocks(page):
        if not block.runs:
            continue
        if block.language == "python":
            script = folder.parent / "example.py"
            script.write_text("\n".join(block.lines) + "\n")
            result = subprocess.run(
                [sys.executable, str(script)],
                cwd=folder,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert result.returncode == 0, (
                f"{block.where}: the Python example failed\n{result.stderr}"
            )
            continue
        for command in commands(block):
            result = subprocess.run(
                ["bash", "-c", command.text],
                cwd=folder,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            out, err = (text.replace(home, HOME) for text in (result.stdout, result.stderr))
            expected = normalised(command.expected)
            assert matches(expected, normalised(out.splitlines()), normalised(err.splitlines())), (
                f"{page.relative_to(ROOT)}:{command.line}: $ {command.text}\n"
                + "--- the page shows\n"
                + "\n".join(command.expected)
                + f"\n--- it printed on standard output\n{out}"
                + f"--- and on standard error\n{err}"
            )


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_example_on_the_page_prints_what_it_shows(page, tmp_path):
    examples = [block for block in blocks(page) if block.runs]
    if not examples:
        pytest.skip(f"{page.name} has no examples")
    text = "\n".join(line for block in examples for line in block.lines)
    for program, package in PROGRAMS.items():
        if re.search(rf"\b{program}\b", text) and not shutil.which(program):
            pytest.skip(f"{page.name}'s examples need {program} (apt-get install {package})")
    folder = tmp_path / "work"
    shutil.copytree(ROOT / "sample_images", folder / "sample_images")
    run_page(page, folder)


def test_every_shell_block_runs_or_says_why_not():
    unmarked = [
        block.where
        for page in PAGES
        for block in blocks(page)
        if block.language in SHELL - {"console"} and not block.not_run
    ]
    assert not unmarked, f"shell blocks that no test runs and no mark explains: {unmarked}"
    listings = [
        block.where
        for page in PAGES
        for block in blocks(page)
        if block.language not in SHELL | {"python"}
        and any(line.startswith("$ ") for line in block.lines)
    ]
    assert not listings, f"transcripts in a block that is not 'console': {listings}"


def test_the_comparison_allows_for_timings_and_nothing_else():
    page = [
        "6/6 images, 8.7 images/s, 0 failed",
        "Time: 3.1 s, 8.6 images/s after start-up (start-up 2.4 s).",
        "Computed by: CPU, 2 cores, AVX512_BF16, float32, TensorFlow 2.21.0.",
        "sample_images/earth/chelsea.jpg\t0.000225910655",
        "Images per node: ... 6",
        "...",
        "last",
    ]
    run = [
        "3/6 images, 1.0 images/s, 0 failed",
        "6/6 images, 12.5 images/s, 0 failed",
        "Time: 12 s, 1,208.0 images/s after start-up (start-up 11.9 s).",
        "Computed by: CPU, 64 cores, float32, TensorFlow 2.21.3.",
        "sample_images/earth/chelsea.jpg\t0.000225908632",
        "Images per node: 192.0.2.2 6",
        "anything",
        "at all",
        "last",
    ]
    assert matches(normalised(page), [], normalised(run))
    assert matches(normalised(page), normalised(run[5:]), normalised(run[:5]))
    wrong = {
        1: "6/6 images, 8.7 images/s, 1 failed",
        3: "Computed by: CPU, 2 cores, AVX512_BF16, bfloat16, TensorFlow 2.21.0.",
        4: "sample_images/earth/chelsea.jpg\t0.000235",  # another value, not its last digits
        5: "Images per node: 192.0.2.2 7",
    }
    for index, line in wrong.items():
        changed = [*run[:index], line, *run[index + 1 :]]
        assert not matches(normalised(page), [], normalised(changed)), line
    assert not matches(normalised(page), [], normalised(run[:-1]))
    # Each stream keeps its own order.
    assert matches(["a", "b", "c"], ["b"], ["a", "c"])
    assert not matches(["a", "b", "c"], ["b", "a"], ["c"])
