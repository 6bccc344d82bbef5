#!/usr/bin/env bash
# Build the compiled frame core with AddressSanitizer and run the frame and
# fuzz tests against it.
#
# The build happens in a scratch copy of the work tree, so the extension in
# fcvsock/ stays the normal build.  CPython itself is not instrumented, so
# libasan is preloaded and leak checking is off (CPython keeps memory until
# exit by design).  Extra arguments go to pytest.
#
#   bash fuzz/asan.sh              # tests/test_frames.py and tests/test_fuzz.py
#   bash fuzz/asan.sh -k decoder   # a subset
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
libasan=$(gcc -print-file-name=libasan.so)
if [[ ! -e "$libasan" ]]; then
    echo "asan: gcc has no libasan.so; install libasan (Debian: libasan8)" >&2
    exit 2
fi

scratch=$(mktemp -d "${TMPDIR:-/tmp}/fcvsock-asan.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

echo "== copy the work tree to $scratch"
git ls-files -z --cached --others --exclude-standard \
    | xargs -0 cp --parents -t "$scratch"

echo "== build fcvsock._cframes with -fsanitize=address"
(
    cd "$scratch"
    CFLAGS="-fsanitize=address -fno-omit-frame-pointer -O1 -g" \
    LDFLAGS="-fsanitize=address" \
        "$python" setup.py -q build_ext --inplace --force
)

export LD_PRELOAD="$libasan"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1"
export PYTHONPATH="$scratch"
cd "$scratch"

echo "== check that the instrumented module is the one imported"
"$python" - <<'EOF'
import os
import sys

import fcvsock._cframes as compiled
from fcvsock import _core

scratch = os.getcwd()
if not compiled.__file__.startswith(scratch) or _core.core_impl != "cython":
    sys.exit(f"asan: imported {compiled.__file__} ({_core.core_impl}), "
             f"expected the build in {scratch}")
with open(compiled.__file__, "rb") as library:
    if b"__asan_init" not in library.read():
        sys.exit(f"asan: {compiled.__file__} was built without AddressSanitizer")
print(f"using {compiled.__file__}")
EOF

echo "== tests/test_frames.py and tests/test_fuzz.py under AddressSanitizer"
"$python" -m pytest -p no:cacheprovider -q tests/test_frames.py tests/test_fuzz.py "$@"
