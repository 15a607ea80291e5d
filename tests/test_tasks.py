"""Cached teacher outputs refuse a student training set they were not computed for."""

from __future__ import annotations

import pytest
import torch

from flame_kd.errors import ConfigError
from flame_kd.tasks import TeacherOutputs


class _Dataset:
    def __init__(self, augment: str):
        self.augment, self.views, self.view_seed = augment, 0, 0

    def use_views(self, views: int, seed: int) -> None:
        self.views, self.view_seed = views, seed


def _cache(augment: str, views: int) -> dict:
    n = 4
    out = {"ids": torch.arange(n), "known": torch.ones(n, dtype=torch.bool), "logits": torch.zeros(n, 2),
           "features": torch.zeros(n, 3), "augment": augment, "views": views, "view_seed": 7}
    if views:
        out |= {"view_known": torch.ones(n, dtype=torch.bool), "view_logits": torch.zeros(views, n, 2),
                "view_features": torch.zeros(views, n, 3)}
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
