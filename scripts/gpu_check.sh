#!/usr/bin/env bash
# The one command to run on a lent GPU machine (device tool, carry [".gpu-kit"], `make gpu-kit`):
#
#     bash scripts/gpu_check.sh $OUT             # on the device, < 14 min (default steps: caps 750 s + set-up)
#     bash scripts/gpu_check.sh OUT --dry-run    # here, on the CPU, tiny sizes (part of make test)
#
# Set-up (skipped by --dry-run, which uses $PYTHON as it is): a venv with --system-site-packages
# (keeps the machine's torch), the kit's wheels installed offline, Detectron2's Python tree from
# the kit's registry wheel (scripts/install_detectron2.sh), this project in editable mode.
# Then steps, each under its own time cap, each writing its JSON to OUT as soon as it ends, so a
# later failure or the device's time limit loses nothing:
#   env.json         versions, GPU
#   tests.json       the test suite on the device (CUDA-only tests included), failures listed
#   bench.jsonl      scripts/benchmark.py: full-size model / step / loader (one line per task)
#   profile.json     scripts/profile_step.py: torch.profiler over ~20 full pre-training steps (R-50,
#                    512 montages, bf16 + channels_last, real loader): ms per phase, device idle,
#                    bytes to the device / pixel bytes, top 15 CUDA kernels, end-to-end montages/s
#   stability.jsonl  scripts/benchmark.py --task stability: the pyramid configs at 512 montages x
#                    224 px (bf16), the unnormalised-FPN control: every loss, finite or not
#   experiment.json  scripts/gpu_experiment.py: chess (or toy) -> bank -> two Montage-ERF R-18
#                    pre-trainings side by side (the default path as make pretrain runs it,
#                    sized to the bank; the earlier 512-montage recipe at LR 0.025) -> their
#                    default exports (init scale) and one as trained -> the same R-18 FPN
#                    detector from each and from random init (scratch_bn, started at once), 2
#                    seeds at 32 epochs (+ 1 seed at 8), 9 runs side by side -> COCO AP on
#                    valid, paired differences, per-stage updates of the first 100 iterations
#   steps.json       each step's exit code, wall and cap; gpu_check.log: everything printed
# At most 8 files come back from OUT; intermediate files stay in $WORK.
set -uo pipefail
OUT=${1:?usage: bash scripts/gpu_check.sh OUT [--dry-run]}
DRY=0
[ "${2:-}" = "--dry-run" ] && DRY=1
cd "$(dirname "$0")/.."
ROOT=$PWD
KIT=${GPU_KIT:-$ROOT/.gpu-kit}
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
log() { echo "[gpu_check $(date +%T)] $*"; }

if [ $DRY = 1 ]; then
  # Tiny sizes on the CPU: the same steps and files, known to work before GPU time is spent.
  PY=${PYTHON:-python}
  CAP_TESTS=120 CAP_BENCH=150 CAP_EXP=300 CAP_PROFILE=120 CAP_STAB=120
  PROF_CONFIG=projects/MontagePretrain/configs/demo/montage_R_18_toy.yaml
  PROF_ARGS=(--warmup 2 --rate-iters 3 --steps 3 MONTAGE.INPUT_SIZE 96 SOLVER.IMS_PER_BATCH 4
             DATALOADER.NUM_WORKERS 1 MONTAGE.ERF_NUM_IMAGES 2 SOLVER.WARMUP_ITERS 1)
  BENCH_ARGS=(--task host,step,loader --size tiny --workers 1)
  TEST_ARGS=(tests/montage_pretrain/test_montage.py -k "cuda or assemble")
  PRE_BATCH=4 PRE_SIZE=96 PRE_WORKERS=0 PRE_SECONDS=0 PRE_MIN_ITER=4 PRE_MAX_ITER=4
  # The default path, bank-sized still, at a tiny size: 1 pass over the dry run's bank.
  DEFAULT_OPTS="MONTAGE.BANK_PASSES 1 SOLVER.IMS_PER_BATCH 4 MONTAGE.INPUT_SIZE 96
                MONTAGE.ERF_NUM_IMAGES 2 TEST.PRECISE_BN.NUM_ITER 2"
  FT_ITER=4 FT_SHORT=0 FT_SEEDS=0 FT_BATCH=2 FT_WORKERS=0 DEVICE=cpu AMP=False
  STAB_ARGS=(--size tiny --workers 0)
