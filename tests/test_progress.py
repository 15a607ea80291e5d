"""Off a terminal, long work prints a line at least every 30 s: step, count, rate and ETA."""

from __future__ import annotations

import logging
import time

from flame_kd import progress


def off_terminal_with_fake_clock(monkeypatch, seconds_per_tick: int) -> None:
    """Off a terminal, with a clock that moves ``seconds_per_tick`` each time it is read; the last
    line was printed at fake time 0."""
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    clock = iter(range(0, 100_000, seconds_per_tick))
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(progress._Watchdog, "last", 0)


def test_track_logs_count_rate_and_eta_off_a_terminal(monkeypatch, caplog):
    off_terminal_with_fake_clock(monkeypatch, 10)  # each item takes 10 s
    with caplog.at_level(logging.INFO, logger="flame_kd"):
        out = list(progress.track(range(12), "epoch 1/3 train", unit="batches"))
    assert out == list(range(12))
    lines = [r.getMessage() for r in caplog.records]
    assert lines, "no progress line"
    assert lines[0].startswith("epoch 1/3 train: ") and "/12 batches" in lines[0]
    assert "batches/s" in lines[0] and "ETA" in lines[0]
    assert len(lines) >= 3  # one at least every 30 s of 120 s


def test_stage_heartbeat_when_nothing_is_printed(monkeypatch, caplog):
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    monkeypatch.setattr(progress, "EVERY", 0.5)
    with caplog.at_level(logging.INFO, logger="flame_kd"):
        with progress.stage("UMAP of 500 test features"):
            time.sleep(2.5)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("UMAP of 500 test features: still running (")
    assert lines[-1].startswith("UMAP of 500 test features: done in ")


def test_a_quick_stage_says_nothing(monkeypatch, caplog):
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="flame_kd"):
        with progress.stage("ONNX check"):
            pass
    assert not caplog.records


def test_on_a_terminal_nothing_is_logged(monkeypatch, caplog):
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    with caplog.at_level(logging.INFO, logger="flame_kd"):
        assert list(progress.track(range(3), "x")) == [0, 1, 2]
    assert not caplog.records


def test_lines_keep_coming_across_short_steps(monkeypatch, caplog):
    """Three 20-s steps in a row: no step alone lasts 30 s, yet a line comes at least every 30 s."""
    off_terminal_with_fake_clock(monkeypatch, 5)  # each item takes 5 s
    with caplog.at_level(logging.INFO, logger="flame_kd"):
        for step in ("decoding frames", "teacher outputs", "epoch 1/6 train"):
            list(progress.track(range(4), step))
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["teacher outputs", "epoch 1/6 train"]
