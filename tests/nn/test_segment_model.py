"""Instance segmentation models: the reference layout of every yolov8/yolo11/yolo26 -seg scale, the Segment and
Segment26 heads' outputs in training, eval and end-to-end form, fusing, strides, name resolution, and a file in the
reference's pickle layout imported key for key."""

import copy
import hashlib
import math
import sys
import types

import pytest
import torch

from detection_match import assert_same_detections
from hashed_weights import fixed_weights, hashed_uniform
from yolotrain.errors import CfgError
from yolotrain.nn.model import SegmentationModel, head_task, load_model_yaml
from yolotrain.nn.modules import Detect, Proto, Proto26, Segment, Segment26
from yolotrain.utils.checkpoint import load_checkpoint

# The reference's own models at nc=80: (parameters, state-dict entries, sha256 of `layout_lines`), taken once from
# Ultralytics 8.4.190's `SegmentationModel(f"{name}.yaml").state_dict()`, so these tests need no reference installed.
REFERENCE_LAYOUTS = {
    "yolov8n-seg": (3_409_968, 417, "056f6671b09bc92e6e5ccb604de5b044b0a70ebe748a2a74850935051c4eb74d"),
    "yolov8s-seg": (11_821_056, 417, "5ee20889cd7256f5ca96f466d20b697effc368663f43586ee22ba351503a5d12"),
    "yolov8m-seg": (27_285_968, 537, "c0a0fbd6469d101156c10ea2614c4b3641bb5fd77bbe1032ff0faffe70cacf62"),
    "yolov8l-seg": (45_997_728, 657, "97a30c9e1d76859c735d0a770eaa172500f0573916ece413cbc30aa148a3fe3a"),
    "yolov8x-seg": (71_827_888, 657, "6d34f045ca57d924ec10f365f9e6c67fcaa22f1d37751768ef42b09c89ea2abb"),
    "yolo11n-seg": (2_876_848, 561, "6259a36b5f993a9881729281048dc7315f6c1650d82a591f77ff217fea3b1dc8"),
    "yolo11s-seg": (10_113_248, 561, "dc821611171983fb5f1c05a92a3ad0b9617e6f928ea8d1dc9e100a5d6e7ce4b3"),
    "yolo11m-seg": (22_420_896, 711, "c7c79d1b42e7a49a79296fd9ca39270e4a56f6700b229c7c83493e13575fb215"),
    "yolo11l-seg": (27_678_368, 1077, "b9d23e644f888b9479ad3555b2c288b5ffc9d38f216fcf846dc8808d5997027f"),
    "yolo11x-seg": (62_142_656, 1077, "18440b5c1f920c0aeddd4245fd4ff81792db20540a718ba4c032e71a8c72db1f"),
    "yolo26n-seg": (3_126_280, 844, "34535cd0b0fdf4b5634c260282efec367e10e189fec31325a8f569086bd9f31f"),
    "yolo26s-seg": (11_505_800, 844, "1a3c4b2977101114092dd12babae9d0b04e29dba1cb4953f66d41165bb92a803"),
    "yolo26m-seg": (27_112_072, 904, "85f3833946ccbadbe900b3039f0cf4bcb3661541efebcd4c95a6c52cf43e6044"),
    "yolo26l-seg": (31_515_528, 1228, "41c63b81f369c7ba332118f7c8eef527a2c574902efa7281d23c369fe3edcdb1"),
    "yolo26x-seg": (70_693_800, 1228, "93085ca503efff86520c136b7362c1cc3285bc8ae79a94c9d4d890ea863111dd"),
}
NC, NM = 6, 32  # the tiny yamls' classes; mask prototypes (not scaled with the model)


def layout_lines(state_dict):
    """One `name:(shape)` line per entry, in state-dict order."""
    return [f"{name}:{tuple(tensor.shape)}" for name, tensor in state_dict.items()]


