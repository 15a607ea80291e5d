"""Images decoded as they are, files refused by type before opening, fingerprints that notice an
edit whose size and mtime were put back."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pandas as pd
from click.testing import CliRunner
from PIL import Image

from flame_kd.cli import main
from flame_kd.data.dataset import decode_image
from flame_kd.data.fingerprint import fingerprints
from flame_kd.files import not_regular


def _ir_folder(copy) -> tuple[pd.DataFrame, list[str]]:
    table = pd.read_csv(copy / "flame2.csv")
    return table, [str(copy / p) for p in table["ir_frame"]]


def test_a_16_bit_thermal_png_is_scaled_by_its_range_and_said_so(synth_copy):
    table, _ = _ir_folder(synth_copy)
    ramp = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 7 + 20000)  # 20000..27161: no 8-bit value
    for i, name in enumerate(table["ir_frame"]):
        path = synth_copy / name
        Image.fromarray(ramp).save(path.with_suffix(".png"))  # Pillow 13 infers I;16 from uint16
        path.unlink()
        table.loc[i, "ir_frame"] = str(name).rsplit(".", 1)[0] + ".png"
    table.to_csv(synth_copy / "flame2.csv", index=False)
    frame = decode_image(str(synth_copy / table["ir_frame"][0]), 32)
    assert frame.dtype == np.uint8 and frame.min() == 0 and frame.max() == 255  # not 255 everywhere
    assert np.all(np.diff(frame[..., 0].ravel().astype(int)) >= 0)  # the ramp kept its order
    result = CliRunner().invoke(main, ["data", "check", str(synth_copy / "flame2.csv")])
    assert result.exit_code == 0, result.output
    assert "RGB: 8-bit RGB; IR: 16-bit grey (I;16), scaled to 8 bits by each image's min..max" in result.output


def test_a_tiny_or_odd_mode_image_is_a_named_problem(synth_copy):
    table, irs = _ir_folder(synth_copy)
    Image.new("RGB", (1, 1)).save(irs[0], format="JPEG")
    Image.new("RGB", (1, 1)).save(synth_copy / table["rgb_frame"][0], format="JPEG")
    result = CliRunner().invoke(main, ["data", "check", str(synth_copy / "flame2.csv")])
    assert result.exit_code == 2
    assert "1x1 px, smaller than 8x8: no frame to learn from" in result.output


def test_a_fifo_as_an_image_or_csv_is_refused_by_type_without_opening(synth_copy):
    table, irs = _ir_folder(synth_copy)
    os.unlink(irs[3])
    os.mkfifo(irs[3])  # open() on it would wait for a writer for ever
    assert not_regular(irs[3]) == "is a FIFO (named pipe), not a regular file"
    result = CliRunner().invoke(main, ["data", "check", str(synth_copy / "flame2.csv")])
    assert result.exit_code == 2 and "is a FIFO (named pipe), not a regular file" in result.output
    os.mkfifo(synth_copy / "pipe.csv")
    result = CliRunner().invoke(main, ["data", "check", str(synth_copy / "pipe.csv")])
    assert result.exit_code == 2 and "pipe.csv: is a FIFO (named pipe), not a regular file" in result.output
    assert not_regular("/dev/null") == "is a character device, not a regular file"


def test_an_edit_with_its_size_and_mtime_put_back_is_hashed_again(synth_copy, tmp_path):
    _, irs = _ir_folder(synth_copy)
    path = irs[0]
    before = fingerprints([path], cache_dir=tmp_path / "fp")
    st = os.stat(path)
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0xFF  # other pixels, the same size
    time.sleep(0.01)
    with open(path, "r+b") as f:  # in place: the inode stays, only the ctime tells
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p, rsync -t and tar do
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns
    after = fingerprints([path], cache_dir=tmp_path / "fp")
    assert after != before
    shutil.copy2(irs[2], path + ".new")  # a renamed-over file: a new inode
    os.replace(path + ".new", path)
    assert fingerprints([path], cache_dir=tmp_path / "fp") != after
