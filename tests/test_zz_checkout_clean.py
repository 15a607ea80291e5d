"""Runs last (files are collected in name order): the suite left no file in the checkout."""

from __future__ import annotations

import pytest
from conftest import checkout_files


def test_the_suite_left_no_file_in_the_checkout(checkout_before):
    if checkout_before is None:
        pytest.skip("not a git checkout: nothing to compare")
    left = sorted(checkout_files() - checkout_before)
    assert not left, f"tests wrote into the checkout: {left[:20]}"
