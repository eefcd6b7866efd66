"""Contact sheets: what ``neighbors``, ``duplicates`` and ``clusters`` found, as pictures.

A sheet is one self-contained HTML page (more, linked, where it would be too
heavy to open): every thumbnail is a small JPEG inside the page as a data URI,
so it opens offline, anywhere, after the images have moved. Every name is
escaped, and the page's Content-Security-Policy lets no script but its own run.
An image that is gone, or cannot be decoded, is a placeholder with its path.
"""

from __future__ import annotations

import base64
import hashlib
import html
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO

from vggfeat.atomic import temporary_name, why_unwritable, write_atomically
from vggfeat.errors import OptionError, OutputError
from vggfeat.images import Thumbnail, thumbnail
from vggfeat.interrupts import signals_deferred
from vggfeat.search.clusters import Clustering
from vggfeat.search.duplicates import Group
from vggfeat.search.neighbors import Neighbors
from vggfeat.search.progress import OnStep, Step, ignore
from vggfeat.search.vectors import Vectors
from vggfeat.store import output_path
from vggfeat.text import storable

#: Longer side of a thumbnail, in pixels.
THUMBNAIL_SIDE = 128
#: Sections (queries, groups, clusters) a sheet shows at most, unless told otherwise.
SECTIONS = 500
#: Images a section shows at most: a cluster's nearest its centre, a group's first.
TILES_PER_SECTION = 24
#: Thumbnails a page holds at most (about 10 MB), so that it opens quickly; more go
#: on further pages, linked.
THUMBNAILS_PER_PAGE = 1500


@dataclass(frozen=True)
class Tile:
    """One image of a section, with what to say under it."""

    row: int
    caption: str
    query: bool = False
    """The image a neighbours section is about, framed."""


@dataclass(frozen=True)
class Section:
    heading: str
    tiles: tuple[Tile, ...]
    more: int = 0
    """Images of the section not shown."""


@dataclass(frozen=True)
class Sheet:
    """What a page shows: ``sections`` of ``found`` (the first ``len(sections)``)."""

    kind: str
    title: str
    facts: tuple[str, ...]
    sections: tuple[Section, ...]
    found: int
    noun: str
    """What a section is, in the plural: ``queries``, ``groups``, ``clusters``."""


def check_target(target: str | os.PathLike, features: str | os.PathLike) -> Path:
    """The page to write, refused before any search unless it is an ``.html`` (``.htm``)
    name in a folder that can be written, and, if it exists, a regular file: a device, a
    FIFO, the features file or an image of the collection is never replaced."""
    shown = os.fspath(target)
    if not shown or shown.endswith(os.sep) or os.path.isdir(shown):
        raise OptionError(f"--html {shown or repr(shown)}: name the page to write, not a folder")
    path = Path(os.path.realpath(shown))
    if path == Path(os.path.realpath(output_path(features))):
        raise OptionError(f"--html {shown}: that is the features file; name an .html page")
    if path.suffix.lower() not in PAGE_SUFFIXES:
        raise OptionError(f"--html {shown}: name an .html page (sheet.html, say)")
    if os.path.exists(path) and not path.is_file():  # False where it cannot be looked at
        raise OptionError(f"--html {shown}: not a regular file; name an .html page to write")
    if not path.parent.is_dir():
        raise OptionError(f"--html {shown}: the folder {path.parent} does not exist")
    refused = why_unwritable(path.parent)
    if refused is not None:
        raise OutputError(f"--html {shown}: {refused}; write the page elsewhere with --html")
    return path


PAGE_SUFFIXES = (".html", ".htm")


