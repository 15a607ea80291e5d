"""bench/memory.py runs end to end on a CPU (tiny models, 32 px) and prints measured rows."""

from __future__ import annotations

import pytest

from pipeline_helpers import REPO

pytestmark = pytest.mark.slow  # two model subprocesses: `make test-fast` leaves it out


def test_memory_bench_prints_measured_rows(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    bench = pytest.importorskip("memory")
    bench.main(["--models", "teacher:timm:test_resnet,student:lightweight-cnn", "--image-size", "32",
                "--batches", "2,4", "--budget-gib", "8", "--threads", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "| model |" not in line]
    body = {line.split("|")[1].strip(): line for line in rows}
    assert set(body) == {"timm:test_resnet", "lightweight-cnn"}
    for line in body.values():
        cells = [c.strip() for c in line.strip("|").split("|")]
        at2, at4 = float(cells[2]), float(cells[3])
        assert 0.1 < at2 <= at4 < 8  # peak RSS in GiB, measured at 2 then 4 frames
