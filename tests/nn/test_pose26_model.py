"""YOLO26 pose models: the reference layout of every yolo26-pose scale, the Pose26 head's outputs in training, eval
and fused form, its normalising flow as a density, the keypoint-aware assignment, and the reference's own decoded
outputs and six loss items for the same weights; then a yolo26 pose run and a file in the reference's layout."""

import copy
import hashlib
import math
from pathlib import Path

import pytest
import torch

from hashed_weights import fixed_weights, hashed_uniform
from resume_check import read_rows
from yolotrain.cfg import get_cfg
from yolotrain.engine.model import YOLO
from yolotrain.loss.pose import LEVEL_RANGE, EndToEndPoseLoss, KeypointTaskAlignedAssigner, RLEPoseLoss
from yolotrain.nn.backends import load_inference_model
from yolotrain.nn.model import PoseModel
from yolotrain.nn.modules import Pose26, RealNVP
from yolotrain.utils.checkpoint import load_checkpoint

# The reference's own models at nc=80, 17 keypoints: (parameters, state-dict entries, sha256 of the `name:(shape)`
# lines in state-dict order), from the reference trainer's (8.4.190) `PoseModel(f"{name}.yaml").state_dict()`.
REFERENCE_LAYOUTS = {
    "yolo26n-pose": (3_747_554, 879, "d67b066c7bfaec3f92d41349f9aa18c720cc0e1cffda2f28d65e246c9109c709"),
    "yolo26s-pose": (11_870_498, 879, "3dedcf4026037e8d09795eb440f36ceff8d24351c2514706dd1822f6f6b00e58"),
    "yolo26m-pose": (24_344_482, 939, "77122488eb5e81c3df98b8b3e2044e2bc12e2964c69e8712a6ab8dbfb2c4be54"),
    "yolo26l-pose": (28_747_938, 1263, "e03f536f27cc36fb2d9d5700648a6d2f970ccb80c3839fbe2f0e7a3a309c8bcd"),
    "yolo26x-pose": (62_914_350, 1263, "9c66c53f69e1d4fd35022ae412d54fbe891a588a934d898e57f93c2f8fab4bc6"),
}


@pytest.fixture(scope="module")
def tiny_pose26_yaml(tiny_family_yaml):
    """The built-in yolo26-pose layers at 1/16 width (scale `t`), nc=6, 17 keypoints."""
    return tiny_family_yaml("yolo26-pose")


# ----------------------------------------------------------------------------------------------- reference layout
@pytest.mark.parametrize("name", sorted(REFERENCE_LAYOUTS))
def test_every_scale_has_the_reference_names_shapes_and_parameter_count(name):
    parameters, entries, digest = REFERENCE_LAYOUTS[name]
    model = PoseModel(f"{name}.yaml", verbose=False)
    assert type(model.head) is Pose26 and model.end2end and model.rle and model.task == "pose"
    assert sum(p.numel() for p in model.parameters()) == parameters
    lines = [f"{key}:{tuple(value.shape)}" for key, value in model.state_dict().items()]
    assert len(lines) == entries and hashlib.sha256("\n".join(lines).encode()).hexdigest() == digest


# --------------------------------------------------------------------------------------------------------- head
def test_training_outputs_carry_spreads_and_eval_outputs_do_not(tiny_pose26_yaml):
    model = PoseModel(tiny_pose26_yaml, data_kpt_shape=[5, 3], verbose=False)
    images = torch.rand(2, 3, 64, 96)
    preds = model.train()(images)
    anchors = 8 * 12 + 4 * 6 + 2 * 3
    for branch in ("one2many", "one2one"):
        maps, keypoints, spreads = preds[branch]
        assert keypoints.shape == (2, 5 * 3, anchors) and spreads.shape == (2, 5 * 2, anchors)
    y, preds = model.eval()(images)
    assert y.shape == (2, anchors, 6 + 5 * 3)  # end-to-end rows, each with its anchor's decoded keypoints
    assert all(len(preds[branch]) == 2 for branch in ("one2many", "one2one"))


