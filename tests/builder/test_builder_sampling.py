"""Pure sampling rules: enlargement, box classification, IoU = 0 negatives, quotas, groups."""

import numpy as np
import pytest

from builder.sampling import (
    KEEP,
    SKIP_REASONS,
    allocate_negatives,
    allocate_shortfall,
    classify_boxes,
    count_reasons,
    enlarge_boxes,
    image_rng,
    intersection_areas,
    iou,
    sample_negatives,
    snap_size,
)
from builder.bank import GROUP_S, GROUP_T, GROUP_W, group_of


def _random_boxes(rng, n, width, height, margin=0):
    x0 = rng.uniform(margin, width - margin - 40, n)
    y0 = rng.uniform(margin, height - margin - 40, n)
    return np.stack([x0, y0, x0 + rng.uniform(8, 40, n), y0 + rng.uniform(8, 40, n)], axis=1)


def test_enlarge_within_range_and_contains_box():
    rng = np.random.default_rng(0)
    boxes = _random_boxes(rng, 500, 1000, 1000, margin=100)  # far from borders: no clipping
    out = enlarge_boxes(boxes, 1000, 1000, (1.0, 1.5), np.random.default_rng(1))
    assert np.all(out == np.round(out)), "crop boxes are whole pixels"
    assert np.all(out[:, :2] <= boxes[:, :2]) and np.all(out[:, 2:] >= boxes[:, 2:])
    size, new = boxes[:, 2:] - boxes[:, :2], out[:, 2:] - out[:, :2]
    factor = new / size
    # Outward snapping to whole pixels adds at most 2 px per side pair.
    assert np.all(new >= size) and np.all(new <= 1.5 * size + 2)
    # Both ends of the range are actually used, independently for w and h.
    assert factor.max() > 1.4 and factor.min() < 1.1
    assert np.corrcoef(factor[:, 0], factor[:, 1])[0, 1] < 0.3


def test_enlarge_fixed_factor_and_no_enlargement():
    box = np.array([[10.0, 20.0, 50.0, 40.0]])
    same = enlarge_boxes(box, 100, 100, (1.0, 1.0), np.random.default_rng(0))
    np.testing.assert_array_equal(same, box)
    doubled = enlarge_boxes(box, 1000, 1000, (2.0, 2.0), np.random.default_rng(0))
    w, h = doubled[0, 2] - doubled[0, 0], doubled[0, 3] - doubled[0, 1]
    assert 80 <= w <= 81 and 40 <= h <= 41


def test_enlarge_clipped_to_image():
    boxes = np.array([[0.0, 0.0, 30.0, 30.0], [70.0, 60.0, 100.0, 80.0], [1.5, 2.5, 99.0, 79.0]])
    out = enlarge_boxes(boxes, 100, 80, (1.5, 1.5), np.random.default_rng(0))
    assert out[:, [0, 1]].min() >= 0 and out[:, 2].max() <= 100 and out[:, 3].max() <= 80
    assert np.all(out[:, :2] <= boxes[:, :2]) and np.all(out[:, 2:] >= boxes[:, 2:])


def test_classify_boxes_reasons():
    boxes = np.array(
        [
            [10, 10, 50, 50],  # keep
            [10, 10, 50, 50],  # crowd
            [10, 10, 10, 50],  # degenerate: w = 0
            [10, 50, 40, 40],  # degenerate: h < 0
            [120, 10, 150, 50],  # outside (right of a 100 px wide image)
            [10, 10, 17, 50],  # tiny: 7 px wide
            [-20, -20, 30, 30],  # partly outside: kept, clipped to 30 x 30
            [10, 10, 50, 50],  # unknown category
            [np.nan, 0, 10, 10],  # degenerate: NaN
        ],
        dtype=float,
    )
    crowd = np.zeros(len(boxes), bool)
    crowd[1] = True
    labels = np.zeros(len(boxes), int)
    labels[7] = -1
    clipped, reasons = classify_boxes(boxes, crowd, labels, 100, 80, min_size=8)
    names = ["keep" if r == KEEP else SKIP_REASONS[r - 1] for r in reasons]
    assert names == [
        "keep",
        "crowd",
        "degenerate",
        "degenerate",
        "outside",
        "tiny",
        "keep",
        "unknown_category",
        "degenerate",
    ]
    np.testing.assert_array_equal(clipped[6], [0, 0, 30, 30])
    assert count_reasons(reasons) == {
        "crowd": 1,
        "degenerate": 3,
        "outside": 1,
        "tiny": 1,
        "unknown_category": 1,
    }


