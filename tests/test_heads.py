"""Heads: none, SPoC, MAC, GeM and R-MAC against NumPy written from their definitions.

Every reference here is computed from the unpooled maps (``LAYER:none``) that
the same run stores next to the pooled ones. R-MAC's regions come from the
table below, worked out from the definition (Tolias et al., ICLR 2016, as the
authors' ``rmac_regions`` places them), not from the code under test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import vggfeat
from tests.test_extract import make_images
from vggfeat import network
from vggfeat.cli import cli
from vggfeat.errors import VggfeatError
from vggfeat.heads import rmac_regions
from vggfeat.pipeline import extract

ROOT = Path(__file__).resolve().parent.parent

#: R-MAC on an n x n map, levels 1-3: per level the regions' side and their offsets
#: along each axis (a square map has l x l regions at level l: every pair of offsets).
#: Level l: side floor(2n / (l + 1)), offsets floor(i * (n - side) / (l - 1)); a level
#: whose side is 0 has no regions.
SQUARE_REGIONS = {
    1: [(1, [0])],
    2: [(2, [0]), (1, [0, 1]), (1, [0, 0, 1])],
    3: [(3, [0]), (2, [0, 1]), (1, [0, 1, 2])],
    4: [(4, [0]), (2, [0, 2]), (2, [0, 1, 2])],
    5: [(5, [0]), (3, [0, 2]), (2, [0, 1, 3])],
    6: [(6, [0]), (4, [0, 2]), (3, [0, 1, 3])],
    7: [(7, [0]), (4, [0, 3]), (3, [0, 2, 4])],
    8: [(8, [0]), (5, [0, 3]), (4, [0, 2, 4])],
    9: [(9, [0]), (6, [0, 3]), (4, [0, 2, 5])],
    10: [(10, [0]), (6, [0, 4]), (5, [0, 2, 5])],
    11: [(11, [0]), (7, [0, 4]), (5, [0, 3, 6])],
    12: [(12, [0]), (8, [0, 4]), (6, [0, 3, 6])],
    13: [(13, [0]), (8, [0, 5]), (6, [0, 3, 7])],
    14: [(14, [0]), (9, [0, 5]), (7, [0, 3, 7])],
    15: [(15, [0]), (10, [0, 5]), (7, [0, 4, 8])],
    16: [(16, [0]), (10, [0, 6]), (8, [0, 4, 8])],
    17: [(17, [0]), (11, [0, 6]), (8, [0, 4, 9])],
    18: [(18, [0]), (12, [0, 6]), (9, [0, 4, 9])],
    19: [(19, [0]), (12, [0, 7]), (9, [0, 5, 10])],
    20: [(20, [0]), (13, [0, 7]), (10, [0, 5, 10])],
}


def square_regions(size: int) -> list[tuple[int, int, int]]:
    return [
        (top, left, side)
        for side, offsets in SQUARE_REGIONS[size]
        for top in offsets
        for left in offsets
    ]


def test_rmac_regions_of_square_maps_of_1_to_20_follow_the_definition():
    for size in SQUARE_REGIONS:
        assert rmac_regions(size, size, 3) == square_regions(size), size
    # The issue's own tables.
    assert len(square_regions(7)) == len(square_regions(14)) == 14
    assert square_regions(14)[1:5] == [(0, 0, 9), (0, 5, 9), (5, 0, 9), (5, 5, 9)]


def test_rmac_regions_of_oblong_maps_add_positions_along_the_longer_side():
    # 5 x 8: w = 5, 3 pixels more across; d = 1 makes neighbours overlap 1 - 3/5 = 40%.
    # Level l: l rows of offsets and l + 1 columns.
    levels = [(5, [0], [0, 3]), (3, [0, 2], [0, 2, 5]), (2, [0, 1, 3], [0, 2, 4, 6])]
    expected = [(t, left, s) for s, tops, lefts in levels for t in tops for left in lefts]
    assert rmac_regions(5, 8, 3) == expected
    # 12 x 4: w = 4, 8 more down; overlaps 1 - 2/d for d = 1..6: d = 3 is closest to 40%.
    levels = [
        (4, [0, 2, 5, 8], [0]),
        (2, [0, 2, 5, 7, 10], [0, 2]),
        (2, [0, 2, 4, 6, 8, 10], [0, 1, 2]),
    ]
    expected = [(t, left, s) for s, tops, lefts in levels for t in tops for left in lefts]
    assert rmac_regions(12, 4, 3) == expected
    assert rmac_regions(7, 7, 1) == [(0, 0, 7)]


# NumPy, from the papers' definitions, in float64 -----------------------------------------


def normalized(vectors: np.ndarray) -> np.ndarray:
    """L2-normalized along the last axis, with the R-MAC authors' 1e-6 added to the norm."""
    return vectors / (np.linalg.norm(vectors, axis=-1, keepdims=True) + 1e-6)


