"""Matching boxes across passes: IoU / GIoU, threshold, the unmatched rule."""

from __future__ import annotations

import pytest
import torch

from alrun.acquisition.match import (
    check_matching,
    match_aligned,
    match_boxes,
    paired_iou,
    paired_overlap,
)
from alrun.errors import AlrunError

REF = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
CANDIDATES = torch.tensor(
    [
        [0.0, 0.0, 10.0, 5.0],  # IoU with REF[0]: 50 / 100 = 0.5
        [21.0, 20.0, 31.0, 30.0],  # IoU with REF[1]: 90 / 110
        [100.0, 100.0, 110.0, 110.0],  # overlaps nothing
    ]
)


def test_each_reference_box_takes_its_best_candidate():
    index, overlap = match_boxes(REF, CANDIDATES, "iou", 0.5)
    assert index.tolist() == [0, 1]
    assert overlap.tolist() == pytest.approx([0.5, 90 / 110])


def test_below_threshold_is_unmatched_with_overlap_zero():
    index, overlap = match_boxes(REF, CANDIDATES, "iou", 0.6)
    assert index.tolist() == [-1, 1]
    assert overlap.tolist() == pytest.approx([0.0, 90 / 110])


def test_giou_penalises_the_empty_part_of_the_enclosing_box():
    ref = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    shifted = torch.tensor([[5.0, 5.0, 15.0, 15.0]])
    # IoU 25 / 175 = 1/7 = 0.1429; GIoU = 1/7 - (225 - 175) / 225 = -0.0794
    index, overlap = match_boxes(ref, shifted, "iou", 0.1)
    assert index.tolist() == [0] and overlap.tolist() == pytest.approx([1 / 7])
    index, overlap = match_boxes(ref, shifted, "giou", 0.1)
    assert index.tolist() == [-1] and overlap.tolist() == [0.0]
    inside = torch.tensor([[2.0, 2.0, 8.0, 8.0]])  # enclosing box = union: GIoU = IoU = 0.36
    index, overlap = match_boxes(ref, inside, "giou", 0.3)
    assert index.tolist() == [0] and overlap.tolist() == pytest.approx([0.36])


def test_a_candidate_may_serve_several_reference_boxes():
    ref = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 9.0]])
    index, _ = match_boxes(ref, CANDIDATES[:1], "iou", 0.5)
    assert index.tolist() == [0, 0]


def test_no_candidates_means_all_unmatched():
    index, overlap = match_boxes(REF, torch.zeros((0, 4)))
    assert index.tolist() == [-1, -1] and overlap.tolist() == [0.0, 0.0]


def test_paired_iou():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0, 10.0, 5.0], [4.0, 4.0, 6.0, 6.0], [0.0, 0.0, 0.0, 0.0]])
    assert paired_iou(a, b).tolist() == pytest.approx([0.5, 0.0, 0.0])


@pytest.mark.parametrize(
    ("metric", "threshold", "needle"),
    [
        ("iou", 0.0, "match_threshold: expected a number in (0, 1], got 0.0"),
        ("iou", 1.5, "match_threshold"),
        ("dice", 0.5, "match_metric: expected one of iou|giou, got 'dice'"),
    ],
)
def test_bad_matching_config_is_one_line(metric, threshold, needle):
    with pytest.raises(AlrunError, match=None) as err:
        check_matching(metric, threshold)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_threshold_one_is_allowed():
    check_matching("giou", 1.0)


def test_paired_giou_and_aligned_matching():
    ref = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    other = torch.tensor([[5.0, 5.0, 15.0, 15.0], [0.0, 0.0, 10.0, 5.0]])
    # pair 0: IoU 1/7, GIoU 1/7 - 50/225; pair 1: IoU = GIoU = 0.5 (enclosing = union)
    assert paired_overlap(ref, other, "giou").tolist() == pytest.approx([1 / 7 - 50 / 225, 0.5])
    # aligned: row i against row i only, even where another row would overlap more
    index, overlap = match_aligned(ref, other.flip(0), "iou", 0.4)
    assert index.tolist() == [0, -1] and overlap.tolist() == pytest.approx([0.5, 0.0])
