# Montage pre-training: make help lists the targets and the variables they take.
# Every variable can be overridden:  make pretrain BANK=/data/coco_bank.h5 NUM_GPUS=8
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV        ?= .venv
PY          := $(VENV)/bin/python

# --- data -------------------------------------------------------------------------------------
DATA_ROOT   ?= datasets/toy#                        built-in toy dataset (make toy writes it)
TOY_SEED    ?= 0#                                   seed of the toy dataset
TRAIN_JSON  ?= $(DATA_ROOT)/annotations/instances_train.json
TRAIN_IMAGES?= $(DATA_ROOT)/train
VAL_JSON    ?= $(DATA_ROOT)/annotations/instances_val.json
VAL_IMAGES  ?= $(DATA_ROOT)/val
# --- stages -----------------------------------------------------------------------------------
OUT         ?= output/demo#                         everything a run writes goes under here
BANK        ?= $(OUT)/bank.h5#                      HDF5 sample bank (make samples writes it)
SEED        ?= 0#                                   seed for bank building and training
WORKERS     ?= 2#                                   builder processes / loader workers
BUILD_ARGS  ?=#                                     extra builder flags, e.g. --max-images 100
NUM_GPUS    ?= 1#                                   processes per machine (on CPU: gloo processes)
PRETRAIN_CONFIG ?= projects/MontagePretrain/configs/demo/montage_R_18_toy.yaml
PRETRAIN_OPTS   ?=#                                 extra KEY VALUE config overrides
WEIGHTS     ?= $(OUT)/pretrain/montage_backbone.pkl# exported backbone (name: MONTAGE.EXPORT_NAME) for fine-tuning
FINETUNE_CONFIG ?= projects/MontagePretrain/configs/finetune/demo/faster_rcnn_R_18_FPN_toy.yaml
FINETUNE_SCRATCH_CONFIG ?= projects/MontagePretrain/configs/finetune/demo/faster_rcnn_R_18_FPN_toy_scratch.yaml
FINETUNE_OPTS   ?=
DEMO_PRETRAIN_ITERS ?= 300#                         make demo: pre-training iterations (make pretrain sizes them to the bank: 139 passes)
DEMO_THREADS?= 1#                                   make demo: threads per fine-tuning (pinned: reruns here are bitwise equal)
QUICK       ?= 0#                                   1 = smoke-sized make compare / bench
# --- make compare: DATASET, or a dataset by path when TRAIN_JSON/TRAIN_IMAGES/VAL_JSON/VAL_IMAGES
# (or DATA_ROOT) are given on the command line; empty = the default of scripts/compare.py ----------
DATASET     ?= toy#                                 compare: preset toy|coco_tiny|chess (comma list ok)
EVAL_SPLIT  ?= valid#                               compare: a preset's eval split: valid, or test (chess; final tables only)
COMPARE_NAME?=#                                     compare: results key of a dataset by path (default: its folder)
ARMS        ?=#                                     compare: comma list of arms (short: scratch,single,global,blockwise,erf by default, coco_tiny scratch,erf; long: + scratch_bn, hand-offs, erf_bank_init = the default path)
SEEDS       ?=#                                     compare: comma list of seeds (default 0,1; QUICK=1: 0)
PRETRAIN_ITERS ?=#                                  compare: pre-training iterations (default 150; QUICK=1: 12)
FINETUNE_ITERS ?=#                                  compare: fine-tuning iterations (default 200, coco_tiny 100; QUICK=1: 12)
INPUT_SIZE  ?=#                                     compare: montage canvas px, MONTAGE.INPUT_SIZE (default 128)
FT_MIN_SIZE ?=#                                     compare: fine-tuning shorter side, INPUT.MIN_SIZE_TRAIN/TEST, MAX_SIZE scaled (default toy 224, else 320)
FROZEN      ?= 0#                                   compare: 1 = also fine-tune with the backbone frozen (FREEZE_AT 5)
PROBES      ?= 1#                                   compare: 0 = skip the kNN / linear probes (scripts/probe.py)
SCRATCH_LONG?= 0#                                   compare: 1 (= erf; PROTOCOL=long: erf_bank_init) or an arm: add scratch_long (long: scratch_bn_long), fine-tuned for that arm's total CPU time (Table 3)
CLIP_GRAD   ?=#                                     compare: gradient-norm clip of every fine-tuning (default 5.0, the toy configs'; 0 = off)
COMPARE_THREADS ?= 1#                               compare: OMP/MKL/torch threads of every step (pinned, recorded)
COMPARE_WORKERS ?= 1#                               compare: DATALOADER.NUM_WORKERS, 0 or 1 (pinned, recorded)
COMPARE_OUT ?= output/compare#                      compare: results.json, table.md, charts, runs; shareable by processes
PROTOCOL    ?= short#                                compare: short (one length) or long (AP against fine-tuning length, scripts/long_protocol.py)
LANES       ?= 2#                                    compare PROTOCOL=long: processes sharing the job queue
LENGTHS     ?= auto#                                 compare PROTOCOL=long: fine-tuning iterations, auto = 200 doubled up to 30 epochs
LONG_SEEDS  ?= 0,1,2#                                compare PROTOCOL=long: seeds at the longest length
SWEEP_SEEDS ?= 0#                                    compare PROTOCOL=long: seeds at every length
LONGEST_FIRST ?= 0#                              compare PROTOCOL=long: 1 = the longest length (the decisive one) first
_CMP_BY_PATH = $(filter-out file default undefined,$(foreach v,DATA_ROOT TRAIN_JSON TRAIN_IMAGES VAL_JSON VAL_IMAGES,$(origin $(v))))

