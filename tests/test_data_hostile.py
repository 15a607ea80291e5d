"""Hostile data sets (issue 33): every case is refused by `data check` (exit 2, one line per problem
naming file and row, no traceback) and by training's own check (`load_frames(verify_images=True)`,
before any run exists); `--gap` is kept exactly or refused."""

from __future__ import annotations

import struct
import tracemalloc
import warnings
import zlib

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from flame_kd.cli import main
from flame_kd.data.checks import MAX_PIXELS
from flame_kd.data.labels import (expand_ranges, official_ranges_path, prepare, range_owner, read_label_ranges,
                                  write_label_ranges)
from flame_kd.data.schema import check_frames, load_frames
from flame_kd.data.split import MIN_PART_FRAMES, SPLITS, make_split, part_problems, split_frames
from flame_kd.errors import DataError

RGB, IR = "254p RGB Images", "254p Thermal Images"


def run_check(csv):
    return CliRunner().invoke(main, ["data", "check", str(csv)])


def rewrite(folder, change) -> str:
    """``folder/flame2.csv`` read as text, passed through ``change(df)`` and written back."""
    csv = folder / "flame2.csv"
    change(pd.read_csv(csv, dtype=str, keep_default_na=False)).to_csv(csv, index=False)
    return str(csv)


def assert_refused(csv, expected: list[str]) -> None:
    """`data check` exits 2 without a traceback and names every ``expected`` text; training's check
    raises the same problems."""
    result = run_check(csv)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    for text in expected:
        assert text in result.output, (text, result.output)
    with pytest.raises(DataError) as err:
        load_frames(csv, verify_images=True)
    for text in expected:
        assert text in err.value.message, (text, err.value.message)


# --- ids --------------------------------------------------------------------------------------------


def test_ids_beyond_int64_are_refused_by_row_not_wrapped(synth_copy):
    csv = rewrite(synth_copy, lambda df: df.assign(id=[str(10**20 + i) for i in range(len(df))]))
    assert_refused(csv, ["rows 2, 3, 4, 5, 6, ... (120 rows)", "id 100000000000000000000", "64-bit limit"])
    one = rewrite(synth_copy, lambda df: df.assign(id=[str(i + 1) if i != 7 else str(2**63) for i in range(len(df))]))
    assert_refused(one, ["row 9: id 9223372036854775808", "64-bit limit"])


def test_the_largest_int64_id_is_kept_exactly(synth_copy):
    top = 2**63 - 1
    csv = rewrite(synth_copy, lambda df: df.assign(id=[str(top - len(df) + 1 + i) for i in range(len(df))]))
    (synth_copy / "label_ranges.tsv").unlink()  # its ranges name ids 1..120
    frames = load_frames(csv, check_files=False)
    assert frames["id"].max() == top and frames["id"].is_unique


def test_negative_ids_are_refused_and_the_summary_keeps_every_row(synth_copy):
    csv = rewrite(synth_copy, lambda df: df.assign(id=[str(-i) if i in (3, 4) else df.at[i, "id"] for i in df.index]))
    assert_refused(csv, ["rows 5, 6: negative id (-3, -4)", "0 or more"])
    assert "120 frame rows" in run_check(csv).output


# --- columns ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("second", ["fire", "Fire", " FIRE "])
def test_a_second_fire_column_is_refused_naming_both(synth_copy, second):
    csv = synth_copy / "flame2.csv"
    text = csv.read_text().splitlines()
    csv.write_text("\n".join([text[0] + f",{second}"] + [line + ",1" for line in text[1:]]) + "\n")
    assert_refused(csv, ["2 columns are read as 'fire'", "'fire' in column 4", f"{second.lstrip()!r} in column 6", "keep one"])


# --- label ranges -----------------------------------------------------------------------------------


def test_overlapping_ranges_are_refused_naming_lines(synth_copy):
    (synth_copy / "label_ranges.tsv").write_text("first\tlast\tfire_smoke\n1\t80\tNN\n50\t120\tYY\n")
    assert_refused(synth_copy / "flame2.csv", ["label_ranges.tsv lines 2 and 3 overlap on 31 frames (50-80"])


def test_one_shared_boundary_frame_is_allowed_as_in_flame2():
    ranges = read_label_ranges(official_ranges_path())  # 41642 closes one range and opens the next
    assert range_owner(ranges, [41641, 41642, 41643, 0, 53452]).tolist() == [14, 15, 15, -1, -1]


