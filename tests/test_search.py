"""``vggfeat neighbors``, ``duplicates`` and ``clusters`` against independent references:
brute-force NumPy for the neighbours, a union-find over the exact pairs for the groups,
scikit-learn's KMeans for the clusters; and the command line's outputs, refusals and pipes."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import clustered, write_features
from vggfeat.cli import cli
from vggfeat.search import DuplicateSearch, NeighborSearch, kmeans, read_vectors
from vggfeat.search import duplicates as duplicates_module

faiss = pytest.importorskip("faiss", reason="faiss comes with the 'test' extra")
ROOT = Path(__file__).resolve().parent.parent


def unit(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def brute_neighbors(rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k most similar other rows by cosine, in float64: (N, k) rows and sims."""
    x = unit(rows)
    similarity = x @ x.T
    np.fill_diagonal(similarity, -np.inf)
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(similarity, order, axis=1)


def reference_groups(rows: np.ndarray, threshold: float) -> list[list[int]]:
    """Connected components of the exact pairs at ``threshold`` or above, by a plain
    union-find over every pair, biggest first; each sorted."""
    x = unit(rows).astype(np.float32)
    similarity = x @ x.T
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(similarity >= np.float32(threshold), k=1)), strict=True):
        parent[find(int(i))] = find(int(j))
    components: dict[int, list[int]] = {}
    for i in range(len(rows)):
        components.setdefault(find(i), []).append(i)
    groups = [sorted(c) for c in components.values() if len(c) > 1]
    return sorted(groups, key=lambda g: (-len(g), g[0]))


def named(count: int) -> list[str]:
    return [f"photos/{index:05d}.jpg" for index in range(count)]


@pytest.fixture(scope="module")
def spread_file(tmp_path_factory):
    """600 rows of 24 values in 30 clusters: no two rows alike, so neighbours are a set."""
    rows = clustered(600, 24, 30, spread=0.8, seed=1)
    path = write_features(tmp_path_factory.mktemp("spread") / "f.h5", named(600), rows)
    return path, rows


def test_exact_neighbors_are_numpys_brute_force(spread_file):
    path, rows = spread_file
    vectors = read_vectors(path)
    found = list(NeighborSearch(vectors, 7, search="exact"))
    expected_rows, expected_sims = brute_neighbors(rows, 7)
    assert [f.query for f in found] == list(range(600))
    for result in found:
        assert set(result.rows.tolist()) == set(expected_rows[result.query].tolist())
        np.testing.assert_allclose(result.similarities, expected_sims[result.query], atol=1e-5)
        assert np.all(np.diff(result.similarities) <= 1e-7)  # most similar first


def test_approximate_neighbors_keep_their_recall_and_say_it(tmp_path):
    rows = clustered(3000, 32, 60, spread=0.6, seed=2)
    path = write_features(tmp_path / "f.h5", named(3000), rows)
    search = NeighborSearch(read_vectors(path), 10, search="approximate")
    report = search.index.report
    assert report.kind == "ivf" and report.lists > 1 and 1 <= report.probes <= report.lists
    found = list(search)
    expected_rows, _ = brute_neighbors(rows, 10)
    x = unit(rows)
    hits = 0
    for result in found:
        # Every similarity given is the true one of that pair, whatever the index found.
        true = x[result.rows] @ x[result.query]
        np.testing.assert_allclose(result.similarities, true, atol=1e-5)
        hits += len(set(result.rows.tolist()) & set(expected_rows[result.query].tolist()))
    recall = hits / (10 * len(found))
    assert recall >= 0.95
    assert report.recall is not None and abs(report.recall - recall) < 0.03


def test_neighbors_of_some_rows_however_their_paths_are_spelt(spread_file, monkeypatch):
    path, rows = spread_file
    folder = path.parent
    monkeypatch.chdir(folder / "..")
    spelt = [
        "photos/00003.jpg",  # as stored
        "photos/00003.jpg",
        str(folder / "photos" / ".." / "photos" / "00010.jpg"),  # absolute, with ..
        os.path.join(folder.name, "photos", "00020.jpg"),  # relative to here, not to the file
    ]
    result = CliRunner().invoke(
        cli, ["neighbors", str(path), "-k", "3", *(f"--of={p}" for p in spelt)]
    )
    assert result.exit_code == 0, result.output
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    expected_rows, expected_sims = brute_neighbors(rows, 3)
    # Each image once, however often it is named.
    assert [line[0] for line in lines] == [named(600)[q] for q in (3, 10, 20) for _ in range(3)]
    for (_, rank, neighbour, similarity), q, r in zip(
        lines, np.repeat([3, 10, 20], 3), [0, 1, 2] * 3, strict=True
    ):
        assert int(rank) == r + 1
        assert neighbour == named(600)[expected_rows[q, r]]
        assert abs(float(similarity) - expected_sims[q, r]) < 1e-5