.PHONY: help setup test toy samples pretrain finetune demo bench bench-stability bench-gpu gpu-kit compare clean

help: ## list targets and variables
	@echo "Targets:"; grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | sed 's/^/  /'
	@echo "Variables (override with make TARGET VAR=value):"
	@grep -E '^[A-Z_]+ *\?=' $(MAKEFILE_LIST) | sed -E 's/ *\?= */ = /; s/ *# */    # /' | sed 's/^/  /'

setup: $(VENV)/.ready ## create the Python 3.11 venv with torch, Detectron2 and the rest
$(VENV)/.ready: requirements.txt pyproject.toml scripts/setup_env.sh scripts/install_detectron2.sh
	VENV=$(VENV) bash scripts/setup_env.sh

test: setup ## run the whole test suite (CPU only)
	$(PY) -m pytest -q tests

toy: setup ## write the built-in toy COCO-format dataset to DATA_ROOT
	$(PY) scripts/make_toy_coco.py --out $(DATA_ROOT) --seed $(TOY_SEED)

samples: setup ## build the HDF5 sample bank BANK from TRAIN_JSON/TRAIN_IMAGES
	$(PY) -m builder build --annotations $(TRAIN_JSON) --images $(TRAIN_IMAGES) --out $(BANK) \
	    --seed $(SEED) --workers $(WORKERS) --overwrite $(BUILD_ARGS)
	$(PY) -m builder info $(BANK)

pretrain: setup ## Montage pre-training from BANK with PRETRAIN_CONFIG (139 passes over it; PRETRAIN_OPTS="SOLVER.MAX_ITER N": N iterations); exports WEIGHTS
	$(PY) projects/MontagePretrain/train_net.py --config-file $(PRETRAIN_CONFIG) \
	    --num-gpus $(NUM_GPUS) MONTAGE.BANK $(BANK) OUTPUT_DIR $(OUT)/pretrain SEED $(SEED) \
	    DATALOADER.NUM_WORKERS $(WORKERS) $(PRETRAIN_OPTS)

finetune: setup ## fine-tune FINETUNE_CONFIG from WEIGHTS and print COCO AP
	$(PY) projects/MontagePretrain/finetune_net.py --config-file $(FINETUNE_CONFIG) \
	    --num-gpus $(NUM_GPUS) --train-json $(TRAIN_JSON) --train-images $(TRAIN_IMAGES) \
	    --val-json $(VAL_JSON) --val-images $(VAL_IMAGES) \
	    MODEL.WEIGHTS "$(WEIGHTS)" OUTPUT_DIR $(OUT)/finetune SEED $(SEED) $(FINETUNE_OPTS)

demo: setup ## toy data -> samples -> pretrain -> finetune (Montage and scratch) -> AP table
	@test -f $(TRAIN_JSON) || $(MAKE) --no-print-directory toy
	$(MAKE) --no-print-directory samples
	$(MAKE) --no-print-directory pretrain \
	    PRETRAIN_OPTS="SOLVER.MAX_ITER $(DEMO_PRETRAIN_ITERS) $(PRETRAIN_OPTS)"
	@echo "fine-tuning Montage and scratch side by side, $(DEMO_THREADS) thread(s) each;" \
	    "logs: $(OUT)/finetune.log, $(OUT)/scratch.log"
	@export OMP_NUM_THREADS=$(DEMO_THREADS) MKL_NUM_THREADS=$(DEMO_THREADS); \
	$(MAKE) --no-print-directory finetune > $(OUT)/finetune.log 2>&1 & m=$$!; \
	$(MAKE) --no-print-directory finetune WEIGHTS= OUT=$(OUT)/scratch \
	    FINETUNE_CONFIG=$(FINETUNE_SCRATCH_CONFIG) > $(OUT)/scratch.log 2>&1 & s=$$!; \
	rc=0; wait $$m || { rc=1; tail -n 5 $(OUT)/finetune.log; }; \
	wait $$s || { rc=1; tail -n 5 $(OUT)/scratch.log; }; exit $$rc
	$(PY) scripts/report.py "Montage R-18=$(OUT)/finetune" "scratch R-18=$(OUT)/scratch/finetune"

