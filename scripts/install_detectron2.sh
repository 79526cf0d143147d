#!/usr/bin/env bash
# Installs Detectron2 into the active Python environment, by the first route that applies:
#   1. an importable detectron2 is already installed            -> use it, do nothing;
#   2. DETECTRON2_SRC points at an official Detectron2 checkout or
#      a pip spec (e.g. git+https://github.com/facebookresearch/detectron2.git)
#                                                                -> pip install it (builds _C; CUDA if present);
#   3. otherwise the registry wheel sal-detectron2==0.7.2        -> unpack its pure-Python code.
# Route 3: the wheel is tagged cp310 but its Python code (upstream Detectron2, April 2024) runs on
# 3.11; pip refuses the tag, so we download it and unpack it without the compiled _C (which could
# not load on 3.11 anyway). Detectron2 then runs on torchvision ops (nms, roi_align).
set -euo pipefail
PY=${PYTHON:-python}
if $PY -c "import detectron2" 2>/dev/null; then
  echo "[detectron2] already importable: $($PY -c 'import detectron2,os;print(detectron2.__version__, os.path.dirname(detectron2.__file__))')"
  exit 0
fi
if [ -n "${DETECTRON2_SRC:-}" ]; then
  echo "[detectron2] installing from DETECTRON2_SRC=${DETECTRON2_SRC}"
  $PY -m pip install --no-build-isolation "${DETECTRON2_SRC}"
  exit 0
fi
WHEEL_DIR=${DETECTRON2_WHEEL_DIR:-.cache/wheels}
mkdir -p "$WHEEL_DIR"
if ! ls "$WHEEL_DIR"/sal_detectron2-0.7.2-*.whl >/dev/null 2>&1; then
  echo "[detectron2] downloading sal-detectron2==0.7.2 (cp310 wheel, pure-Python part used)"
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.10 \
      sal-detectron2==0.7.2 -d "$WHEEL_DIR"
fi
SITE=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
$PY - "$WHEEL_DIR" "$SITE" <<'PYEOF'
import glob, sys, zipfile
wheel = sorted(glob.glob(f"{sys.argv[1]}/sal_detectron2-0.7.2-*.whl"))[-1]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if not n.startswith("detectron2/_C")]
    z.extractall(sys.argv[2], members=names)
print(f"[detectron2] unpacked {len(names)} files from {wheel} into {sys.argv[2]}")
PYEOF
$PY -c "import detectron2; print('[detectron2] ok', detectron2.__version__)"