def test_neighbors_jsonl_is_one_object_per_query(spread_file):
    path, rows = spread_file
    result = CliRunner().invoke(cli, ["neighbors", str(path), "-k", "2", "--format", "jsonl"])
    assert result.exit_code == 0
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    expected_rows, expected_sims = brute_neighbors(rows, 2)
    assert len(objects) == 600
    for query, found in enumerate(objects):
        assert found["path"] == named(600)[query]
        assert [n["rank"] for n in found["neighbors"]] == [1, 2]
        assert [n["path"] for n in found["neighbors"]] == [
            named(600)[r] for r in expected_rows[query]
        ]
        got = [n["similarity"] for n in found["neighbors"]]
        np.testing.assert_allclose(got, expected_sims[query], atol=1e-5)


def near_duplicates(seed: int = 3) -> np.ndarray:
    """400 rows: most stand alone, some in near-duplicate chains (a~b, b~c, a not ~ c)."""
    rng = np.random.default_rng(seed)
    rows = unit(rng.standard_normal((400, 48))).astype(np.float32)
    for start in range(0, 120, 6):  # 20 chains of 4 rows, each a small step from the last
        for step in range(1, 4):
            nudge = rng.standard_normal(48).astype(np.float32) * 0.045
            rows[start + step] = unit((rows[start + step - 1] + nudge)[None])[0]
    rows[200:203] = rows[300]  # exact copies, including of a row after them
    return rows


@pytest.mark.parametrize("search", ["exact", "approximate"])
def test_duplicate_groups_are_the_union_find_of_the_exact_pairs(tmp_path, search):
    rows = near_duplicates()
    path = write_features(tmp_path / "f.h5", named(400), rows)
    expected = reference_groups(rows, 0.96)
    assert len(expected) >= 10 and any(len(g) > 2 for g in expected)  # chains were linked
    groups = DuplicateSearch(read_vectors(path), 0.96, search=search).groups()
    assert [g.rows.tolist() for g in groups] == expected
    x = unit(rows)
    for group in groups:
        np.testing.assert_allclose(group.similarities, x[group.rows] @ x[group.rows[0]], atol=1e-5)


def test_an_approximate_search_keeps_a_dense_group_whole(tmp_path):
    # 3,000 copies of one direction, a little apart: one group, every pair linked. Tuned
    # on recall@10, one probed list would do, and the group would split.
    rng = np.random.default_rng(10)
    rows = np.ones((3000, 32), np.float32)
    rows[:, :8] += rng.standard_normal((3000, 8)).astype(np.float32) * 0.01
    assert (unit(rows) @ unit(rows).T).min() > 0.99
    path = write_features(tmp_path / "f.h5", named(3000), rows)
    search = DuplicateSearch(read_vectors(path), 0.99, search="approximate")
    groups = search.groups()
    assert [g.rows.tolist() for g in groups] == [list(range(3000))]
    assert search.index.report.kind == "ivf"
    assert search.index.report.measured == "pairs at 0.99 or above found"


def test_a_pair_exactly_at_the_threshold_is_a_duplicate(tmp_path):
    rows = np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 0, 1]], np.float32)
    path = write_features(tmp_path / "f.h5", named(3), rows)
    groups = DuplicateSearch(read_vectors(path), 0.6).groups()
    assert [g.rows.tolist() for g in groups] == [[0, 1]]
    assert DuplicateSearch(read_vectors(path), 0.61).groups() == []


def test_union_find_agrees_with_a_plain_one_on_random_graphs():
    rng = np.random.default_rng(4)
    for _ in range(20):
        count = int(rng.integers(2, 300))
        pairs = rng.integers(0, count, (int(rng.integers(0, 400)), 2))
        parent = np.arange(count)
        for chunk in np.array_split(pairs, 3):  # batches, as a search gives them
            duplicates_module.union(parent, chunk[:, 0], chunk[:, 1])
        roots = duplicates_module.flatten(parent)
        plain = list(range(count))

        def find(i: int, plain=plain) -> int:
            while plain[i] != i:
                i = plain[i]
            return i

        for a, b in pairs:
            plain[find(int(a))] = find(int(b))
        for a in range(count):
            for b in rng.integers(0, count, 5):
                assert (roots[a] == roots[b]) == (find(a) == find(int(b)))


