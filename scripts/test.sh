#!/usr/bin/env bash
# THE test command: sets up the locked Python environment, builds (or finds cached) the real test
# servers, then runs pytest. Arguments are passed to pytest, e.g. scripts/test.sh -m "not cluster".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

UV_VERSION=0.13.8
UV=(uv)
if ! command -v uv >/dev/null 2>&1; then
    echo "[test.sh] installing uv ${UV_VERSION}" >&2
    python3 -m pip install --quiet "uv==${UV_VERSION}" \
        || python3 -m pip install --quiet --user --break-system-packages "uv==${UV_VERSION}"
    command -v uv >/dev/null 2>&1 || UV=(python3 -m uv)
fi

"${UV[@]}" sync --locked --all-extras
scripts/build-test-servers.sh >/dev/null

# pytest's exit codes are all failures here, 5 (no tests collected) included.
rc=0
"${UV[@]}" run --locked --all-extras pytest "$@" || rc=$?
if [[ $rc -eq 5 ]]; then
    echo "[test.sh] pytest collected no tests" >&2
fi
exit "$rc"
