"""`data prepare` and the label-range file: from FLAME2's ranges and image folders to a frames CSV."""

from __future__ import annotations

import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from flame_kd.cli import main
from flame_kd.data.labels import expand_ranges, official_ranges_path, prepare, read_label_ranges, write_label_ranges
from flame_kd.data.schema import load_frames
from flame_kd.errors import DataError


def make_raw_flame2(tmp_path, rgb_ids, ir_ids):
    """A FLAME2-download-like tree with tiny JPEGs for the given frame numbers."""
    rgb_dir, ir_dir = tmp_path / "254p RGB Images", tmp_path / "254p Thermal Images"
    rgb_dir.mkdir()
    ir_dir.mkdir()
    for i in rgb_ids:
        Image.new("RGB", (8, 8), (i % 255, 0, 0)).save(rgb_dir / f"254p RGB Frame ({i}).jpg")
    for i in ir_ids:
        Image.new("RGB", (8, 8), (0, 90, 255 - i % 100)).save(ir_dir / f"254p Thermal Frame ({i}).jpg")
    (rgb_dir / "notes.txt").write_text("not an image")
    return rgb_dir, ir_dir


def test_official_ranges():
    ranges = read_label_ranges(official_ranges_path())
    assert len(ranges) == 19 and set(ranges.fire_smoke) == {"NN", "YY", "YN"}
    frames = expand_ranges(ranges)
    assert len(frames) == 53451 and frames.id.is_monotonic_increasing
    row = frames.set_index("id").loc[41642]
    assert (row.fire, row.smoke, row.range) == (1, 1, 15)  # listed twice: the later (YY) range wins


def test_prepare_keeps_pairs_and_reports_the_rest(tmp_path):
    both = [1, 13700, 13701, 41641, 41642, 53451]
    rgb_dir, ir_dir = make_raw_flame2(tmp_path, both + [41643, 60000], both + [5, 60000])
    out = tmp_path / "out" / "flame2.csv"
    report = prepare(None, rgb_dir, ir_dir, out)
    table = pd.read_csv(out).set_index("id")
    assert list(table.index) == both
    assert table.loc[41642, ["fire", "smoke"]].tolist() == [1, 1]
    assert table.loc[41641, ["fire", "smoke"]].tolist() == [1, 0]
    assert table.loc[1, ["fire", "smoke"]].tolist() == [0, 0]
    assert table.loc[1, "rgb_frame"] == "../254p RGB Images/254p RGB Frame (1).jpg"  # relative to the CSV
    text = report.summary()
    assert "6 frame pairs" in text
    assert "1 RGB frame(s) without a thermal frame, e.g. frames 41643" in text
    assert "1 thermal frame(s) without an RGB frame, e.g. frames 5" in text
    assert "in no label range, e.g. frames 60000" in text
    assert (out.parent / "label_ranges.tsv").is_file()
    loaded = load_frames(out, verify_images=True)  # the CSV passes the contract
    assert len(loaded) == 6 and loaded.rgb_path[0] == str(rgb_dir / "254p RGB Frame (1).jpg")


def test_prepare_command(tmp_path):
    rgb_dir, ir_dir = make_raw_flame2(tmp_path, [1, 2, 3], [1, 2])
    out = tmp_path / "flame2.csv"
    args = ["data", "prepare", "--labels", str(official_ranges_path()), "--rgb-dir", str(rgb_dir),
            "--ir-dir", str(ir_dir), "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "2 frame pairs" in result.output and "without a thermal frame" in result.output
    check = CliRunner().invoke(main, ["data", "check", str(out)])  # valid rows, but 2 frames cannot be split:
    assert check.exit_code == 2 and "2 frames are too few" in check.output, check.output  # as training says


def test_prepare_with_nothing_in_common_is_a_clean_error(tmp_path):
    rgb_dir, ir_dir = make_raw_flame2(tmp_path, [1], [2])
    result = CliRunner().invoke(main, ["data", "prepare", "--rgb-dir", str(rgb_dir), "--ir-dir", str(ir_dir),
                                       "--out", str(tmp_path / "x.csv")])
    assert result.exit_code == 2 and "no frame is in both" in result.output and "Traceback" not in result.output
    missing = CliRunner().invoke(main, ["data", "prepare", "--rgb-dir", str(tmp_path / "nope"), "--ir-dir",
                                        str(ir_dir), "--out", str(tmp_path / "x.csv")])
    assert missing.exit_code == 2 and "folder not found" in missing.output


def test_range_file_round_trip_and_loose_formats(tmp_path):
    ranges = read_label_ranges(official_ranges_path())
    path = write_label_ranges(ranges, tmp_path / "r.tsv", ["a comment"])
    assert path.read_text().startswith("# a comment\nfirst\tlast\tfire_smoke\n1\t13700\tNN\n")
    assert read_label_ranges(path).equals(ranges)
    loose = tmp_path / "Frame Pair Labels.txt"
    loose.write_text("Frames 1-10: NN\n11 - 20 yy\n")
    assert read_label_ranges(loose).fire_smoke.tolist() == ["NN", "YY"]
    bad = tmp_path / "bad.txt"
    bad.write_text("1\t10\tNN\nhello\n20\t5\tYY\n")
    with pytest.raises(DataError) as err:
        read_label_ranges(bad)
    assert any("line 2" in p for p in err.value.problems) and any("line 3" in p for p in err.value.problems)


def test_locate_image_folders_finds_a_mounted_data_set(tmp_path):
    from flame_kd.data.paths import locate_image_folders

    base = tmp_path / "input" / "flame2-dataset" / "FLAME2"
    (base / "254p RGB Images").mkdir(parents=True)
    (base / "254p Thermal Images").mkdir()
    (tmp_path / "input" / "other" / "254p RGB Images").mkdir(parents=True)  # no IR beside it
    found = locate_image_folders([tmp_path / "missing", tmp_path / "input"])
    assert found == (base / "254p RGB Images", base / "254p Thermal Images")
    assert locate_image_folders([tmp_path / "input" / "other"]) is None