@pytest.fixture(scope="module")
def tiny_seg_yaml(tmp_path_factory):
    """`tiny_seg_yaml("yolo26")`: the built-in `<family>-seg.yaml` layers at 1/16 width (scale `t`), nc=6."""
    import yaml

    from yolotrain.nn.model import MODELS_DIR

    folder = tmp_path_factory.mktemp("seg-models")

    def make(family):
        model = yaml.safe_load((MODELS_DIR / f"{family}-seg.yaml").read_text())
        model.update(nc=NC, scales={"t": [0.5, 0.0625, 256]})
        path = folder / f"tiny{family}-seg-t.yaml"
        path.write_text(yaml.safe_dump(model, sort_keys=False))
        return str(path)

    return make


# ----------------------------------------------------------------------------------------------- reference layout
@pytest.mark.parametrize("name", sorted(REFERENCE_LAYOUTS))
def test_every_scale_has_the_reference_names_shapes_and_parameter_count(name):
    parameters, entries, digest = REFERENCE_LAYOUTS[name]
    model = SegmentationModel(f"{name}.yaml", verbose=False)
    assert model.nc == 80 and model.yaml["scale"] == name[-5] and model.task == "segment"
    assert sum(p.numel() for p in model.parameters()) == parameters
    lines = layout_lines(model.state_dict())
    assert len(lines) == entries
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == digest


def test_names_with_a_scale_letter_resolve_to_the_family_yaml():
    for name, base, scale in [("yolo11n-seg.yaml", "yolo11-seg.yaml", "n"), ("yolov8m-seg.yaml", "yolov8-seg.yaml", "m"),
                              ("yolo26x-seg.yaml", "yolo26-seg.yaml", "x")]:
        model_dict = load_model_yaml(name)
        assert model_dict["yaml_file"].endswith(base) and model_dict["scale"] == scale
        assert head_task(model_dict) == "segment"


