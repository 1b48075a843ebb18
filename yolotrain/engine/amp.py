"""Mixed precision and memory format: which autocast dtype a run trains with and whether its tensors are
channels-last, both decided once at set-up.

- CUDA: ``amp=True`` is float16 when the model's fp16 output matches its fp32 output on a synthetic image (else
  fp32); ``amp="bf16"`` is bfloat16.
- CPU: ``amp=True`` is bfloat16 where the CPU runs it natively (oneDNN reports AVX512-BF16 or AMX) and a tiny
  convolution and matmul under autocast give bfloat16 results that match fp32; elsewhere fp32, said in one line.
  Without native support bfloat16 is emulated and several times slower than fp32, so only ``amp="bf16"`` asks
  for it there.
- Other devices (MPS): fp32.

Autocast changes only the dtype of activations: weights, gradients, the optimizer state and the EMA stay float32,
so checkpoints are the same whatever the precision. bfloat16 has float32's range and needs no GradScaler.

``channels_last`` (True/False, or None for auto) lays the model's weights and the training batches out as NHWC:
oneDNN (x86 CPUs) and CUDA run convolutions on that layout without reordering every layer's input, so auto turns
it on there. Values are unchanged; only strides differ.
"""

from __future__ import annotations

import copy
import logging
from typing import Optional

import torch
from torch import nn

LOGGER = logging.getLogger(__name__)

# bfloat16 keeps 8 significant bits: a tiny conv/matmul agrees with fp32 to about 1%, a broken kernel does not.
CPU_PROBE_RTOL = 0.05
CPU_PROBE_ATOL = 0.05


def resolve_amp(amp, device: torch.device, model: Optional[nn.Module] = None) -> Optional[torch.dtype]:
    """The autocast dtype for ``amp`` (True/False/"bf16") on ``device``, or None to train in fp32."""
    if not amp:
        return None
    if device.type == "cuda":
        if amp == "bf16":
            return torch.bfloat16
        return torch.float16 if model is None or fp16_output_matches(model, device) else None
    if device.type == "cpu":
        return _resolve_cpu_amp(requested_bf16=amp == "bf16")
    LOGGER.info(f"amp: no mixed precision on {device.type}; training in fp32")
    return None


def _resolve_cpu_amp(requested_bf16: bool) -> Optional[torch.dtype]:
    native = cpu_has_native_bf16()
    if not native and not requested_bf16:
        LOGGER.info("amp: this CPU has no native bfloat16 (AVX512-BF16 or AMX); training in fp32")
        return None
    if not cpu_bf16_probe():
        LOGGER.warning("amp: bfloat16 autocast on this CPU gave wrong results in a test convolution; training in fp32")
        return None
    if not native:
        LOGGER.warning("amp=bf16: this CPU emulates bfloat16, which trains several times slower than fp32")
    return torch.bfloat16


def cpu_has_native_bf16() -> bool:
    """True where oneDNN runs bfloat16 convolutions in hardware (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN, or an older torch without the query
        return False


def cpu_bf16_probe() -> bool:
    """Run a tiny convolution and matmul in fp32 and under CPU bfloat16 autocast: True when autocast produced
    bfloat16 results close to fp32 (an autocast that silently stays fp32 or returns garbage is no use)."""
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 8, 16, 16, generator=generator)
    weight = torch.randn(16, 8, 3, 3, generator=generator) / 8
    matrix = torch.randn(16, 16, generator=generator) / 4
    try:
        with torch.no_grad():
            reference = _probe_ops(image, weight, matrix)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                mixed = _probe_ops(image, weight, matrix)
    except RuntimeError as e:
        LOGGER.debug("bfloat16 probe failed: %s", e)
        return False
    if mixed.dtype != torch.bfloat16:
        return False
    mixed = mixed.float()
    return bool(torch.isfinite(mixed).all() and torch.allclose(reference, mixed, rtol=CPU_PROBE_RTOL, atol=CPU_PROBE_ATOL))


def _probe_ops(image: torch.Tensor, weight: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    features = torch.nn.functional.conv2d(image, weight, padding=1)  # (1, 16, 16, 16)
    return features.flatten(2).transpose(1, 2) @ matrix  # (1, 256, 16)


def fp16_output_matches(model: nn.Module, device: torch.device) -> bool:
    """Run the model once in fp32 and fp16 autocast on a synthetic image; False (with a warning) on a mismatch."""
    from yolotrain.utils.torch_utils import de_parallel

    probe_model = copy.deepcopy(de_parallel(model)).eval()
    image = torch.rand(1, 3, 64, 64, device=device)
    with torch.no_grad():
        reference = _first_tensor(probe_model(image)).float()
        with torch.autocast("cuda", dtype=torch.float16):
            mixed = _first_tensor(probe_model(image)).float()
    ok = torch.allclose(reference, mixed, atol=0.5, rtol=0.05) and torch.isfinite(mixed).all()
    if not ok:
        LOGGER.warning("AMP check failed: fp16 outputs differ from fp32 on this GPU, training in fp32")
    return bool(ok)


def _first_tensor(output):
    while isinstance(output, (list, tuple)):
        output = output[0]
    return output


def resolve_channels_last(setting, device: torch.device) -> bool:
    """``channels_last`` as given, or for None (auto): True where channels-last convolutions are faster."""
    if setting is not None:
        return bool(setting)
    from yolotrain.utils.torch_utils import channels_last_pays

    return channels_last_pays(device)