else
  CAP_TESTS=${CAP_TESTS:-90} CAP_BENCH=${CAP_BENCH:-150} CAP_EXP=${CAP_EXP:-540}
  CAP_STAB=${CAP_STAB:-120}
  CAP_PROFILE=${CAP_PROFILE:-90}
  # The issue-22 setting: R-50, 512 montages, bf16 + channels_last, 14 workers. A low LR (the
  # step's cost does not depend on it) so that 51 steps from scratch cannot diverge.
  PROF_CONFIG=projects/MontagePretrain/configs/montage_R_50.yaml
  PROF_ARGS=(--warmup 10 --rate-iters 20 --steps 20 SOLVER.IMS_PER_BATCH 512
             DATALOADER.NUM_WORKERS 14 SOLVER.AMP.ENABLED True MONTAGE.CHANNELS_LAST True
             SOLVER.BASE_LR 0.1 SOLVER.WARMUP_ITERS 5)
  BENCH_ARGS=(--task host,model,step,loader --size full --workers 16)
  # The CPU suite runs in CI; here only what needs CUDA (the whole suite outlasts any cap: 257
  # of 417 tests in 120 s on an H200 machine, 2026-11-27).
  TEST_ARGS=(tests -k "cuda or bf16")
  # The paper's 512 montages at 224 px; iterations from the measured rate (below).
  PRE_BATCH=512 PRE_SIZE=224 PRE_WORKERS=12 PRE_SECONDS=${PRE_SECONDS:-75}
  PRE_MIN_ITER=50 PRE_MAX_ITER=3000
  DEFAULT_OPTS=""                  # the default path exactly as make pretrain runs it
  # 400 x 16 images = 32 epochs of chess train; 9 R-18 fine-tunings side by side (2 seeds x 3
  # arms at FT_ITER, 3 arms at FT_SHORT) at ~0.69 s/iter each on an H200: ~5 min.
  FT_ITER=${FT_ITER:-400} FT_SHORT=${FT_SHORT:-100} FT_SEEDS=${FT_SEEDS:-0,1} FT_BATCH=16
  FT_WORKERS=1 DEVICE=cuda AMP=True
  STAB_ARGS=(--size full --workers 8)
  log "set-up: venv with the machine's torch + the kit ($KIT)"
  [ -d "$KIT/wheels" ] || { log "no kit at $KIT: run make gpu-kit here and carry .gpu-kit"; exit 2; }
  BASE_PY=${GPU_PYTHON:-python3}
  $BASE_PY -m venv --system-site-packages --without-pip "$WORK/venv" || exit 2
  PY=$WORK/venv/bin/python
  # The machine's python3 may itself be a venv (/opt/torch/.venv): a venv made from it sees the
  # base interpreter's packages, not its own. Listing its site-packages in a .pth keeps torch
  # (and pip, setuptools) visible; the venv's own packages come first.
  $BASE_PY -c "import site; print('\n'.join(site.getsitepackages()))" \
    > "$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/machine_site.pth"
  $PY -m pip install -q --no-index --no-deps "$KIT"/wheels/*.whl || exit 2
  PYTHON=$PY DETECTRON2_WHEEL_DIR=$KIT bash scripts/install_detectron2.sh || exit 2
  $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 2
fi

# GPU_CHECK_STEPS=experiment (say) runs only those steps: a rerun that fits what device time is left.
# The default fits one lent device's 15 minutes with its start-up: tests and bench ran on the
# first device (2026-11-27) and are opt-in (GPU_CHECK_STEPS=env,tests,bench,...).
ONLY=",${GPU_CHECK_STEPS:-env,profile,stability,experiment},"
FT_LR=${FT_LR:-}
STEPS=()
record_step() {  # name rc wall cap -> steps.json (rewritten after every step)
  STEPS+=("{\"step\": \"$1\", \"rc\": $2, \"wall_s\": $3, \"cap_s\": $4}")
  (IFS=,; echo "[${STEPS[*]}]") > "$OUT/steps.json"
}
run_step() {  # name cap command... : runs under `timeout`, records its status
  local name=$1 cap=$2; shift 2
  case $ONLY in *",$name,"*) ;; *) log "step $name: not in GPU_CHECK_STEPS, skipped"; return 0;; esac
  local cmd="$*"
  [ ${#cmd} -le 300 ] || cmd="${cmd:0:120} ..."
  log "step $name (cap ${cap}s): $cmd"
  local t0=$SECONDS
  timeout --kill-after=10 "$cap" "$@"
  local rc=$?
  record_step "$name" "$rc" $((SECONDS - t0)) "$cap"
  log "step $name: rc $rc in $((SECONDS - t0))s"
  return $rc
}

# -- env ---------------------------------------------------------------------------------------
run_step env 60 $PY - "$OUT/env.json" <<'PY'
import json, platform, subprocess, sys
import torch, torchvision
import detectron2
info = {"python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "detectron2": detectron2.__version__,
        "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpus": __import__("os").cpu_count()}
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                        timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError):
    info["nvidia_smi"] = None
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info))
PY

# -- a. the test suite on the device -----------------------------------------------------------
run_step tests "$CAP_TESTS" $PY -m pytest -q -p no:cacheprovider "${TEST_ARGS[@]}" \
  --junitxml="$WORK/junit.xml"
[[ $ONLY == *,tests,* ]] && $PY - "$WORK/junit.xml" "$OUT/tests.json" <<'PY'
import json, sys, xml.etree.ElementTree as ET
out = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "skips": []}
try:
    cases = ET.parse(sys.argv[1]).getroot().iter("testcase")
except (OSError, ET.ParseError) as e:
    out["error"] = f"no junit report ({e}): the step was killed or did not start"
    cases = []
for case in cases:
    name = f"{case.get('classname')}::{case.get('name')}"
    bad = case.find("failure") if case.find("failure") is not None else case.find("error")
    skip = case.find("skipped")
    if bad is not None:
        out["failed"] += 1
        out["failures"].append({"test": name, "message": (bad.get("message") or "")[:500]})
    elif skip is not None:
        out["skipped"] += 1
        out["skips"].append({"test": name, "reason": (skip.get("message") or "")[:200]})
    else:
        out["passed"] += 1
json.dump(out, open(sys.argv[2], "w"), indent=1)
print({k: out[k] for k in ("passed", "failed", "skipped")})
PY

# -- b. throughput -----------------------------------------------------------------------------
run_step bench "$CAP_BENCH" $PY scripts/benchmark.py "${BENCH_ARGS[@]}" --json "$OUT/bench.jsonl"

# -- profile: full pre-training steps under torch.profiler -------------------------------------
profile() {
  local train_json train_dir
  if [ -f "$KIT/data/chess/train/_annotations.coco.json" ] && [ $DRY = 0 ]; then
    train_json=$KIT/data/chess/train/_annotations.coco.json train_dir=$KIT/data/chess/train
  else
    if [ $DRY = 1 ]; then set -- --num-train 12 --num-val 0; else set -- --num-val 0; fi
    $PY scripts/make_toy_coco.py --out "$WORK/profile_toy" "$@" >/dev/null || return 1
    train_json=$WORK/profile_toy/annotations/instances_train.json
    train_dir=$WORK/profile_toy/train
  fi
  $PY -m builder build --annotations "$train_json" --images "$train_dir" \
    --out "$WORK/profile_bank.h5" --workers "$([ $DRY = 1 ] && echo 1 || echo 8)" --overwrite \
    >/dev/null || return 1
  $PY scripts/profile_step.py --config-file "$PROF_CONFIG" --out "$OUT/profile.json" \
    "${PROF_ARGS[@]}" MONTAGE.BANK "$WORK/profile_bank.h5" MODEL.DEVICE $DEVICE SEED 0 \
    > "$WORK/profile.log" 2>&1 || { tail -20 "$WORK/profile.log"; return 1; }
  tail -1 "$WORK/profile.log"
}
run_step profile "$CAP_PROFILE" bash -c "$(declare -f profile); $(declare -p \
  KIT WORK OUT DRY PY DEVICE PROF_CONFIG PROF_ARGS); profile"

# -- stability: pre-training at the paper's batch must stay finite (issue 21) -------------------
# The pyramid configs at 512 montages x 224 px, bf16, 40 iterations, and the R-50 pyramid with an
# unnormalised FPN as the control (it diverged there before the fix); every loss is recorded.
run_step stability "$CAP_STAB" $PY scripts/benchmark.py --task stability "${STAB_ARGS[@]}" \
  --json "$OUT/stability.jsonl"

# -- c. the long protocol in one call (issue 20) ------------------------------------------------
experiment() {
  local data train_json train_dir val_json val_dir rate iters
  if [ -f "$KIT/data/chess/train/_annotations.coco.json" ] && [ $DRY = 0 ]; then
    data=chess
    train_json=$KIT/data/chess/train/_annotations.coco.json train_dir=$KIT/data/chess/train
    val_json=$KIT/data/chess/valid/_annotations.coco.json val_dir=$KIT/data/chess/valid
    FT_SIZE=(INPUT.MIN_SIZE_TRAIN "(428,)" INPUT.MAX_SIZE_TRAIN 640 INPUT.MIN_SIZE_TEST 428
             INPUT.MAX_SIZE_TEST 640)
  else
    data=toy
    if [ $DRY = 1 ]; then set -- --num-train 12 --num-val 4; else set -- ; fi
    $PY scripts/make_toy_coco.py --out "$WORK/toy" "$@" >/dev/null || return 1
    train_json=$WORK/toy/annotations/instances_train.json train_dir=$WORK/toy/train
    val_json=$WORK/toy/annotations/instances_val.json val_dir=$WORK/toy/val
    FT_SIZE=()
  fi
  log "experiment on $data"
  $PY -m builder build --annotations "$train_json" --images "$train_dir" --out "$WORK/bank.h5" \
    --workers "$([ $DRY = 1 ] && echo 1 || echo 8)" --overwrite || return 1
  # Pre-training length: PRE_SECONDS at the full step rate the benchmark measured (R-50, so
  # the R-18 run here ends early rather than late).
  rate=$($PY -c "
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r['task'] == 'step' and r.get('results'):
        print(r['results']['b_full']['montages_per_s']); break
" "$OUT/bench.jsonl" 2>/dev/null)
  iters=$($PY -c "
import sys; rate = float(sys.argv[1] or 0); s, b, lo, hi = (float(x) for x in sys.argv[2:])
print(int(min(max(s * rate / b if rate else 300, lo), hi)))
" "${rate:-}" "$PRE_SECONDS" "$PRE_BATCH" "$PRE_MIN_ITER" "$PRE_MAX_ITER")
  log "pre-training: $iters iterations x $PRE_BATCH montages (measured rate ${rate:-n/a}/s)"
  # The long protocol in one call (scripts/gpu_experiment.py, issue 20): two pre-trainings
  # side by side (the default path, make pretrain as shipped: 139 passes over the bank at 16
  # montages x 128 px, LR 0.025, guard on; and the earlier recipe above at LR 0.025), then
  # scratch_bn (started at once) / erf_bank_init (the default export of the default path) /
  # erf_init into the same trainable-BN R-18 FPN detector for FT_SEEDS at FT_ITER (>= 30 epochs
  # of chess train), erf (the earlier recipe's export as trained) for the first seed,
  # scratch_bn / erf_bank_init for the first seed at FT_SHORT too: 9 runs side by side. LR 0.01
  # for every arm, not scaled to FT_BATCH: on an H200 (2026-11-27) the linear rule's 0.04 left
  # the BN hand-off at AP 0.0.
  $PY scripts/gpu_experiment.py --work "$WORK/exp" --out "$OUT/experiment.json" \
    --bank "$WORK/bank.h5" --train-json "$train_json" --train-images "$train_dir" \
    --val-json "$val_json" --val-images "$val_dir" --device $DEVICE --amp $AMP \
    --pre-batch $PRE_BATCH --pre-size $PRE_SIZE --pre-iters "$iters" --pre-workers $PRE_WORKERS \
    --default-workers $([ $DRY = 1 ] && echo 0 || echo 4) \
    --ft-iters $FT_ITER --ft-short $FT_SHORT --ft-batch $FT_BATCH --ft-workers $FT_WORKERS \
    --ft-lr "${FT_LR:-0.01}" --seeds "$FT_SEEDS" --default-opts "$DEFAULT_OPTS" \
    -- "${FT_SIZE[@]}"
}
run_step experiment "$CAP_EXP" bash -c "$(declare -f experiment log); $(declare -p \
  KIT WORK OUT DRY PY PRE_BATCH PRE_SIZE PRE_WORKERS PRE_SECONDS PRE_MIN_ITER PRE_MAX_ITER \
  FT_ITER FT_SHORT FT_SEEDS FT_BATCH FT_WORKERS FT_LR DEVICE AMP DEFAULT_OPTS); experiment"

log "done: $(ls "$OUT" | tr '\n' ' ')"
$PY -c "
import json, sys
steps = json.load(open(sys.argv[1]))
bad = [s['step'] for s in steps if s['rc'] != 0]
print('steps failed:', bad or 'none'); sys.exit(1 if bad else 0)
" "$OUT/steps.json"
