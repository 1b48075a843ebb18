"""YOLO11 and YOLO26 layouts: published parameter counts, name resolution, the blocks they add, and the
end-to-end head of YOLO26 (at most max_det boxes, no NMS)."""

import pytest
import torch

from detection_match import assert_same_detections
from yolotrain.nn.model import DetectionModel, load_model_yaml
from yolotrain.nn.modules import C3k, SPPF, C2PSA, C3k2, Detect, PSABlock

# Published parameter counts at nc=80 (the layouts yolo11.yaml and yolo26.yaml follow).
PUBLISHED_PARAMS = {
    "yolo11": {"n": 2_624_080, "s": 9_458_752, "m": 20_114_688, "l": 25_372_160, "x": 56_966_176},
    "yolo26": {"n": 2_572_280, "s": 10_009_784, "m": 21_896_248, "l": 26_299_704, "x": 58_993_368},
}


@pytest.mark.parametrize("family", sorted(PUBLISHED_PARAMS))
@pytest.mark.parametrize("scale", ["n", "s", "m", "l", "x"])
def test_parameter_counts_equal_the_published_ones(family, scale):
    model = DetectionModel(f"{family}{scale}.yaml", verbose=False)
    assert model.yaml["scale"] == scale and model.nc == 80
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[family][scale]


def test_family_names_resolve_with_or_without_a_dash():
    assert load_model_yaml("yolo11s.yaml")["scale"] == "s"
    assert load_model_yaml("yolo26-m.yaml")["scale"] == "m"
    assert load_model_yaml("yolo11s.yaml")["yaml_file"].endswith("yolo11.yaml")


def test_larger_scales_use_c3k_blocks_inside_every_c3k2():
    small, medium = DetectionModel("yolo11n.yaml", verbose=False), DetectionModel("yolo11m.yaml", verbose=False)
    assert isinstance(small.model[2], C3k2) and not isinstance(small.model[2].m[0], C3k)  # the row says False
    assert isinstance(medium.model[2].m[0], C3k)


def test_yolo11_head_has_a_depthwise_class_branch_and_yolov8_a_dense_one():
    v11, v8 = DetectionModel("yolo11n.yaml", verbose=False), DetectionModel("yolo-n.yaml", verbose=False)
    depthwise = v11.head.cv3[0][0][0].conv
    assert depthwise.groups == depthwise.in_channels > 1
    assert v8.head.cv3[0][0].conv.groups == 1 and v8.head.cv3[0][0].conv.kernel_size == (3, 3)


@pytest.mark.numeric
def test_sppf_of_yolo26_has_a_linear_cv1_and_a_residual():
    original, newer = SPPF(16, 16, 5), SPPF(16, 16, 5, 3, True)
    assert isinstance(original.cv1.act, torch.nn.SiLU) and not original.add
    assert isinstance(newer.cv1.act, torch.nn.Identity) and newer.add
    x = torch.randn(1, 16, 8, 8)
    newer.eval()
    with torch.no_grad():
        assert torch.allclose(newer(x) - x, newer.cv2(torch.cat(_pooled(newer, x), 1)), atol=1e-5)


def _pooled(block, x):
    pooled = [block.cv1(x)]
    for _ in range(3):
        pooled.append(block.m(pooled[-1]))
    return pooled


def test_position_sensitive_attention_mixes_all_positions():
    """A change at one pixel reaches every output position through attention (a conv stack would not)."""
    torch.manual_seed(0)
    block = C2PSA(64, 64, n=1).eval()
    x = torch.randn(1, 64, 8, 8)
    changed = x.clone()
    changed[..., 0, 0] += 5.0
    with torch.no_grad():
        delta = (block(changed) - block(x)).abs().sum(1)[0]  # (8, 8)
    assert delta[7, 7] > 0 and delta[4, 0] > 0
    assert isinstance(block.m[0], PSABlock) and block.m[0].attn.num_heads == 1


@pytest.mark.numeric
def test_the_attention_block_runs_channels_last():
    block = C2PSA(64, 64).eval()
    x = torch.randn(2, 64, 6, 6)
    with torch.no_grad():
        expected = block(x)
        got = block.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("family", ["yolo11", "yolo26"])
def test_yaml_and_state_dict_rebuild_the_same_model(family, tiny_family_yaml):
    torch.manual_seed(0)
    model = DetectionModel(tiny_family_yaml(family), verbose=False).eval()
    rebuilt = DetectionModel.from_yaml_and_state(model.yaml, model.state_dict()).eval()
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(model(x)[0], rebuilt(x)[0])


# ------------------------------------------------------------------------------------------- end-to-end head
def test_end_to_end_head_returns_at_most_max_det_sorted_detections(tiny_family_yaml):
    model = DetectionModel(tiny_family_yaml("yolo26"), verbose=False).eval()
    assert model.end2end and model.head.reg_max == 1 and isinstance(model.head.dfl, torch.nn.Identity)
    model.head.max_det = 7
    with torch.no_grad():
        detections, preds = model(torch.rand(2, 3, 64, 64))
    assert detections.shape == (2, 7, 6) and set(preds) == {"one2one", "one2many"}
    scores = detections[..., 4]
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    boxes = detections[..., :4]
    assert torch.all(boxes[..., 2:] >= boxes[..., :2])  # xyxy


def test_top_detections_pick_the_best_anchor_class_pairs_by_hand():
    head = Detect(nc=3, ch=(8,), reg_max=1, end2end=True)
    head.max_det = 3
    # 4 anchors: boxes xyxy, then scores for 3 classes. Anchor 2 scores high on two classes: both pairs count.
    boxes = torch.tensor([[0, 0, 1, 1], [1, 1, 2, 2], [2, 2, 3, 3], [3, 3, 4, 4]], dtype=torch.float)
    scores = torch.tensor([[0.1, 0.2, 0.3], [0.0, 0.7, 0.1], [0.9, 0.0, 0.8], [0.05, 0.05, 0.05]])
    decoded = torch.cat((boxes, scores), 1).T.unsqueeze(0)  # (1, 7, 4)
    top = head._top_detections(decoded)[0]
    assert top[:, 4].tolist() == pytest.approx([0.9, 0.8, 0.7])
    assert top[:, 5].tolist() == [0.0, 2.0, 1.0]
    assert torch.equal(top[:, :4], boxes[[2, 2, 1]])


@pytest.mark.numeric
def test_fusing_an_end_to_end_model_keeps_its_detections_and_drops_the_training_branch(tiny_family_yaml):
    torch.manual_seed(0)
    model = DetectionModel(tiny_family_yaml("yolo26"), verbose=False).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)[0]
        model.fuse()
        after, preds = model(x)
    assert set(preds) == {"one2one"} and model.head.cv2 is None
    # Fusing changes the kernels' rounding: near-equal scores of an untrained model may leave the top-k swapped.
    assert_same_detections(after[0], before[0], atol=1e-4, rtol=1e-4, cut_off=True)


def test_one_to_one_branch_trains_on_detached_features(tiny_family_yaml):
    """Only the one-to-many loss reaches the backbone: a loss on the one-to-one maps gives it no gradient."""
    model = DetectionModel(tiny_family_yaml("yolo26"), verbose=False).train()
    preds = model(torch.rand(1, 3, 64, 64))
    sum(m.sum() for m in preds["one2one"]).backward()
    assert model.model[0].conv.weight.grad is None
    assert model.head.one2one_cv2[0][0].conv.weight.grad is not None
