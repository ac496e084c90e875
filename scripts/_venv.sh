# Sourced by scripts/serve and scripts/test: makes .venv with the locked dependency set.
# Everything a fresh machine needs is installed here, from PyPI, pinned by requirements.lock.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CALLGATE_VENV:-$root/.venv}"

pick_python() {
    for candidate in python3.11 python3.12 python3.13 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "callgate needs Python 3.11 or newer on PATH" >&2
    return 1
}

# ensure_venv EXTRAS: install the project (editable) with the given extras, once per lock change.
ensure_venv() {
    local extras="$1"
    local stamp="$venv/.callgate-installed"
    local want
    want="$(cat "$root/requirements.lock" "$root/pyproject.toml" | cksum | cut -d' ' -f1)-$extras"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        ensure_compiled
        return 0
    fi
    if [[ ! -x "$venv/bin/python" ]]; then
        "$(pick_python)" -m venv "$venv"
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "pip>=24"
    PIP_CONSTRAINT="$root/requirements.lock" "$venv/bin/python" -m pip install --quiet \
        --disable-pip-version-check -c "$root/requirements.lock" -e "$root[$extras]"
    echo "$want" >"$stamp"
    ensure_compiled
}

# ensure_compiled: the mypyc build of the hot path (src/callgate/_accel.py says what and why),
# made when a compiled source changed since the last build, in well under a minute. Without it
# (no C compiler, or CALLGATE_PURE=1) callgate runs the same modules as pure Python.
ensure_compiled() {
    if [[ "${CALLGATE_PURE:-0}" == "1" ]]; then
        return 0
    fi
    if ! "$venv/bin/python" -m callgate.accelerate build; then
        echo "WARNING: the mypyc build failed: callgate runs as pure Python (slower)" >&2
    fi
}