def neighbors_sheet(
    vectors: Vectors, found: Sequence[Neighbors], queries: int, facts: Iterable[str]
) -> Sheet:
    """A section per query: the query, then its neighbours with their similarities."""
    sections = []
    for result in found:
        tiles = [Tile(result.query, "query", query=True)]
        shown = min(len(result.rows), TILES_PER_SECTION)
        tiles += [
            Tile(int(row), f"{rank}: {similarity:.3f}")
            for rank, (row, similarity) in enumerate(
                zip(result.rows[:shown], result.similarities[:shown], strict=True), start=1
            )
        ]
        heading = vectors.paths[result.query]
        sections.append(Section(heading, tuple(tiles), len(result.rows) - shown))
    title = f"Nearest neighbours in {vectors.file.name}"
    return Sheet("neighbors", title, tuple(facts), tuple(sections), queries, "queries")


def duplicates_sheet(
    vectors: Vectors, groups: Sequence[Group], limit: int, facts: Iterable[str]
) -> Sheet:
    """A section per group, biggest first: its images, each with its similarity to the first."""
    sections = []
    for number, group in enumerate(groups[:limit], start=1):
        shown = min(len(group.rows), TILES_PER_SECTION)
        tiles = tuple(
            Tile(int(row), "first" if index == 0 else f"{similarity:.3f}")
            for index, (row, similarity) in enumerate(
                zip(group.rows[:shown], group.similarities[:shown], strict=True)
            )
        )
        heading = f"Group {number}: {len(group.rows):,} images"
        sections.append(Section(heading, tiles, len(group.rows) - shown))
    title = f"Near-duplicates in {vectors.file.name}"
    return Sheet("duplicates", title, tuple(facts), tuple(sections), len(groups), "groups")


def clusters_sheet(
    vectors: Vectors, clustering: Clustering, limit: int, facts: Iterable[str]
) -> Sheet:
    """A section per cluster, biggest first: its images nearest its centre."""
    sections = []
    for cluster in range(min(limit, len(clustering.sizes))):
        nearest = clustering.nearest_centre(cluster, TILES_PER_SECTION)
        tiles = tuple(Tile(int(row), f"{clustering.distances[row]:.3f}") for row in nearest)
        size = int(clustering.sizes[cluster])
        heading = f"Cluster {cluster + 1}: {size:,} image{'s' if size != 1 else ''}"
        sections.append(Section(heading, tiles, size - len(tiles)))
    title = f"Clusters in {vectors.file.name}"
    count = len(clustering.sizes)
    return Sheet("clusters", title, tuple(facts), tuple(sections), count, "clusters")


def write_sheet(
    sheet: Sheet, target: Path, vectors: Vectors, on_step: OnStep = ignore
) -> list[Path]:
    """Write ``sheet`` to ``target`` (and ``<stem>-2.html`` ... where it takes more than
    one page); returns the pages written.

    Every page is written under a temporary name first and then all are renamed
    into place together, Ctrl-C held meanwhile: a stopped run leaves the sheet
    it found. Pages of an earlier, longer sheet of the same name are removed.
    """
    rows = sorted({tile.row for section in sheet.sections for tile in section.tiles})
    thumbnails = _thumbnails(vectors, rows, on_step)
    pages = _paged(sheet.sections)
    names = [target] + [_page_name(target, number) for number in range(2, len(pages) + 1)]
    written: list[tuple[Path, Path]] = []
    try:
        first = 1
        for number, (page, name) in enumerate(zip(pages, names, strict=True)):
            text = _page(sheet, page, first, number, [n.name for n in names], vectors, thumbnails)
            temporary = temporary_name(name)
            written.append((temporary, name))
            write_atomically(
                temporary, partial(_write, text=text), name, "the sheet is not written"
            )
            first += len(page)
        with signals_deferred():
            for temporary, name in written:
                os.replace(temporary, name)
            _remove_stale_pages(target, len(pages))
    finally:
        for temporary, _ in written:
            temporary.unlink(missing_ok=True)
    return names


NOT_WRITTEN = "the sheet is not written"


def _page_name(target: Path, number: int) -> Path:
    return target.with_name(f"{target.stem}-{number}{target.suffix}")


