"""The analysis tests run tiny models: one intra-op thread is faster there than two, because on a
loaded machine every small op otherwise waits for the second thread."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
