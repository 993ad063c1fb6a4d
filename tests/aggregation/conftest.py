"""Fixtures shared by the aggregation tests."""

import pytest

from jdoptim.solvers.eigh import eig_method


@pytest.fixture(params=["jacobi", "eigh"])
def each_eig_method(request):
    """Run a test with the sync-free Jacobi eigensolver (what accelerators use) and with LAPACK's
    eigh (the CPU default); use it with ``pytestmark = pytest.mark.usefixtures(...)``."""
    with eig_method(request.param):
        yield request.param
