#!/bin/bash
# Pre-training LR sweep at a fixed batch (128 montages, 128 px, 60 it, warm-up 6 from 0.25), chess and coco_tiny.
cd /work/main

PY=.venv/bin/python
COCO_BANK=output/lrsweep/coco_tiny_train.h5
[ -f $COCO_BANK ] || OMP_NUM_THREADS=1 $PY -m builder build --annotations ../shared/data/coco_tiny/annotations/instances_train2017.json --images ../shared/data/coco_tiny/train2017 --out $COCO_BANK --seed 0 > output/lrsweep/bank_coco.log 2>&1
CHESS_BANK=output/chess_long/banks/chess-9b4bbfdaaa.h5
for spec in coco:0.025 coco:0.2 chess:0.1 coco:0.1 chess:0.05 coco:0.05; do
  ds=${spec%%:*}; lr=${spec##*:}; name=${ds}_lr${lr}
  if [ $ds = coco ]; then bank=$COCO_BANK; imgs=../shared/data/coco_tiny/train2017; else bank=$CHESS_BANK; imgs=../shared/data/chess/train; fi
  [ -f output/lrsweep/diagnose_$name.json ] && continue
  [ -f output/lrsweep/$name/montage_backbone.pkl ] || OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $PY projects/MontagePretrain/train_net.py --resume --config-file projects/MontagePretrain/configs/demo/montage_R_18_toy.yaml MONTAGE.BANK $PWD/$bank MONTAGE.LOSS erf MONTAGE.INPUT_SIZE 128 SOLVER.IMS_PER_BATCH 128 SOLVER.BASE_LR $lr SOLVER.MAX_ITER 60 SOLVER.WARMUP_ITERS 6 SOLVER.CHECKPOINT_PERIOD 100000 MONTAGE.ERF_PERIOD 50 MONTAGE.LOG_PERIOD 1 TEST.PRECISE_BN.NUM_ITER 3 SEED 0 OUTPUT_DIR output/lrsweep/$name DATALOADER.NUM_WORKERS 1 CUDNN_BENCHMARK False MONTAGE.EXPORT_WEIGHT_SCALE trained MONTAGE.COLLAPSE.PERIOD 10 MONTAGE.COLLAPSE.ACTION warn > output/lrsweep/$name.log 2>&1 || { echo "FAILED $name"; continue; }
  OMP_NUM_THREADS=1 $PY scripts/diagnose_handoff.py --images $imgs --weights output/lrsweep/$name/montage_backbone.pkl --json output/lrsweep/diagnose_$name.json > output/lrsweep/diagnose_$name.txt 2>&1
  echo "done $name $(date)"
done
