#!/usr/bin/env bash
# Creates the Python 3.11 virtual environment $VENV (default .venv) with everything the project
# needs, then installs Detectron2 (scripts/install_detectron2.sh). Idempotent: a finished venv is
# marked with $VENV/.ready and left alone.
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON_BIN=${PYTHON_BIN:-python3.11}
if [ -f "$VENV/.ready" ]; then exit 0; fi
echo "[setup] creating $VENV with $PYTHON_BIN"
$PYTHON_BIN -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade "pip<27" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -m pip install -q -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import torch, torchvision, h5py, cv2, pycocotools, fvcore" 
PYTHON="$VENV/bin/python" bash scripts/install_detectron2.sh
touch "$VENV/.ready"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch;print("torch", torch.__version__)')"
