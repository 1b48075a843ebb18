"""DetectionModel: building from yaml, output shapes and decoding, fusion, weight transfer and rebuild."""

import copy
import logging
import math

import pytest
import torch
import torch.nn as nn

from yolotrain.errors import CheckpointError
from yolotrain.nn.model import DetectionModel, load_model_yaml
from yolotrain.nn.modules import SPPF, Conv, Detect

# YOLOv8-layout reference parameter counts at nc=80 (the layout yolo.yaml follows).
REFERENCE_PARAMS = {"n": 3_157_200, "s": 11_166_560, "m": 25_902_640, "l": 43_691_520, "x": 68_229_648}


def _num_anchors(height, width):
    return sum((height // s) * (width // s) for s in (8, 16, 32))


@pytest.mark.parametrize("scale", ["n", "s"])
@pytest.mark.parametrize("size", [(64, 64), (96, 96), (128, 128), (64, 96)])
def test_train_and_eval_output_shapes(scale, size):
    model = DetectionModel(f"yolo-{scale}.yaml", nc=5, verbose=False)
    height, width = size
    images = torch.rand(2, 3, height, width)
    maps = model.train()(images)
    assert [tuple(m.shape) for m in maps] == [(2, 16 * 4 + 5, height // s, width // s) for s in (8, 16, 32)]
    with torch.no_grad():
        y, feats = model.eval()(images)
    assert y.shape == (2, 4 + 5, _num_anchors(height, width))
    assert len(feats) == 3 and feats[0].shape == (2, 69, height // 8, width // 8)
    assert ((y[:, 4:] >= 0) & (y[:, 4:] <= 1)).all()  # sigmoid scores


@pytest.mark.parametrize("scale", ["n", "s", "m", "l", "x"])
def test_parameter_counts_match_the_yolov8_layout(scale):
    model = DetectionModel(f"yolo-{scale}.yaml", verbose=False)
    assert model.yaml["scale"] == scale and model.nc == 80
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(REFERENCE_PARAMS[scale], rel=1e-3)


def test_layers_are_indexed_and_parameters_named_by_layer(model_n):
    layers = list(model_n.model)
    assert [layer.i for layer in layers] == list(range(len(layers)))
    assert all(layer.np == sum(p.numel() for p in layer.parameters()) for layer in layers)
    assert layers[0].f == -1 and layers[-1].f == [15, 18, 21] and layers[-1].type == "Detect"
    for name, _ in model_n.named_parameters():
        prefix, index = name.split(".")[:2]
        assert prefix == "model" and 0 <= int(index) < len(layers)
    assert model_n.save == [4, 6, 9, 12, 15, 18, 21]


def test_backbone_is_layers_0_to_9(model_n):
    """Layers 0-9 end at SPPF with stride 32 and never read head outputs, so freeze=10 freezes exactly the backbone."""
    layers = list(model_n.model)
    assert isinstance(layers[9], SPPF) and all(layer.f == -1 for layer in layers[:10])
    x = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        for layer in layers[:10]:
            x = layer(x)
    assert x.shape[-1] == 64 // 32
    assert [name for name, _ in model_n.named_parameters() if int(name.split(".")[1]) < 10][-1].startswith("model.9.")


def test_stride_names_and_nc_override(model_n, caplog):
    assert model_n.stride.tolist() == [8.0, 16.0, 32.0]
    assert model_n.model[-1].stride.tolist() == [8.0, 16.0, 32.0]
    assert model_n.nc == 3 and model_n.yaml["nc"] == 3 and model_n.model[-1].nc == 3
    assert model_n.names == {0: "0", 1: "1", 2: "2"}
    with caplog.at_level(logging.INFO, logger="yolotrain.nn.model"):
        DetectionModel("yolo-n.yaml", nc=7, verbose=False)
    assert "nc=80 with nc=7" in caplog.text


def test_verbose_build_logs_layer_table_and_summary(caplog):
    with caplog.at_level(logging.INFO, logger="yolotrain"):
        DetectionModel("yolo-n.yaml", nc=2, verbose=True)
    assert "arguments" in caplog.text and "SPPF" in caplog.text and "Detect" in caplog.text
    assert "GFLOPs" in caplog.text and "parameters" in caplog.text


def test_bias_init_follows_the_object_prior(model_n):
    head = model_n.model[-1]
    for box_branch, cls_branch, stride in zip(head.cv2, head.cv3, (8, 16, 32)):
        assert torch.all(box_branch[-1].bias == 2.0)  # any constant is a uniform DFL distribution
        expected = math.log(5 / 3 / (640 / stride) ** 2)
        assert torch.allclose(cls_branch[-1].bias, torch.full((3,), expected))


def test_initialize_weights_sets_batchnorm_and_inplace_activations(model_n):
    norms = [m for m in model_n.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.eps == 1e-3 and m.momentum == 0.03 for m in norms)
    assert all(m.inplace for m in model_n.modules() if isinstance(m, nn.SiLU))


def _set_known_head_output(head, distances, class_logit):
    """Make every anchor predict `distances` (l, t, r, b in grid units) and one class logit, whatever the input."""
    for box_branch, cls_branch in zip(head.cv2, head.cv3):
        final_box, final_cls = box_branch[-1], cls_branch[-1]
        nn.init.zeros_(final_box.weight)
        nn.init.zeros_(final_cls.weight)
        bias = torch.zeros(4, head.reg_max)
        for side, distance in enumerate(distances):
            bias[side, distance] = 30.0  # softmax ~one-hot: the DFL expectation is `distance`
        final_box.bias.data.copy_(bias.flatten())
        final_cls.bias.data.fill_(class_logit)


def test_eval_decodes_dfl_distances_to_xywh_in_input_pixels():
    model = copy.deepcopy(DetectionModel("yolo-n.yaml", nc=2, verbose=False)).eval()
    left, top, right, bottom = 2, 3, 4, 5
    _set_known_head_output(model.model[-1], (left, top, right, bottom), class_logit=0.7)
    height, width = 64, 96
    with torch.no_grad():
        y, _ = model(torch.rand(1, 3, height, width))
    expected = []
    for stride in (8, 16, 32):
        for row in range(height // stride):
            for col in range(width // stride):
                anchor_x, anchor_y = col + 0.5, row + 0.5
                x1, y1 = (anchor_x - left) * stride, (anchor_y - top) * stride
                x2, y2 = (anchor_x + right) * stride, (anchor_y + bottom) * stride
                expected.append([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
    assert torch.allclose(y[0, :4].T, torch.tensor(expected), atol=1e-3)
    assert torch.allclose(y[0, 4:], torch.full_like(y[0, 4:], torch.sigmoid(torch.tensor(0.7)).item()))


def test_anchor_cache_follows_the_input_shape(model_n):
    model = model_n.eval()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        first = model(images)[0]
        other = model(torch.rand(1, 3, 96, 64))[0]
        again = model(images)[0]
    model.train()
    assert other.shape == (1, 7, _num_anchors(96, 64))
    assert first.shape == (1, 7, _num_anchors(64, 64)) and torch.equal(first, again)


def _randomise_batchnorm(model):
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            size = module.num_features
            module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(size, generator=generator) * 0.1)


@pytest.mark.numeric
def test_fuse_keeps_eval_outputs():
    model = DetectionModel("yolo-n.yaml", nc=2, verbose=False).eval()
    _randomise_batchnorm(model)
    images = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        before = model(images)[0]
        fused = copy.deepcopy(model).fuse()
        after = fused(images)[0]
    assert not model.is_fused() and fused.is_fused()
    assert all(isinstance(m.bn, nn.Identity) for m in fused.modules() if isinstance(m, Conv))
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)


def test_info_counts_parameters_and_scales_flops_with_area(model_n):
    layers, params, grads, gflops = model_n.info(imgsz=640, verbose=False)
    assert params == sum(p.numel() for p in model_n.parameters())
    assert grads == params - 16  # only the DFL's fixed 16 bin weights are frozen
    assert layers == len(list(model_n.modules()))
    assert gflops > 0
    assert model_n.info(imgsz=320, verbose=False)[3] == pytest.approx(gflops / 4)
    assert model_n.info(imgsz=(320, 640), verbose=False)[3] == pytest.approx(gflops / 2)
    assert model_n.training  # counting FLOPs leaves the mode alone


def test_load_transfers_matching_weights_only():
    torch.manual_seed(1)
    source = DetectionModel("yolo-n.yaml", nc=4, verbose=False)
    target = DetectionModel("yolo-n.yaml", nc=2, verbose=False)
    class_output_keys = {f"model.22.cv3.{i}.2.{p}" for i in range(3) for p in ("weight", "bias")}
    before = copy.deepcopy(target.state_dict())
    transferred = target.load(source.state_dict(), verbose=False)
    assert transferred == len(target.state_dict()) - len(class_output_keys)
    for key, value in target.state_dict().items():
        expected = before[key] if key in class_output_keys else source.state_dict()[key]
        assert torch.equal(value, expected), key
    assert target.load(source, verbose=False) == transferred  # a model works like its state dict
    assert target.load({"model": None, "ema": source.state_dict()}, verbose=False) == transferred


def test_from_yaml_and_state_rebuilds_the_same_model(model_n):
    rebuilt = DetectionModel.from_yaml_and_state(copy.deepcopy(model_n.yaml), model_n.state_dict())
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = model_n.eval()(images)[0]
        actual = rebuilt.eval()(images)[0]
    model_n.train()
    assert rebuilt.nc == 3 and torch.equal(expected, actual)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        DetectionModel.from_yaml_and_state(copy.deepcopy(model_n.yaml), model_n.state_dict(), nc=5)


def test_loss_builds_the_criterion_once_and_forward_dispatches_batches(model_n, monkeypatch):
    built = []

    def fake_criterion():
        built.append(1)
        return lambda preds, batch: (sum(p.sum() for p in preds), batch["tag"])

    monkeypatch.setattr(model_n, "criterion", None)
    monkeypatch.setattr(model_n, "init_criterion", fake_criterion)
    batch = {"img": torch.rand(1, 3, 64, 64), "tag": "seen"}
    assert model_n.loss(batch)[1] == "seen"
    given = [torch.ones(1, 1, 1, 1)]
    assert model_n.loss(batch, preds=given)[0].item() == 1.0
    assert model_n(batch)[1] == "seen"
    assert built == [1]


def test_builtin_resolution_and_yaml_is_rebuildable():
    loaded = load_model_yaml("yolo-s.yaml")
    assert loaded["scale"] == "s" and loaded["yaml_file"].endswith("yolo.yaml")
    model = DetectionModel(loaded, verbose=False)
    assert model.yaml["scale"] == "s" and isinstance(model.model[-1], Detect)
