"""
Deterministic frozen-backbone probes of a backbone export: how well do its features tell the
dataset's categories apart, without any fine-tuning?

Fine-tuning AP at CPU scale moves by more than 10x between reruns; these numbers do not move at
all. For every non-crowd ground-truth box of a COCO json the frozen bottom-up backbone of the
detector (``model.backbone.bottom_up`` under an FPN, ``model.backbone`` otherwise; in eval mode,
so BN uses the export's running statistics) gives one vector per stage: RoIAlign
(``torchvision.ops.roi_align``, 7 x 7, adaptive sampling, ``aligned=True``) of the stage output,
averaged over the 7 x 7 cells. Images are read and resized as the detector sees them at test
time (``INPUT.FORMAT``, shorter side ``INPUT.MIN_SIZE_TEST``, longer side at most
``INPUT.MAX_SIZE_TEST``, normalised with the model's pixel mean/std, padded to the backbone's
size divisibility), one image per forward pass. A stage the plain ResNet of a C4 detector does
not have (res5, which lives in ``roi_heads.res5``) is computed as the C4 box head computes it:
RoIAlign of res4 at ``MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION``, then ``roi_heads.res5``, then
the spatial mean.

The reference set is the train split's boxes, the queries the val split's, labels the
contiguous category ids (categories of the train json sorted by id, as Detectron2 maps them).
Two probes, both top-1 accuracy in percent:

* :func:`knn_top1`: k nearest neighbours by cosine similarity, majority vote;
* :func:`linear_probe`: a softmax classifier on standardised features, fixed full-batch Adam
  steps from zero weights.

Reproducibility: :func:`probe_exports` pins the torch thread count (an argument, recorded as
``"threads"``), switches on ``torch.use_deterministic_algorithms``, seeds the random-init model
and the probe, and reads images in a fixed order without loader workers (one image per forward,
so no feature depends on which images share a batch). On the same machine, software and thread
count every number of the result - the features (``"features_sha1"``), ``knn_top1``,
``linear_top1``, counts, dims - is bitwise equal between reruns (checked by ``tests/montage_pretrain/test_probes.py``), and a
weight file scores the same whether it is probed alone or next to others. Only the
``"seconds"`` entry (timings) varies. Another thread count or CPU can change the last bits of
the features and so, rarely, a vote.
"""
import contextlib
import hashlib
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from .datasets import check_coco_paths

__all__ = [
    "DEFAULT_CONFIG", "BoxSet", "knn_predict", "knn_top1", "linear_probe", "load_boxes",
    "build_probe_config", "build_probe_model", "extract_features", "probe_exports",
    "probe_export",
]

# The toy R-18 FPN detector of `make demo`; at its test size (224, max 341 px) one export's
# features take about 0.07 s per image on one CPU thread (~20 s for 260 images).
DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "configs", "finetune", "demo", "faster_rcnn_R_18_FPN_toy.yaml",
)

# RoIAlign output of the generic path: averaged to one vector per box and stage.
ROI_SIZE = 7


# ---------------------------------------------------------------------------------------------
# Probes on feature matrices
# ---------------------------------------------------------------------------------------------
def _num_classes(*labels):
    return int(max(int(y.max()) for y in labels if y.numel()) + 1)


