#!/usr/bin/env bash
# Create .venv (if missing) and install croc with everything the tests and the demo need.
#
# torch: a torch the venv can already import is kept. If the system python3 has torch, the venv
# is created with --system-site-packages so that torch is reused; otherwise torch==2.13.0 is
# installed (on our CPU machines pip takes the local CPU wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
  if python3 -c "import torch" >/dev/null 2>&1; then
    echo "setup: reusing the system torch $(python3 -c 'import torch; print(torch.__version__)')"
    python3 -m venv --system-site-packages "$VENV"
  else
    python3 -m venv "$VENV"
  fi
fi
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

pip_install "setuptools>=64" wheel numpy
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch==2.13.0"
  pip_install "torch==2.13.0"
fi
# Triton 3.6 is what our GPU machines run; CI proves the interpreter and AOT compile with it.
if ! "$PY" -c "import triton" >/dev/null 2>&1 && [ "$(uname -s)" = "Linux" ]; then
  pip_install "triton==3.6.*"
fi
echo "setup: installing croc (editable, with the C++ extension) and its test/train dependencies"
pip_install --no-build-isolation -e ".[test,train,deepspeed,bench]"
"$PY" -c "import torch, croc; print(f'setup: torch {torch.__version__}, croc {croc.__version__} ready')"