def test_kmeans_inertia_is_scikit_learns_within_2_percent():
    from sklearn.cluster import KMeans

    x = unit(clustered(3000, 24, 12, spread=0.7, seed=5)).astype(np.float32)
    ours = kmeans(x, 12, seed=0)
    reference = KMeans(n_clusters=12, n_init=10, random_state=0).fit(x)
    assert ours.inertia <= 1.02 * reference.inertia_
    assert ours.inertia >= 0.98 * reference.inertia_
    # The inertia is what the labels and centres say it is, and each row is at its nearest.
    distances = np.linalg.norm(x[:, None, :] - ours.centres[None, :, :], axis=2)
    assert np.array_equal(ours.labels, distances.argmin(axis=1))
    np.testing.assert_allclose(ours.distances, distances.min(axis=1), atol=1e-4)
    assert abs(ours.inertia - float((distances.min(axis=1) ** 2).sum())) < 1e-3 * ours.inertia
    assert np.all(np.diff(ours.sizes) <= 0) and ours.sizes.sum() == 3000
    assert np.array_equal(np.bincount(ours.labels), ours.sizes)


def test_clusters_output_is_numbered_by_size_nearest_the_centre_first(spread_file):
    path, rows = spread_file
    result = CliRunner().invoke(cli, ["clusters", str(path), "--clusters", "5", "--seed", "1"])
    assert result.exit_code == 0, result.output
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert sorted(line[0] for line in lines) == sorted(named(600))
    labels = [int(line[1]) for line in lines]
    assert labels == sorted(labels) and set(labels) == {1, 2, 3, 4, 5}
    sizes = np.bincount(labels)[1:]
    assert np.all(np.diff(sizes) <= 0)
    x = unit(rows)
    row_of = {name: index for index, name in enumerate(named(600))}
    for cluster in range(1, 6):
        members = [line for line in lines if int(line[1]) == cluster]
        centre = x[[row_of[m[0]] for m in members]].mean(axis=0)
        distances = [float(m[2]) for m in members]
        assert distances == sorted(distances)
        expected = np.linalg.norm(x[[row_of[m[0]] for m in members]] - centre, axis=1)
        np.testing.assert_allclose(distances, expected, atol=1e-4)


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_refusals_are_one_line_with_their_exit_codes(tmp_path, spread_file):
    path, _ = spread_file
    empty = write_features(tmp_path / "empty.h5", [], np.zeros((0, 8), np.float32))
    write_features(tmp_path / "one.h5", named(1), np.ones((1, 8), np.float32))
    fifo = tmp_path / "pipe.html"
    os.mkfifo(fifo)
    cases = [
        (("neighbors", str(empty)), 1, "holds no rows of fc7"),
        (("duplicates", str(empty)), 1, "holds no rows of fc7"),
        (("neighbors", str(path), "-k", "600"), 2, "give -k 599 or less"),
        (("neighbors", str(path), "-k", "0"), 2, "-k 0: give 1 or more"),
        (("neighbors", str(path), "--of", "nowhere.jpg"), 2, "--of nowhere.jpg: not a row"),
        (("duplicates", str(path), "--threshold", "1.5"), 2, "between -1 and 1"),
        (("duplicates", str(path), "--threshold", "-1.01"), 2, "between -1 and 1"),
        (("clusters", str(path), "--clusters", "601"), 2, "give --clusters 600 or less"),
        (("clusters", str(path), "--clusters", "0"), 2, "give 1 or more"),
        (("neighbors", str(path), "--layer", "fc6"), 2, "holds fc7"),
        (("neighbors", str(tmp_path / "missing.h5")), 1, "does not exist"),
        (("neighbors", str(path), "--html", str(path)), 2, "features file"),
        (("neighbors", str(path), "--html", str(tmp_path / "new") + "/"), 2, "not a folder"),
        (("clusters", str(path), "--clusters", "2", "--html", "no/such/s.html"), 2, "not exist"),
        (("neighbors", str(path), "--html", "/dev/null"), 2, "name an .html page"),
        (("neighbors", str(path), "--html", str(path.parent / "photo.jpg")), 2, ".html page"),
        (("neighbors", str(path), "--html", str(fifo)), 2, "not a regular file"),
        (("neighbors", str(tmp_path / "one.h5")), 2, "no other row to be its neighbour"),
    ]
    for args, code, words in cases:
        result = invoke(*args)
        assert result.exit_code == code, (args, result.output)
        assert words in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.output


