"""DetectionLoss: padding, empty images, DFL, gradients, class weights, autocast."""

import math

import pytest
import torch
from loss_helpers import FakeModel, make_batch, make_feats

from yolotrain.errors import CfgError
from yolotrain.loss.detection import DetectionLoss, distribution_focal_loss

NC = 3


def record_assigner(loss):
    """Wrap the loss's assigner so each call's outputs are kept in the returned list."""
    calls, assign = [], loss.assigner

    def recording(*args):
        out = assign(*args)
        calls.append(out)
        return out

    loss.assigner = recording
    return calls


def image_batch(batch, i):
    """The part of a batch that belongs to image i, re-indexed as a batch of one."""
    keep = batch["batch_idx"] == i
    return {
        "batch_idx": torch.zeros(int(keep.sum())),
        "cls": batch["cls"][keep],
        "bboxes": batch["bboxes"][keep],
        "img": batch["img"][i : i + 1],
    }


def test_padded_targets_keep_each_image_boxes_in_order():
    loss = DetectionLoss(FakeModel(nc=NC))
    batch = {
        "batch_idx": torch.tensor([2.0, 0.0, 2.0, 2.0]),
        "cls": torch.tensor([[1.0], [0.0], [2.0], [1.0]]),
        "bboxes": torch.tensor(
            [[0.5, 0.5, 0.5, 0.25], [0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.75, 0.5, 0.5, 0.5]]
        ),
        "img": torch.zeros(3, 3, 64, 128, dtype=torch.uint8),  # H = 64, W = 128
    }
    labels, boxes, mask = loss.build_targets(batch, 3, (64, 128), torch.device("cpu"))
    assert labels.shape == (3, 3, 1) and boxes.shape == (3, 3, 4) and mask.shape == (3, 3, 1)
    assert mask[..., 0].tolist() == [[True, False, False], [False, False, False], [True, True, True]]
    assert labels[0, 0, 0] == 0 and labels[2, :, 0].tolist() == [1, 2, 1]
    # (cx, cy, w, h) = (0.25, 0.25, 0.5, 0.5) in a 128 x 64 image -> x 0..64, y 0..32
    assert boxes[0, 0].tolist() == [0.0, 0.0, 64.0, 32.0]
    assert boxes[2, 0].tolist() == [32.0, 24.0, 96.0, 40.0]
    assert boxes[2, 1].tolist() == [0.0, 0.0, 128.0, 64.0]
    assert (boxes[1] == 0).all() and (boxes[0, 1:] == 0).all()


@pytest.mark.parametrize("shuffle", [False, True])
def test_batched_assignment_equals_per_image_assignment(shuffle):
    counts = [2, 0, 5, 1]
    batch = make_batch(counts, NC, seed=1, shuffle=shuffle)
    feats = make_feats(len(counts), NC, seed=2)
    loss = DetectionLoss(FakeModel(nc=NC))
    batched_calls = record_assigner(loss)
    loss(feats, batch)
    labels, boxes, scores, fg, gt_idx = batched_calls[0]
    assert labels.shape[0] == 4 and fg.any()

    for i in range(len(counts)):
        single = DetectionLoss(FakeModel(nc=NC))
        single_calls = record_assigner(single)
        single([f[i : i + 1] for f in feats], image_batch(batch, i))
        s_labels, s_boxes, s_scores, s_fg, s_gt_idx = single_calls[0]
        assert torch.equal(fg[i], s_fg[0])
        assert torch.equal(labels[i], s_labels[0])
        assert torch.equal(gt_idx[i][fg[i]], s_gt_idx[0][s_fg[0]])
        assert torch.allclose(boxes[i], s_boxes[0])
        assert torch.allclose(scores[i], s_scores[0], atol=1e-6)
        assert bool(s_fg.any()) == (counts[i] > 0)


def test_batch_without_boxes_is_all_background_with_exact_cls_loss():
    model = FakeModel(nc=NC)
    loss = DetectionLoss(model)
    calls = record_assigner(loss)
    feats = [torch.zeros(2, 64 + NC, s, s, requires_grad=True) for s in (8, 4, 2)]
    batch = make_batch([0, 0], NC)
    total, items = loss(feats, batch)
    assert not calls[0][3].any()
    num_images, num_anchors = 2, 64 + 16 + 4
    # All logits 0 and all targets 0: BCE = ln 2 per image, anchor and class; the normaliser clamps to 1.
    expected_cls = num_images * num_anchors * NC * math.log(2) * model.args.cls
    assert items[0].item() == 0.0 and items[2].item() == 0.0
    assert items[1].item() == pytest.approx(expected_cls, rel=1e-5)
    assert total.item() == pytest.approx(expected_cls * 2, rel=1e-5)
    total.backward()
    assert all(torch.isfinite(f.grad).all() for f in feats)


