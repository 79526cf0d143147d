#!/usr/bin/env python
"""
Own-region ERF weights of a randomly initialised pre-training model, without and with the BN
calibration before the first ERF (MONTAGE.ERF_CALIBRATE_BN), on the same montages:

    python scripts/erf_calibration.py --bank output/demo/bank.h5 \
        --config-file projects/MontagePretrain/configs/montage_R_50.yaml --size 224
"""
import argparse

import torch

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from montage_pretrain import MontageStream, add_montage_config, collate_montages
from montage_pretrain.config import merge_config_file


def own_weights(bank, config, size, calibrate, seed):
    """(h, w) own-region weight and (4, h, w) label weights of the first ERF refresh."""
    cfg = get_cfg()
    add_montage_config(cfg)
    merge_config_file(cfg, config)  # safe YAML
    cfg.merge_from_list(["MONTAGE.BANK", bank, "MODEL.DEVICE", "cpu", "MONTAGE.INPUT_SIZE", size,
                         "MODEL.RESNETS.NORM", "BN", "MONTAGE.ERF_CALIBRATE_BN", calibrate])
    torch.manual_seed(seed)
    model = build_model(cfg)
    stream = iter(MontageStream.from_config(cfg, seed + 7919, crops_per_image=4))
    model.refresh_erf_weights(
        collate_montages([next(stream) for _ in range(cfg.MONTAGE.ERF_NUM_IMAGES)]), 0)
    own = model.erf_weights.gather(0, model.region_map[None]).squeeze(0)
    return own, model.erf_weights.clone()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bank", required=True)
    p.add_argument("--config-file", required=True)
    p.add_argument("--size", type=int, default=224, help="MONTAGE.INPUT_SIZE, px")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    res = {c: own_weights(args.bank, args.config_file, args.size, c, args.seed)
           for c in (False, True)}
    for c, (own, _) in res.items():
        print(f"calibrate={c}: own-region weight per position\n{own.numpy().round(3)}")
    diff = (res[True][1] - res[False][1]).abs().max().item()
    print(f"largest change of any label weight {diff:.3f}; mean own weight "
          f"{res[False][0].mean():.3f} -> {res[True][0].mean():.3f}")


if __name__ == "__main__":
    main()