def _remove_stale_pages(target: Path, pages: int) -> None:
    """Remove ``<stem>-N.html`` pages after the last, while they are sheets of vggfeat's."""
    number = pages + 1
    while True:
        page = _page_name(target, number)
        try:
            with page.open("rb") as file:
                head = file.read(1024)
        except OSError:
            return
        if GENERATOR.encode() not in head:
            return
        page.unlink(missing_ok=True)
        number += 1


def _write(file: IO[bytes], *, text: str) -> None:
    file.write(text.encode("utf-8"))


def _thumbnails(vectors: Vectors, rows: list[int], on_step: OnStep) -> dict[int, Thumbnail | str]:
    """Each row's thumbnail, or why it has none: made on threads (Pillow decodes
    without the GIL)."""
    made: dict[int, Thumbnail | str] = {}

    def make(row: int) -> tuple[int, Thumbnail | str]:
        location = vectors.locate(row)
        if location is None:
            return row, "image not found"
        return row, thumbnail(location, THUMBNAIL_SIDE)

    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        for row, outcome in pool.map(make, rows):
            made[row] = outcome
            if len(made) % 64 == 0 or len(made) == len(rows):
                on_step(Step("thumbnails", len(made), len(rows), "images"))
    finally:
        pool.shutdown(cancel_futures=True)  # on Ctrl-C, the images not begun are not made
    return made


