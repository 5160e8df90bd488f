"""One torch thread in these tests: the small convolutions and MLPs here run several times faster
that way on a shared 2-core machine (threads fight over the cores), and results are the same."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