def test_the_prototype_width_scales_with_the_model_and_the_mask_count_does_not():
    head = SegmentationModel("yolo11n-seg.yaml", verbose=False).head  # width 0.25: npr 256 -> 64
    assert (head.nm, head.npr) == (32, 64) and isinstance(head.proto, Proto)
    assert head.proto.upsample.weight.shape == (64, 64, 2, 2) and head.proto.cv3.conv.out_channels == 32
    assert head.cv4[0][0].conv.out_channels == max(head.cv2[0][0].conv.in_channels // 4, 32)


def test_a_segmentation_model_needs_a_segment_head(tiny_family_yaml):
    with pytest.raises(CfgError, match="a SegmentationModel needs a Segment head, got Detect"):
        SegmentationModel(tiny_family_yaml("yolo11"), verbose=False)


# ----------------------------------------------------------------------------------------------- forward contract
@pytest.mark.parametrize("family", ["yolov8", "yolo11"])
def test_segment_outputs_in_training_and_eval(tiny_seg_yaml, family):
    model = SegmentationModel(tiny_seg_yaml(family), verbose=False)
    assert not model.end2end and model.nm == NM and type(model.head) is Segment
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    x = torch.rand(2, 3, 64, 96)
    anchors = 8 * 12 + 4 * 6 + 2 * 3
    maps, coefficients, proto = model.train()(x)
    assert [tuple(m.shape) for m in maps] == [(2, 64 + NC, 8, 12), (2, 64 + NC, 4, 6), (2, 64 + NC, 2, 3)]
    assert coefficients.shape == (2, NM, anchors) and proto.shape == (2, NM, 16, 24)
    with torch.no_grad():
        y, (maps, coefficients, proto) = model.eval()(x)
    assert y.shape == (2, 4 + NC + NM, anchors) and proto.shape == (2, NM, 16, 24)
    assert Segment.eval_prototypes((y, (maps, coefficients, proto))) is proto
    assert torch.equal(y[:, : 4 + NC], model.head._decode(maps)) and torch.equal(y[:, 4 + NC :], coefficients)


def test_segment26_trains_two_branches_with_prototypes_and_semantic_logits(tiny_seg_yaml):
    model = SegmentationModel(tiny_seg_yaml("yolo26"), verbose=False).train()
    assert model.end2end and type(model.head) is Segment26 and isinstance(model.head.proto, Proto26)
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    preds = model(torch.rand(2, 3, 64, 96))
    assert set(preds) == {"one2many", "one2one"}
    for maps, coefficients, proto, semantic in preds.values():
        assert [tuple(m.shape) for m in maps] == [(2, 4 + NC, 8, 12), (2, 4 + NC, 4, 6), (2, 4 + NC, 2, 3)]
        assert coefficients.shape == (2, NM, 126) and proto.shape == (2, NM, 16, 24)
        assert semantic.shape == (2, NC, 8, 12)


def test_the_one_to_one_branch_trains_neither_the_backbone_nor_the_prototypes(tiny_seg_yaml):
    model = SegmentationModel(tiny_seg_yaml("yolo26"), verbose=False).train()
    preds = model(torch.rand(1, 3, 64, 64))
    maps, coefficients, proto, semantic = preds["one2one"]
    assert not proto.requires_grad and not semantic.requires_grad
    (sum(m.sum() for m in maps) + coefficients.sum()).backward()
    assert model.model[0].conv.weight.grad is None and model.head.proto.cv3.conv.weight.grad is None
    assert model.head.one2one_cv4[0][0].conv.weight.grad is not None
    preds["one2many"][2].sum().backward()  # the one-to-many prototypes do reach the backbone
    assert model.model[0].conv.weight.grad is not None


def test_end_to_end_eval_rows_carry_the_coefficients_of_their_anchor(tiny_seg_yaml):
    torch.manual_seed(0)
    model = SegmentationModel(tiny_seg_yaml("yolo26"), verbose=False).eval()
    model.head.max_det = 10
    with torch.no_grad():
        for parameter in model.parameters():  # a fresh model predicts alike at many anchors: make them differ
            parameter.add_(torch.randn_like(parameter) * 0.1)
        y, preds = model(torch.rand(2, 3, 64, 64))
    assert y.shape == (2, 10, 6 + NM) and set(preds) == {"one2one", "one2many"}
    maps, coefficients, proto = preds["one2one"]
    assert proto.shape == (2, NM, 16, 16) and Segment.eval_prototypes((y, preds)) is proto
    decoded = model.head._decode(maps, xywh=False)  # (B, 4 + nc, A) xyxy and scores
    for image in range(2):
        for row in y[image]:  # the one anchor with this row's coefficients has its box and class score
            (anchor,) = torch.nonzero((coefficients[image] == row[6:, None]).all(0)).flatten().tolist()
            assert torch.equal(decoded[image, :4, anchor], row[:4])
            assert decoded[image, 4 + int(row[5]), anchor] == row[4]
    assert torch.all(y[..., 4][:, :-1] >= y[..., 4][:, 1:])


def test_top_detections_carry_extra_columns_by_hand():
    head = Detect(nc=2, ch=(8,), reg_max=1, end2end=True)
    head.max_det = 2
    boxes = torch.tensor([[0, 0, 1, 1], [1, 1, 2, 2], [2, 2, 3, 3]], dtype=torch.float)
    scores = torch.tensor([[0.1, 0.2], [0.9, 0.0], [0.3, 0.8]])
    extra = torch.tensor([[10.0, 11.0], [20.0, 21.0], [30.0, 31.0]])
    top = head._top_detections(torch.cat((boxes, scores, extra), 1).T.unsqueeze(0))[0]
    assert top.tolist() == [[1, 1, 2, 2, pytest.approx(0.9), 0, 20, 21], [2, 2, 3, 3, pytest.approx(0.8), 1, 30, 31]]


def outputs_before_and_after_fusing(model):
    """The eval outputs for one random image before and after `model.fuse()`."""
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = model.eval()(x)
        return before, model.fuse()(x)


@pytest.mark.numeric
def test_fusing_an_end_to_end_model_keeps_its_output_and_drops_the_training_branches(tiny_seg_yaml):
    model = SegmentationModel(tiny_seg_yaml("yolo26"), verbose=False)
    (y_before, preds_before), (y, preds) = outputs_before_and_after_fusing(model)
    head = model.head
    assert set(preds) == {"one2one"} and head.cv2 is None and head.cv3 is None and head.cv4 is None
    assert head.proto.semseg is None and model.is_fused()
    assert_same_detections(y[0], y_before[0], atol=1e-4, rtol=1e-4, cut_off=True)
    torch.testing.assert_close(preds["one2one"][2], preds_before["one2one"][2], atol=1e-4, rtol=1e-4)
    assert len(model.train()(torch.rand(1, 3, 64, 64))["one2one"]) == 3  # no semantic branch left to train


@pytest.mark.numeric
def test_fusing_a_segment_model_keeps_its_output(tiny_seg_yaml):
    model = SegmentationModel(tiny_seg_yaml("yolo11"), verbose=False)
    (y_before, preds_before), (y, preds) = outputs_before_and_after_fusing(model)
    assert model.head.cv4 is not None and model.is_fused()
    torch.testing.assert_close(y, y_before, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(preds[2], preds_before[2], atol=1e-4, rtol=1e-4)


def test_class_biases_start_at_the_prior_and_info_counts_flops(tiny_seg_yaml):
    model = SegmentationModel(tiny_seg_yaml("yolo26"), verbose=False)
    for branch in (model.head.cv3, model.head.one2one_cv3):
        for level, stride in zip(branch, (8, 16, 32)):
            expected = math.log(5 / NC / (640 / stride) ** 2)
            assert torch.allclose(level[-1].bias, torch.full((NC,), expected))
    layers, parameters, gradients, gflops = model.info(verbose=False)
    assert parameters == sum(p.numel() for p in model.parameters()) and gflops > 0


def test_the_loss_comes_from_the_segment_loss_module(tiny_seg_yaml, monkeypatch):
    """init_criterion imports lazily: `SegmentationLoss`, or `EndToEndSegmentationLoss` for an end2end head."""
    module = types.ModuleType("yolotrain.loss.segment")
    module.SegmentationLoss = lambda model: ("one2many only", model)
    module.MaskAlignedSegmentationLoss = lambda model: ("mask aligned", model)
    module.EndToEndSegmentationLoss = lambda model: ("end2end", model)
    monkeypatch.setitem(sys.modules, "yolotrain.loss.segment", module)
    for family, kind in (("yolo11", "one2many only"), ("yolo26", "end2end")):
        model = SegmentationModel(tiny_seg_yaml(family), verbose=False)
        assert model.init_criterion() == (kind, model)


# ------------------------------------------------------------------------------------ the loss: reference figures
# The reference's (8.4.190) loss items (box, seg, cls, l1, sem) of both branches of its yolo26n-seg at nc=3, with
# `fixed_weights` loaded and 4 added to the bias of each box branch's last conv, on `reference_batch()`: its
# assignment ranks candidates by the mean of box and mask IoU, as ours does for a Segment26 head (by box alone, the
# one-to-one items would be [2.41051, 12.33034, 310.31738, 0.0695, 5.84823]).
REFERENCE_SEG26_ITEMS = {
    "one2many": [3.3007, 8.95477, 87.27268, 0.11387, 5.84823],
    "one2one": [3.11068, 11.78535, 393.5976, 0.08883, 5.84823],
}


def reference_batch():
    """Five objects in two 128-px images of hashed pixels, each an ellipse in its box (index masks at 32 px)."""
    images = ((hashed_uniform(2 * 3 * 128 * 128, 7) + 1) / 2).float().view(2, 3, 128, 128)
    boxes = torch.tensor([[0.5, 0.5, 0.4, 0.5], [0.25, 0.3, 0.2, 0.3], [0.6, 0.55, 0.5, 0.6], [0.8, 0.2, 0.1, 0.12],
                          [0.3, 0.7, 0.2, 0.16]])
    batch_idx = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0])
    masks = torch.zeros(2, 32, 32)
    ys, xs = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    counts = [0, 0]
    for (cx, cy, w, h), image in zip(boxes.tolist(), batch_idx.long().tolist()):
        counts[image] += 1
        inside = ((xs / 32 - cx) / (w / 2)) ** 2 + ((ys / 32 - cy) / (h / 2)) ** 2 <= 1
        masks[image][inside & (masks[image] == 0)] = counts[image]
    return {"img": images, "batch_idx": batch_idx, "cls": torch.tensor([[0.0], [1.0], [2.0], [0.0], [1.0]]),
            "bboxes": boxes, "masks": masks}


