#!/bin/bash
# Gentle recipe (make compare's erf pre-training) run 8x longer, checkpoints every 150 it.
cd /work/main
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python projects/MontagePretrain/train_net.py --resume --config-file projects/MontagePretrain/configs/demo/montage_R_18_toy.yaml MONTAGE.BANK /work/main/output/chess_long/banks/chess-9b4bbfdaaa.h5 MONTAGE.LOSS erf MONTAGE.INPUT_SIZE 128 SOLVER.MAX_ITER 1200 SOLVER.WARMUP_ITERS 15 SOLVER.CHECKPOINT_PERIOD 150 MONTAGE.ERF_PERIOD 50 SEED 0 OUTPUT_DIR output/passes/gentle1200 DATALOADER.NUM_WORKERS 1 CUDNN_BENCHMARK False MONTAGE.EXPORT_WEIGHT_SCALE trained > output/passes/gentle1200.log 2>&1
