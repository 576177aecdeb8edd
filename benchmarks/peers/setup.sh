#!/usr/bin/env bash
# Build the SEPARATE venv used by benchmarks/peers/run_peers.py (sfft CPU + properimage ZOGY).
# Kept apart from the project venv because sfft needs numpy < 2.4 and pulls its own stack.
#   bash benchmarks/peers/setup.sh [VENV_DIR]   (default benchmarks/peers/.venv)
# Needs: python3.11, root (or sudo) for the Debian package source-extractor (sfft calls `sex`).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="${1:-$HERE/.venv}"
PY="${PYTHON:-python3.11}"
if ! command -v source-extractor >/dev/null && ! command -v sex >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq source-extractor
fi
# sfft shells out to `sex`; Debian names the binary source-extractor.
if ! command -v sex >/dev/null; then
  mkdir -p "$VENV/bin"
fi
"$PY" -m venv "$VENV"
# setuptools < 81: tinynpydb's ez_setup imports pkg_resources (removed in 81) and otherwise tries to
# download setuptools 18 from the network at build time.
"$VENV/bin/pip" install -q --upgrade pip "setuptools<81" wheel
"$VENV/bin/pip" install -q "numpy<2.4" scipy astropy sep "sfft==1.7.3"
# properimage: tinynpydb fails in an isolated build; install it without isolation, then
# properimage without its (over-pinned) dependency resolution.
"$VENV/bin/pip" install -q --no-build-isolation "tinynpydb==0.1.2"
"$VENV/bin/pip" install -q --no-deps "properimage==0.7.2"
# properimage's runtime dependencies (not pulled in with --no-deps)
"$VENV/bin/pip" install -q astroalign matplotlib joblib attrs
"$VENV/bin/pip" install -q astroscrappy pyfftw 2>/dev/null || true
[ -e "$VENV/bin/sex" ] || ln -sf "$(command -v source-extractor || command -v sex)" "$VENV/bin/sex"
"$VENV/bin/python" -c "import sfft, properimage; print('peers ok: sfft', getattr(sfft,'__version__','?'), 'properimage', properimage.__version__)"