def knn_predict(train_x, train_y, test_x, k=20, num_classes=None, chunk=1024):
    """
    k-NN classification by cosine similarity with a majority vote.

    Features are L2-normalised and compared in float64. Neighbours are ranked by a stable sort
    (equal similarity: lower train index first); the class with the most votes wins, a tie goes
    to the tied class whose best neighbour ranks first. No step depends on randomness.

    Args:
        train_x (Tensor): (N, D) reference features; train_y (Tensor): (N,) labels 0..C-1.
        test_x (Tensor): (M, D) query features.
        k (int): neighbours (at most N are used).
        num_classes (int or None): C; None = ``max(train_y) + 1``.
        chunk (int): queries per similarity block (memory bound).

    Returns:
        LongTensor: (M,) predicted labels.
    """
    if len(train_x) == 0:
        raise ValueError("knn_predict: the reference set is empty (no train boxes)")
    train_y = torch.as_tensor(train_y, dtype=torch.long)
    num_classes = num_classes or _num_classes(train_y)
    k = max(1, min(int(k), len(train_x)))
    ref = F.normalize(torch.as_tensor(train_x, dtype=torch.float64), dim=1)
    query = F.normalize(torch.as_tensor(test_x, dtype=torch.float64), dim=1)
    preds = []
    for start in range(0, len(query), chunk):
        sim = query[start:start + chunk] @ ref.T
        order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k]
        votes = train_y[order]                                            # (q, k)
        q = len(votes)
        counts = torch.zeros(q, num_classes, dtype=torch.long).scatter_add_(
            1, votes, torch.ones_like(votes))
        ranks = torch.arange(k).expand(q, k)
        first = torch.full((q, num_classes), k, dtype=torch.long).scatter_reduce_(
            1, votes, ranks, reduce="amin")
        # Votes dominate; among equal votes the earlier best neighbour wins (ranks are unique).
        preds.append((counts * (k + 1) + (k - first)).argmax(dim=1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def knn_top1(train_x, train_y, test_x, test_y, k=20):
    """
    Top-1 accuracy (percent) of :func:`knn_predict` on the queries ``test_x`` / ``test_y``.

    Deterministic: the same inputs give a bitwise-equal result.
    """
    test_y = torch.as_tensor(test_y, dtype=torch.long)
    if len(test_y) == 0:
        return float("nan")
    num_classes = _num_classes(torch.as_tensor(train_y), test_y)
    pred = knn_predict(train_x, train_y, test_x, k=k, num_classes=num_classes)
    return 100.0 * float((pred == test_y).double().mean())


def linear_probe(train_x, train_y, test_x, test_y, epochs=100, seed=0, lr=0.05,
                 weight_decay=1e-3, batch_size=None, num_classes=None):
    """
    Top-1 accuracy (percent) of a linear softmax classifier trained on ``train_x``.

    Features are standardised with the train mean and std (constant channels left at 0). The
    classifier starts from zero weights and takes ``epochs`` Adam steps over the train set in
    float32: one full-batch step per epoch, or, with ``batch_size``, mini-batches in a
    permutation drawn from a generator seeded with ``seed`` (full batch does not use the seed).
    L2 penalty ``weight_decay / 2 * |W|^2`` on the weights, not the bias. Deterministic: the
    same inputs, arguments and thread count give a bitwise-equal result; the global RNG is not
    touched. About 0.5 s for 2000 x 512 features and 100 epochs on one CPU thread.

    Args:
        train_x (Tensor): (N, D); train_y (Tensor): (N,) labels 0..C-1.
        test_x (Tensor): (M, D); test_y (Tensor): (M,).
        epochs (int): passes over the train set.
        seed (int): seed of the mini-batch order.
        lr (float): Adam learning rate.
        weight_decay (float): L2 penalty on the weights.
        batch_size (int or None): None = full batch.
        num_classes (int or None): C; None = ``max(labels) + 1``.

    Returns:
        float: top-1 accuracy on the test set, in percent.
    """
    train_y = torch.as_tensor(train_y, dtype=torch.long)
    test_y = torch.as_tensor(test_y, dtype=torch.long)
    if len(train_y) == 0:
        raise ValueError("linear_probe: the train set is empty (no train boxes)")
    if len(test_y) == 0:
        return float("nan")
    num_classes = num_classes or _num_classes(train_y, test_y)
    x = torch.as_tensor(train_x, dtype=torch.float64)
    mean, std = x.mean(dim=0), x.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-12 * (1.0 + mean.abs()), std, torch.ones_like(std))
    x = ((x - mean) / std).float()
    xt = ((torch.as_tensor(test_x, dtype=torch.float64) - mean) / std).float()
    weight = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr, foreach=False)
    gen = torch.Generator().manual_seed(int(seed))
    n = len(x)
    with torch.enable_grad():
        for _ in range(int(epochs)):
            if batch_size is None or batch_size >= n:
                batches = [None]
            else:
                perm = torch.randperm(n, generator=gen)
                batches = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
            for idx in batches:
                xb, yb = (x, train_y) if idx is None else (x[idx], train_y[idx])
                loss = F.cross_entropy(xb @ weight + bias, yb)
                loss = loss + 0.5 * weight_decay * (weight * weight).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    with torch.no_grad():
        pred = (xt @ weight + bias).argmax(dim=1)
    return 100.0 * float((pred == test_y).double().mean())


