"""Cached teacher outputs refuse a student training set they were not computed for."""

from __future__ import annotations

import pytest
import torch

from flame_kd.errors import ConfigError
from flame_kd.teacher_cache import TeacherOutputs


class _Dataset:
    def __init__(self, augment: str):
        self.augment, self.views, self.view_seed = augment, 0, 0

    def use_views(self, views: int, seed: int) -> None:
        self.views, self.view_seed = views, seed


def _cache(augment: str, views: int) -> dict:
    n = 4
    out = {"ids": torch.arange(n), "known": torch.ones(n, dtype=torch.bool), "augment": augment, "views": views,
           "view_seed": 7, "outputs": {"logits": torch.zeros(n, 2), "features": torch.zeros(n, 3)}}
    if views:
        out |= {"view_known": torch.ones(n, dtype=torch.bool),
                "view_outputs": {"logits": torch.zeros(views, n, 2), "features": torch.zeros(views, n, 3)}}
    return out


@pytest.mark.parametrize("cached, asked", [("full", "flip"), ("none", "full"), ("flip", "none")])
def test_cached_outputs_refuse_another_augmentation(cached, asked):
    outputs = TeacherOutputs(cache=_cache(cached, 2 if cached != "none" else 0), frame_ids=list(range(4)))
    with pytest.raises(ConfigError, match=f"augment={cached!r}.*{asked!r}") as err:
        outputs.attach(_Dataset(asked))
    assert "\n" not in err.value.message


def test_attach_shows_the_cached_views():
    ds = _Dataset("full")
    TeacherOutputs(cache=_cache("full", 3), frame_ids=list(range(4))).attach(ds)
    assert (ds.views, ds.view_seed) == (3, 7)


def test_a_teacher_cache_that_would_not_fit_is_refused_in_one_line():
    from flame_kd.teacher_cache import check_room

    hint = {"logits": torch.zeros(4, 2, dtype=torch.float16), "hint": torch.zeros(4, 1024, 14, 14, dtype=torch.float16)}
    per_row = (2 + 1024 * 14 * 14) * 2  # bytes of one frame's float16 outputs
    rows = 53_000 * 9  # FLAME2-sized: every frame, and 8 views of the training frames
    with pytest.raises(ConfigError, match=r"need ~178.3 GiB, and this machine has 21.0 GiB memory available; "
                                          r"use --teacher-mode live") as err:
        check_room(hint, 4, rows, ("logits", "hint"), room=21 * 2**30, disk=10**15)
    assert "\n" not in err.value.message
    with pytest.raises(ConfigError, match="1.0 GiB temporary disk available"):
        check_room(hint, 4, rows, ("logits", "hint"), room=10**15, disk=2**30)
    check_room(hint, 4, int(0.8 * 2**30 // per_row) - 1, ("logits", "hint"), room=2**30, disk=2**30)  # fits: silent