def test_ranges_that_contradict_the_csv_name_the_range_and_rows(synth_copy):
    ranges = read_label_ranges(synth_copy / "label_ranges.tsv")
    first = ranges.iloc[0]
    flipped = "YY" if first.fire_smoke != "YY" else "NN"
    ranges.loc[0, "fire_smoke"] = flipped
    write_label_ranges(ranges, synth_copy / "label_ranges.tsv")
    expected = f"label_ranges.tsv range 1 ({first['first']}-{first['last']} {flipped}) contradicts the CSV: rows 2, 3"
    assert_refused(synth_copy / "flame2.csv", [expected, f"say {first.fire_smoke}"])


def test_a_range_up_to_two_billion_allocates_nothing_per_id(synth_copy):
    ranges = read_label_ranges(synth_copy / "label_ranges.tsv")
    ranges.loc[len(ranges) - 1, "last"] = 2_000_000_000  # agrees with every frame the CSV has
    write_label_ranges(ranges, synth_copy / "label_ranges.tsv")
    tracemalloc.start()
    try:
        report = check_frames(synth_copy / "flame2.csv", verify_images=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.problems == [] and peak < 200 * 2**20, (report.problems, peak)  # 14.9 GiB before
    with pytest.raises(DataError, match="cover 2,000,000,0"):
        expand_ranges(ranges)  # listing frame by frame is bounded and says so


def test_prepare_with_a_two_billion_range_counts_what_it_leaves_out(tmp_path):
    rgb, ir = tmp_path / RGB, tmp_path / IR
    rgb.mkdir(), ir.mkdir()
    for i in (1, 2, 3):
        Image.new("RGB", (8, 8), (200, 10, 10)).save(rgb / f"254p RGB Frame ({i}).jpg")
        Image.new("RGB", (8, 8), (10, 10, 200)).save(ir / f"254p Thermal Frame ({i}).jpg")
    (tmp_path / "r.tsv").write_text("1\t2000000000\tNN\n")
    report = prepare(tmp_path / "r.tsv", rgb, ir, tmp_path / "out" / "flame2.csv")
    assert report.frames == 3 and "left out 1,999,999,997 labelled frame(s)" in report.summary()


# --- pixels -----------------------------------------------------------------------------------------


def _float_tiff(path, fill) -> None:
    Image.fromarray(np.full((32, 32), fill, dtype=np.float32), "F").save(path)


def test_an_all_nan_float_tiff_is_refused_naming_file_and_row(synth_copy):
    _float_tiff(synth_copy / IR / "nan.tif", np.nan)
    csv = rewrite(synth_copy, lambda df: df.assign(ir_frame=df.ir_frame.where(df.index != 4, f"{IR}/nan.tif")))
    assert_refused(csv, ["row 6: unusable IR image", "nan.tif", "1,024 of 1,024 pixels are NaN or infinite"])


def test_a_float_tiff_with_one_infinite_pixel_is_refused(synth_copy):
    values = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    values[3, 3] = np.inf
    Image.fromarray(values, "F").save(synth_copy / IR / "inf.tif")
    csv = rewrite(synth_copy, lambda df: df.assign(ir_frame=df.ir_frame.where(df.index != 0, f"{IR}/inf.tif")))
    assert_refused(csv, ["row 2: unusable IR image", "inf.tif", "1 of 1,024 pixels"])


def _png_header(path, width: int, height: int) -> None:
    """A PNG that declares ``width`` x ``height`` grey pixels (no image data follows: nothing is decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [5000, 12000, 20000])  # over our bound; over Pillow's warning; over its error
def test_an_image_over_the_pixel_bound_is_refused_without_pillows_warning(synth_copy, side):
    assert side * side > MAX_PIXELS
    _png_header(synth_copy / RGB / "big.png", side, side)
    csv = rewrite(synth_copy, lambda df: df.assign(rgb_frame=df.rgb_frame.where(df.index != 2, f"{RGB}/big.png")))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert_refused(csv, ["row 4: unusable RGB image", "big.png", "over the bound of 4096x4096"])
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]


# --- RGB and IR of one file -------------------------------------------------------------------------


def test_prepare_refuses_one_folder_as_rgb_and_ir(tmp_path):
    rgb = tmp_path / RGB
    rgb.mkdir()
    Image.new("RGB", (8, 8)).save(rgb / "254p RGB Frame (1).jpg")
    args = ["data", "prepare", "--rgb-dir", str(rgb), "--ir-dir", str(tmp_path / "." / RGB), "--out", str(tmp_path / "x.csv")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "--rgb-dir and --ir-dir name one folder" in result.output, result.output
    assert not (tmp_path / "x.csv").exists()
    (tmp_path / "link").symlink_to(rgb)  # the same folder under another name
    with pytest.raises(DataError, match="name one folder"):
        prepare(None, rgb, tmp_path / "link", tmp_path / "x.csv")


def test_check_refuses_rows_whose_ir_is_the_rgb_file(synth_copy):
    csv = rewrite(synth_copy, lambda df: df.assign(ir_frame=df.rgb_frame))
    assert_refused(csv, ["rows 2, 3, 4, 5, 6, ... (120 rows): rgb_frame and ir_frame are one file"])


def test_check_refuses_an_ir_image_with_the_rgb_images_bytes(synth_copy):
    (synth_copy / IR / "254p Thermal Frame (7).jpg").write_bytes((synth_copy / RGB / "254p RGB Frame (7).jpg").read_bytes())
    assert_refused(synth_copy / "flame2.csv", ["row 8: the IR image has the same bytes as the RGB image",
                                               "254p Thermal Frame (7).jpg"])


# --- split parts too small for the reports ----------------------------------------------------------


@pytest.fixture
def thirty(tmp_path):
    from flame_kd.data.synth import synthesize

    return synthesize(tmp_path / "thirty", frames=30, image_size=16, seed=3)


def test_a_thirty_frame_set_is_refused_before_training(thirty, tmp_path, monkeypatch):
    result = run_check(thirty)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{MIN_PART_FRAMES} val and {MIN_PART_FRAMES} test frames" in result.output, result.output
    import torch

    from flame_kd.config import DataConfig
    from flame_kd.runs.skeleton import load_data

    monkeypatch.setenv("FLAME_KD_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="the reports 4 val and 4 test frames"):  # before any run exists
        load_data(DataConfig(csv=str(thirty), image_size=16), 0, torch.device("cpu"))


def _frames(n: int, video=None) -> pd.DataFrame:
    states = np.resize(["NN"] * 20 + ["YY"] * 20 + ["YN"] * 20, n)
    frames = pd.DataFrame({"id": np.arange(1, n + 1), "fire": [int(s[0] == "Y") for s in states],
                           "smoke": [int(s[1] == "Y") for s in states], "rgb_path": "", "ir_path": ""})
    return frames if video is None else frames.assign(video=video)


def test_a_one_value_video_column_says_so():
    problems = part_problems(make_split(_frames(160, video="flight-1"), seed=42))
    assert problems == ["one video: the split keeps each video whole, so it needs at least 3 videos (groups), one "
                        "per part; add videos, or leave out the video column so label ranges are cut into blocks"]
    assert "too few" not in problems[0]


def test_zero_ratios_are_named_as_such_not_as_too_few_frames():
    problems = part_problems(make_split(_frames(160), seed=42, ratios=(1, 0, 0)))
    assert problems == ["the val and test splits are empty: ratio 0 (ratios 1.00/0.00/0.00)"]


def test_one_video_refused_by_data_split(tmp_path, synth_csv):
    df = pd.read_csv(synth_csv, dtype=str).assign(video="v1")
    df["rgb_frame"] = str(synth_csv.parent) + "/" + df["rgb_frame"]
    df["ir_frame"] = str(synth_csv.parent) + "/" + df["ir_frame"]
    df.to_csv(tmp_path / "one.csv", index=False)
    result = CliRunner().invoke(main, ["data", "split", str(tmp_path / "one.csv"), "--gap", "rule",
                                       "--out", str(tmp_path / "m.csv")])
    assert result.exit_code == 2 and "one video: the split keeps each video whole" in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "m.csv").exists()


# --- --gap is kept exactly --------------------------------------------------------------------------


def min_cross_distance(frames: pd.DataFrame, split) -> float:
    """The smallest id distance between kept frames of two different splits in one sequence."""
    m = split.manifest.assign(chain=frames["video"].to_numpy() if "video" in frames.columns else 0)
    m = m[m["split"] != "gap"]
    best = np.inf
    for _, chain in m.groupby("chain"):
        ids, parts = chain["id"].to_numpy(np.int64), chain["split"].to_numpy()
        for s in SPLITS:
            mine, other = np.sort(ids[parts == s]), ids[parts != s]
            if len(mine) and len(other):
                k = np.searchsorted(mine, other)
                below = np.abs(other - mine[np.clip(k - 1, 0, len(mine) - 1)])
                above = np.abs(mine[np.clip(k, 0, len(mine) - 1)] - other)
                best = min(best, below.min(), above.min())
    return best


@pytest.mark.parametrize("gap", [1, 3, 10, 25])
def test_gap_holds_with_blocks_shorter_than_the_gap(synth_csv, gap):
    frames = load_frames(synth_csv, check_files=False)
    split = make_split(frames, seed=42, block_size=4, gap=gap)  # the review's 4-frame blocks
    assert min_cross_distance(frames, split) > gap, split.summary()
    assert split.counts["gap"] > 0


def test_gap_holds_on_full_flame2_and_counts_the_ids_not_positions():
    from test_data_split import flame2_frames

    frames = flame2_frames()
    frames = frames[frames["id"] % 7 != 0].reset_index(drop=True)  # ids with holes
    for gap in (30, 500):
        split = split_frames(frames, seed=1, gap=gap, ranges=official_ranges_path())
        assert min_cross_distance(frames, split) > gap
        assert "as given" in split.notes[0] and part_problems(split) == []


def test_gap_holds_within_each_cut_video():
    video = np.repeat(["a", "b", "c", "d"], 60)
    frames = _frames(240, video=video)
    split = make_split(frames, seed=3, block_size=5, gap=7, cut_videos=True)
    assert min_cross_distance(frames, split) > 7


def test_a_gap_that_drops_a_whole_part_is_refused_in_one_line(synth_copy):
    csv, out = synth_copy / "flame2.csv", synth_copy / "m.csv"
    result = CliRunner().invoke(main, ["data", "split", str(csv), "--gap", "1000000", "--out", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "a gap of 1,000,000 frame(s) leaves the" in error[0], result.output
    assert "give a smaller --gap" in error[0] and not out.exists()


def test_the_cli_gap_is_kept_in_the_written_manifest(synth_copy):
    csv, out = synth_copy / "flame2.csv", synth_copy / "m.csv"
    result = CliRunner().invoke(main, ["data", "split", str(csv), "--gap", "3", "--out", str(out)])
    assert result.exit_code == 0 and "gap: 3 frames, as given" in result.output, result.output
    manifest = pd.read_csv(out)
    frames = load_frames(csv, check_files=False)
    assert manifest["id"].tolist() == frames["id"].tolist()
    assert min_cross_distance(frames, type("S", (), {"manifest": manifest})()) > 3


def test_data_split_refuses_a_big_image_naming_it_without_pillows_warning(synth_copy):
    _png_header(synth_copy / RGB / "big.png", 12000, 12000)
    csv = rewrite(synth_copy, lambda df: df.assign(rgb_frame=df.rgb_frame.where(df.index != 2, f"{RGB}/big.png")))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = CliRunner().invoke(main, ["data", "split", csv])  # names only: the thumbnails open the images
    assert result.exit_code == 2 and "big.png is 12000x12000 px, over the bound of 4096x4096" in result.output
    assert "Traceback" not in result.output and "DecompressionBomb" not in result.output
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]


def test_a_label_range_beyond_int64_is_a_bad_line(tmp_path):
    (tmp_path / "r.tsv").write_text("1\t10\tNN\n11\t99999999999999999999\tYY\n")
    with pytest.raises(DataError) as err:
        read_label_ranges(tmp_path / "r.tsv")
    assert err.value.problems == ["r.tsv line 2: frame 99999999999999999999 is beyond the 64-bit id limit "
                                  "9223372036854775807"]


def test_a_negative_label_range_is_a_bad_line_not_read_as_positive(tmp_path):
    (tmp_path / "r.tsv").write_text("-5\t10\tNN\n11\t20\tYY\n")
    with pytest.raises(DataError) as err:
        read_label_ranges(tmp_path / "r.tsv")
    assert err.value.problems == ["r.tsv line 1: a negative frame: frame ids are 0 or more: '-5\\t10\\tNN'"]