def _paged(sections: Sequence[Section]) -> list[list[Section]]:
    """The sections cut into pages of at most ``THUMBNAILS_PER_PAGE`` thumbnails (a
    section is never split; one bigger than that has a page of its own)."""
    pages: list[list[Section]] = [[]]
    held = 0
    for section in sections:
        if pages[-1] and held + len(section.tiles) > THUMBNAILS_PER_PAGE:
            pages.append([])
            held = 0
        pages[-1].append(section)
        held += len(section.tiles)
    return pages


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.4em; margin: 0 0 .3em; }
h2 { font-size: 1.05em; margin: 1.2em 0 .4em; overflow-wrap: anywhere; }
header p { margin: .2em 0; color: #555; }
p.cap { color: #8a4b00; }
nav { margin: .8em 0; }
nav a, nav span { margin-right: .8em; }
.tiles { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; width: 136px; background: #fff; border: 1px solid #ddd; padding: 4px; }
figure.query { border-color: #2a6; }
figure img { display: block; margin: 0 auto; max-width: 128px; max-height: 128px; }
.placeholder { height: 96px; display: flex; align-items: center; justify-content: center;
  text-align: center; background: #eee; color: #900; font-size: 12px; padding: 2px; }
figcaption { font-size: 11px; margin-top: 3px; }
figcaption .score { font-weight: 600; display: block; }
figcaption .name, figcaption .folder { display: block; overflow: hidden;
  text-overflow: ellipsis; white-space: nowrap; }
figcaption .folder { color: #777; }
figure.broken { border-color: #c33; }
p.more { color: #555; font-size: 12px; margin: .3em 0 0; }
"""

#: Marks each thumbnail decoded or broken once the page has loaded, and counts them on
#: <body data-thumbnails>: a page whose images did not all arrive says so.
SCRIPT = """
addEventListener("load", () => {
  let decoded = 0, broken = 0;
  for (const image of document.images) {
    const ok = image.complete && image.naturalWidth > 0;
    image.closest("figure").classList.add(ok ? "decoded" : "broken");
    if (ok) { decoded++; } else { broken++; }
  }
  document.body.dataset.thumbnails = decoded + " decoded, " + broken + " broken";
});
"""


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


#: How a page says it is a sheet of vggfeat's (an older, longer sheet's pages are removed).
GENERATOR = '<meta name="generator" content="vggfeat contact sheet">'

#: Nothing but the page's own style and script, and images inside the page.
POLICY = f"default-src 'none'; img-src data:; style-src {_hash(STYLE)}; script-src {_hash(SCRIPT)}"


def _page(
    sheet: Sheet,
    sections: Sequence[Section],
    first: int,
    number: int,
    names: Sequence[str],
    vectors: Vectors,
    thumbnails: dict[int, Thumbnail | str],
) -> str:
    e = _escaped
    last = first + len(sections) - 1
    lines = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        GENERATOR,
        f"<title>{e(sheet.title)}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        f'<body data-kind="{sheet.kind}">',
        "<header>",
        f"<h1>{e(sheet.title)}</h1>",
        *(f"<p>{e(fact)}</p>" for fact in sheet.facts),
        f'<p class="shown">{e(_shown(sheet, first, last))}</p>',
        *_cap(sheet),
        "</header>",
        *_navigation(number, names),
        "<main>",
    ]
    for section in sections:
        lines.append("<section>")
        lines.append(f"<h2>{e(section.heading)}</h2>")
        lines.append('<div class="tiles">')
        lines += [_figure(tile, vectors, thumbnails[tile.row]) for tile in section.tiles]
        lines.append("</div>")
        if section.more:
            lines.append(f'<p class="more">and {section.more:,} more, not shown</p>')
        lines.append("</section>")
    lines += ["</main>", *_navigation(number, names), f"<script>{SCRIPT}</script>"]
    lines += ["</body>", "</html>", ""]
    return "\n".join(lines)


def _shown(sheet: Sheet, first: int, last: int) -> str:
    if not sheet.found:
        return f"No {sheet.noun} found."
    if last < first:
        return f"No {sheet.noun} shown."
    if first == last:
        return f"{SINGULAR[sheet.noun].capitalize()} {first:,} of {sheet.found:,}."
    return f"{sheet.noun.capitalize()} {first:,} to {last:,} of {sheet.found:,}."


SINGULAR = {"queries": "query", "groups": "group", "clusters": "cluster"}


def _cap(sheet: Sheet) -> list[str]:
    if len(sheet.sections) >= sheet.found:
        return []
    return [
        f'<p class="cap">This sheet shows the first {len(sheet.sections):,} of '
        f"{sheet.found:,} {sheet.noun}, to stay quick to open; the command's output "
        "lists them all, and --html-limit shows more.</p>"
    ]


def _navigation(number: int, names: Sequence[str]) -> list[str]:
    if len(names) == 1:
        return []
    links = [
        f"<span>page {index + 1}</span>"
        if index == number
        else f'<a href="{_escaped(name)}">page {index + 1}</a>'
        for index, name in enumerate(names)
    ]
    return [f"<nav>{' '.join(links)}</nav>"]


def _figure(tile: Tile, vectors: Vectors, made: Thumbnail | str) -> str:
    e = _escaped
    path = vectors.paths[tile.row]
    query = ' class="query"' if tile.query else ""
    folder, name = os.path.split(path)
    caption = (
        f'<figcaption title="{e(path)}"><span class="score">{e(tile.caption)}</span>'
        f'<span class="name">{e(name)}</span><span class="folder">{e(folder)}</span>'
        "</figcaption>"
    )
    if isinstance(made, str):
        return f'<figure class="gone"><div class="placeholder">{e(made)}</div>{caption}</figure>'
    data = base64.b64encode(made.jpeg).decode("ascii")
    return (
        f'<figure{query}><img src="data:image/jpeg;base64,{data}" alt="{e(path)}" '
        f'width="{made.width}" height="{made.height}">{caption}</figure>'
    )


def _escaped(text: str) -> str:
    """``text`` as HTML text or an attribute value: markup escaped, a control character
    shown as ``\\xNN`` (a name is shown as the file stores it, backslashes and all)."""
    visible = "".join(
        f"\\x{ord(c):02x}" if ord(c) < 32 or 127 <= ord(c) < 160 else c for c in storable(text)
    )
    return html.escape(visible, quote=True)