# ---------------------------------------------------------------------------------------------
# Boxes of a COCO json
# ---------------------------------------------------------------------------------------------
@dataclass
class BoxSet:
    """
    The non-crowd GT boxes of one COCO split, grouped by image in image-id order.

    Attributes:
        images (list[tuple[str, int, int, ndarray, ndarray]]): ``(file_name, height, width,
            boxes (K, 4) float64 XYXY in json pixels, labels (K,) int64)`` per image with boxes.
        category_ids (list[int]): json category ids; label i is ``category_ids[i]``.
        category_names (list[str]): names in label order.
        json_file (str): the json read.
    """

    images: list
    category_ids: list
    category_names: list
    json_file: str

    @property
    def num_boxes(self):
        return int(sum(len(labels) for *_, labels in self.images))

    @property
    def labels(self):
        """LongTensor: every box label, in the order :func:`extract_features` returns them."""
        parts = [torch.as_tensor(labels) for *_, labels in self.images]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _json_categories(json_file):
    import json

    with open(json_file) as f:
        cats = json.load(f).get("categories") or []
    cats = sorted(cats, key=lambda c: c["id"])
    return [int(c["id"]) for c in cats], [str(c.get("name", c["id"])) for c in cats]


def load_boxes(json_file, image_root, max_boxes=None, categories=None):
    """
    Reads the non-crowd GT boxes of a COCO json with ``detectron2.data.datasets.load_coco_json``.

    Args:
        json_file (str): COCO instances json.
        image_root (str): folder of its ``file_name`` entries.
        max_boxes (int or None): keep only the first N boxes in image-id order (json order
            within an image); None = all.
        categories (tuple[list[int], list[str]] or None): ``(ids, names)`` defining the labels,
            e.g. the train split's; None = this json's categories sorted by id.

    Returns:
        BoxSet

    Raises:
        FileNotFoundError: the json or the image folder is missing (one line, with the fix).
        ValueError: an annotation's category is not among ``categories``.
    """
    from detectron2.data.datasets import load_coco_json
    from detectron2.structures import BoxMode

    check_coco_paths(json_file, image_root, "probe boxes")
    own_ids, own_names = _json_categories(json_file)
    ids, names = categories if categories is not None else (own_ids, own_names)
    id_map = {cid: i for i, cid in enumerate(ids)}
    for cid, name in zip(own_ids, own_names):
        if cid in id_map and names[id_map[cid]] != name:
            raise ValueError(
                f"{json_file}: category_id {cid} is {name!r} here but {names[id_map[cid]]!r} in "
                "the train json; probe splits with the same categories."
            )
    images, total = [], 0
    for record in load_coco_json(json_file, image_root):  # sorted by image id
        if max_boxes is not None and total >= max_boxes:
            break
        boxes, labels = [], []
        for ann in record.get("annotations", []):
            if ann.get("iscrowd", 0):
                continue
            if max_boxes is not None and total + len(boxes) >= max_boxes:
                break
            cid = ann["category_id"]
            if cid not in id_map:
                raise ValueError(
                    f"{json_file}: image {record['image_id']} has a box of category_id {cid}, "
                    f"which is not among the categories {ids[:20]}; probe splits with the same "
                    "categories."
                )
            boxes.append(BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS))
            labels.append(id_map[cid])
        if boxes:
            images.append((record["file_name"], int(record["height"]), int(record["width"]),
                           np.asarray(boxes, np.float64).reshape(-1, 4),
                           np.asarray(labels, np.int64)))
            total += len(boxes)
    return BoxSet(images, list(ids), list(names), json_file)


