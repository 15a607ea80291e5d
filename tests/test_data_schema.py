"""The frames CSV contract: frame ids, path forms, and every validation problem (exit 2, no traceback)."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from click.testing import CliRunner

from flame_kd.cli import main
from flame_kd.data import paths as fr
from flame_kd.data.schema import check_frames, data_digest, load_frames
from flame_kd.errors import DataError


def run_check(csv, *args):
    return CliRunner().invoke(main, ["data", "check", str(csv), *args])


def edit_csv(folder, change) -> str:
    """Rewrite ``folder/flame2.csv`` (read as text) through ``change(df)``; returns its path."""
    csv = folder / "flame2.csv"
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    df = change(df)
    df.to_csv(csv, index=False)
    return str(csv)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("254p RGB Frame (1).jpg", 1),
        ("254p Thermal Frame (41642).jpg", 41642),
        (r"C:\Users\x\FLAME2\254p RGB Images\254p RGB Frame (12).jpg", 12),
        ("/kaggle/input/flame2/254p IR Images/254p IR Frame (7).JPG", 7),
        ("frame_2541.jpg", None),
    ],
)
def test_frame_id_reads_the_number_in_parentheses(name, expected):
    assert fr.frame_id(name) == expected


def test_clean_set_passes_with_summary(synth_csv):
    result = run_check(synth_csv)
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("OK")
    for text in ("120 frame rows", "label states: NN", "NY 0", "groups:", "label ranges", "240 relative paths", "240 decoded"):
        assert text in result.output


def test_load_frames_contract(synth_csv):
    frames = load_frames(synth_csv)
    assert list(frames.columns) == ["id", "rgb_path", "ir_path", "fire", "smoke"]
    assert list(frames.index) == list(range(120)) and frames["id"].tolist() == list(range(1, 121))
    assert frames.rgb_path.map(lambda p: __import__("os").path.isabs(p)).all()
    assert set(frames.fire) <= {0, 1} and set(frames.smoke) <= {0, 1}


WINDOWS = r"C:\Users\x\Downloads\FLAME2\{dir}\{name}"


@pytest.mark.parametrize(
    "form, template, summary",
    [
        ("bare", "{name}", "bare names"),
        ("relative", "{dir}/{name}", "relative paths"),
        ("windows", WINDOWS, "absolute paths from another machine"),
        ("wsl", "/mnt/c/Users/x/Downloads/FLAME2/{dir}/{name}", "absolute paths from another machine"),
        ("kaggle", "/kaggle/input/flame2/{dir}/{name}", "absolute paths from another machine"),
    ],
)
def test_every_path_form_resolves(synth_copy, form, template, summary):
    def rewrite(df):
        for col in ("rgb_frame", "ir_frame"):
            parts = df[col].str.split("/", n=1, expand=True)
            df[col] = [template.format(dir=d, name=n) for d, n in zip(parts[0], parts[1])]
        return df

    csv = edit_csv(synth_copy, rewrite)
    frames = load_frames(csv)
    assert frames.rgb_path.str.startswith(str(synth_copy)).all()
    assert frames.ir_path.str.contains("Thermal Images").all()
    result = run_check(csv)
    assert result.exit_code == 0, result.output
    assert f"240 {summary}" in result.output


def test_root_option_and_ir_folder_spelling(synth_copy, tmp_path):
    """--root points elsewhere; a thermal folder named '254p IR Images' is found too."""
    (synth_copy / "254p Thermal Images").rename(synth_copy / "254p IR Images")
    csv = edit_csv(synth_copy, lambda df: df.assign(rgb_frame=df.rgb_frame.str.split("/").str[-1],
                                                    ir_frame=df.ir_frame.str.split("/").str[-1]))
    moved = tmp_path / "elsewhere.csv"
    shutil.copy(csv, moved)
    assert run_check(moved).exit_code == 2
    result = run_check(moved, "--root", str(synth_copy))
    assert result.exit_code == 0, result.output


def test_id_column_optional(synth_copy):
    csv = edit_csv(synth_copy, lambda df: df.drop(columns="id"))
    assert load_frames(csv)["id"].tolist() == list(range(1, 121))


def _garbage(folder):
    (folder / "254p RGB Images" / "254p RGB Frame (5).jpg").write_bytes(b"this is not a jpeg" * 10)
    return str(folder / "flame2.csv")


def _truncated(folder):
    path = folder / "254p Thermal Images" / "254p Thermal Frame (9).jpg"
    path.write_bytes(path.read_bytes()[:200])
    return str(folder / "flame2.csv")


def _wrong_size(folder):
    from PIL import Image

    Image.new("RGB", (40, 30)).save(folder / "254p Thermal Images" / "254p Thermal Frame (3).jpg")
    return str(folder / "flame2.csv")


def _empty(folder):
    csv = folder / "flame2.csv"
    csv.write_text("id,rgb_frame,ir_frame,fire,smoke\n")
    return str(csv)


def _zero_bytes(folder):
    csv = folder / "flame2.csv"
    csv.write_text("")
    return str(csv)


def _set(row, col, value):
    def change(df):
        df.loc[row, col] = value
        return df

    return change


CASES = {
    "missing column": (lambda f: edit_csv(f, lambda df: df.drop(columns="smoke")), ["missing column", "smoke"]),
    "label 2": (lambda f: edit_csv(f, _set(3, "fire", "2")), ["fire: '2' x1 (rows 5)", "0/1"]),
    "blank label": (lambda f: edit_csv(f, _set(7, "smoke", "")), ["smoke: blank x1 (rows 9)"]),
    "label maybe": (lambda f: edit_csv(f, _set(0, "fire", "maybe")), ["fire: 'maybe' x1 (rows 2)"]),
    "duplicate id": (lambda f: edit_csv(f, _set(10, "id", "1")), ["duplicate id 1", "row 2", "row 12"]),
    "missing file": (
        lambda f: (f / "254p RGB Images" / "254p RGB Frame (4).jpg").unlink() or str(f / "flame2.csv"),
        ["row 5", "rgb_frame file not found", "254p RGB Frame (4).jpg"],
    ),
    "corrupt jpeg": (_garbage, ["row 6", "unusable RGB image", "254p RGB Frame (5).jpg"]),
    "truncated jpeg": (_truncated, ["row 10", "unusable IR image", "254p Thermal Frame (9).jpg"]),
    "number mismatch": (
        lambda f: edit_csv(f, _set(1, "ir_frame", "254p Thermal Images/254p Thermal Frame (3).jpg")),
        ["row 3", "pair does not match", "frame 2", "frame 3"],
    ),
    "size mismatch": (_wrong_size, ["row 4", "pair does not match", "32x32", "40x30"]),
    "empty csv": (_empty, ["no frames"]),
    "zero-byte csv": (_zero_bytes, ["empty"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_problem_exits_2_naming_it(synth_copy, case):
    make, expected = CASES[case]
    csv = make(synth_copy)
    result = run_check(csv)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)  # a clean exit
    for text in expected:
        assert text in result.output, (text, result.output)
    with pytest.raises(DataError) as err:  # training stops before its first step, same message
        load_frames(csv, verify_images=True)
    for text in expected:
        assert text in str(err.value.message)


def test_every_problem_listed_and_capped(synth_copy):
    for image in (synth_copy / "254p Thermal Images").iterdir():
        image.unlink()
    csv = str(synth_copy / "flame2.csv")
    report = check_frames(csv)
    assert len(report.problems) == 120 and report.frames is None
    result = run_check(csv)
    assert result.exit_code == 2
    assert "120 problem(s)" in result.output and "... and 100 more" in result.output


def test_missing_csv_is_a_clean_error(tmp_path):
    result = run_check(tmp_path / "nope.csv")
    assert result.exit_code == 2 and "no such file" in result.output


def test_verify_images_off_skips_decoding(synth_copy):
    csv = _garbage(synth_copy)
    assert len(load_frames(csv, verify_images=False)) == 120  # existence only
    with pytest.raises(DataError):
        load_frames(csv, verify_images=True)


def test_split_loading_needs_no_images(synth_copy):
    shutil.rmtree(synth_copy / "254p RGB Images")
    with pytest.raises(DataError):
        load_frames(synth_copy / "flame2.csv")
    assert len(load_frames(synth_copy / "flame2.csv", check_files=False)) == 120


def test_data_digest_ignores_directories_but_not_labels(synth_csv, synth_copy):
    a = load_frames(synth_csv)
    b = load_frames(synth_copy / "flame2.csv")
    assert data_digest(a) == data_digest(b) and len(data_digest(a)) == 12
    b.loc[0, "smoke"] = 1 - b.loc[0, "smoke"]
    assert data_digest(a) != data_digest(b)


@pytest.mark.parametrize("no, yes", [("0", "1"), ("0.0", "1.0"), ("false", "true"), ("No", "YES"), ("n", "Y"),
                                     ("FALSE", "True")])
def test_every_label_spelling_is_read_and_named(synth_copy, no, yes):
    csv = synth_copy / "flame2.csv"
    df = pd.read_csv(csv, dtype=str)
    want = df[["fire", "smoke"]].astype(int).to_numpy()
    for col in ("fire", "smoke"):
        df[col] = df[col].map({"0": no, "1": yes})
    df.to_csv(csv, index=False)
    assert (load_frames(csv)[["fire", "smoke"]].to_numpy() == want).all()
    result = run_check(str(csv))
    assert result.exit_code == 0, result.output
    spelling = {"0": "0/1", "0.0": "0.0/1.0", "false": "true/false", "no": "yes/no", "n": "y/n"}[no.lower()]
    assert f"labels written as: fire {spelling}, smoke {spelling}" in result.output


def test_bad_labels_are_one_line_per_column(synth_copy):
    csv = synth_copy / "flame2.csv"
    df = pd.read_csv(csv, dtype=str)
    df.loc[[2, 7, 15], "fire"] = "maybe"
    df.loc[[4], "fire"] = "2"
    df.loc[list(range(20, 40)), "smoke"] = "?"
    df.to_csv(csv, index=False)
    result = run_check(str(csv))
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if "labels must be" in line]
    assert len(lines) == 2, result.output
    assert "fire: 'maybe' x3, '2' x1 (rows 4, 6, 9, 17)" in lines[0]
    assert "smoke: '?' x20 (rows 22, 23, 24, 25, 26, ...)" in lines[1]


def test_data_digest_sees_the_pixels_not_only_the_names(synth_csv, synth_copy, tmp_path):
    """Two folders with the same file names and other pixels (a preprocessed variant) differ."""
    from PIL import Image

    a = load_frames(synth_csv)
    b_frames = load_frames(synth_copy / "flame2.csv")
    path = b_frames.loc[3, "rgb_path"]
    with Image.open(path) as im:
        Image.eval(im.convert("RGB"), lambda v: 255 - v).save(path, format="JPEG")
    assert data_digest(a, cache_dir=tmp_path) != data_digest(b_frames, cache_dir=tmp_path)
    assert data_digest(a, content=False) == data_digest(b_frames, content=False)


def test_fingerprints_are_remembered_by_path_size_and_mtime(synth_copy, tmp_path, monkeypatch):
    import os

    from flame_kd.data import fingerprint

    frames = load_frames(synth_copy / "flame2.csv")
    first = data_digest(frames, cache_dir=tmp_path)
    calls = []
    real = fingerprint.file_hash
    monkeypatch.setattr(fingerprint, "file_hash", lambda p: calls.append(p) or real(p))
    assert data_digest(frames, cache_dir=tmp_path) == first and calls == []  # a re-run hashes nothing
    path = frames.loc[0, "ir_path"]
    with open(path, "ab") as f:
        f.write(b"\0")  # same name, other bytes (and size)
    os.utime(path, ns=(1, 1))
    assert data_digest(frames, cache_dir=tmp_path) != first
    assert calls == [os.path.abspath(path)]  # only the changed file is hashed again


def test_check_reports_what_training_would_refuse(synth_copy, tmp_path):
    """One data contract: a CSV too small to split fails check as it fails training."""
    csv = synth_copy / "flame2.csv"
    df = pd.read_csv(csv, dtype=str)
    df.iloc[:1].to_csv(tmp_path / "one.csv", index=False)
    (tmp_path / "254p RGB Images").symlink_to(synth_copy / "254p RGB Images")
    (tmp_path / "254p Thermal Images").symlink_to(synth_copy / "254p Thermal Images")
    result = run_check(str(tmp_path / "one.csv"))
    assert result.exit_code == 2 and "1 frames are too few: the val and test splits get 0 and 0" in result.output, result.output


def test_check_flags_one_image_under_several_rows(synth_copy):
    csv = synth_copy / "flame2.csv"
    df = pd.read_csv(csv, dtype=str)
    df.loc[5, ["rgb_frame", "ir_frame"]] = df.loc[4, ["rgb_frame", "ir_frame"]].to_numpy()
    df.loc[5, "id"] = "9999"
    df.to_csv(csv, index=False)
    same = run_check(str(csv))
    if df.loc[5, "fire"] == df.loc[4, "fire"] and df.loc[5, "smoke"] == df.loc[4, "smoke"]:
        assert same.exit_code == 0 and "warning: 254p RGB Frame (5).jpg is used by 2 rows" in same.output
    df.loc[5, "fire"] = str(1 - int(df.loc[4, "fire"]))
    df.to_csv(csv, index=False)
    differ = run_check(str(csv))
    assert differ.exit_code == 2 and "is used by 2 rows with different labels (row 6, row 7)" in differ.output


def test_a_single_class_is_a_warning(synth_copy):
    csv = synth_copy / "flame2.csv"
    df = pd.read_csv(csv, dtype=str)
    df["smoke"] = "0"
    df.to_csv(csv, index=False)
    (synth_copy / "label_ranges.tsv").unlink()  # its YY ranges would contradict the new labels
    result = run_check(str(csv))
    assert "warning: smoke is 0 in every row" in result.output, result.output
