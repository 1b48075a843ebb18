"""Load a trained detector for inference, whatever file it is in: a yolotrain checkpoint (.pt), safetensors,
ONNX (run by onnxruntime) or TorchScript.

Every backend is an `nn.Module` whose `forward(images)` takes (B, 3, H, W) float in [0, 1] and returns the head's
eval output (B, 4 + nc, A), and which carries `names`, `stride` (tensor of the strides) and `nc`; so the validator
and the predictor run any of them the same way.
"""

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn

from yolotrain.errors import CfgError, CheckpointError, one_line

LOGGER = logging.getLogger(__name__)

EXPORT_METADATA_FILE = "config.json"  # TorchScript's `_extra_files` entry holding the metadata


def load_checkpoint_model(path):
    """The model of a yolotrain checkpoint or safetensors file (its EMA weights, else its model weights), of the
    task its model yaml's head names (`DetectionModel`, `ClassificationModel`)."""
    from yolotrain.nn.model import head_task, load_model_yaml
    from yolotrain.tasks import task_classes
    from yolotrain.utils.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    if "model_yaml" not in ckpt:
        raise CheckpointError(f"{path} has no 'model_yaml' entry; expected a yolotrain checkpoint")
    weights = ckpt.get("ema") if ckpt.get("ema") is not None else ckpt.get("model")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path} holds no 'ema' or 'model' state dict to run")
    names = ckpt.get("names")
    nc = len(names) if names else ckpt.get("nc")
    model_class = task_classes(head_task(load_model_yaml(ckpt["model_yaml"]))).model
    model = model_class.from_yaml_and_state(ckpt["model_yaml"], weights, nc=nc)
    if names:
        model.names = {int(k): str(v) for k, v in names.items()}
    return model.float()


def load_inference_model(model):
    """An inference backend for `model`: a path (.pt, .safetensors, .onnx, .torchscript) or an nn.Module."""
    if isinstance(model, nn.Module):
        return model
    path = Path(model)
    if not path.exists() and path.suffix in (".onnx", ".torchscript"):
        raise CheckpointError(f"model file '{path}' does not exist; export one with 'yolotrain export'")
    if path.suffix == ".onnx":
        return OnnxModel(path)
    if path.suffix == ".torchscript":
        return TorchScriptModel(path)
    return load_checkpoint_model(path)


class ExportedModel(nn.Module):
    """Shared by the exported formats: the metadata written at export time."""

    def __init__(self, metadata, path):
        super().__init__()
        if "names" not in metadata or "stride" not in metadata:
            raise CheckpointError(f"{path} carries no yolotrain metadata (names, stride); export it with "
                                  f"'yolotrain export'")
        self.names = {int(k): v for k, v in metadata["names"].items()}
        self.nc = len(self.names)
        self.stride = torch.tensor([float(s) for s in metadata["stride"]])
        self.imgsz = tuple(metadata.get("imgsz", ()))
        self.dynamic = bool(metadata.get("dynamic", False))
        self.batch = int(metadata.get("batch", 1))
        self.half = bool(metadata.get("half", False))
        self.end2end = bool(metadata.get("end2end", False))  # output (B, max_det, 6): final detections, no NMS
        self.task = str(metadata.get("task", "detect"))
        if metadata.get("kpt_shape") is not None:  # a pose model: K keypoints of D values follow each box's scores
            self.kpt_shape = tuple(int(v) for v in metadata["kpt_shape"])
        self.path = str(path)

    def fuse(self):
        return self

    def is_fused(self):
        return True

    def forward(self, images):
        """Any number of images: a fixed-shape export runs them `batch` at a time (the last call padded with
        blank images whose outputs are dropped), at exactly its own image size."""
        if self.dynamic:
            return self.run(images)
        if tuple(images.shape[2:]) != self.imgsz:
            raise CheckpointError(f"{self.path} was exported for {self.imgsz[0]}x{self.imgsz[1]} images, got "
                                  f"{images.shape[2]}x{images.shape[3]}; export it with dynamic=True to run others")
        outputs = []
        for chunk in images.split(self.batch):
            padding = images.new_zeros(self.batch - len(chunk), *chunk.shape[1:])
            outputs.append([output[: len(chunk)] for output in _as_tuple(self.run(torch.cat([chunk, padding])))])
        joined = tuple(torch.cat(parts) for parts in zip(*outputs))
        return joined[0] if len(joined) == 1 else joined

    def run(self, images):
        """The exported graph on one input it accepts: (B, 3, H, W) float in [0, 1]. Returns its output, or the
        tuple of its outputs when it has several (a segmentation model's detections and prototypes)."""
        raise NotImplementedError


def _as_tuple(output):
    return tuple(output) if isinstance(output, (list, tuple)) else (output,)


def fixed_input_size(model, imgsz):
    """(height, width) of a fixed-shape export, checked against `imgsz`; None for a model that takes any size.

    An export without dynamic=True runs only at its own size: a different `imgsz` would silently not be honoured,
    so it is a one-line error.
    """
    if getattr(model, "dynamic", True) is not False:
        return None
    height, width = model.imgsz
    # An int imgsz is the long side images are resized to; a fixed export letterboxes them to its own shape.
    if isinstance(imgsz, (list, tuple)):
        honoured = [int(size) for size in imgsz] == [height, width]
    else:
        honoured = int(imgsz) == max(height, width)
    if not honoured:
        raise CfgError(f"imgsz={imgsz} cannot be used with {model.path}: it was exported for fixed {height}x{width} "
                       f"images; leave imgsz out (it defaults to the export's size) or export with dynamic=True")
    return height, width


class OnnxModel(ExportedModel):
    """An exported .onnx detector run by onnxruntime (CUDA provider when present, else CPU)."""

    def __init__(self, path):
        try:
            import onnxruntime
        except ImportError:
            raise CheckpointError(f"running {path} needs onnxruntime: pip install 'yolotrain[export]'") from None
        available = onnxruntime.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            session = onnxruntime.InferenceSession(str(path), providers=providers)
            metadata = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
        except Exception as error:  # onnxruntime's own error types; a damaged file is a user's mistake to name
            raise CheckpointError(f"{path} is not a readable ONNX model: {one_line(error)[:200]}") from None
        super().__init__(metadata, path)
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def run(self, images):
        array = images.detach().cpu().numpy().astype("float16" if self.half else "float32")
        outputs = tuple(torch.from_numpy(output).float().to(images.device)
                        for output in self.session.run(None, {self.input_name: array}))
        return outputs[0] if len(outputs) == 1 else outputs


class TorchScriptModel(ExportedModel):
    """An exported .torchscript detector."""

    def __init__(self, path):
        extra = {EXPORT_METADATA_FILE: ""}
        # A TorchScript file is a program: its forward may call any TorchScript operation (files included).
        LOGGER.info(f"{path}: TorchScript runs the code inside the file; load only files you trust (ONNX is data)")
        try:
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
            metadata = json.loads(extra[EXPORT_METADATA_FILE] or "{}")
        except Exception as error:  # torch's RuntimeError for a file that is not TorchScript, or bad metadata
            raise CheckpointError(f"{path} is not a readable TorchScript model: {one_line(error)[:200]}") from None
        super().__init__(metadata, path)
        self.module = module

    def run(self, images):
        parameter = next(self.module.parameters(), None)
        dtype = parameter.dtype if parameter is not None else images.dtype
        outputs = tuple(output.float() for output in _as_tuple(self.module(images.to(dtype))))
        return outputs[0] if len(outputs) == 1 else outputs