# ---------------------------------------------------------------------------------------------
# Model and features
# ---------------------------------------------------------------------------------------------
def build_probe_config(config_file=DEFAULT_CONFIG, opts=()):
    """
    The detector config of the probe: ``config_file`` (``model_zoo://`` bases allowed) plus
    ``opts`` (``KEY VALUE ...``), on CPU, ``MODEL.WEIGHTS`` cleared (the probe loads its own).
    """
    from detectron2.config import get_cfg

    from .config import add_montage_config, merge_config_file

    if "://" not in config_file and not os.path.isfile(config_file):
        raise FileNotFoundError(
            f"Config file not found: {config_file}; pass a Detectron2 detector config "
            f"(--config-file), e.g. {os.path.relpath(DEFAULT_CONFIG)}."
        )
    cfg = get_cfg()
    add_montage_config(cfg)
    merge_config_file(cfg, config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


def build_probe_model(cfg, weights, seed=0):
    """
    Builds the detector of ``cfg`` on CPU in eval mode and loads ``weights`` into it.

    Args:
        cfg (CfgNode): from :func:`build_probe_config`.
        weights (str): a weight file (a Montage ``.pkl`` export is checked against ``cfg`` and
            every backbone tensor verified, :func:`~montage_pretrain.loading.load_and_verify`),
            or "" for random init.
        seed (int): ``torch.manual_seed`` right before the model is built, so a random init
            does not depend on what ran before.

    Returns:
        tuple[nn.Module, str]: the model and ``"loaded/total"`` backbone tensors ("" for
        random init).
    """
    from detectron2.modeling import build_model

    from . import backbones as _  # noqa: F401  (registers the RegNet builders)
    from .loading import load_and_verify, read_checked_weights

    cfg = cfg.clone()
    cfg.MODEL.WEIGHTS = weights
    export = None
    if weights:
        if "://" not in weights and not os.path.isfile(weights):
            raise FileNotFoundError(
                f"Weight file not found: {weights}; pass a backbone export (.pkl, e.g. "
                "output/<run>/montage_backbone.pkl) or \"\" for random init."
            )
        export = read_checked_weights(cfg)  # raises on a config/export mismatch
    torch.manual_seed(int(seed))
    model = build_model(cfg)
    loaded = ""
    if weights:
        summary = load_and_verify(model, export if export is not None else weights)
        loaded = f"{summary['loaded']}/{summary['total']}"
    model.eval()
    model.requires_grad_(False)
    return model, loaded


def _bottom_up(model):
    return getattr(model.backbone, "bottom_up", model.backbone)


def _stage_plan(model, stages):
    """
    Checks that every stage can be computed; returns ``{stage: stride}`` of the backbone ones
    and the name of the stage a C4 ``roi_heads.res5`` continues from (or None).
    """
    net = _bottom_up(model)
    if hasattr(net, "stage_names") and hasattr(net, "stem"):  # Detectron2 ResNet
        available = dict(net._out_feature_strides)
    else:
        available = {k: v.stride for k, v in net.output_shape().items()}
    strides, c4 = {}, None
    for stage in stages:
        if stage in available and stage != "stem":
            strides[stage] = available[stage]
        elif stage == "res5" and hasattr(getattr(model, "roi_heads", None), "res5") and (
                "res4" in available):
            c4 = "res4"
            strides["res4"] = available["res4"]
        else:
            raise ValueError(
                f"Stage {stage!r} is not computed by the backbone of this detector "
                f"({type(net).__name__}, stages {sorted(k for k in available if k != 'stem')}); "
                "pass --stages among those, or a config whose MODEL.RESNETS.OUT_FEATURES "
                "includes it."
            )
    return strides, c4


def _run_backbone(net, images, names):
    """The backbone outputs named ``names``; a ResNet runs only up to the last one needed."""
    if hasattr(net, "stage_names") and hasattr(net, "stem"):
        outputs, x = {}, net.stem(images)
        for name, stage in zip(net.stage_names, net.stages):
            if len(outputs) == len(names):
                break
            x = stage(x)
            if name in names:
                outputs[name] = x
        return outputs
    out = net(images)
    return {name: out[name] for name in names}


def _read_image(file_name, height, width, cfg):
    """HWC uint8 image in ``INPUT.FORMAT``, resized as at test time, and its transform."""
    from detectron2.data import detection_utils
    from detectron2.data.transforms import NoOpTransform, ResizeShortestEdge, ResizeTransform
    from PIL import Image

    if not os.path.isfile(file_name):
        raise FileNotFoundError(
            f"Image not found: {file_name}; check the --train-images/--val-images folder "
            "against the json's file_name entries."
        )
    img = detection_utils.read_image(file_name, format=cfg.INPUT.FORMAT)
    h, w = img.shape[:2]
    if (h, w) != (height, width):
        raise ValueError(
            f"{file_name} is {w}x{h} px but its json entry says {width}x{height}; fix the json "
            "or the image."
        )
    if cfg.INPUT.MIN_SIZE_TEST == 0:
        tfm = NoOpTransform()
    else:
        newh, neww = ResizeShortestEdge.get_output_shape(
            h, w, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        tfm = ResizeTransform(h, w, newh, neww, Image.BILINEAR)
    return tfm.apply_image(img), tfm


@torch.no_grad()
def _image_features(model, cfg, image, boxes, stages, plan):
    """(K, C) per stage: RoIAlign means of one image's boxes (XYXY in resized pixels)."""
    from detectron2.structures import ImageList

    strides, c4 = plan
    x = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
    x = (x - model.pixel_mean) / model.pixel_std
    x = ImageList.from_tensors(
        [x], model.backbone.size_divisibility,
        padding_constraints=getattr(model.backbone, "padding_constraints", None)).tensor
    maps = _run_backbone(_bottom_up(model), x, list(strides))
    rois = [torch.as_tensor(boxes, dtype=torch.float32)]
    out = {}
    for stage in stages:
        if stage == "res5" and c4:
            res = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
            pooled = roi_align(maps[c4], rois, output_size=res, spatial_scale=1.0 / strides[c4],
                               sampling_ratio=cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
                               aligned=True)
            out[stage] = model.roi_heads.res5(pooled).mean(dim=(2, 3))
        else:
            pooled = roi_align(maps[stage], rois, output_size=ROI_SIZE,
                               spatial_scale=1.0 / strides[stage], sampling_ratio=0, aligned=True)
            out[stage] = pooled.mean(dim=(2, 3))
    return out


def _at_least_one_pixel(boxes):
    """Widens boxes thinner than 1 px about their centre (RoIAlign gives 0 for an empty box)."""
    boxes = np.array(boxes, np.float64)
    for lo, hi in ((0, 2), (1, 3)):
        thin = boxes[:, hi] - boxes[:, lo] < 1.0
        centre = (boxes[thin, lo] + boxes[thin, hi]) / 2
        boxes[thin, lo], boxes[thin, hi] = centre - 0.5, centre + 0.5
    return boxes


def extract_features(models, cfg, boxset, stages=("res4", "res5")):
    """
    RoIAlign features of every box of ``boxset`` under each model, reading each image once.

    Args:
        models (list[nn.Module]): detectors of ``cfg`` in eval mode (:func:`build_probe_model`).
        cfg (CfgNode): their config (test size, ``INPUT.FORMAT``, C4 pooler).
        boxset (BoxSet): from :func:`load_boxes`.
        stages (tuple[str]): backbone stages.

    Returns:
        list[dict[str, Tensor]]: per model, ``{stage: (num_boxes, C) float32}`` in the order of
        ``boxset.labels``.
    """
    plans = [_stage_plan(m, stages) for m in models]
    feats = [{s: [] for s in stages} for _ in models]
    for file_name, height, width, boxes, _ in boxset.images:
        image, tfm = _read_image(file_name, height, width, cfg)
        resized = _at_least_one_pixel(tfm.apply_box(boxes))
        for model, plan, out in zip(models, plans, feats):
            for stage, value in _image_features(model, cfg, image, resized, stages, plan).items():
                out[stage].append(value)
    empty = {s: torch.zeros(0, 0) for s in stages}
    return [{s: torch.cat(v) if v else empty[s] for s, v in f.items()} for f in feats]


# ---------------------------------------------------------------------------------------------
# Probing exports
# ---------------------------------------------------------------------------------------------
def _digest(*tensors):
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def _pinned(threads):
    """Torch thread count and deterministic algorithms for the block; restored after."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(int(threads))
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.set_num_threads(old_threads)


def probe_exports(weights_list, train_json, train_images, val_json, val_images,
                  config_file=DEFAULT_CONFIG, stages=("res4", "res5"), max_boxes=None, opts=(),
                  *, threads=1, seed=0, k=20, epochs=100):
    """
    :func:`probe_export` for several weight files, reading and resizing each image once.

    Each weight file's numbers are the same as when it is probed alone (its features do not
    depend on the other models, and each probe is seeded on its own).

    Returns:
        list[dict]: one :func:`probe_export` result per entry of ``weights_list``.
    """
    weights_list = list(weights_list)
    stages = tuple(stages)
    for weights in weights_list:
        if weights and "://" not in weights and not os.path.isfile(weights):
            raise FileNotFoundError(
                f"Weight file not found: {weights}; pass a backbone export (.pkl, e.g. "
                "output/<run>/montage_backbone.pkl) or \"\" for random init."
            )
    with _pinned(threads):
        t0 = time.perf_counter()
        cfg = build_probe_config(config_file, opts)
        train = load_boxes(train_json, train_images, max_boxes)
        categories = (train.category_ids, train.category_names)
        val = load_boxes(val_json, val_images, max_boxes, categories=categories)
        num_classes = len(train.category_ids)
        if train.num_boxes == 0 or val.num_boxes == 0:
            empty = train_json if train.num_boxes == 0 else val_json
            raise ValueError(f"{empty} has no non-crowd boxes (with images); nothing to probe")
        models, loaded = [], []
        for weights in weights_list:
            model, summary = build_probe_model(cfg, weights, seed=seed)
            models.append(model)
            loaded.append(summary)
        t1 = time.perf_counter()
        train_feats = extract_features(models, cfg, train, stages)
        val_feats = extract_features(models, cfg, val, stages)
        t2 = time.perf_counter()
        train_y, val_y = train.labels, val.labels
        results = []
        for weights, summary, ftrain, fval in zip(weights_list, loaded, train_feats, val_feats):
            p0 = time.perf_counter()
            result = {}
            for stage in stages:
                result[stage] = {
                    "knn_top1": knn_top1(ftrain[stage], train_y, fval[stage], val_y, k=k),
                    "linear_top1": linear_probe(ftrain[stage], train_y, fval[stage], val_y,
                                                epochs=epochs, seed=seed,
                                                num_classes=num_classes),
                    "num_train": len(train_y),
                    "num_val": len(val_y),
                    "dim": int(ftrain[stage].shape[1]),
                }
            result.update({
                "weights": weights,
                # Bitwise identity of the features themselves (train then val, float32).
                "features_sha1": {stage: _digest(ftrain[stage], fval[stage]) for stage in stages},
                "backbone_tensors_loaded": summary,
                "threads": torch.get_num_threads(),
                "seed": int(seed),
                "k": int(k),
                "epochs": int(epochs),
                "num_classes": num_classes,
                "category_names": list(train.category_names),
                "config_file": config_file,
                "opts": list(opts),
                "image_size": [int(cfg.INPUT.MIN_SIZE_TEST), int(cfg.INPUT.MAX_SIZE_TEST)],
                "input_format": cfg.INPUT.FORMAT,
                "max_boxes": max_boxes,
                "train_json": train_json,
                "val_json": val_json,
                # Not reproducible (wall clock); the setup and features are shared by the list.
                "seconds": {"setup": t1 - t0, "features": t2 - t1,
                            "probes": time.perf_counter() - p0},
            })
            results.append(result)
        return results


def probe_export(weights, train_json, train_images, val_json, val_images,
                 config_file=DEFAULT_CONFIG, stages=("res4", "res5"), max_boxes=None, opts=(),
                 *, threads=1, seed=0, k=20, epochs=100):
    """
    Frozen-backbone kNN and linear probes of one backbone export on a COCO train/val pair.

    Args:
        weights (str): a Montage export ``.pkl`` (checked against the config, every backbone
            tensor verified) or any Detectron2 weight file; "" = random init with ``seed``.
        train_json, train_images (str): reference split (COCO json + image folder).
        val_json, val_images (str): query split; its categories must be the train json's.
        config_file (str): detector config (default: the toy R-18 FPN of ``make demo``).
        stages (tuple[str]): bottom-up stages to probe.
        max_boxes (int or None): at most this many boxes per split (the first ones in image-id
            order); None = all.
        opts (sequence[str]): config overrides ``KEY VALUE ...`` (e.g.
            ``("INPUT.MIN_SIZE_TEST", "160")``).
        threads (int): torch intra-op threads during the probe (restored after).
        seed (int): random-init seed and linear-probe seed.
        k (int): neighbours of the kNN probe.
        epochs (int): full-batch steps of the linear probe.

    Returns:
        dict: ``{stage: {"knn_top1", "linear_top1" (percent), "num_train", "num_val", "dim"},
        ..., "weights", "features_sha1" ({stage: SHA-1 of the train and val feature bytes}),
        "backbone_tensors_loaded" ("loaded/total", "" for random init),
        "threads", "seed", "k", "epochs", "num_classes", "category_names", "config_file",
        "opts", "image_size", "input_format", "max_boxes", "train_json", "val_json",
        "seconds"}``. Every entry except ``"seconds"`` is bitwise equal on a rerun with the same
        thread count on the same machine (see the module docstring).
    """
    return probe_exports([weights], train_json, train_images, val_json, val_images,
                         config_file, stages, max_boxes, opts, threads=threads, seed=seed, k=k,
                         epochs=epochs)[0]
