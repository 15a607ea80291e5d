"""The accelerator benchmark runs end to end on a CPU (a smoke test: tiny models, 32 px, 2 steps)."""

from __future__ import annotations


import pytest

from pipeline_helpers import REPO


def test_gpu_throughput_smoke(tmp_path, monkeypatch, capsys):
    for var in ("MLFLOW_TRACKING_URI", "FLAME_KD_CACHE"):  # the bench points them at its temp folder
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    monkeypatch.chdir(tmp_path)
    gpu_throughput = pytest.importorskip("gpu_throughput")
    gpu_throughput.main(["--device", "cpu", "--steps", "2", "--image-size", "32", "--batch-size", "4",
                         "--teacher", "timm:test_resnet", "--student", "timm:test_efficientnet", "--compile", "off",
                         "--views", "2", "--epoch-frames", "16", "--epoch-repeats", "1",
                         "--threads", "0"])  # 0: leave this process's torch and numba threads alone
    out = capsys.readouterr().out
    assert "device: cpu" in out
    table = [line for line in out.splitlines() if line.startswith(("memory ", "device "))]
    assert len(table) == 3  # memory cache x augmentation host/device, device cache (augmented there)
    for line in table:
        data, teacher, student = (float(v.replace(",", "")) for v in line.split()[3:6])
        assert data > 0 and teacher > 0 and student > 0
    assert "cache device / memory, teacher" in out and "augment_on device / host, data" in out
    assert sorted(line.split()[1] for line in table) == ["device", "device", "host"]
    assert "cached KD (kl_bce, 2 views)" in out and "ratio" in out


def test_use_store_keeps_artifacts_inside_the_bench_folder(tmp_path):
    """A SQLite store puts artifacts in ./mlruns of the working folder: a bench must not write into the caller's."""
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; sys.path.insert(0, 'bench'); from _common import use_store; "
            "import mlflow; use_store(Path(sys.argv[1])); "
            "print(mlflow.get_experiment(mlflow.create_experiment('x')).artifact_location)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "store")], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.strip()
    store = (tmp_path / "store").resolve()
    assert out.startswith((store.as_uri(), str(store))), out  # not the repository's ./mlruns
