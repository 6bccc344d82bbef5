"""Fixtures shared by the test modules."""

from __future__ import annotations

from types import ModuleType

import pytest

from fcvsock import _core


def _compiled_frame_core() -> ModuleType:
    # A missing extension must fail the run: a silent fallback to the twin
    # would leave the compiled core untested.
    if _core.extensions_disabled:
        pytest.skip("FCVSOCK_NO_EXTENSIONS is set, so the compiled core is not tested")
    if _core.cython_core is None:
        pytest.fail(
            "import fcvsock._cframes failed: build it with pip install -e . "
            "or set FCVSOCK_NO_EXTENSIONS=1"
        )
    return _core.cython_core


@pytest.fixture(scope="session", params=["python_core", "cython_core"])
def frame_core(request: pytest.FixtureRequest) -> ModuleType:
    """Each frame core in turn: the pure-Python twin, then the compiled one."""
    if request.param == "python_core":
        return _core.python_core
    return _compiled_frame_core()


@pytest.fixture(scope="session")
def cython_frame_core() -> ModuleType:
    """The compiled frame core, for tests that compare it with the twin."""
    return _compiled_frame_core()
