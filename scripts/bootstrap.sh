#!/usr/bin/env bash
# Set up everything the project needs on a fresh Debian/Ubuntu machine, offline from crates.io:
#   1. apt: PyO3 + rayon sources from Debian's Rust registry (and cargo if absent), redis-server, chromium;
#   2. a Python 3.11 virtualenv in .venv;
#   3. torch 2.13.0 (CPU) and the project itself, editable, built by maturin (Rust included), installed by uv.
# Idempotent: each step is skipped when already done; the install is redone when pyproject.toml
# or the Rust sources change.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*"; }
SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"

need_apt=()
[ -d /usr/share/cargo/registry/pyo3-0.17.3 ] || need_apt+=(librust-pyo3-dev)
ls -d /usr/share/cargo/registry/rayon-1.* >/dev/null 2>&1 || need_apt+=(librust-rayon-dev)
command -v cargo >/dev/null || need_apt+=(cargo rustc)
command -v redis-server >/dev/null || need_apt+=(redis-server)   # the Redis Streams sink's tests
command -v chromium >/dev/null || need_apt+=(chromium)   # the operator page's browser tests (Playwright drives it)
command -v python3.11 >/dev/null || command -v python3 >/dev/null || need_apt+=(python3 python3-dev)
PY="${PYTHON:-$(command -v python3.11 || command -v python3 || echo python3)}"
if [ ! -x .venv/bin/pip ] && ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
  need_apt+=(python3-venv)   # Debian splits venv/ensurepip out of python3
fi
[ -n "${EXTRA_APT:-}" ] && need_apt+=(${EXTRA_APT})
if [ ${#need_apt[@]} -gt 0 ]; then
  log "apt-get install ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' 2>/dev/null || {
  echo "Python 3.11 is required (found: $("$PY" --version 2>&1)). Set PYTHON=/path/to/python3.11." >&2; exit 1; }
if [ ! -x .venv/bin/pip ]; then   # pip, not python: a half-made venv (no ensurepip) is redone
  log "creating .venv with $("$PY" --version)"
  rm -rf .venv
  "$PY" -m venv .venv
fi

stamp=.venv/.morl-installed
sources=$(cat pyproject.toml rust_ext/Cargo.toml rust_ext/src/*.rs .cargo/config.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sources" ]; then
  # torch 2.13.0: this machine's CPU wheel where it lies on disk (pip's find-links), else PyPI's
  torch=$(ls "${PIP_FIND_LINKS:-/opt/wheels}"/torch-2.13.0+cpu-*.whl 2>/dev/null | head -1 || true)
  log "install torch 2.13.0 ${torch:+(CPU, $torch) }and the project (editable; maturin builds rust_ext offline)"
  .venv/bin/python -m pip install -q uv
  # uv resolves and downloads in parallel (~100 s here where pip took ~200 s); bytecode compiled once, up front:
  # every Ray worker imports from this venv, and PYTHONDONTWRITEBYTECODE machines would otherwise recompile
  if ! .venv/bin/uv pip install -q --python .venv/bin/python --compile-bytecode \
      --reinstall-package morl-recsys "${torch:-torch==2.13.0}" -e ".[test,bench]"; then
    log "uv failed; installing with pip"
    .venv/bin/python -m pip install -q "torch==2.13.0"
    .venv/bin/python -m pip install -q -e ".[test,bench]"
  fi
  echo "$sources" > "$stamp"
fi
log "ready: $(.venv/bin/python -c 'import ray, torch, rust_ext; print(f"ray {ray.__version__}, torch {torch.__version__}, rust_ext ok")')"
