"""Validation precision: fp32 by default; half=True gives bf16 autocast on a CPU with native bf16 (and fp32 with a
warning elsewhere), with metrics that stay close to fp32's."""

import logging

import pytest
import torch

import yolotrain.engine.validator as validator_module
from yolotrain.nn.model import DetectionModel
from yolotrain.tasks.detect.val import DetectionValidator


def tiny_model(model_yaml):
    torch.manual_seed(0)
    model = DetectionModel(model_yaml, nc=6, verbose=False)
    reg_max = model.head.reg_max
    for box_branch, class_branch in zip(model.head.cv2, model.head.cv3):  # many scored, shape-sized boxes
        box_branch[-1].bias.data.zero_()
        box_branch[-1].bias.data.view(4, reg_max)[:, 2] = 6.0
        class_branch[-1].bias.data.fill_(1.0)
    return model.eval()


def run(model_yaml, data, tmp_path, outputs=None, **overrides):
    """Validate the tiny model; with `outputs` (a list), each batch's decoded network output is appended to it."""
    dtypes = []
    args = {"data": data, "imgsz": 64, "batch": 4, "device": "cpu", "workers": 0, "plots": False, **overrides}
    validator = DetectionValidator(save_dir=tmp_path, args=args)
    validator.add_callback("on_val_start", lambda v: dtypes.append(v.amp_dtype))
    model = tiny_model(model_yaml)
    if outputs is not None:  # the hook travels with the fused copy the validator runs
        model.register_forward_hook(lambda module, inputs, output: outputs.append(output[0].float().cpu()))
    return validator(model=model), dtypes[0], validator


@pytest.mark.numeric
def test_half_on_a_cpu_with_native_bf16_runs_bf16_close_to_fp32(monkeypatch, tiny_model_yaml, tiny_data, tmp_path):
    fp32_out, bf16_out = [], []
    fp32, fp32_dtype, _ = run(tiny_model_yaml, tiny_data, tmp_path / "fp32", outputs=fp32_out)
    monkeypatch.setattr(validator_module, "cpu_has_native_bf16", lambda: True)
    bf16, bf16_dtype, _ = run(tiny_model_yaml, tiny_data, tmp_path / "bf16", outputs=bf16_out, half=True)
    assert fp32_dtype is None and bf16_dtype == torch.bfloat16
    assert fp32["metrics/mAP50(B)"] > 0
    for key in ("metrics/mAP50(B)", "metrics/mAP50-95(B)"):
        assert bf16[key] == pytest.approx(fp32[key], abs=0.05)
    # The untrained model's mAP is near 0 on both, so its decoded outputs (B, 4 + nc, A) carry the comparison.
    # Measured with oneDNN on AMX and capped to AVX512_CORE_BF16, AVX512_CORE and AVX2 alike: boxes differ by at
    # most 0.64 px (0.45% of the largest coordinate, 141 px), scores by at most 6e-4. The tolerances allow about
    # 4x and 15x that; garbage from a broken bf16 kernel is far outside them.
    assert len(bf16_out) == len(fp32_out) > 0
    assert not all(torch.equal(a, b) for a, b in zip(bf16_out, fp32_out))  # autocast did compute in bf16
    for bf16_batch, fp32_batch in zip(bf16_out, fp32_out):
        torch.testing.assert_close(bf16_batch[:, :4], fp32_batch[:, :4], rtol=0.02, atol=0.5)  # pixels
        torch.testing.assert_close(bf16_batch[:, 4:], fp32_batch[:, 4:], rtol=0.0, atol=0.01)  # scores


def test_half_without_native_bf16_stays_fp32_and_says_so(monkeypatch, tiny_model_yaml, tiny_data, tmp_path, caplog):
    monkeypatch.setattr(validator_module, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING):
        half, dtype, _ = run(tiny_model_yaml, tiny_data, tmp_path / "half", half=True)
    assert dtype is None and "validating in fp32" in caplog.text
    fp32, _, _ = run(tiny_model_yaml, tiny_data, tmp_path / "fp32")
    assert half == fp32  # the same fp32 path, exactly


def test_standalone_cpu_model_is_channels_last_and_the_callers_model_untouched(tiny_model_yaml, tiny_data, tmp_path):
    model = tiny_model(tiny_model_yaml)
    weight = model.model[0].conv.weight
    validator = DetectionValidator(save_dir=tmp_path, args={"data": tiny_data, "imgsz": 64, "batch": 4,
                                                            "device": "cpu", "workers": 0, "plots": False})
    validator(model=model)
    assert validator.channels_last
    assert validator.model.model[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert weight.is_contiguous() and model.model[0].conv.weight is weight and not model.is_fused()