def test_keypoints_decode_around_their_anchor_without_the_2x_scale(tiny_pose26_yaml):
    model = PoseModel(tiny_pose26_yaml, data_kpt_shape=[4, 2], verbose=False).eval()
    for conv in model.head.one2one_cv4_kpts:  # raw outputs all zero: each keypoint sits on its anchor
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    _, preds = model(torch.rand(1, 3, 64, 64))
    decoded = model.head._inference(preds["one2one"])[0, 4 + model.nc :].view(4, 2, -1)
    assert torch.equal(decoded[:, :, 0], torch.full((4, 2), 4.0))  # anchor (0.5, 0.5) at stride 8
    assert torch.equal(decoded[:, :, -1], torch.full((4, 2), 48.0))  # anchor (1.5, 1.5) at stride 32


def test_fusing_drops_the_spreads_and_the_flow_and_keeps_the_output(tiny_pose26_yaml):
    model = PoseModel(tiny_pose26_yaml, data_kpt_shape=[5, 3], verbose=False).eval()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = model(images)[0]
        fused = copy.deepcopy(model).fuse()
        after = fused(images)[0]
    assert fused.head.flow_model is None and fused.head.cv4_sigma is None and fused.head.one2one_cv4_sigma is None
    assert fused.head.cv4 is None and fused.head.cv4_kpts is None  # the one-to-many branch: training only
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_the_flow_is_a_density_whatever_its_weights():
    torch.manual_seed(0)
    flow = RealNVP()
    grid = torch.linspace(-12, 12, 481)
    xy = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).view(-1, 2)
    cell = (grid[1] - grid[0]) ** 2
    standard_normal = -0.5 * xy.pow(2).sum(-1) - math.log(2 * math.pi)
    with torch.no_grad():
        for weights in (None, fixed_weights(flow.state_dict())):  # as built, then trained-looking weights
            if weights is not None:
                flow.load_state_dict(weights)
            log_density = flow.log_prob(xy)
            assert float(log_density.exp().sum() * cell) == pytest.approx(1.0, abs=0.01)
            assert (log_density - standard_normal).abs().max() > 0.1  # a learned density, not the prior itself


# ----------------------------------------------------------------------------------------------------- assignment
def test_the_assignment_ranks_candidates_by_keypoint_similarity_on_the_levels_that_suit_the_object():
    assigner = KeypointTaskAlignedAssigner(topk=1, num_classes=1)
    anchors = torch.tensor([[20.0, 20.0], [28.0, 20.0], [24.0, 24.0]])  # pixels
    strides = torch.tensor([8.0, 8.0, 16.0])
    gt_box = torch.tensor([[[4.0, 4.0, 44.0, 44.0]]])  # side 40: stride 8 (2..12 strides) and 16 both suit it
    gt_keypoints = torch.tensor([[[[10.0, 10.0, 2.0], [30.0, 30.0, 2.0]]]])
    # Anchor 0 has the better box, anchor 1 the better keypoints; anchor 2 is on a level that suits as well.
    pred_boxes = torch.tensor([[[4.0, 4.0, 44.0, 44.0], [8.0, 8.0, 40.0, 40.0], [0.0, 0.0, 30.0, 30.0]]])
    pred_keypoints = torch.tensor([[[[20.0, 20.0], [40.0, 40.0]], [[10.0, 11.0], [30.0, 29.0]],
                                    [[0.0, 0.0], [0.0, 0.0]]]])
    inputs = dict(pred_keypoints=pred_keypoints, gt_keypoints=gt_keypoints, anchor_strides=strides,
                  sigmas=torch.full((2,), 0.1))
    _, _, scores, fg, _ = assigner(torch.full((1, 3, 1), 0.5), pred_boxes, anchors, torch.zeros(1, 1, 1), gt_box,
                                   torch.ones(1, 1, 1), **inputs)
    assert fg.tolist() == [[False, True, False]] and float(scores[0, 1, 0]) > 0.9  # its OKS, near 1

    low, high = LEVEL_RANGE
    small = torch.tensor([[[14.0, 14.0, 14.0 + low * 8, 14.0 + low * 8]]])  # too small for stride 16
    assert assigner.candidate_anchors(anchors, small, anchor_strides=strides).tolist() == [[[True, True, False]]]
    big = torch.tensor([[[0.0, 0.0, high * 8 + 8, high * 8 + 8]]])  # too big for stride 8
    assert assigner.candidate_anchors(anchors, big, anchor_strides=strides).tolist() == [[[False, False, True]]]
    stranded = torch.tensor([[[22.0, 22.0, 26.0, 26.0]]])  # inside it only a level that does not suit it: kept
    assert assigner.candidate_anchors(anchors, stranded, anchor_strides=strides).tolist() == [[[False, False, True]]]


