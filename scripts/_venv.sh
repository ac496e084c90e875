# Sourced by scripts/serve and scripts/test: makes .venv with the locked dependency set.
# Everything a fresh machine needs is installed here, from PyPI, pinned by requirements.lock.
# Each step prints one line saying what it does, so a first start can be watched.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CALLGATE_VENV:-$root/.venv}"

step() {
    echo "callgate setup: $*" >&2
}

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

# pip with the lock as constraints, for the project and for its build environment (where
# setup.py's mypyc build runs), so every machine installs and compiles with the same versions.
locked_pip() {
    PIP_CONSTRAINT="$root/requirements.lock" "$venv/bin/python" -m pip install --quiet \
        --disable-pip-version-check -c "$root/requirements.lock" "$@"
}

# ensure_venv EXTRAS: install the project (editable) with the given extras ("" for the runtime
# only), once per change of the lock, pyproject.toml or setup.py. The install compiles the hot path
# (setup.py); ensure_compiled rebuilds it when a compiled source was edited since.
ensure_venv() {
    local extras="$1"
    local stamp="$venv/.callgate-installed"
    local inputs want have=""
    inputs="$(cat "$root/requirements.lock" "$root/pyproject.toml" "$root/setup.py" | cksum | cut -d' ' -f1)"
    want="$inputs-$extras"
    [[ -f "$stamp" ]] && have="$(cat "$stamp")"
    # The runtime alone is satisfied by any install of the same inputs (the extras add to it).
    if [[ "$have" == "$want" || (-z "$extras" && "$have" == "$inputs-"*) ]]; then
        ensure_compiled
        return 0
    fi
    if [[ ! -x "$venv/bin/python" ]]; then
        step "creating the virtual environment $venv"
        "$(pick_python)" -m venv "$venv"
    fi
    step "updating pip"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "pip>=24"
    step "installing the locked dependencies${extras:+ with [$extras]} and compiling the hot path with mypyc (about a minute; pure Python without a C compiler)"
    locked_pip -e "$root${extras:+[$extras]}"
    echo "$want" >"$stamp"
    report_build
}

# ensure_compiled: rebuild the mypyc extensions through the build backend when a compiled source
# changed since the last build (callgate/_accel.py: a stale build never runs). CALLGATE_PURE=1
# skips it: that run uses the sources anyway.
ensure_compiled() {
    if [[ "${CALLGATE_PURE:-0}" == "1" ]]; then
        return 0
    fi
    if [[ "$(hot_path)" == "stale" ]]; then
        step "a compiled source changed: rebuilding the hot path with mypyc (about a minute)"
        locked_pip --no-deps -e "$root"
        report_build
    fi
}

hot_path() {
    "$venv/bin/python" -c 'import callgate; print(callgate.IMPLEMENTATION)'
}

report_build() {
    local built
    built="$(hot_path)"
    if [[ "$built" == "compiled" ]]; then
        step "hot path compiled"
    else
        echo "WARNING: the hot path is not compiled ($built; no C compiler?): callgate runs as pure Python (slower)" >&2
    fi
}
