"""Contact sheets, rendered by a real browser: Debian's Chromium, headless, loads each kind
of sheet made from the sample photos; the DOM it built says every thumbnail decoded and a
hostile file name stayed text. A screenshot of each is kept in ``test-artifacts/``."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps

from tests.conftest import write_features
from vggfeat import sheet as sheet_module
from vggfeat.cli import cli
from vggfeat.images import thumbnail

pytest.importorskip("faiss", reason="faiss comes with the 'test' extra")

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("VGGFEAT_TEST_ARTIFACTS", ROOT / "test-artifacts"))
#: File names that are markup: the first as the issue gives it, the second one whose
#: script, were it ever run, would leave a mark on the page that the test looks for.
HOSTILE = [
    "<img src=x onerror=alert(1)>.jpg",
    "<img src=x onerror=document.body.dataset.pwned=1>.jpg",
]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The sample photos, a copy of one under each hostile name, and a row whose image
    is gone; features that make the copies duplicates of each other."""
    work = tmp_path_factory.mktemp("sheets")
    shutil.copytree(ROOT / "sample_images", work / "photos", ignore=shutil.ignore_patterns("*.md"))
    for name in HOSTILE:
        shutil.copy(work / "photos" / "earth" / "chelsea.jpg", work / "photos" / name)
    found = sorted(str(p.relative_to(work)) for p in (work / "photos").rglob("*.jpg"))
    paths = [*found, "photos/gone.jpg"]
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((len(paths), 16)).astype(np.float32)
    cat = paths.index("photos/earth/chelsea.jpg")
    for name in HOSTILE:
        rows[paths.index(f"photos/{name}")] = rows[cat] + 0.01 * rng.standard_normal(16)
    return write_features(work / "features.h5", paths, rows), paths


def make(kind: str, features: Path, *options: str) -> Path:
    page = features.parent / f"{kind}.html"
    result = CliRunner().invoke(cli, [kind, str(features), "--html", str(page), *options])
    assert result.exit_code == 0, result.output
    return page


