# Shared by bin/zraft and bin/test (sourced, not run): make sure REPO/.venv exists and
# holds the project installed in editable mode with its test extras.
#
# Sets ZRAFT_REPO (the repo root) and ZRAFT_VENV (REPO/.venv). The install is redone
# only when setup.cfg or pyproject.toml changed since the last one: a hash of the two
# files is kept in .venv/.zraft-stamp. ZRAFT_PYTHON picks the interpreter that makes
# the venv (default: python3).

ZRAFT_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
ZRAFT_VENV="$ZRAFT_REPO/.venv"

_zraft_stamp() {
    local hash=sha256sum
    command -v sha256sum >/dev/null 2>&1 || hash=cksum
    cat "$ZRAFT_REPO/setup.cfg" "$ZRAFT_REPO/pyproject.toml" | "$hash" | cut -d' ' -f1
}

_zraft_venv_ok() {
    [ -x "$ZRAFT_VENV/bin/python" ] && [ ! -L "$ZRAFT_VENV/bin/python" ] &&
        [ -f "$ZRAFT_VENV/.zraft-stamp" ] &&
        [ "$(cat "$ZRAFT_VENV/.zraft-stamp")" = "$(_zraft_stamp)" ] &&
        "$ZRAFT_VENV/bin/python" -c '' 2>/dev/null
}

_zraft_setup_venv() {
    local python="${ZRAFT_PYTHON:-python3}" log rc
    if ! command -v "$python" >/dev/null 2>&1; then
        echo "zraft: $python not found; install Python 3.10 or newer (or set ZRAFT_PYTHON)" >&2
        return 1
    fi
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
        echo "zraft: $python is $("$python" -V 2>&1); zraft needs Python 3.10 or newer" >&2
        return 1
    fi

    mkdir -p "$ZRAFT_VENV" || return 1
    # One setup at a time: a second caller waits, then finds the work done.
    if command -v flock >/dev/null 2>&1; then
        exec 9>"$ZRAFT_VENV/.zraft-lock" && flock 9
    fi
    if _zraft_venv_ok; then
        exec 9>&-
        return 0
    fi

    echo "zraft: setting up .venv (first run only)..." >&2
    log="$ZRAFT_VENV/.zraft-setup.log"
    rm -f "$ZRAFT_VENV/.zraft-stamp"
    (
        set -e
        if ! "$ZRAFT_VENV/bin/python" -c '' 2>/dev/null || [ -L "$ZRAFT_VENV/bin/python" ]; then
            # Missing or broken (e.g. its base interpreter is gone), or made with symlinks: start
            # afresh, but keep the lock file that other callers may be waiting on. --copies: a
            # venv python that is its own file, so tools that compare interpreters by their
            # resolved path (to re-exec under the venv) see the difference.
            find "$ZRAFT_VENV" -mindepth 1 -maxdepth 1 ! -name .zraft-lock ! -name .zraft-setup.log \
                -exec rm -rf {} +
            "$python" -m venv --copies "$ZRAFT_VENV"
        fi
        "$ZRAFT_VENV/bin/python" -m pip install --disable-pip-version-check --no-input \
            -e "$ZRAFT_REPO[test]"
    ) >"$log" 2>&1
    rc=$?
    if [ $rc -ne 0 ]; then
        cat "$log" >&2
        echo "zraft: setting up $ZRAFT_VENV failed (log above, also in $log)" >&2
        exec 9>&-
        return 1
    fi
    _zraft_stamp >"$ZRAFT_VENV/.zraft-stamp"
    exec 9>&-
}

_zraft_venv_ok || _zraft_setup_venv || exit 1