def test_image_without_boxes_among_others_gets_no_foreground():
    batch = make_batch([3, 0, 2], NC, seed=3)
    loss = DetectionLoss(FakeModel(nc=NC))
    calls = record_assigner(loss)
    total, items = loss(make_feats(3, NC, seed=4), batch)
    fg = calls[0][3]
    assert fg[0].any() and not fg[1].any() and fg[2].any()
    assert torch.isfinite(items).all() and (items > 0).all()


def test_eval_mode_tuple_uses_the_feature_maps():
    batch = make_batch([2, 1], NC)
    feats = make_feats(2, NC)
    loss = DetectionLoss(FakeModel(nc=NC))
    from_list, items_list = loss(feats, batch)
    from_tuple, items_tuple = loss((torch.zeros(2, 4 + NC, 84), feats), batch)
    assert torch.equal(items_list, items_tuple) and torch.equal(from_list, from_tuple)


def test_dfl_mixes_the_two_neighbour_bins_by_distance():
    # 4 bins with probabilities 0.1, 0.2, 0.3, 0.4.
    logits = torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0])).expand(1, 4, 4)
    targets = torch.tensor([[1.25, 0.0, 2.5, 2.99]])
    per_side = [
        -(0.75 * math.log(0.2) + 0.25 * math.log(0.3)),  # 1.25: bins 1 and 2
        -(1.0 * math.log(0.1) + 0.0 * math.log(0.2)),  # 0.0: all on bin 0
        -(0.5 * math.log(0.3) + 0.5 * math.log(0.4)),  # 2.5: halfway between bins 2 and 3
        -(0.01 * math.log(0.3) + 0.99 * math.log(0.4)),  # 2.99: almost all on bin 3
    ]
    out = distribution_focal_loss(logits, targets)
    assert out.shape == (1, 1)
    assert out.item() == pytest.approx(sum(per_side) / 4, rel=1e-5)


def test_dfl_is_smallest_when_the_distribution_matches_the_target_split():
    target = torch.tensor([[1.25, 1.25, 1.25, 1.25]])
    exact = torch.log(torch.tensor([1e-6, 0.75, 0.25, 1e-6])).expand(1, 4, 4)
    skewed = torch.log(torch.tensor([1e-6, 0.5, 0.5, 1e-6])).expand(1, 4, 4)
    assert distribution_focal_loss(exact, target) < distribution_focal_loss(skewed, target)


def test_gradients_flow_to_box_and_class_outputs_and_are_finite():
    feats = make_feats(2, NC, seed=5, requires_grad=True)
    total, items = DetectionLoss(FakeModel(nc=NC))(feats, make_batch([2, 3], NC, seed=6))
    total.backward()
    grads = torch.cat([f.grad.flatten(2) for f in feats], 2)  # (B, 64 + nc, A)
    assert torch.isfinite(grads).all()
    assert grads[:, :64].abs().sum() > 0  # box distribution channels
    assert grads[:, 64:].abs().sum() > 0  # class channels
    assert total.item() == pytest.approx(items.sum().item() * 2, rel=1e-6)


def test_gains_scale_each_component():
    batch, feats = make_batch([2, 1], NC, seed=7), make_feats(2, NC, seed=8)
    _, base = DetectionLoss(FakeModel(nc=NC, box=1.0, cls=1.0, dfl=1.0))(feats, batch)
    _, scaled = DetectionLoss(FakeModel(nc=NC, box=2.0, cls=3.0, dfl=0.5))(feats, batch)
    assert torch.allclose(scaled, base * torch.tensor([2.0, 3.0, 0.5]), rtol=1e-5)


def test_a_huge_box_uses_the_last_dfl_bins_and_stays_finite():
    # A box much larger than 16 strides around the stride-8 anchors: its distances are clamped to the last bins.
    batch = {
        "batch_idx": torch.zeros(1),
        "cls": torch.zeros(1, 1),
        "bboxes": torch.tensor([[0.5, 0.5, 1.0, 1.0]]),
        "img": torch.zeros(1, 3, 512, 512, dtype=torch.uint8),
    }
    feats = make_feats(1, NC, imgsz=512, seed=9, requires_grad=True)
    total, items = DetectionLoss(FakeModel(nc=NC))(feats, batch)
    total.backward()
    assert torch.isfinite(items).all() and items[2] > 0
    assert all(torch.isfinite(f.grad).all() for f in feats)


def cls_loss_with_weights(weights, feats, batch):
    return DetectionLoss(FakeModel(nc=NC, class_weights=weights))(feats, batch)[1][1].item()


