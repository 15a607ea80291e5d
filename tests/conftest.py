"""Shared fixtures: one tiny synthetic FLAME2-like data set per test session (read-only: copy it
with ``synth_copy`` before changing anything)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Left in the checkout by running Python and pytest themselves, not by the code under test.
TOOL_LITTER = ("__pycache__/", ".pytest_cache/")


def checkout_files() -> set[str] | None:
    """Untracked and ignored paths of the checkout (``git status --ignored``), or None outside git."""
    out = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=REPO,
                         capture_output=True, text=True)
    if out.returncode != 0:
        return None
    paths = {line[3:] for line in out.stdout.splitlines() if line[:2] in ("??", "!!")}
    return {p for p in paths if not any(t in p or p.endswith(t.rstrip("/")) for t in TOOL_LITTER)}


# Whole test files are handed to the xdist workers in collection order (`--dist loadfile
# --no-loadscope-reorder`), so the longest start first and do not end the run on one worker while the
# other idles. Their lengths: what this checkout's last runs measured (pytest's cache, written by the
# session's controller at the end), else tests/durations.json (committed; `make durations` refreshes it
# from the cache). A file measured nowhere keeps its place after them.
DURATIONS_FILE = Path(__file__).with_name("durations.json")
DURATIONS_KEY = "flame_kd/file_seconds"


def recorded_durations(config) -> dict[str, float]:
    """Seconds per test file (``tests/test_x.py``): the committed figures, updated by this checkout's."""
    import json

    seconds = json.loads(DURATIONS_FILE.read_text()) if DURATIONS_FILE.exists() else {}
    cache = getattr(config, "cache", None)  # None under -p no:cacheprovider
    if cache is not None:
        seconds.update(cache.get(DURATIONS_KEY, {}))
    return seconds


def pytest_collection_modifyitems(session, config, items) -> None:
    seconds = recorded_durations(config)
    # stable: a file's own order stays
    items.sort(key=lambda item: -seconds.get(item.nodeid.split("::")[0], 0.0))


_SESSION_SECONDS: dict[str, float] = {}  # this session's seconds per test file


def pytest_runtest_logreport(report) -> None:
    """Adds up each test file's setup, call and teardown seconds (on the controller, from every worker)."""
    path = report.nodeid.split("::")[0]
    _SESSION_SECONDS[path] = _SESSION_SECONDS.get(path, 0.0) + report.duration


def save_durations(config) -> None:
    """This session's seconds per file into pytest's cache, when whole files ran (no -k or -m)."""
    cache = getattr(config, "cache", None)
    if cache is None or not _SESSION_SECONDS or config.option.keyword or config.option.markexpr:
        return
    seconds = cache.get(DURATIONS_KEY, {})
    seconds.update({path: round(s, 1) for path, s in _SESSION_SECONDS.items()})
    cache.set(DURATIONS_KEY, seconds)


def _controller(config) -> bool:
    """The process that runs the session (not a pytest-xdist worker)."""
    return not hasattr(config, "workerinput")


def pytest_configure(config) -> None:
    """UMAP's numba code compiled once for every test process and every later suite: one cache folder
    (``plots.import_umap``) shared by the xdist workers and the subprocesses they start, outside the
    per-test ``$FLAME_KD_CACHE`` (a cold compile costs ~50 s a process)."""
    import os
    import tempfile

    os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(tempfile.gettempdir()) / f"flame-kd-tests-numba-{os.getuid()}"))


def pytest_sessionstart(session) -> None:
    if _controller(session.config):
        session.config.stash[CHECKOUT_BEFORE] = checkout_files()


def pytest_sessionfinish(session, exitstatus) -> None:
    """After every test (on every worker): the suite left no file in the checkout, else the run fails."""
    if _controller(session.config):
        save_durations(session.config)
    before = session.config.stash.get(CHECKOUT_BEFORE, None) if _controller(session.config) else None
    after = checkout_files() if before is not None else None
    left = sorted(after - before) if after is not None else []
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        reporter.write_line(f"FAILED: the tests wrote into the checkout: {left[:20]}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


CHECKOUT_BEFORE = pytest.StashKey[set]()


@pytest.fixture(autouse=True)
def _outside_the_checkout(tmp_path, monkeypatch):
    """Every test runs in its own temporary folder, so nothing it writes lands in the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _tracking_uri_restored():
    """MLflow's global tracking URI (and the MLFLOW_TRACKING_URI it exports) as before the test: a test
    that configures a store (``flame_kd.tracking.configure``) leaves it behind, and a later test's
    ``MlflowClient()`` went there (an unreachable test server: four minutes of MLflow's retries)."""
    import os

    from mlflow.tracking._tracking_service import utils

    uri, env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    yield
    utils._tracking_uri = uri
    if env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = env



SYNTH_FRAMES, SYNTH_SIZE, SYNTH_SEED = 120, 32, 7


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """Folder of a 120-frame, 32-px synthetic data set (image folders, flame2.csv, label_ranges.tsv)."""
    from flame_kd.data.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, frames=SYNTH_FRAMES, image_size=SYNTH_SIZE, seed=SYNTH_SEED)
    return out


@pytest.fixture(scope="session")
def synth_csv(synth_dir) -> Path:
    """Path of the session's synthetic ``flame2.csv``. Do not modify the files it points to."""
    return synth_dir / "flame2.csv"


@pytest.fixture
def synth_copy(synth_dir, tmp_path) -> Path:
    """A private copy of the synthetic data set folder, free to break; returns its folder."""
    return Path(shutil.copytree(synth_dir, tmp_path / "synth"))


@pytest.fixture(scope="session")
def auth_front(tmp_path_factory):
    """A real `mlflow server` on loopback behind a basic-auth front (``auth_front.AuthFront``), shared
    by the session's credential and server-loss tests; reset to up after each use."""
    from auth_front import AuthFront

    front = AuthFront(tmp_path_factory.mktemp("mlflow-server"))
    yield front
    front.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on loopback, artifacts served over HTTP, on PostgreSQL where
    FLAME_KD_TEST_POSTGRES is set, else SQLite (``mlflow_server.MlflowServer``); one per session."""
    from mlflow_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    yield server
    server.close()
