"""The tests here are marked ``vision``: they need torchvision and timm, and torchvision needs
the torch it was built for (torch 2.14.1 with torchvision 0.29.1), while the main environment
keeps torch 2.13.0 and has no torchvision. They run in a second environment that ``.ci/run``
builds from ``requirements-vision.txt``::

    python -m pytest -m vision tests/train/vision

Why a hook rather than ``-m "not vision"`` in pyproject's ``addopts``: any ``-m`` on the
command line (``-m "not slow"``) replaces the one in ``addopts``, and the vision tests would then
fail in the main environment for want of torchvision. So a run whose ``-m`` expression does not
name ``vision`` (the main run, ``python -m pytest``) deselects them here: its summary counts
them as *deselected*, never as skipped, and no test is skipped for lack of torchvision in the
vision environment. The test modules import torchvision and timm inside the tests, so the main
run still collects (and so checks the syntax of) them."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if "vision" in (config.getoption("markexpr") or ""):
        return  # -m names vision: pytest's own marker selection decides
    drop = [item for item in items if item.get_closest_marker("vision") is not None]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [item for item in items if item.get_closest_marker("vision") is None]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as tests/train/learners: on a 2-core machine that other processes
    share, threads fight over the cores; results are the same."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tvm():
    """``torchvision.models`` (imported here, so that the main run collects these modules)."""
    import torchvision.models

    return torchvision.models


@pytest.fixture(scope="session")
def timm():
    import timm

    return timm


@pytest.fixture(scope="session")
def digits32():
    """scikit-learn's 8x8 digits resized to 32x32 (bilinear), three channels: ``(x, y)``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = torch.nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False)
    return x.repeat(1, 3, 1, 1), torch.as_tensor(d.target)