def test_without_faiss_one_line_says_how_to_install_it_and_clusters_work(spread_file, monkeypatch):
    path, _ = spread_file
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    for command in ("neighbors", "duplicates"):
        result = invoke(command, str(path))
        assert result.exit_code == 1
        assert result.stderr.strip() == (
            "Error: searching features needs faiss: pip install faiss-cpu"
        )
    assert invoke("clusters", str(path), "--clusters", "2").exit_code == 0  # NumPy alone


def test_a_reader_that_goes_away_is_not_an_error_and_the_sheet_is_still_written(tmp_path):
    rows = clustered(2000, 8, 40, spread=0.5, seed=6)
    path = write_features(tmp_path / "f.h5", named(2000), rows)
    sheet = tmp_path / "sheet.html"
    for extra in ([], ["--html", str(sheet), "--html-limit", "3"]):
        process = subprocess.Popen(
            [sys.executable, "-m", "vggfeat", "neighbors", str(path), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert process.stdout is not None and process.stderr is not None
        assert process.stdout.readline().startswith(b"photos/00000.jpg\t1\t")
        process.stdout.close()
        error = process.stderr.read().decode()
        assert process.wait(timeout=120) == 0, error
        assert "Traceback" not in error and "Error" not in error
    text = sheet.read_text()
    assert text.count("<section>") == 3 and "image not found" in text  # no photos here


def test_faiss_says_nothing_of_its_own_on_a_small_file(tmp_path):
    path = write_features(tmp_path / "f.h5", named(15), clustered(15, 8, 3, spread=0.5))
    result = subprocess.run(
        [sys.executable, "-m", "vggfeat", "duplicates", str(path), "--search", "approximate",
         "--verbose"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0
    # Too few rows for two lists of an IVF index: searched exactly, and said so.
    assert result.stderr.splitlines()[0] == "Search: exact inner-product search over 15 rows of 8."
    assert "WARNING" not in result.stderr and len(result.stderr.splitlines()) == 2


def test_a_closed_standard_output_is_refused_unless_a_sheet_is_asked_for(spread_file, tmp_path):
    path, _ = spread_file
    errors = []
    for html, code in (([], 1), (["--html", str(tmp_path / "s.html")], 0)):
        result = subprocess.run(
            [sys.executable, "-m", "vggfeat", "neighbors", str(path), "-q", *html],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120,
            preexec_fn=lambda: os.close(1),
        )  # fmt: skip
        assert result.returncode == code, result.stderr
        errors.append(result.stderr)
    assert errors == [
        "Error: standard output is closed, so the results would be lost: redirect it to a "
        "file, or give --html\n",
        "",
    ]
    assert (tmp_path / "s.html").is_file()


def test_a_full_disk_on_standard_output_is_one_line(spread_file):
    path, _ = spread_file
    with open("/dev/full", "wb") as full:
        result = subprocess.run(
            [sys.executable, "-m", "vggfeat", "neighbors", str(path), "-q"],
            stdout=full, stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == "Error: cannot write standard output: No space left on device\n"


def test_progress_on_a_terminal_draws_each_stage(tmp_path):
    rows = clustered(3000, 16, 30, spread=0.5, seed=9)
    path = write_features(tmp_path / "f.h5", named(3000), rows)
    for command in (["duplicates", "--search", "approximate"], ["neighbors", "--html", "s.html"]):
        primary, secondary = pty.openpty()
        shown = bytearray()
        reader = threading.Thread(target=drain, args=(primary, shown))
        reader.start()
        try:
            result = subprocess.run(
                [sys.executable, "-m", "vggfeat", command[0], str(path), *command[1:]],
                stdout=subprocess.DEVNULL, stderr=secondary, cwd=tmp_path, timeout=120,
            )  # fmt: skip
        finally:
            os.close(secondary)
            reader.join(timeout=30)
            os.close(primary)
        text = shown.decode(errors="replace")
        assert result.returncode == 0, text
        assert "Traceback" not in text and "reading" in text


def drain(descriptor: int, into: bytearray) -> None:
    """Read a terminal until it closes, so that the program writing to it never blocks."""
    while True:
        try:
            chunk = os.read(descriptor, 4096)
        except OSError:
            return
        if not chunk:
            return
        into.extend(chunk)


def test_search_commands_never_import_a_backend(spread_file):
    path, _ = spread_file
    code = (
        "import sys\n"
        "from vggfeat.cli import cli\n"
        f"cli(['neighbors', {str(path)!r}, '-k', '2'], standalone_mode=False)\n"
        f"cli(['clusters', {str(path)!r}, '--clusters', '3'], standalone_mode=False)\n"
        "print(sorted(m for m in ('tensorflow', 'keras', 'jax') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"


def test_rows_without_a_direction_are_left_out_and_named(tmp_path):
    rows = clustered(50, 8, 5, spread=0.5, seed=7)
    rows[7] = np.nan
    rows[9] = 0
    path = write_features(tmp_path / "f.h5", named(50), rows)
    result = invoke("neighbors", str(path), "-k", "3")
    assert result.exit_code == 0
    assert (
        "2 rows of fc7 have no direction (all zeros, or NaN or an infinity) and are left out, "
        "the first: photos/00007.jpg"
    ) in result.stderr
    assert "photos/00007.jpg" not in result.stdout and "photos/00009.jpg" not in result.stdout
    assert len(result.stdout.splitlines()) == 48 * 3
    result = invoke("neighbors", str(path), "-k", "48")
    assert result.exit_code == 2
    assert "holds 48 rows to compare (2 more have no direction)" in result.stderr
    result = invoke("clusters", str(path), "--clusters", "49")
    assert result.exit_code == 2
    assert "holds 48 rows to compare (2 more have no direction); give --clusters 48" in (
        result.stderr
    )


def test_a_terminated_search_says_so_and_leaves_no_sheet_behind(tmp_path):
    # An exact search of 60,000 rows of 512: 1.8e12 multiply-adds, seconds on any CPU.
    rows = clustered(60_000, 512, 200, spread=0.8, seed=8)
    path = write_features(tmp_path / "f.h5", named(60_000), rows)
    process = subprocess.Popen(
        [sys.executable, "-m", "vggfeat", "neighbors", str(path), "--search", "exact",
         "--html", str(tmp_path / "sheet.html")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    # Once it holds the rows and the index's copy of them, it is searching.
    while resident_bytes(process.pid) < 2 * rows.nbytes and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)  # Ctrl-C is the command group's, tested with extract
    assert process.wait(timeout=60) == 143
    assert process.stderr is not None
    error = process.stderr.read().decode()
    assert error.strip().splitlines()[-1] == "Stopped." and "Traceback" not in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5"]


def resident_bytes(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = [line for line in status.splitlines() if line.startswith("VmRSS:")]
    return int(found[0].split()[1]) * 1024 if found else 0


def test_the_python_api_refuses_misuse_naming_what_to_pass(spread_file):
    path, rows = spread_file
    vectors = read_vectors(path)
    nan = unit(rows[:10]).astype(np.float32)
    nan[0] = np.nan
    cases = [
        (lambda: kmeans(vectors, clusters=2), TypeError, "read_vectors(...).rows"),
        (lambda: kmeans([[1.0, 0.0]], clusters=1), TypeError, "not list"),
        (lambda: kmeans(vectors.rows[0], clusters=1), TypeError, "shape (24,)"),
        (lambda: kmeans(nan, clusters=2), ValueError, "NaN or an infinity"),
        (lambda: kmeans(vectors.rows[:0], clusters=1), ValueError, "more than the 0 rows"),
        (lambda: kmeans(vectors.rows, clusters=2.5), ValueError, "clusters=2.5"),
        (lambda: NeighborSearch(vectors.rows, k=2), TypeError, "read_vectors(path)"),
        (lambda: NeighborSearch(vectors, k=2.5), TypeError, "k=2.5"),
        (lambda: DuplicateSearch(vectors.rows, 0.9), TypeError, "read_vectors(path)"),
        (lambda: read_vectors(""), ValueError, "no file named"),
    ]
    for call, error, words in cases:
        with pytest.raises(error) as raised:
            call()
        assert words in str(raised.value)