class Page(HTMLParser):
    """What a page holds: its elements' tags and attributes, and its text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str) -> list[dict[str, str | None]]:
        return [attributes for name, attributes in self.elements if name == tag]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("Debian's chromium is not installed here (.ci/run installs it)")
    return found


def render(page: Path, tmp_path: Path, screenshot: Path) -> Page:
    """The DOM Chromium built from ``page`` once loaded, scripts run; and a screenshot."""
    flags = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}", "--hide-scrollbars",
    ]  # fmt: skip
    dom = subprocess.run(
        [*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    shot = subprocess.run(
        [*flags, "--window-size=1200,900", f"--screenshot={screenshot}", page.as_uri()],
        capture_output=True,
        timeout=120,
    )
    assert shot.returncode == 0 and Image.open(screenshot).size == (1200, 900)
    return Page(dom.stdout)


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("neighbors", ["-k", "4"]),
        ("duplicates", ["--threshold", "0.99"]),
        ("clusters", ["--clusters", "3"]),
    ],
)
def test_each_sheet_renders_in_a_browser_with_every_thumbnail_decoded(
    photos, tmp_path, kind, options
):
    features, _ = photos
    page = make(kind, features, *options)
    source = Page(page.read_text())
    images = len(source.all("img"))
    gone = sum(1 for f in source.all("figure") if f.get("class") == "gone")
    assert images > 0

    rendered = render(page, tmp_path, ARTIFACTS / f"sheet-{kind}.png")

    body = rendered.all("body")[0]
    assert body.get("data-thumbnails") == f"{images} decoded, 0 broken"
    assert "data-pwned" not in body  # the hostile name's script never ran
    # Every image Chromium built is a thumbnail of ours: no name became an element.
    built = rendered.all("img")
    assert len(built) == images
    assert all(str(i["src"]).startswith("data:image/jpeg;base64,") for i in built)
    assert not any("onerror" in attributes for _, attributes in rendered.elements)
    text = "".join(rendered.text)
    shown = [name for name in HOSTILE if name in text]
    if kind != "clusters":  # every row is a query, or the copies are a group
        assert shown == HOSTILE
    if kind == "neighbors":
        titles = {caption.get("title") for caption in rendered.all("figcaption")}
        assert gone >= 1 and "photos/gone.jpg" in titles
    assert len(rendered.all("figure")) == images + gone


def test_a_gone_or_broken_image_is_a_placeholder_naming_it(tmp_path):
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "photos" / "red.jpg")
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "photos" / "a folder.jpg").mkdir()
    shutil.copy(tmp_path / "photos" / "red.jpg", tmp_path / "photos" / "back\\slash.jpg")
    paths = ["photos/red.jpg", "photos/broken.jpg", "photos/gone.jpg", "photos/a folder.jpg",
             "photos/back\\slash.jpg"]  # fmt: skip
    rows = np.array([[1, 0], [1, 0.01], [1, 0.02], [1, 0.03], [1, 0.04]], np.float32)
    features = write_features(tmp_path / "f.h5", paths, rows)
    page = Page(make("duplicates", features).read_text())
    figures = page.all("figure")
    assert [f.get("class") for f in figures] == [None, "gone", "gone", "gone", None]
    # Each name as the file stores it: a backslash is one backslash.
    assert [c.get("title") for c in page.all("figcaption")] == paths
    text = " ".join(page.text)
    assert "image not found" in text and "not an image in a supported format" in text
    assert "a folder, not an image" in text


def test_large_sheets_are_capped_and_paged_and_say_so(tmp_path, monkeypatch):
    (tmp_path / "photos").mkdir()
    paths = []
    for index in range(40):
        Image.new("RGB", (20, 20), (index * 6, 0, 0)).save(tmp_path / "photos" / f"{index}.png")
        paths.append(f"photos/{index}.png")
    rows = np.repeat(np.eye(20, dtype=np.float32), 2, axis=0)  # 20 pairs of duplicates
    features = write_features(tmp_path / "f.h5", paths, rows)
    monkeypatch.setattr(sheet_module, "THUMBNAILS_PER_PAGE", 10)
    first = make("duplicates", features, "--html-limit", "12")
    pages = [first] + [tmp_path / f"duplicates-{n}.html" for n in (2, 3)]
    assert all(p.exists() for p in pages) and not (tmp_path / "duplicates-4.html").exists()
    sections = 0
    for number, page in enumerate(pages, start=1):
        text = page.read_text()
        parsed = Page(text)
        sections += len(parsed.all("section"))
        assert "This sheet shows the first 12 of 20 groups" in text
        links = [a["href"] for a in parsed.all("a")]
        assert links == 2 * [p.name for p in pages if p != page]  # above and below
        assert f"<span>page {number}</span>" in text
    assert sections == 12
    # A shorter sheet of the same name: the earlier pages after its last go, but not a
    # page that vggfeat did not write.
    pages[2].write_text("<p>my own notes</p>")
    make("duplicates", features, "--html-limit", "4")
    assert first.exists() and not pages[1].exists()
    assert pages[2].read_text() == "<p>my own notes</p>"
    assert "Groups 1 to 4 of 20." in first.read_text() and "<nav>" not in first.read_text()


def test_thumbnails_are_small_upright_jpegs(tmp_path):
    image = Image.new("RGB", (300, 200), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to show
    image.save(tmp_path / "turned.jpg", exif=exif)
    made = thumbnail(str(tmp_path / "turned.jpg"), 128)
    assert not isinstance(made, str)
    upright = ImageOps.exif_transpose(Image.open(tmp_path / "turned.jpg"))
    assert upright.size == (200, 300)
    decoded = Image.open(io.BytesIO(made.jpeg))
    assert decoded.format == "JPEG" and decoded.size == (made.width, made.height) == (85, 128)