@pytest.mark.numeric
def test_the_yolo26_loss_items_equal_the_references_for_the_same_weights():
    from yolotrain.cfg import get_cfg
    from yolotrain.loss.segment import MaskAlignedSegmentationLoss

    model = SegmentationModel("yolo26n-seg.yaml", nc=3, verbose=False)
    model.load_state_dict(fixed_weights(model.state_dict()))
    with torch.no_grad():
        for branch in (*model.head.cv2, *model.head.one2one_cv2):
            branch[-1].bias += 4.0
    model.args = get_cfg()
    criterion, batch = model.init_criterion(), reference_batch()
    assert isinstance(criterion.one2one, MaskAlignedSegmentationLoss)
    preds = model.train()(batch["img"])
    for branch, expected in REFERENCE_SEG26_ITEMS.items():
        _, items = getattr(criterion, branch)(preds[branch], batch)
        torch.testing.assert_close(items, torch.tensor(expected), atol=1e-4, rtol=1e-4)


def test_the_mask_aware_assignment_prefers_the_anchor_whose_mask_is_right():
    from yolotrain.loss.segment import MaskTaskAlignedAssigner

    assigner = MaskTaskAlignedAssigner(topk=1, num_classes=1)
    anchors = torch.tensor([[12.0, 12.0], [20.0, 20.0]])  # pixels; masks at a quarter of the input size
    gt_box = torch.tensor([[[0.0, 0.0, 32.0, 32.0]]])
    gt_mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    gt_mask[..., :4, :] = True  # the object fills the top half of its box
    protos = torch.stack((torch.ones(8, 8), torch.zeros(8, 8)))[None]  # (1, 2, 8, 8)
    protos[0, 1, :4] = 1.0
    protos[0, 1, 4:] = -1.0  # prototype 1: +1 on the top half, -1 below
    coefficients = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # anchor 0: the whole box; anchor 1: the top half
    pred_boxes = torch.tensor([[[0.0, 0.0, 32.0, 32.0], [0.0, 0.0, 32.0, 32.0]]])  # the same box: masks decide
    _, _, scores, fg, _ = assigner(torch.full((1, 2, 1), 0.5), pred_boxes, anchors, torch.zeros(1, 1, 1), gt_box,
                                   torch.ones(1, 1, 1), coefficients=coefficients, protos=protos, gt_masks=gt_mask,
                                   mask_scale=0.25)
    assert fg.tolist() == [[False, True]]  # mask IoU 1 against 0.5
    assert float(scores[0, 1, 0]) == pytest.approx(1.0, rel=1e-5)  # (box 1 + mask 1) / 2
    overlaps = assigner.candidate_overlaps(gt_box, pred_boxes, torch.ones(1, 1, 2, dtype=torch.bool),
                                           class_scores=torch.full((1, 1, 2), 0.5), coefficients=coefficients,
                                           protos=protos, gt_masks=gt_mask, mask_scale=0.25)
    assert overlaps.tolist() == [[[0.75, 1.0]]]


