#!/bin/bash
# Same canvas (128 px) and about the same passes over the 2,319-crop bank (~13), linear LR
# scaling (0.025 x B / 16), warm-up 10 % from 0.25: batch 128 (22 % of the bank per step),
# batch 512 (88 %).
cd /work/main
run() { # name montages lr iters warmup precise-BN-iters (~400 montages)
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python projects/MontagePretrain/train_net.py --resume --config-file projects/MontagePretrain/configs/demo/montage_R_18_toy.yaml MONTAGE.BANK /work/main/output/chess_long/banks/chess-9b4bbfdaaa.h5 MONTAGE.LOSS erf MONTAGE.INPUT_SIZE 128 SOLVER.IMS_PER_BATCH $2 SOLVER.BASE_LR $3 SOLVER.MAX_ITER $4 SOLVER.WARMUP_ITERS $5 SOLVER.CHECKPOINT_PERIOD 100000 MONTAGE.ERF_PERIOD 50 MONTAGE.LOG_PERIOD 1 TEST.PRECISE_BN.NUM_ITER $6 SEED 0 OUTPUT_DIR output/passes/$1 DATALOADER.NUM_WORKERS 1 CUDNN_BENCHMARK False MONTAGE.EXPORT_WEIGHT_SCALE trained > output/passes/$1.log 2>&1
}
run b128 128 0.2 60 6 3
run b512 512 0.8 15 2 1
