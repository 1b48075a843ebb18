"""yolotrain.utils.torch_utils: device selection, seeding, unwrapping, BN fusion and dict helpers."""

import copy
import os
import random
import types

import numpy as np
import pytest
import torch
import torch.nn as nn

from yolotrain.errors import CfgError
from yolotrain.nn.modules import DFL, Conv
from yolotrain.utils import torch_utils
from yolotrain.utils.torch_utils import (
    copy_attr,
    de_parallel,
    FusedCopy,
    fuse_conv_and_bn,
    init_seeds,
    intersect_dicts,
    select_device,
)


def _fake_cuda(monkeypatch, count):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_select_device_defaults_and_cpu(monkeypatch):
    _fake_cuda(monkeypatch, 0)
    assert select_device(None) == torch.device("cpu")
    assert select_device("") == torch.device("cpu")
    assert select_device("CPU") == torch.device("cpu")
    _fake_cuda(monkeypatch, 2)
    assert select_device("") == torch.device("cuda:0")
    assert select_device("1") == torch.device("cuda:1")
    assert select_device("1,0") == torch.device("cuda:1")
    assert select_device(0) == torch.device("cuda:0")
    assert select_device("cuda:1") == torch.device("cuda:1")


@pytest.mark.parametrize(
    "device, gpus, fragment",
    [("0", 0, "no CUDA GPU"), ("0,1", 1, "index 1 is out of range"), ("3", 2, "index 3"), ("gpu", 1, "not understood")],
)
def test_select_device_errors_are_one_line(monkeypatch, device, gpus, fragment):
    _fake_cuda(monkeypatch, gpus)
    with pytest.raises(CfgError, match=fragment) as info:
        select_device(device)
    assert "\n" not in str(info.value) and repr(device) in str(info.value)


def test_select_device_mps_unavailable(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(CfgError, match="mps"):
        select_device("mps")


def test_de_parallel_unwraps_data_parallel_and_compile():
    model = nn.Linear(2, 2)
    assert de_parallel(model) is model
    assert de_parallel(nn.DataParallel(model)) is model
    assert de_parallel(types.SimpleNamespace(_orig_mod=nn.DataParallel(model))) is model


def test_init_seeds_repeats_streams_and_sets_determinism():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()

    try:
        init_seeds(3, deterministic=True)
        first = draw()
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        init_seeds(3)
        assert draw() == first
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


def test_intersect_dicts_keeps_matching_names_and_shapes():
    a = {"x": torch.zeros(2), "y": torch.zeros(3), "z": torch.zeros(1), "skip.w": torch.zeros(1)}
    b = {"x": torch.ones(2), "y": torch.ones(4), "skip.w": torch.ones(1)}
    assert list(intersect_dicts(a, b, exclude=("skip",))) == ["x"]


def test_copy_attr_respects_include_exclude_and_privacy():
    source = types.SimpleNamespace(nc=3, names={0: "a"}, _private=1, stride=8)
    target = types.SimpleNamespace()
    copy_attr(target, source, exclude=("stride",))
    assert vars(target) == {"nc": 3, "names": {0: "a"}}
    only = types.SimpleNamespace()
    copy_attr(only, source, include=("nc",))
    assert vars(only) == {"nc": 3}


@pytest.mark.numeric
def test_fuse_conv_and_bn_matches_eval_batchnorm():
    torch.manual_seed(0)
    layer = Conv(4, 6, k=3, s=2, g=2).eval()
    layer.bn.running_mean.uniform_(-0.5, 0.5)
    layer.bn.running_var.uniform_(0.5, 2.0)
    layer.bn.weight.data.uniform_(0.5, 1.5)
    layer.bn.bias.data.uniform_(-0.2, 0.2)
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        expected = layer.bn(layer.conv(x))
        fused = fuse_conv_and_bn(layer.conv, layer.bn)
        assert torch.allclose(fused(x), expected, atol=1e-5)
        reference = layer(x)
        assert torch.allclose(layer.fuse()(x), reference, atol=1e-5)
    assert isinstance(layer.bn, nn.Identity) and layer.conv.bias is not None


def _tensors_of(output):
    if isinstance(output, torch.Tensor):
        return [output]
    parts = output.values() if isinstance(output, dict) else output
    return [t for part in parts for t in _tensors_of(part)]


@pytest.mark.numeric
def test_a_fused_copy_follows_its_source_and_keeps_every_branch():
    from yolotrain.tasks import task_classes

    torch.manual_seed(0)
    source = task_classes("detect").model("yolo26.yaml", nc=3, verbose=False).to(memory_format=torch.channels_last)
    source.eval()
    fused = FusedCopy(source)
    fused.refreshed()
    with torch.no_grad():  # the source trains on (the EMA moves): weights and running statistics change
        for tensor in [*source.parameters(), *(m.running_mean for m in source.modules() if hasattr(m, "running_mean"))]:
            tensor.add_(torch.randn_like(tensor) * 0.05)
    network = fused.refreshed()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in network.modules())
    assert network.model[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
    # Equal to fusing a fresh copy of the source, BatchNorms only (end2end heads keep their one-to-many branch).
    fresh = copy.deepcopy(source)
    for module in fresh.modules():
        if isinstance(module, Conv):
            module.fuse()
    assert network.state_dict().keys() == fresh.state_dict().keys()
    assert all(torch.equal(network.state_dict()[k], v) for k, v in fresh.state_dict().items())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected, outputs = _tensors_of(source(x)), _tensors_of(network(x))
    assert [t.shape for t in outputs] == [t.shape for t in expected]
    assert all(torch.allclose(o, e, rtol=1e-4, atol=1e-4) for o, e in zip(outputs, expected))
    assert FusedCopy(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).copy is None  # nothing of ours to fold


@pytest.mark.numeric
def test_dfl_is_the_softmax_expectation():
    dfl = DFL(16)
    logits = torch.randn(2, 4 * 16, 5)
    expected = (logits.view(2, 4, 16, 5).softmax(2) * torch.arange(16.0).view(1, 1, 16, 1)).sum(2)
    assert torch.allclose(dfl(logits), expected, atol=1e-5)
    assert not any(p.requires_grad for p in dfl.parameters())


def test_get_flops_counts_a_conv():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False))
    # 2 FLOPs per multiply-add: 8 outputs * 3 * 9 taps * 64 * 64 pixels
    assert torch_utils.get_flops(model, imgsz=64) == pytest.approx(2 * 8 * 27 * 64 * 64 / 1e9)
