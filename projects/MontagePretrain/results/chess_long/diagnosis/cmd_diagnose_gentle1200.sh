#!/bin/bash
# Export every checkpoint of output/passes/gentle1200 (as trained) and diagnose them together.
cd /work/main; D=output/passes/gentle1200; W=()
for c in $D/model_0*.pth $D/model_final.pth; do
  [ -f "$c" ] || continue
  o=${c%.pth}.pkl
  [ -f "$o" ] || OMP_NUM_THREADS=1 .venv/bin/montage-export --config-file $D/config.yaml --checkpoint $c --out $o --weight-scale trained > /dev/null 2>&1 || echo "export failed: $c"
  W+=(--weights $o)
done
OMP_NUM_THREADS=1 .venv/bin/python scripts/diagnose_handoff.py --images ../shared/data/chess/train "${W[@]}" --json output/passes/diagnose_gentle1200.json 2>&1 | grep -v -i warn
