"""Choose the frame core: the compiled one, or its pure-Python twin.

``FCVSOCK_NO_EXTENSIONS=1`` (any non-empty value but ``0``) selects the twin.
Otherwise the compiled module is used when it imports; when it does not,
the twin is used and :data:`core_impl` reports it.  Tests reach both modules
through :data:`python_core` and :data:`cython_core`.
"""

from __future__ import annotations

import os
from types import ModuleType

from . import _pyframes as python_core

cython_core: ModuleType | None
try:
    from . import _cframes as cython_core  # type: ignore[attr-defined,no-redef]
except ImportError:
    cython_core = None

extensions_disabled = os.environ.get("FCVSOCK_NO_EXTENSIONS", "") not in ("", "0")

if cython_core is not None and not extensions_disabled:
    core: ModuleType = cython_core
    core_impl = "cython"
else:
    core = python_core
    core_impl = "python"

FrameDecoder = core.FrameDecoder
FrameWriter = core.FrameWriter
encode_frame = core.encode_frame

__all__ = [
    "FrameDecoder",
    "FrameWriter",
    "core",
    "core_impl",
    "cython_core",
    "encode_frame",
    "extensions_disabled",
    "python_core",
]