def test_an_object_without_labelled_keypoints_is_assigned_by_its_box_overlap():
    assigner = KeypointTaskAlignedAssigner(topk=1, num_classes=1)
    gt_boxes = torch.tensor([[[4.0, 4.0, 44.0, 44.0], [4.0, 4.0, 44.0, 44.0]]])
    gt_keypoints = torch.tensor([[[[10.0, 10.0, 2.0], [30.0, 30.0, 2.0]], [[10.0, 10.0, 0.0], [30.0, 30.0, 0.0]]]])
    pred_boxes = torch.tensor([[[4.0, 4.0, 44.0, 44.0], [8.0, 8.0, 40.0, 40.0]]])
    pred_keypoints = torch.tensor([[[[20.0, 20.0], [40.0, 40.0]], [[10.0, 11.0], [30.0, 29.0]]]])
    candidates = torch.ones(1, 2, 2, dtype=torch.bool)
    overlaps = assigner.candidate_overlaps(gt_boxes, pred_boxes, candidates, pred_keypoints=pred_keypoints,
                                           gt_keypoints=gt_keypoints, sigmas=torch.full((2,), 0.1))
    assert torch.equal(overlaps[0, 1], assigner.pair_iou(gt_boxes[0, 1], pred_boxes[0]))  # the unlabelled object
    assert float(overlaps[0, 0, 1]) > 0.9 > float(overlaps[0, 0, 0])  # the labelled one: OKS ranks anchor 1 first
    assert float(overlaps[0, 1, 0]) > float(overlaps[0, 1, 1])  # ... the box overlap anchor 0


# ------------------------------------------------------------------------------------- the reference's own figures
# The reference's (8.4.190) yolo26n-pose at nc=2, kpt_shape [5, 3], with `fixed_weights` loaded and 4 added to the
# bias of each box branch's last conv (boxes with positive sides), for the images `(hashed_uniform(2 * 3 * 64 * 96,
# 7) + 1) / 2` as (2, 3, 64, 96): the one-to-one branch's decoded eval output of the first image (B=1, 4 + 2 +
# 15, A=126) at a few anchors and summed over all, and the loss items of both branches on `PARITY_BATCH`.
PARITY_ANCHORS = (0, 50, 95, 100, 119, 125)
REFERENCE_COLUMNS = [
    [3.1151, 3.3398, 61.0481, 59.9833, 0.4734, 0.583, 4.5242, 6.7764, 0.4074, 5.5682, 2.9102, 0.422, 3.6733, 4.8637,
     0.3556, 0.2855, -0.4681, 0.5973, 3.4576, 3.4403, 0.6538],
    [19.5127, 35.6173, 61.1875, 59.4018, 0.4754, 0.6024, 21.2728, 38.8021, 0.4083, 20.0177, 33.9858, 0.3976, 20.1806,
     36.9132, 0.3251, 17.0486, 31.6761, 0.5845, 19.7204, 34.3764, 0.6532],
    [91.2335, 60.1327, 61.3485, 59.2606, 0.4763, 0.5949, 91.9735, 62.1718, 0.4064, 91.8144, 57.4659, 0.4136, 91.2414,
     60.4106, 0.3405, 88.4442, 57.3152, 0.5983, 92.1136, 58.9778, 0.6182],
    [77.5741, 10.1156, 129.06, 122.295, 0.3881, 0.3928, 81.0855, 6.2608, 0.6686, 65.3403, 12.5595, 0.5373, 72.6875,
     0.516, 0.4546, 71.1122, 10.3012, 0.445, 79.4827, 11.6522, 0.48],
    [92.018, 58.6867, 129.5896, 124.0232, 0.3857, 0.3921, 101.8157, 54.918, 0.6755, 82.1683, 60.0728, 0.473, 88.7673,
     49.5238, 0.4879, 87.4085, 60.3944, 0.4771, 93.2559, 59.2812, 0.4616],
    [67.4849, 51.3929, 280.5693, 244.2994, 0.4548, 0.719, 73.5671, 36.1144, 0.6038, 88.8218, 42.9745, 0.4631,
     99.5071, 52.856, 0.5547, 71.8598, 44.9538, 0.5469, 91.458, 42.6357, 0.4274],
]
REFERENCE_SUMS = [6020.541, 4049.4766, 10580.5508, 10120.5127, 57.6306, 71.2267, 6402.2456, 4195.3916, 59.1526,
                  5913.3838, 3927.2913, 53.9385, 6226.1978, 3948.0083, 46.4154, 5640.9355, 3662.4487, 70.2771,
                  6247.8486, 3922.9709, 76.2537]
