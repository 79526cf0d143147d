#!/usr/bin/env bash
# Writes the GPU kit (default .gpu-kit/, ignored by git): everything a lent GPU machine lacks to
# run scripts/gpu_check.sh, since it reaches no package registry. That machine has Python 3.12
# with its own torch/torchvision, numpy, h5py, opencv, pyyaml, tabulate, tqdm, pillow, portalocker,
# cloudpickle, setuptools and pytest (the device tool's KINDS.md); the kit adds:
#   wheels/          cp312 / pure-Python wheels of the rest of what the project imports
#                    (sdist-only packages are built here into pure-Python wheels)
#   sal_detectron2-0.7.2-*.whl   the registry wheel whose Python tree scripts/install_detectron2.sh
#                    unpacks (the same route as `make setup`)
#   data/chess/      train + valid of ../shared/data/chess when present (the experiment's data;
#                    without it gpu_check.sh generates the toy set)
# Prints the kit's size and fails when kit + working tree exceed $LIMIT_MIB (60): the device tool
# carries 64 MiB at most.
set -euo pipefail
KIT=${KIT:-.gpu-kit}
PY=${PYTHON:-.venv/bin/python}
LIMIT_MIB=${LIMIT_MIB:-60}
SHARED_CHESS=${SHARED_CHESS:-../shared/data/chess}
# Versions of the venv made by `make setup`, so the device runs what the tests ran here.
BINARY=(pycocotools==2.0.11 yacs==0.1.8 omegaconf==2.3.1 hydra-core==1.3.8
        termcolor==3.3.0)
SDIST_ONLY=(fvcore==0.1.5.post20221221 iopath==0.1.10 antlr4-python3-runtime==4.9.3)

rm -rf "$KIT.tmp" && mkdir -p "$KIT.tmp/wheels"
echo "[gpu-kit] cp312 wheels: ${BINARY[*]}"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$KIT.tmp/wheels" "${BINARY[@]}" \
    2>&1 | grep -v "^WARNING: Location" || true
echo "[gpu-kit] pure-Python wheels built from sdists: ${SDIST_ONLY[*]}"
$PY -m pip wheel -q --no-deps -w "$KIT.tmp/wheels" "${SDIST_ONLY[@]}" \
    2>&1 | grep -v "^WARNING: Location" || true
expected=$(( ${#BINARY[@]} + ${#SDIST_ONLY[@]} ))
found=$(ls "$KIT.tmp/wheels"/*.whl | wc -l)
if [ "$found" -ne "$expected" ]; then
  echo "[gpu-kit] error: $found wheels in $KIT.tmp/wheels, expected $expected" >&2; exit 1
fi
WHEEL_DIR=${DETECTRON2_WHEEL_DIR:-.cache/wheels}
if ! ls "$WHEEL_DIR"/sal_detectron2-0.7.2-*.whl >/dev/null 2>&1; then
  mkdir -p "$WHEEL_DIR"
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.10 \
      sal-detectron2==0.7.2 -d "$WHEEL_DIR"
fi
cp "$WHEEL_DIR"/sal_detectron2-0.7.2-*.whl "$KIT.tmp/"
if [ -d "$SHARED_CHESS/train" ] && [ -d "$SHARED_CHESS/valid" ]; then
  mkdir -p "$KIT.tmp/data/chess"
  cp -r "$SHARED_CHESS/train" "$SHARED_CHESS/valid" "$KIT.tmp/data/chess/"
  echo "[gpu-kit] data: chess train + valid from $SHARED_CHESS"
else
  echo "[gpu-kit] data: $SHARED_CHESS not found; gpu_check.sh will use the toy set"
fi
rm -rf "$KIT" && mv "$KIT.tmp" "$KIT"

kit_kib=$(du -sk "$KIT" | cut -f1)
# What the device tool sends besides the kit: tracked + untracked-not-ignored files.
tree_kib=$( (git ls-files -z; git ls-files -z --others --exclude-standard) \
            | xargs -0 -r du -ck 2>/dev/null | tail -1 | cut -f1)
total_kib=$(( kit_kib + tree_kib ))
printf "[gpu-kit] %s: %.1f MiB (wheels %s, detectron2 wheel, data %s); working tree %.1f MiB; " \
  "$KIT" "$(echo "$kit_kib / 1024" | bc -l)" "$(ls "$KIT"/wheels | wc -l)" \
  "$([ -d "$KIT/data" ] && du -sh "$KIT/data" | cut -f1 || echo none)" \
  "$(echo "$tree_kib / 1024" | bc -l)"
printf "total %.1f MiB (limit %s MiB)\n" "$(echo "$total_kib / 1024" | bc -l)" "$LIMIT_MIB"
if [ "$total_kib" -gt $(( LIMIT_MIB * 1024 )) ]; then
  echo "[gpu-kit] error: kit + working tree exceed $LIMIT_MIB MiB; drop data or wheels" >&2
  exit 1
fi
echo "[gpu-kit] run it there: device run with carry [\"$KIT\"] and command" \
     "'bash scripts/gpu_check.sh \$OUT'"
