"""Fixtures shared by the test files."""
import multiprocessing

import pytest


@pytest.fixture(params=["fork", "forkserver", "spawn"])
def pool_context(request):
    """A multiprocessing start method name, for the tests that run under each."""
    if request.param not in multiprocessing.get_all_start_methods():
        pytest.skip(f"start method {request.param} not available")
    return request.param
