# Frozen-backbone probes (res4/res5 kNN + linear top-1 on chess valid GT boxes) of the exports of
# erf's gentle recipe at three lengths (150 / 1,200 / 5,037 iterations: 4 / 33 / 139 passes over
# the bank), seed 0, and of random init. Run from the repo root after the long protocol.
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python scripts/probe.py \
  --weights '' \
  --weights output/chess_long/chess/erf/seed0/pretrain-7d1fe8a8b1/montage_backbone.pkl \
  --weights output/chess_long/chess/erf_long_init/seed0/pretrain-e656f398f6/montage_backbone.pkl \
  --weights output/chess_long/chess/erf_bank_init/seed0/pretrain-14e242bd9c/montage_backbone.pkl \
  --train-json ../shared/data/chess/train/_annotations.coco.json --train-images ../shared/data/chess/train \
  --val-json ../shared/data/chess/valid/_annotations.coco.json --val-images ../shared/data/chess/valid \
  --config-file projects/MontagePretrain/configs/finetune/demo/faster_rcnn_R_18_FPN_toy.yaml \
  --threads 1 --seed 0 --json projects/MontagePretrain/results/chess_long/diagnosis/length_probes/probes_valid.json INPUT.MIN_SIZE_TEST 320 INPUT.MAX_SIZE_TEST 487

# Rerun (2026-12-05, a new machine: the earlier output/ was lost): erf_bank_init seed 0
# pre-trained again by `make compare PROTOCOL=long ... LONG_SEEDS=0 ARMS=scratch_bn,erf_bank_init`
# (same command, same settings), probed alone against random init.
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python scripts/probe.py \
  --weights '' \
  --weights output/chess_long/chess/erf_bank_init/seed0/pretrain-14e242bd9c/montage_backbone.pkl \
  --train-json ../shared/data/chess/train/_annotations.coco.json --train-images ../shared/data/chess/train \
  --val-json ../shared/data/chess/valid/_annotations.coco.json --val-images ../shared/data/chess/valid \
  --config-file projects/MontagePretrain/configs/finetune/demo/faster_rcnn_R_18_FPN_toy.yaml \
  --threads 1 --seed 0 --json projects/MontagePretrain/results/chess_long/diagnosis/length_probes/probes_valid_bank_rerun.json INPUT.MIN_SIZE_TEST 320 INPUT.MAX_SIZE_TEST 487