# box, pose, kobj, cls, l1 (the reference names it dfl), rle
REFERENCE_LOSS_ITEMS = {
    "one2many": [6.10586, 5.69994, 0.82704, 34.7085, 0.46729, 81.79388],
    "one2one": [5.93927, 4.35204, 0.58974, 109.81886, 0.3078, 161.08559],
}


def parity_model():
    model = PoseModel("yolo26n-pose.yaml", nc=2, data_kpt_shape=[5, 3], verbose=False)
    model.load_state_dict(fixed_weights(model.state_dict()))
    with torch.no_grad():
        for branch in (*model.head.cv2, *model.head.one2one_cv2):
            branch[-1].bias += 4.0
    return model


def parity_batch():
    """Three objects in two images; keypoints scattered in their boxes, some unlabelled."""
    images = ((hashed_uniform(2 * 3 * 64 * 96, 7) + 1) / 2).float().view(2, 3, 64, 96)
    boxes = torch.tensor([[0.5, 0.5, 0.4, 0.5], [0.25, 0.3, 0.2, 0.3], [0.6, 0.55, 0.5, 0.6]])
    offsets = hashed_uniform(3 * 5 * 3, 11).float().view(3, 5, 3)
    keypoints = torch.cat((boxes[:, None, :2] + offsets[..., :2] * boxes[:, None, 2:] / 2,
                           (offsets[..., 2:] > -0.4).float() * 2), -1)
    return {"img": images, "batch_idx": torch.tensor([0.0, 0.0, 1.0]), "cls": torch.tensor([[0.0], [1.0], [0.0]]),
            "bboxes": boxes, "keypoints": keypoints}


@pytest.mark.numeric
def test_decoded_outputs_equal_the_references_for_the_same_weights():
    model, batch = parity_model().eval(), parity_batch()
    with torch.no_grad():
        _, preds = model(batch["img"][:1])
    decoded = model.head._inference(preds["one2one"])
    torch.testing.assert_close(decoded[0, :, list(PARITY_ANCHORS)].T, torch.tensor(REFERENCE_COLUMNS), atol=1e-3,
                               rtol=1e-4)
    torch.testing.assert_close(decoded[0].sum(1), torch.tensor(REFERENCE_SUMS), atol=1e-2, rtol=1e-4)


@pytest.mark.numeric
def test_the_six_loss_items_equal_the_references_on_both_branches():
    model, batch = parity_model(), parity_batch()
    model.args = get_cfg()
    criterion = model.init_criterion()
    assert isinstance(criterion, EndToEndPoseLoss) and isinstance(criterion.one2one, RLEPoseLoss)
    preds = model.train()(batch["img"])
    for branch, expected in REFERENCE_LOSS_ITEMS.items():
        _, items = getattr(criterion, branch)(preds[branch], batch)
        torch.testing.assert_close(items, torch.tensor(expected), atol=1e-4, rtol=1e-4)


def test_the_rle_term_reaches_the_spreads_and_the_flow(tiny_pose26_yaml):
    model = PoseModel(tiny_pose26_yaml, nc=2, data_kpt_shape=[5, 3], verbose=False)
    model.args = get_cfg(overrides={"pose": 0.0, "kobj": 0.0, "box": 0.0, "cls": 0.0, "dfl": 0.0})
    batch = parity_batch()
    loss, items = model.init_criterion().one2one(model.train()(batch["img"])["one2one"], batch)
    loss.backward()
    assert float(items[-1]) > 0 and float(loss.detach()) == pytest.approx(float(items.sum()) * 2, rel=1e-5)
    assert model.head.one2one_cv4_sigma[0].weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.flow_model.s[0].parameters())


