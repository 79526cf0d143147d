import math

import pytest
import torch

from montage_pretrain.losses import (
    blockwise_loss,
    blockwise_weights,
    erf_dense_loss,
    global_loss,
    single_loss,
    soft_targets,
)
from montage_pretrain.montage import MontageTemplate

pytestmark = pytest.mark.usefixtures("few_threads")

K = 4  # C = 3 foreground classes + background


def _example(seed=0):
    g = torch.Generator().manual_seed(seed)
    # 96 / 0.3 / stride 32: a 3x3 map with uneven regions [[0,1,1],[2,3,3],[2,3,3]]
    rmap = MontageTemplate(96, 0.3).region_map(3, 3, 32)
    logits = torch.randn(2, K, 3, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([[0, 1, 3, 1], [2, 2, 0, 3]])
    w = torch.rand(4, 3, 3, generator=g, dtype=torch.float64)
    w = w / w.sum(0, keepdim=True)
    return logits, labels, w, rmap


def _log_softmax(v):
    m = max(v)
    lse = m + math.log(sum(math.exp(x - m) for x in v))
    return [x - lse for x in v]


def test_region_map_example():
    _, _, _, rmap = _example()
    assert rmap.tolist() == [[0, 1, 1], [2, 3, 3], [2, 3, 3]]
    bw = blockwise_weights(rmap)
    assert bw.shape == (4, 3, 3)
    assert torch.equal(bw.argmax(0), rmap) and torch.equal(bw.sum(0), torch.ones(3, 3))


def test_soft_targets_loops():
    logits, labels, w, _ = _example()
    t = soft_targets(labels, w, K)
    assert t.shape == (2, K, 3, 3)
    for n in range(2):
        for j in range(3):
            for k in range(3):
                ref = [0.0] * K
                for i in range(4):
                    ref[int(labels[n, i])] += float(w[i, j, k])
                assert t[n, :, j, k].tolist() == pytest.approx(ref, abs=1e-6)
    with pytest.raises(ValueError, match="C \\+ 1"):
        soft_targets(labels, w, 3)


def test_erf_dense_loss_hand_computed():
    logits, labels, w, rmap = _example()
    per_image = []
    for n in range(2):
        region_losses = []
        for r in range(4):
            losses = []
            for j in range(3):
                for k in range(3):
                    if int(rmap[j, k]) != r:
                        continue
                    logp = _log_softmax([float(logits[n, c, j, k]) for c in range(K)])
                    target = [0.0] * K
                    for i in range(4):
                        target[int(labels[n, i])] += float(w[i, j, k])
                    losses.append(-sum(tc * lc for tc, lc in zip(target, logp)))
            region_losses.append(sum(losses) / len(losses))
        per_image.append(sum(region_losses) / 4)
    ref = sum(per_image) / 2
    got = erf_dense_loss(logits, labels, w, rmap)
    assert got.dim() == 0 and got.dtype == torch.float32
    assert got.item() == pytest.approx(ref, rel=1e-5)


def test_erf_dense_loss_equals_explicit_soft_ce_and_backprops():
    logits, labels, w, rmap = _example(1)
    logits = logits.float().requires_grad_(True)
    ce = -(soft_targets(labels, w, K) * torch.log_softmax(logits, 1)).sum(1)  # (N, h, w)
    masks = blockwise_weights(rmap)
    ref = ((ce[:, None] * masks).sum((2, 3)) / masks.sum((1, 2))).mean()
    got = erf_dense_loss(logits, labels, w.float(), rmap)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    got.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_blockwise_loss_hand_computed():
    logits, labels, _, rmap = _example()
    total = 0.0
    for n in range(2):
        for r in range(4):
            pos = [(j, k) for j in range(3) for k in range(3) if int(rmap[j, k]) == r]
            mean = [sum(float(logits[n, c, j, k]) for j, k in pos) / len(pos) for c in range(K)]
            total += -_log_softmax(mean)[int(labels[n, r])]
    assert blockwise_loss(logits, labels, rmap).item() == pytest.approx(total / 8, rel=1e-5)


def test_global_loss_hand_computed():
    logits, labels, _, _ = _example()
    areas = MontageTemplate(96, 0.3).region_areas()
    total = 0.0
    for n in range(2):
        mean = [float(logits[n, c].mean()) for c in range(K)]
        logp = _log_softmax(mean)
        total += -sum(float(areas[i]) * logp[int(labels[n, i])] for i in range(4))
    assert global_loss(logits, labels, areas).item() == pytest.approx(total / 2, rel=1e-5)


def test_single_loss_hand_computed():
    logits, labels, _, _ = _example()
    lab = labels[:, :1]
    ref = sum(-_log_softmax([float(logits[n, c].mean()) for c in range(K)])[int(lab[n, 0])]
              for n in range(2)) / 2
    assert single_loss(logits, lab).item() == pytest.approx(ref, rel=1e-5)


def test_same_label_everywhere_reduces_to_plain_ce():
    # If all four regions share a label, every soft target is that one-hot whatever the weights.
    logits, _, w, rmap = _example(2)
    labels = torch.full((2, 4), 2)
    per_pos = torch.nn.functional.cross_entropy(logits, torch.full((2, 3, 3), 2), reduction="none")
    masks = blockwise_weights(rmap).double()
    ref = ((per_pos[:, None] * masks).sum((2, 3)) / masks.sum((1, 2))).mean()
    assert erf_dense_loss(logits, labels, w, rmap).item() == pytest.approx(ref.item(), rel=1e-5)
