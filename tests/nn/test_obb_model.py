"""Oriented-box (OBB) models: the reference layout of every yolov8/yolo11/yolo26 -obb scale, rotated-box decoding
by hand, the OBB and OBB26 heads' outputs in training, eval and end-to-end form, the reference's decoded outputs
for the same weights, fusing, name resolution, and a file in the reference's pickle layout imported key for key."""

import copy
import hashlib
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from detection_match import assert_same_detections
from hashed_weights import fixed_weights, hashed_uniform
from yolotrain.errors import CfgError
from yolotrain.nn.anchors import dist2bbox, dist2rbox
from yolotrain.nn.model import OBBModel, head_task, load_model_yaml
from yolotrain.nn.modules import OBB, OBB26
from yolotrain.utils.checkpoint import load_checkpoint

# The reference's own models at nc=80: (parameters, state-dict entries, sha256 of `layout_lines`), taken once from
# the reference trainer's (8.4.190) `OBBModel(f"{name}.yaml").state_dict()`, so these tests need no reference
# installed. The parameter counts are also the ones the reference's yamls publish.
REFERENCE_LAYOUTS = {
    "yolov8n-obb": (3_228_867, 397, "2846a0a3673a342104e65459950dfd0367295cc101a42d0a40414c46a9b1c949"),
    "yolov8s-obb": (11_452_739, 397, "bbd355d71526b1fe76c1ca27b5a29347a35a7485e1e56a16d2d634c6b6b8ed71"),
    "yolov8m-obb": (26_463_235, 517, "f7690f76b9f116dbd985e17b4712de1546c827b5028c9183329507e845c06b85"),
    "yolov8l-obb": (44_540_355, 637, "b679a10c8f3861c3dfe658b1d329a97b93e589f53d7a06827561e16ef619a4bc"),
    "yolov8x-obb": (69_555_651, 637, "08ccd7ec42499e622457408691f712ac7a8b1e76760b816798c751d2550d8274"),
    "yolo11n-obb": (2_695_747, 541, "2469fe64a72b43adc42693a375911f48483300d4b579b0bade91ffc03d78d8c3"),
    "yolo11s-obb": (9_744_931, 541, "5741568f4e9ce6b2157ecabf1c41ac56e86ef7a51bc425fde5c6f8c84964db3d"),
    "yolo11m-obb": (20_963_523, 691, "dbf8512ca7eb5fdcd5079e5df067cc92cc956027690f22f3be5c0b8e65d071a7"),
    "yolo11l-obb": (26_220_995, 1057, "6d8faeeb392671ba96a3b6fb07cba4e585430605c71972ee0fda8ace14994e40"),
    "yolo11x-obb": (58_875_331, 1057, "e84071ef0fffdb311816ee9778f8dfdb3c1b044f2dd2eef77afbbe22df1039ae"),
    "yolo26n-obb": (2_715_614, 792, "93d1b8cb024c26b5c1f41e3bbc9a3e697e2f8723eacb6ca9ed0d5495dac3d346"),
    "yolo26s-obb": (10_582_142, 792, "3349717bf73b1152b8a9a21007c58b3c152c2baa1a9d09cb681e7585f329c2f2"),
    "yolo26m-obb": (23_593_918, 852, "88304fa94244727c762bcaa38ba3ccf9a11342b87a2e1ab96c3aecee09cbba22"),
    "yolo26l-obb": (27_997_374, 1176, "c94f7ff971b675fa978b2608184e7a446c7ee6705ffe3ff7b583095793a88b45"),
    "yolo26x-obb": (62_811_678, 1176, "0ac60c81d30b953f7dd100d2ebe6792636139d57579a25790b8188b5098cbbb1"),
}
NC = 6  # the tiny yamls' classes (tests/conftest.py)


def layout_lines(state_dict):
    """One `name:(shape)` line per entry, in state-dict order."""
    return [f"{name}:{tuple(tensor.shape)}" for name, tensor in state_dict.items()]


@pytest.fixture
def tiny_obb_yaml(tiny_family_yaml):
    """`tiny_obb_yaml("yolo26")`: the built-in `<family>-obb.yaml` layers at 1/16 width (scale `t`), nc=6."""
    return lambda family: tiny_family_yaml(f"{family}-obb")