def test_class_weights_scale_the_classification_loss_in_the_expected_direction():
    batch, feats = make_batch([2, 2], NC, seed=10), make_feats(2, NC, seed=11)
    uniform = cls_loss_with_weights(None, feats, batch)
    assert cls_loss_with_weights(torch.full((NC,), 2.0), feats, batch) == pytest.approx(2 * uniform, rel=1e-5)
    assert cls_loss_with_weights(torch.tensor([1.0, 1.0, 3.0]), feats, batch) > uniform
    assert cls_loss_with_weights(torch.tensor([1.0, 1.0, 0.0]), feats, batch) < uniform
    # Per class the loss is linear in its weight: sum of the one-hot weighted parts is the uniform loss.
    parts = [cls_loss_with_weights(torch.eye(NC)[c], feats, batch) for c in range(NC)]
    assert sum(parts) == pytest.approx(uniform, rel=1e-5)


def test_class_weight_vector_can_be_overridden():
    class RareClassLoss(DetectionLoss):
        def class_weight_vector(self):
            return torch.tensor([0.0, 0.0, 1.0])

    batch, feats = make_batch([2, 2], NC, seed=10), make_feats(2, NC, seed=11)
    overridden = RareClassLoss(FakeModel(nc=NC))(feats, batch)[1][1].item()
    assert overridden == pytest.approx(cls_loss_with_weights(torch.tensor([0.0, 0.0, 1.0]), feats, batch))


def test_class_weights_of_the_wrong_shape_raise_a_clear_error():
    with pytest.raises(CfgError, match="class_weights"):
        DetectionLoss(FakeModel(nc=NC, class_weights=torch.ones(NC + 1)))


def test_label_smoothing_keeps_background_at_zero_and_spreads_foreground_mass():
    loss = DetectionLoss(FakeModel(nc=4, label_smoothing=0.2))
    targets = torch.tensor([[[0.0, 0.8, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    fg = torch.tensor([[True, False]])
    smoothed = loss._smoothed(targets, fg)
    assert torch.allclose(smoothed[0, 0], torch.tensor([0.04, 0.64 + 0.04, 0.04, 0.04]))
    assert (smoothed[0, 1] == 0).all()
    assert smoothed[0, 0].sum().item() == pytest.approx(0.8)


@pytest.mark.numeric
def test_bf16_autocast_matches_float32():
    batch, feats = make_batch([2, 3], NC, seed=12), make_feats(2, NC, seed=13)
    loss = DetectionLoss(FakeModel(nc=NC))
    _, full = loss(feats, batch)
    half_feats = [f.bfloat16().requires_grad_(True) for f in feats]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, half = loss(half_feats, batch)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert torch.allclose(half, full, rtol=5e-2, atol=1e-2)
    total.backward()
    assert all(torch.isfinite(f.grad).all() for f in half_feats)


# The reference's (8.4.190) loss items, box, cls and dfl (l1 for yolo26), at nc=3 with `fixed_weights` loaded and 4
# added to the bias of each box branch's last conv, for `reference_batch()`: its assignment ranks candidates by the
# Complete IoU, as ours does.
REFERENCE_ITEMS = {
    "yolo11n": {"all": [5.20755, 240.53215, 4.67979]},
    "yolo26n": {"one2many": [2.91671, 91.87337, 0.10131], "one2one": [2.07687, 337.931, 0.05961]},
}


def reference_batch():
    """Five objects, large to sub-stride, in two 128-px images of hashed pixels."""
    from hashed_weights import hashed_uniform

    images = ((hashed_uniform(2 * 3 * 128 * 128, 7) + 1) / 2).float().view(2, 3, 128, 128)
    boxes = torch.tensor([[0.5, 0.5, 0.4, 0.5], [0.25, 0.3, 0.2, 0.3], [0.6, 0.55, 0.5, 0.6], [0.8, 0.2, 0.06, 0.05],
                          [0.3, 0.7, 0.1, 0.12]])
    return {"img": images, "batch_idx": torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0]),
            "cls": torch.tensor([[0.0], [1.0], [2.0], [0.0], [1.0]]), "bboxes": boxes}


@pytest.mark.numeric
@pytest.mark.parametrize("name", sorted(REFERENCE_ITEMS))
def test_the_loss_items_equal_the_references_for_the_same_weights(name):
    from hashed_weights import fixed_weights

    from yolotrain.cfg import get_cfg
    from yolotrain.nn.model import DetectionModel

    model = DetectionModel(f"{name}.yaml", nc=3, verbose=False)
    model.load_state_dict(fixed_weights(model.state_dict()))
    with torch.no_grad():
        for branch in (*model.head.cv2, *getattr(model.head, "one2one_cv2", [])):
            branch[-1].bias += 4.0
    model.args = get_cfg()
    criterion, batch = model.init_criterion(), reference_batch()
    preds = model.train()(batch["img"])
    for branch, expected in REFERENCE_ITEMS[name].items():
        loss = criterion if branch == "all" else getattr(criterion, branch)
        _, items = loss(preds if branch == "all" else preds[branch], batch)
        torch.testing.assert_close(items, torch.tensor(expected), atol=1e-4, rtol=1e-4)