def test_min_size_is_inclusive():
    boxes = np.array([[0, 0, 8, 8], [0, 0, 7.9, 20]], dtype=float)
    _, reasons = classify_boxes(boxes, [False, False], [0, 0], 50, 50, min_size=8)
    assert reasons[0] == KEEP and SKIP_REASONS[reasons[1] - 1] == "tiny"


def test_intersection_touching_is_zero():
    a = np.array([[0, 0, 10, 10]], float)
    b = np.array([[10, 0, 20, 10], [9, 9, 20, 20], [0, 0, 10, 10]], float)
    np.testing.assert_allclose(intersection_areas(a, b), [[0, 1, 100]])
    np.testing.assert_allclose(iou(a, b), [[0, 1 / 220, 1]])


def test_negatives_have_zero_overlap_with_all_gt_including_crowd():
    rng = np.random.default_rng(3)
    gt = _random_boxes(rng, 12, 300, 200)
    crowd_region = np.array([[0, 0, 150, 100]], float)  # a big crowd box must be avoided too
    tiny = np.array([[280, 180, 284, 184]], float)
    all_gt = np.concatenate([gt, crowd_region, tiny])
    for seed in range(5):
        neg = sample_negatives(
            all_gt,
            300,
            200,
            20,
            np.random.default_rng(seed),
            ref_sizes=gt[:, 2:] - gt[:, :2],
            min_size=8,
        )
        assert len(neg) > 0
        assert np.all(intersection_areas(neg, all_gt) == 0)
        assert np.all(iou(neg, all_gt) == 0)
        assert np.all(neg == np.round(neg))
        assert neg[:, :2].min() >= 0 and neg[:, 2].max() <= 300 and neg[:, 3].max() <= 200
        assert np.all(neg[:, 2:] - neg[:, :2] >= 8)


def test_negatives_cover_all_groups():
    neg = sample_negatives(
        np.zeros((0, 4)), 640, 480, 400, np.random.default_rng(0), ref_sizes=None, min_size=8
    )
    groups = {group_of(w, h) for w, h in neg[:, 2:] - neg[:, :2]}
    assert groups == {GROUP_S, GROUP_T, GROUP_W}


def test_negatives_exhausted_when_no_room():
    full = np.array([[0, 0, 100, 100]], float)
    assert len(sample_negatives(full, 100, 100, 3, np.random.default_rng(0))) == 0
    # Only a 100 x 6 strip is free: narrower than min_size, so nothing fits.
    almost = np.array([[0, 6, 100, 100]], float)
    assert len(sample_negatives(almost, 100, 100, 3, np.random.default_rng(0), min_size=8)) == 0
    # A 100 x 20 strip: negatives shrink until they fit.
    strip = np.array([[0, 20, 100, 100]], float)
    neg = sample_negatives(
        strip, 100, 100, 3, np.random.default_rng(0), ref_sizes=np.array([[80.0, 80.0]]), min_size=8
    )
    assert len(neg) == 3 and neg[:, 3].max() <= 20


def test_allocate_negatives_total_and_proportional():
    pos = np.array([3, 0, 12, 7, 1, 1, 1, 25, 4])
    q = allocate_negatives(pos, 0.1)
    assert q.sum() == round(0.1 * pos.sum()) and q.min() >= 0
    assert q[1] == 0 and q[7] >= 2
    assert allocate_negatives(pos, 0.0).sum() == 0
    np.testing.assert_array_equal(allocate_shortfall(4, 6), [2, 2, 1, 1])
    np.testing.assert_array_equal(allocate_shortfall(3, 0), [0, 0, 0])


def test_image_rng_depends_only_on_seed_and_image():
    a = image_rng(0, 42).uniform(size=4)
    np.testing.assert_array_equal(a, image_rng(0, 42).uniform(size=4))
    assert not np.allclose(a, image_rng(0, 43).uniform(size=4))
    assert not np.allclose(a, image_rng(1, 42).uniform(size=4))
    assert not np.allclose(a, image_rng(0, 42, pass_index=1).uniform(size=4))
    image_rng(0, -5)  # negative ids are valid


@pytest.mark.parametrize(
    "w,h,group",
    [
        (50, 100, GROUP_S),
        (150, 100, GROUP_S),
        (100, 100, GROUP_S),
        (4999, 10000, GROUP_T),
        (15001, 10000, GROUP_W),
        (1, 3, GROUP_T),
        (3, 1, GROUP_W),
    ],
)
def test_group_boundaries(w, h, group):
    assert group_of(w, h) == group


def test_snap_size_keeps_aspect_and_never_upscales():
    assert snap_size(100, 50, 256) == (100, 50)
    assert snap_size(512, 256, 256) == (256, 128)
    assert snap_size(1000, 3, 256) == (256, 1)
    assert snap_size(640, 480, 0) == (640, 480)