def spoc(maps: np.ndarray) -> np.ndarray:
    return maps.mean(axis=(1, 2))


def mac(maps: np.ndarray) -> np.ndarray:
    return maps.max(axis=(1, 2))


def gem(maps: np.ndarray, p: float = 3.0, eps: float = 1e-6) -> np.ndarray:
    return (np.maximum(maps, eps) ** p).mean(axis=(1, 2)) ** (1 / p)


def rmac(maps: np.ndarray) -> np.ndarray:
    size = maps.shape[1]
    regions = [
        normalized(maps[:, top : top + side, left : left + side].max(axis=(1, 2)))
        for top, left, side in square_regions(size)
    ]
    return normalized(np.sum(regions, axis=0))


def maps_of(loaded, name: str) -> np.ndarray:
    return loaded.features[name].astype(np.float64)


def assert_close(got: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


#: One pass at 112x112: conv4_3 is 14x14, conv5_3 7x7 and pool5 3x3; GeM with p = 4.5.
LAYERS_112 = [
    "conv4_3:none", "conv4_3:rmac", "conv5_3:none", "conv5_3:avg", "conv5_3:max",
    "conv5_3:gem", "conv5_3:rmac", "pool5:none", "pool5:gem", "pool5:rmac",
]  # fmt: skip
OPTIONS_112 = {"image_size": 112, "weights": "random", "seed": 7, "batch_size": 3}


@pytest.fixture(scope="module")
def run_112(tmp_path_factory):
    folder = tmp_path_factory.mktemp("heads")
    make_images(folder / "photos", 5, size=112)
    output = folder / "float32.h5"
    extract([folder / "photos"], output, layers=LAYERS_112, head_parameters={"gem_p": 4.5},
            **OPTIONS_112)  # fmt: skip
    return folder, vggfeat.load(output)


def test_every_head_equals_numpy_on_the_maps_of_the_same_run(run_112):
    _, loaded = run_112
    for layer in ("conv4_3", "conv5_3", "pool5"):
        maps = maps_of(loaded, f"{layer}:none")
        assert_close(loaded.features[f"{layer}:rmac"], rmac(maps))
        if layer != "conv4_3":
            assert_close(loaded.features[f"{layer}:gem"], gem(maps, p=4.5))
    maps = maps_of(loaded, "conv5_3:none")
    assert maps.shape[1:] == (7, 7, 512) and (maps == 0).any()  # ReLU zeros meet GeM's eps
    assert_close(loaded.features["conv5_3:avg"], spoc(maps))
    assert_close(loaded.features["conv5_3:max"], mac(maps))


def test_the_file_records_each_head_and_its_parameters(run_112):
    folder, _ = run_112
    with h5py.File(folder / "float32.h5") as file:
        gem_attributes = dict(file["features/pool5:gem"].attrs)
        assert gem_attributes == {
            "keras_layer": "block5_pool", "pooling": "gem", "pooling_p": 4.5, "pooling_eps": 1e-6,
        }  # fmt: skip
        rmac_attributes = file["features/conv4_3:rmac"].attrs
        assert rmac_attributes["pooling_levels"] == 3
        assert rmac_attributes["pooling_regions"].tolist() == [list(r) for r in square_regions(14)]
        assert dict(file["features/pool5:none"].attrs)["pooling"] == "none"
        assert json.loads(file.attrs["settings"])["heads"][5] == "gem(p=4.5, eps=1e-06)"
    with vggfeat.open(folder / "float32.h5") as file:
        assert file.layers["conv5_3:rmac"].pooling == "rmac(levels=3)"
        assert file.layers["conv5_3:gem"].shape == (512,)


def test_jax_computes_the_same_heads_as_tensorflow(run_112):
    pytest.importorskip("jax", reason="JAX comes with the 'test' extra")
    folder, loaded = run_112
    output = folder / "jax.h5"
    layers = [argument for layer in LAYERS_112 for argument in ("--layer", layer)]
    result = subprocess.run(
        [sys.executable, "-m", "vggfeat", "extract", str(folder / "photos"), "-o", str(output),
         *layers, "--gem-p", "4.5", "--image-size", "112", "--weights", "random", "--seed", "7",
         "--batch-size", "3", "--backend", "jax", "--quiet"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    on_jax = vggfeat.load(output)
    assert on_jax.attributes["backend"] == "jax"
    for name in LAYERS_112:
        expected = loaded.features[name]
        np.testing.assert_allclose(
            on_jax.features[name], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()
        )


def test_mixed_precision_heads_point_the_same_way_as_float32(run_112, monkeypatch):
    """The layers in bfloat16, as on a CPU with AVX512_BF16 (forced here, where a CPU
    without it would keep float32), the heads in float32."""
    monkeypatch.setattr(network, "cpu_has_fast_bfloat16", lambda: True)
    folder, loaded = run_112
    output = folder / "mixed.h5"
    extract([folder / "photos"], output, layers=LAYERS_112, head_parameters={"gem_p": 4.5},
            precision="mixed", **OPTIONS_112)  # fmt: skip
    mixed = vggfeat.load(output)
    assert mixed.attributes["compute_dtype"] == "bfloat16"
    for name in LAYERS_112:
        if name.endswith(":none"):
            continue
        full = loaded.features[name]
        half = mixed.features[name]
        assert half.dtype == np.float32
        cosine = (full * half).sum(1) / np.linalg.norm(full, axis=1) / np.linalg.norm(half, axis=1)
        assert cosine.min() >= 0.999, (name, cosine)


def test_small_maps_and_one_head_for_several_layers_in_one_pass(tmp_path):
    """At 32x32 pool5 is 1x1 and conv5_3 2x2: R-MAC's regions shrink to one pixel."""
    make_images(tmp_path / "photos", 3, size=32)
    output = tmp_path / "small.h5"
    layers = ["conv5_3", "pool5", "conv5_3:none", "pool5:none", "conv5_3:rmac", "pool5:rmac"]
    extract([tmp_path / "photos"], output, layers=layers, pool="gem", image_size=32,
            weights="random", seed=3)  # fmt: skip
    loaded = vggfeat.load(output)
    for layer, size in (("conv5_3", 2), ("pool5", 1)):
        maps = maps_of(loaded, f"{layer}:none")
        assert maps.shape[1:3] == (size, size)
        assert_close(loaded.features[layer], gem(maps))
        assert_close(loaded.features[f"{layer}:rmac"], rmac(maps))
    assert loaded.attributes["pooling"] == "gem(p=3, eps=1e-06)"


@pytest.fixture(scope="module")
def gem_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gem")
    make_images(folder / "photos", 3, size=32)
    output = folder / "gem.h5"
    extract([folder / "photos"], output, layers=["pool4", "pool4:rmac"], pool="gem",
            image_size=32, weights="random")  # fmt: skip
    return folder, output


def test_a_continued_run_with_another_head_or_parameter_is_refused(gem_file):
    folder, output = gem_file
    copy = folder / "continued.h5"  # beside the original: its paths are relative to the folder
    copy.write_bytes(output.read_bytes())
    make_images(folder / "more", 1, size=32, seed=9)
    common = {"layers": ["pool4", "pool4:rmac"], "image_size": 32, "weights": "random"}
    with pytest.raises(VggfeatError) as refused:
        extract([folder / "photos", folder / "more"], copy, pool="gem",
                head_parameters={"gem_p": 4, "rmac_levels": 2}, **common)  # fmt: skip
    message = str(refused.value)
    assert "the head of pool4 gem(p=3, eps=1e-06) in the file, gem(p=4, eps=1e-06) now" in message
    assert "the head of pool4:rmac rmac(levels=3) in the file, rmac(levels=2) now" in message
    with pytest.raises(VggfeatError, match=r"the head of pool4 gem\(.*\) in the file, avg now"):
        extract([folder / "photos"], copy, pool="avg", **common)
    # The same heads, spelt otherwise (block4_pool:RMAC, gem(p=3)), continue the file.
    spelt = {"layers": ["block4_pool:RMAC", "pool4"], "image_size": 32, "weights": "random"}
    done = extract([folder / "photos", folder / "more"], copy, pool="gem(p=3)", **spelt)
    assert (done.computed, done.already) == (1, 3)
    assert vggfeat.load(copy).features["pool4:rmac"].shape == (4, 512)


def test_a_file_from_before_head_parameters_continues(tmp_path):
    make_images(tmp_path / "photos", 2, size=32)
    output = tmp_path / "old.h5"
    options = {"layers": ["pool1"], "pool": "avg", "image_size": 32, "weights": "random"}
    extract([tmp_path / "photos"], output, **options)
    with h5py.File(output, "r+") as file:  # as vggfeat 0.1 wrote it: no "heads"
        settings = json.loads(file.attrs["settings"])
        del settings["heads"]
        file.attrs["settings"] = json.dumps(settings)
        del file.attrs["heads"]
    make_images(tmp_path / "photos" / "more", 3, size=32, seed=5)
    done = extract([tmp_path / "photos"], output, **options)
    assert done.computed == 3
    with pytest.raises(VggfeatError, match="the head of pool1 avg in the file, max now"):
        extract([tmp_path / "photos"], output, **{**options, "pool": "max"})


def test_show_and_export_name_the_head(gem_file, tmp_path):
    _, output = gem_file
    shown = CliRunner().invoke(cli, ["show", str(output)])
    assert "pool4: 512 float32, Keras layer block4_pool, head gem(p=3, eps=1e-06)" in shown.output
    assert "pool4:rmac: 512 float32, Keras layer block4_pool, head rmac(levels=3)" in shown.output
    facts = json.loads(CliRunner().invoke(cli, ["show", str(output), "--json"]).output)
    assert [layer["pooling"] for layer in facts["layers"]] == [
        "gem(p=3, eps=1e-06)",
        "rmac(levels=3)",
    ]
    target = tmp_path / "rmac.npy"
    result = CliRunner().invoke(
        cli, ["export", str(output), "--layer", "block4_pool:RMAC", "-o", str(target)]
    )
    assert result.exit_code == 0, result.output
    assert "3 rows of pool4:rmac (rmac(levels=3), 512 float32) as npy" in result.output
    np.testing.assert_array_equal(np.load(target), vggfeat.load(output).features["pool4:rmac"])
    # pool4 holds GeM (--pool gem): pool4:gem finds it too.
    result = CliRunner().invoke(
        cli, ["export", str(output), "--layer", "pool4:gem", "-o", str(target)]
    )
    assert "3 rows of pool4 (gem(p=3, eps=1e-06), 512 float32)" in result.output
    pytest.importorskip("pyarrow", reason="pyarrow comes with the 'test' extra")
    import pyarrow.parquet as parquet

    CliRunner().invoke(
        cli, ["export", str(output), "--layer", "pool4", "-o", str(tmp_path / "p.parquet")]
    )
    metadata = parquet.read_schema(tmp_path / "p.parquet").metadata
    assert metadata[b"vggfeat.pooling"] == b"gem(p=3, eps=1e-06)"


def test_bad_heads_are_usage_errors_before_any_backend_starts(tmp_path):
    image = str(ROOT / "sample_images")
    calls = [
        ["extract", image, "--layer", "pool5", "--pool", "gem", "--gem-p", "0"],
        ["extract", image, "--layer", "pool5", "--pool", "gem", "--gem-p", "nan"],
        ["extract", image, "--layer", "pool5", "--pool", "rmac", "--rmac-levels", "0"],
        ["extract", image, "--layer", "pool5", "--pool", "avg", "--gem-p", "4"],
        ["extract", image, "--layer", "fc7", "--pool", "gem", "--gem-p", "4"],
        ["extract", image, "--layer", "fc7:gem"],
        ["extract", image, "--layer", "pool5:gem(p=4)"],
        ["extract", image, "--layer", "pool5:spoc"],
        ["extract", image, "--layer", "pool5", "--layer", "block5_pool:AVG", "--pool", "avg"],
        ["extract", image, "--pool", "sum"],
        ["extract", image, "--layer", "pool5:"],
    ]
    probe = (
        "import sys, json\n"
        "from click.testing import CliRunner\n"
        "from vggfeat.cli import cli\n"
        f"for args in {calls!r}:\n"
        "    result = CliRunner().invoke(cli, args)\n"
        "    print(json.dumps([result.exit_code, result.output.splitlines()[-1:]]))\n"
        "print(','.join(m for m in ('tensorflow', 'keras', 'jax') if m in sys.modules) or 'none')\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True, cwd=tmp_path)  # fmt: skip
    *answers, loaded = result.stdout.splitlines()
    assert loaded == "none"
    codes, errors = zip(*(json.loads(answer) for answer in answers), strict=True)
    assert set(codes) == {2}, answers
    errors = [lines[0] for lines in errors]
    assert errors[0] == "Error: --gem-p must be from 0.1 to 100, not 0"
    assert errors[1] == "Error: --gem-p must be from 0.1 to 100, not nan"
    assert errors[2] == "Error: --rmac-levels must be from 1 to 10, not 0"
    assert errors[3] == (
        "Error: --gem-p changes nothing: no conv or pool layer has the gem head "
        "(--pool gem, or --layer LAYER:gem)"
    )
    assert errors[4] == errors[3]
    assert errors[5].startswith("Error: --layer fc7:gem: fc7 has no map over space to pool")
    assert errors[6].startswith("Error: --layer pool5:gem(p=4): give a head's parameters with")
    assert errors[7] == f"Error: --layer pool5:spoc: spoc is not one of {HEADS}"
    assert (
        errors[8] == "Error: --layer block5_pool:AVG and --layer pool5 are the same layer and head"
    )
    assert "'sum' is not one of 'none', 'avg', 'max', 'gem', 'rmac'" in errors[9]
    assert errors[10] == "Error: --layer pool5: names no head after ':': give one of " + HEADS


HEADS = "none, avg, max, gem, rmac"


def test_the_api_refuses_parameters_given_twice_or_of_the_wrong_kind():
    common = {"layers": ["pool5"], "weights": "random", "image_size": 32}
    refused = [
        ({"pool": "gem(p=4)", "head_parameters": {"gem_p": 5}}, "disagree"),
        ({"pool": "gem", "head_parameters": {"gem_p": "4"}}, "--gem-p '4' is not a number"),
        ({"pool": "rmac", "head_parameters": {"rmac_levels": 2.0}}, "is not a whole number"),
        ({"pool": "gem", "head_parameters": {"gem_q": 2}}, "'gem_q' is not one of"),
        ({"pool": 3}, "--pool 3 is not a head's name"),
    ]
    for options, message in refused:
        with pytest.raises(VggfeatError, match=message):
            vggfeat.ExtractOptions.make(["photos"], "f.h5", **common, **options)
    same = vggfeat.ExtractOptions.make(["photos"], "f.h5", **common, pool="gem(p=4)",
                                       head_parameters={"gem_p": np.float32(4)})  # fmt: skip
    assert str(same.pool) == "gem(p=4, eps=1e-06)"
    levels = {"pool": "rmac", "head_parameters": {"rmac_levels": np.int64(2)}}
    assert str(vggfeat.ExtractOptions.make(["photos"], "f.h5", **common, **levels).pool) == (
        "rmac(levels=2)"
    )
    with pytest.raises(TypeError):  # frozen, as every option is
        same.head_parameters["gem_p"] = 1000


def test_info_lists_the_heads_and_the_features_each_gives():
    facts = json.loads(CliRunner().invoke(cli, ["info", "--image-size", "112", "--json"]).output)
    assert [head["name"] for head in facts["heads"]] == HEADS.split(", ")
    gem = facts["heads"][3]["parameters"]
    assert gem["p"] == {"option": "--gem-p", "default": 3.0, "least": 0.1, "most": 100.0}
    by_alias = {layer["alias"]: layer["feature_size"] for layer in facts["layers"]}
    assert by_alias["conv5_3"] == {"none": 7 * 7 * 512, "avg": 512, "max": 512, "gem": 512,
                                   "rmac": 512}  # fmt: skip
    text = CliRunner().invoke(cli, ["info", "--image-size", "112"]).output
    assert "rmac: R-MAC, the sum of regional maxima" in text
