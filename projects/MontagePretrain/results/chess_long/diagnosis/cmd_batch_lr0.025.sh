#!/bin/bash
# Batch 128 at the small batch's LR (0.025, no linear scaling): is it the batch or the step size?
cd /work/main
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python projects/MontagePretrain/train_net.py --resume --config-file projects/MontagePretrain/configs/demo/montage_R_18_toy.yaml MONTAGE.BANK /work/main/output/chess_long/banks/chess-9b4bbfdaaa.h5 MONTAGE.LOSS erf MONTAGE.INPUT_SIZE 128 SOLVER.IMS_PER_BATCH 128 SOLVER.BASE_LR 0.025 SOLVER.MAX_ITER 60 SOLVER.WARMUP_ITERS 6 SOLVER.CHECKPOINT_PERIOD 100000 MONTAGE.ERF_PERIOD 50 MONTAGE.LOG_PERIOD 1 TEST.PRECISE_BN.NUM_ITER 3 SEED 0 OUTPUT_DIR output/passes/b128_lr0.025 DATALOADER.NUM_WORKERS 1 CUDNN_BENCHMARK False MONTAGE.EXPORT_WEIGHT_SCALE trained > output/passes/b128_lr0.025.log 2>&1