# ------------------------------------------------------------------------------------------- reference checkpoints
@pytest.mark.parametrize("family", ["yolo11", "yolo26"])
def test_a_reference_segmentation_file_imports_key_for_key(tmp_path, tiny_seg_yaml, family):
    """A .pt in the reference's pickle layout (whole model objects, EMA in half precision) rebuilds the same
    SegmentationModel: every tensor under its own name, the task from its head."""
    from reference_layout import classes_named_like_the_reference

    torch.manual_seed(0)
    model = SegmentationModel(tiny_seg_yaml(family), nc=3, verbose=False)
    model.names = {0: "a", 1: "b", 2: "c"}
    ema = copy.deepcopy(model).half()
    path = tmp_path / f"{family}t-seg.pt"
    with classes_named_like_the_reference(model):
        torch.save({"epoch": 9, "model": None, "ema": ema, "train_args": {"task": "segment"}, "version": "8.4.190"},
                   path)
    checkpoint = load_checkpoint(path)
    assert head_task(load_model_yaml(checkpoint["model_yaml"])) == "segment" and checkpoint["nc"] == 3
    expected = {k: v.float() for k, v in ema.state_dict().items()}
    assert list(checkpoint["model"]) == list(expected)
    rebuilt = SegmentationModel.from_yaml_and_state(checkpoint["model_yaml"], checkpoint["model"])
    assert rebuilt.end2end == (family == "yolo26")
    assert all(torch.equal(v, expected[k]) for k, v in rebuilt.state_dict().items())