bench: setup ## CPU benchmarks: builder vs decode floor, host data path, step (ERF vs global), loader
	$(PY) scripts/benchmark.py --task builder,host,step,loader \
	    --size $(if $(filter 1,$(QUICK)),tiny,small) --json output/bench/cpu.jsonl

bench-stability: setup ## every shipped pre-training config at 512 montages and its LR: finite losses? (CPU: ~30 min)
	$(PY) scripts/benchmark.py --task stability --size $(if $(filter 1,$(QUICK)),tiny,small) \
	    --json output/bench/stability.jsonl

bench-gpu: setup ## full-size model / step / loader throughput on the current CUDA device
	$(PY) scripts/benchmark.py --task host,model,step,loader --size full \
	    --json output/bench/gpu.jsonl

gpu-kit: setup ## write .gpu-kit/ (wheels, Detectron2, chess) for scripts/gpu_check.sh on a lent GPU
	PYTHON=$(PY) bash scripts/make_gpu_kit.sh

compare: setup ## will Montage help on this data? arms vs scratch over SEEDS: paired AP, probes (QUICK=1: smoke)
ifeq ($(PROTOCOL),long)
	OMP_NUM_THREADS=$(COMPARE_THREADS) MKL_NUM_THREADS=$(COMPARE_THREADS) $(PY) scripts/long_protocol.py \
	    --quick $(QUICK) --out $(COMPARE_OUT) $(if $(_CMP_BY_PATH),--train-json $(TRAIN_JSON) \
	    --train-images $(TRAIN_IMAGES) --val-json $(VAL_JSON) --val-images $(VAL_IMAGES) \
	    $(if $(COMPARE_NAME),--name $(COMPARE_NAME)),--dataset $(DATASET) --eval-split $(EVAL_SPLIT)) \
	    $(if $(ARMS),--arms $(ARMS)) --seeds $(LONG_SEEDS) --sweep-seeds $(SWEEP_SEEDS) --lengths $(LENGTHS) --lanes $(LANES) \
	    $(if $(filter 1,$(LONGEST_FIRST)),--longest-first) \
	    $(if $(CLIP_GRAD),--clip-grad $(CLIP_GRAD)) $(if $(PRETRAIN_ITERS),--pretrain-iters $(PRETRAIN_ITERS)) \
	    $(if $(FT_MIN_SIZE),--ft-min-size $(FT_MIN_SIZE)) \
	    $(if $(filter-out 0,$(SCRATCH_LONG)),--table3 $(if $(filter 1,$(SCRATCH_LONG)),erf_bank_init,$(SCRATCH_LONG))) \
	    --threads $(COMPARE_THREADS) --workers $(COMPARE_WORKERS) --bank-workers $(WORKERS)
else
	OMP_NUM_THREADS=$(COMPARE_THREADS) MKL_NUM_THREADS=$(COMPARE_THREADS) $(PY) scripts/compare.py \
	    --quick $(QUICK) --out $(COMPARE_OUT) $(if $(_CMP_BY_PATH),--train-json $(TRAIN_JSON) \
	    --train-images $(TRAIN_IMAGES) --val-json $(VAL_JSON) --val-images $(VAL_IMAGES) \
	    $(if $(COMPARE_NAME),--name $(COMPARE_NAME)),--dataset $(DATASET) --eval-split $(EVAL_SPLIT)) \
	    $(if $(ARMS),--arms $(ARMS)) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(CLIP_GRAD),--clip-grad $(CLIP_GRAD)) \
	    $(if $(PRETRAIN_ITERS),--pretrain-iters $(PRETRAIN_ITERS)) \
	    $(if $(FINETUNE_ITERS),--finetune-iters $(FINETUNE_ITERS)) \
	    $(if $(INPUT_SIZE),--input-size $(INPUT_SIZE)) $(if $(FT_MIN_SIZE),--ft-min-size $(FT_MIN_SIZE)) \
	    $(if $(filter 1,$(FROZEN)),--frozen) $(if $(filter 0,$(PROBES)),--no-probes) \
	    $(if $(filter-out 0,$(SCRATCH_LONG)),--table3 $(if $(filter 1,$(SCRATCH_LONG)),erf,$(SCRATCH_LONG))) \
	    --threads $(COMPARE_THREADS) --workers $(COMPARE_WORKERS) --bank-workers $(WORKERS)
endif

clean: ## remove outputs and caches (keeps the venv)
	rm -rf output .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