# ----------------------------------------------------------------------------------------------------------- runs
def test_a_yolo26_pose_run_trains_validates_and_predicts(tiny_pose26_yaml, pose_data_small, tmp_path):
    model = YOLO(tiny_pose26_yaml)
    metrics = model.train(data=pose_data_small, epochs=2, imgsz=64, batch=4, workers=0, device="cpu",
                          project=str(tmp_path / "runs"), name="train", plots=False, seed=0, verbose=False,
                          warmup_epochs=0.5, close_mosaic=1)
    save_dir = tmp_path / "runs" / "train"
    rows = read_rows(save_dir / "results.csv")
    assert [k for k in rows[0] if k.startswith("train/")] == [
        "train/box_loss", "train/pose_loss", "train/kobj_loss", "train/cls_loss", "train/dfl_loss", "train/rle_loss"]
    assert [k for k in rows[0] if k.startswith("val/")] == [
        "val/box_loss", "val/pose_loss", "val/kobj_loss", "val/cls_loss", "val/dfl_loss"]  # eval has no spreads
    assert all(math.isfinite(float(r["train/rle_loss"])) for r in rows) and 0 <= metrics.pose.map <= 1
    checkpoint = load_checkpoint(save_dir / "weights" / "last.pt")
    assert any(".flow_model.s.0.0.weight" in key for key in checkpoint["model"])
    trained = YOLO(save_dir / "weights" / "last.pt")
    image = next(Path(pose_data_small).parent.glob("images/val/*.jpg"))
    (result,) = trained.predict(str(image), imgsz=64, conf=0.0, max_det=4, save=False)
    assert result.keypoints.data.shape == (len(result.boxes), 5, 3) and len(result.boxes) == 4

    exported = trained.export(format="torchscript", imgsz=64)
    images = torch.rand(1, 3, 64, 64)
    from_checkpoint = load_inference_model(save_dir / "weights" / "last.pt").eval()(images)[0][0]
    from_export = load_inference_model(exported)(images)[0]
    # The same end-to-end rows (boxes, scores, classes, keypoints); near-equal scores may order them differently.
    torch.testing.assert_close(by_position(from_export), by_position(from_checkpoint), atol=1e-3, rtol=1e-4)


def by_position(rows):
    """Detection rows sorted by class, then x1, then y1."""
    return rows[(rows[:, 5] * 1e6 + rows[:, 0] * 1e3 + rows[:, 1]).argsort()].detach()


@pytest.fixture(scope="module")
def pose_data_small(tmp_path_factory):
    from yolotrain.data.builtin import generate_shapes_pose_dataset

    return str(generate_shapes_pose_dataset(tmp_path_factory.mktemp("pose26-data"), n_train=8, n_val=4, imgsz=64,
                                            seed=5))


def test_a_reference_yolo26_pose_file_imports_key_for_key(tiny_pose26_yaml, tmp_path):
    from reference_layout import classes_named_like_the_reference

    torch.manual_seed(0)
    model = PoseModel(tiny_pose26_yaml, nc=6, data_kpt_shape=[5, 3], verbose=False)
    model.names = {i: f"shape{i}" for i in range(6)}
    ema = copy.deepcopy(model).half()
    path = tmp_path / "yolo26t-pose.pt"
    with classes_named_like_the_reference(model):
        torch.save({"epoch": 9, "model": None, "ema": ema, "train_args": {"task": "pose"}, "version": "8.4.190"}, path)
    checkpoint = load_checkpoint(path)
    expected = {k: v.float() if v.is_floating_point() else v for k, v in ema.state_dict().items()}
    assert list(checkpoint["model"]) == list(expected)
    rebuilt = PoseModel.from_yaml_and_state(checkpoint["model_yaml"], checkpoint["model"])
    assert type(rebuilt.head) is Pose26 and rebuilt.kpt_shape == (5, 3)
    assert all(torch.equal(v, expected[k]) for k, v in rebuilt.state_dict().items())
