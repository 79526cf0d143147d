#!/usr/bin/env bash
# Creates the Python 3.11 virtual environment $VENV (default .venv) with everything the project
# needs, installs Detectron2 (scripts/install_detectron2.sh), then this project in editable mode
# (pyproject.toml: the builder and montage_pretrain packages, console scripts). Idempotent: a
# finished venv is marked with $VENV/.ready; only the editable install is redone then.
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON_BIN=${PYTHON_BIN:-python3.11}
if [ ! -f "$VENV/.ready" ] || [ ! -x "$VENV/bin/python" ]; then
  # torch + torchvision (a CUDA build) take about 6 GB: fail in one line before pip half-fills
  # the disk (CI once died here with "No space left on device" after a venv of broken installs).
  NEED_GB=${SETUP_NEED_GB:-7}
  free_gb=$(df -Pk "$(dirname "$(realpath -m "$VENV")")" | awk 'NR==2 {print int($4 / 1048576)}')
  if [ "${free_gb:-0}" -lt "$NEED_GB" ]; then
    echo "[setup] only ${free_gb} GB free where $VENV goes; the venv needs about $NEED_GB GB" \
         "(torch + torchvision): free space (old clones, output/, /tmp) and rerun make setup" >&2
    exit 1
  fi
  echo "[setup] creating $VENV with $PYTHON_BIN"
  $PYTHON_BIN -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade "pip<27" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -m pip install -q -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import torch, torchvision, h5py, cv2, pycocotools, fvcore"
  PYTHON="$VENV/bin/python" bash scripts/install_detectron2.sh
fi
# Editable: the checkout itself is imported, so edits need no reinstall (no PYTHONPATH either).
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 \
  | grep -v "^WARNING: Location\|SetuptoolsDeprecationWarning\|^ *!!\|^ *\*\*\*\|^$" || true
"$VENV/bin/python" -c "import builder, montage_pretrain"
touch "$VENV/.ready"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch;print("torch", torch.__version__)')"