def scrambled(model, seed=0):
    """The model with noise on every weight: a fresh head predicts alike everywhere, this one does not."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


# ----------------------------------------------------------------------------------------------- reference layout
@pytest.mark.parametrize("name", sorted(REFERENCE_LAYOUTS))
def test_every_scale_has_the_reference_names_shapes_and_parameter_count(name):
    parameters, entries, digest = REFERENCE_LAYOUTS[name]
    model = OBBModel(f"{name}.yaml", verbose=False)
    assert model.nc == 80 and model.yaml["scale"] == name[-5] and model.task == "obb" and model.ne == 1
    assert type(model.head) is (OBB26 if name.startswith("yolo26") else OBB)
    assert sum(p.numel() for p in model.parameters()) == parameters
    lines = layout_lines(model.state_dict())
    assert len(lines) == entries
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == digest


def test_names_with_a_scale_letter_resolve_to_the_family_yaml():
    for name, base, scale in [("yolo11n-obb.yaml", "yolo11-obb.yaml", "n"), ("yolov8m-obb.yaml", "yolov8-obb.yaml", "m"),
                              ("yolo26x-obb.yaml", "yolo26-obb.yaml", "x")]:
        model_dict = load_model_yaml(name)
        assert model_dict["yaml_file"].endswith(base) and model_dict["scale"] == scale
        assert head_task(model_dict) == "obb"


def test_an_obb_model_needs_an_obb_head_with_one_angle(tiny_family_yaml, tiny_obb_yaml):
    with pytest.raises(CfgError, match="OBBModel needs a OBB head, got Detect"):
        OBBModel(tiny_family_yaml("yolo11"), verbose=False)
    with pytest.raises(ValueError, match="ne must be 1, got ne=2"):
        OBB(nc=2, ne=2, ch=(8,))
    model_dict = yaml.safe_load(Path(tiny_obb_yaml("yolo11")).read_text())
    model_dict["head"][-1][3] = ["nc"]  # a row without ne takes one angle
    assert OBBModel(model_dict, verbose=False).ne == 1


# ----------------------------------------------------------------------------------------------- rotated boxes
def test_rotated_boxes_by_hand():
    anchors = torch.tensor([[10.0], [20.0]])  # (2, A=1)
    distances = torch.tensor([[[1.0], [2.0], [5.0], [4.0]]])  # (B=1, 4, A): left, top, right, bottom
    unturned = dist2rbox(distances, torch.zeros(1, 1, 1), anchors, dim=1)
    assert torch.equal(unturned, dist2bbox(distances, anchors, xywh=True, dim=1))  # (12, 21, 6, 6)
    # A quarter turn: the box's width axis is the image's y axis and its height axis points along -x, so the
    # centre's offset (+2 along the width, +1 along the height) lands at (-1, +2) in the image.
    turned = dist2rbox(distances, torch.full((1, 1, 1), math.pi / 2), anchors, dim=1)
    torch.testing.assert_close(turned.flatten(), torch.tensor([9.0, 22.0, 6.0, 6.0]))
    # Along the last dim as well; the size never depends on the angle.
    rows = dist2rbox(distances.transpose(1, 2), torch.full((1, 1, 1), 0.3), anchors.T, dim=-1)
    assert rows.shape == (1, 1, 4) and rows[0, 0, 2:].tolist() == [6.0, 6.0]
    assert math.hypot(rows[0, 0, 0] - 10, rows[0, 0, 1] - 20) == pytest.approx(math.hypot(2, 1))


# ----------------------------------------------------------------------------------------------- forward contract
@pytest.mark.parametrize("family", ["yolov8", "yolo11"])
def test_obb_outputs_in_training_and_eval(tiny_obb_yaml, family):
    model = scrambled(OBBModel(tiny_obb_yaml(family), verbose=False))
    assert not model.end2end and type(model.head) is OBB and model.task == "obb"
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    x = torch.rand(2, 3, 64, 96)
    anchors = 8 * 12 + 4 * 6 + 2 * 3
    maps, angles = model.train()(x)
    assert [tuple(m.shape) for m in maps] == [(2, 64 + NC, 8, 12), (2, 64 + NC, 4, 6), (2, 64 + NC, 2, 3)]
    assert angles.shape == (2, 1, anchors) and angles.dtype == torch.float32 and angles.requires_grad
    with torch.no_grad():
        y, (maps, angles) = model.eval()(x)
    assert y.shape == (2, 4 + NC + 1, anchors)
    assert angles.min() > -math.pi / 4 and angles.max() < 3 * math.pi / 4 and angles.std() > 0
    assert torch.equal(y[:, -1:], angles) and torch.equal(y[:, 4 : 4 + NC], model.head._decode(maps)[:, 4:])
    upright = model.head._decode(maps)  # the same distances read as an unturned box
    assert torch.allclose(y[:, 2:4], upright[:, 2:4])  # width and height do not depend on the angle
    assert not torch.allclose(y[:, :2], upright[:, :2])  # the centre does


def test_the_angle_is_a_sigmoid_range_for_obb_and_raw_for_obb26():
    raw = torch.tensor([[[-30.0, 0.0, 30.0]]])
    torch.testing.assert_close(OBB(nc=2, ch=(8,)).decode_angles(raw), torch.tensor([[[-math.pi / 4, math.pi / 4,
                                                                                       3 * math.pi / 4]]]))
    assert torch.equal(OBB26(nc=2, ch=(8,)).decode_angles(raw), raw)


def test_obb26_trains_two_branches_with_angles(tiny_obb_yaml):
    model = OBBModel(tiny_obb_yaml("yolo26"), verbose=False).train()
    assert model.end2end and type(model.head) is OBB26 and model.stride.tolist() == [8.0, 16.0, 32.0]
    preds = model(torch.rand(2, 3, 64, 96))
    assert set(preds) == {"one2many", "one2one"}
    for maps, angles in preds.values():
        assert [tuple(m.shape) for m in maps] == [(2, 4 + NC, 8, 12), (2, 4 + NC, 4, 6), (2, 4 + NC, 2, 3)]
        assert angles.shape == (2, 1, 126)


def test_the_one_to_one_branch_does_not_train_the_backbone(tiny_obb_yaml):
    model = OBBModel(tiny_obb_yaml("yolo26"), verbose=False).train()
    preds = model(torch.rand(1, 3, 64, 64))
    maps, angles = preds["one2one"]
    (sum(m.sum() for m in maps) + angles.sum()).backward()
    assert model.model[0].conv.weight.grad is None and model.head.cv4[0][0].conv.weight.grad is None
    assert model.head.one2one_cv4[0][0].conv.weight.grad is not None
    preds["one2many"][1].sum().backward()  # the one-to-many angles do reach the backbone
    assert model.model[0].conv.weight.grad is not None


def test_end_to_end_eval_rows_are_rotated_boxes_with_their_anchors_angle(tiny_obb_yaml):
    model = scrambled(OBBModel(tiny_obb_yaml("yolo26"), verbose=False)).eval()
    model.head.max_det = 10
    with torch.no_grad():
        y, preds = model(torch.rand(2, 3, 64, 64))
    assert y.shape == (2, 10, 7) and set(preds) == {"one2one", "one2many"}
    maps, angles = preds["one2one"]
    decoded = model.head._decode(maps, angles=angles)  # (B, 4 + nc, A): centre, size and scores
    for image in range(2):
        for row in y[image]:  # the one anchor with this row's angle has its box and class score
            (anchor,) = torch.nonzero(angles[image, 0] == row[6]).flatten().tolist()
            assert torch.equal(decoded[image, :4, anchor], row[:4])
            assert decoded[image, 4 + int(row[5]), anchor] == row[4]
    assert torch.all(y[..., 4][:, :-1] >= y[..., 4][:, 1:])


@pytest.mark.numeric
def test_fusing_keeps_the_output_and_drops_the_training_branches(tiny_obb_yaml):
    for family in ("yolo11", "yolo26"):
        model = scrambled(OBBModel(tiny_obb_yaml(family), verbose=False)).eval()
        x = torch.rand(1, 3, 64, 64)
        with torch.no_grad():
            y_before, _ = model(x)
            y, preds = model.fuse()(x)
        assert model.is_fused()
        if family == "yolo26":
            head = model.head
            assert set(preds) == {"one2one"} and head.cv2 is None and head.cv3 is None and head.cv4 is None
            assert_same_detections(y[0], y_before[0], atol=1e-4, rtol=1e-4, cut_off=True)
        else:
            torch.testing.assert_close(y, y_before, atol=1e-3, rtol=1e-3)


def test_info_counts_the_angle_branches_and_flops(tiny_obb_yaml):
    model = OBBModel(tiny_obb_yaml("yolo26"), verbose=False)
    layers, parameters, gradients, gflops = model.info(verbose=False)
    assert parameters == sum(p.numel() for p in model.parameters()) and gflops > 0


def test_the_loss_comes_from_the_obb_loss_module(tiny_obb_yaml, monkeypatch):
    """init_criterion imports lazily: `OBBLoss`, or `EndToEndOBBLoss` for an end2end head."""
    module = types.ModuleType("yolotrain.loss.obb")
    module.OBBLoss = lambda model: ("one2many only", model)
    module.EndToEndOBBLoss = lambda model: ("end2end", model)
    monkeypatch.setitem(sys.modules, "yolotrain.loss.obb", module)
    for family, kind in (("yolov8", "one2many only"), ("yolo26", "end2end")):
        model = OBBModel(tiny_obb_yaml(family), verbose=False)
        assert model.init_criterion() == (kind, model)


# ----------------------------------------------------------------------------------- the reference's own outputs
# The reference's decoded eval output (B=1, 4 + nc + 1, A=126: cx, cy, w, h, 3 scores, angle) of its `OBBModel`
# at nc=3 with `fixed_weights` loaded, for the image `(hashed_uniform(3 * 64 * 96, 7) + 1) / 2` as (1, 3, 64, 96):
# the columns of a few anchors (3 at stride 8, 2 at 16, 1 at 32) and each row summed over all anchors. For yolo26
# it is the one-to-one branch's decoded output, and its end-to-end output's first 10 rows follow.
PARITY_ANCHORS = (0, 50, 95, 100, 119, 125)
REFERENCE_OUTPUTS = {
    "yolov8n-obb": (
        [[1.830956, 5.353603, 118.4132, 123.7588, 0.60787, 0.618416, 0.50794, 1.071889],
         [17.51183, 38.28997, 118.4584, 124.5567, 0.570633, 0.622763, 0.542419, 1.046145],
         [90.09856, 61.86533, 116.5171, 124.8337, 0.600379, 0.618247, 0.491153, 0.92065],
         [73.00202, 5.509014, 232.6872, 253.5077, 0.458354, 0.428176, 0.484659, 0.501526],
         [89.6456, 53.53482, 234.3956, 255.2412, 0.439129, 0.386163, 0.473987, 0.48062],
         [73.98815, 44.14984, 442.6165, 490.8458, 0.56624, 0.592434, 0.552598, 0.667215]],
        [5830.545, 4167.478, 19585.02, 21046.33, 69.56789, 73.03449, 65.32203, 114.6299],
    ),
    "yolo11n-obb": (
        [[5.93045, 3.98314, 122.2573, 122.4983, 0.604297, 0.577168, 0.436043, 0.685163],
         [22.1727, 35.11739, 123.7465, 125.4947, 0.585384, 0.580457, 0.424745, 0.601707],
         [93.82295, 60.04773, 122.8889, 124.5059, 0.581684, 0.573084, 0.437374, 0.4917],
         [74.15408, 11.79336, 249.8366, 235.1162, 0.541396, 0.466015, 0.397413, 1.065075],
         [90.86578, 59.83573, 254.7083, 238.0168, 0.548129, 0.464038, 0.369809, 1.059581],
         [63.64353, 52.2527, 456.9709, 494.6425, 0.529796, 0.456949, 0.429794, 0.930903]],
        [6201.912, 4122.103, 20636.78, 20623.87, 72.82862, 69.19105, 53.0158, 89.89026],
    ),
    "yolo26n-obb": (
        [[3.011408, 3.50847, -2.951939, -4.016718, 0.473397, 0.582971, 0.356809, -0.179604],
         [19.44889, 35.71684, -2.812457, -4.598162, 0.475357, 0.602445, 0.353636, -0.191161],
         [91.26402, 60.252, -2.651466, -4.73941, 0.476306, 0.594897, 0.347004, -0.158515],
         [76.7505, 11.60274, 1.060056, -5.704998, 0.388114, 0.392841, 0.556788, 0.2861],
         [91.26105, 59.56769, 1.589564, -3.976815, 0.385659, 0.392118, 0.530989, 0.24089],
         [68.49266, 53.97657, 24.56934, -11.70062, 0.454815, 0.719024, 0.492735, -0.214284]],
        [6001.799, 4103.22, -171.4488, -631.4865, 57.63057, 71.22672, 49.98504, -12.5914],
    ),
}
REFERENCE_END_TO_END_ROWS = [  # yolo26n-obb: cx, cy, w, h, score, class, angle
    [68.49266, 53.97657, 24.56934, -11.70062, 0.719024, 1, -0.214284],
    [33.10392, 55.60711, 24.09521, -18.56605, 0.703005, 1, -0.243114],
    [68.11668, 19.96019, -0.741376, -13.86568, 0.694902, 1, -0.406974],
    [35.34871, 15.61106, 3.888712, -12.8396, 0.682277, 1, -0.209937],
    [-3.08527, 55.1402, 14.48579, -21.46307, 0.681755, 1, -0.0787946],
    [3.428474, 12.87455, 6.610265, -13.06356, 0.678266, 1, 0.0362949],
    [83.60874, 11.51693, -3.957998, -4.170176, 0.60675, 1, -0.203368],
    [83.53822, 43.56052, -3.411532, -4.104078, 0.605719, 1, -0.234273],
    [83.47202, 27.61213, -3.621719, -4.036793, 0.605249, 1, -0.237903],
    [83.53639, 35.6039, -3.456594, -4.125432, 0.605099, 1, -0.237556],
]


def test_the_weights_and_image_hash_alike_everywhere():
    assert hashed_uniform(4, 0).tolist() == [0.23988831043243408, 0.6350252628326416, -0.5533127784729004,
                                             0.7978607416152954]
    assert hashed_uniform(3, 5).tolist() == [0.3014422655105591, -0.4439147710800171, 0.4434797763824463]


@pytest.mark.numeric
@pytest.mark.parametrize("name", sorted(REFERENCE_OUTPUTS))
def test_decoded_outputs_equal_the_references_for_the_same_weights(name):
    model = OBBModel(f"{name}.yaml", nc=3, verbose=False)
    model.load_state_dict(fixed_weights(model.state_dict()))
    image = ((hashed_uniform(3 * 64 * 96, 7) + 1) / 2).float().view(1, 3, 64, 96)
    with torch.no_grad():
        y, preds = model.eval()(image)
    decoded = model.head._inference(preds["one2one"]) if model.end2end else y  # (1, 8, 126)
    assert decoded.shape == (1, 4 + 3 + 1, 126)
    columns, sums = REFERENCE_OUTPUTS[name]
    torch.testing.assert_close(decoded[0, :, list(PARITY_ANCHORS)].T, torch.tensor(columns), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(decoded[0].sum(1), torch.tensor(sums), atol=1e-4, rtol=1e-4)
    if model.end2end:
        assert y.shape == (1, 126, 7)
        assert_same_detections(y[0, :10], torch.tensor(REFERENCE_END_TO_END_ROWS), atol=1e-4, rtol=1e-4, cut_off=True)


# ------------------------------------------------------------------------------------------- reference checkpoints
@pytest.mark.parametrize("family", ["yolov8", "yolo26"])
def test_a_reference_obb_file_imports_key_for_key(tmp_path, tiny_obb_yaml, family):
    """A .pt in the reference's pickle layout (whole model objects, EMA in half precision) rebuilds the same
    OBBModel: every tensor under its own name, the task from its head."""
    from reference_layout import classes_named_like_the_reference

    torch.manual_seed(0)
    model = OBBModel(tiny_obb_yaml(family), nc=3, verbose=False)
    model.names = {0: "plane", 1: "ship", 2: "tank"}
    ema = copy.deepcopy(model).half()
    path = tmp_path / f"{family}t-obb.pt"
    with classes_named_like_the_reference(model):
        torch.save({"epoch": 9, "model": None, "ema": ema, "train_args": {"task": "obb"}, "version": "8.4.190"}, path)
    checkpoint = load_checkpoint(path)
    assert head_task(load_model_yaml(checkpoint["model_yaml"])) == "obb" and checkpoint["nc"] == 3
    assert checkpoint["names"] == {0: "plane", 1: "ship", 2: "tank"}
    expected = {k: v.float() for k, v in ema.state_dict().items()}
    assert list(checkpoint["model"]) == list(expected)
    rebuilt = OBBModel.from_yaml_and_state(checkpoint["model_yaml"], checkpoint["model"])
    assert rebuilt.end2end == (family == "yolo26") and type(rebuilt.head) is type(model.head)
    assert all(torch.equal(v, expected[k]) for k, v in rebuilt.state_dict().items())
