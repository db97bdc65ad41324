"""Pytest configuration: the GPU marker's skip rule."""

from __future__ import annotations

import pytest

from helpers import kernel_skip_reason


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    reason = kernel_skip_reason()
    if reason:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))
