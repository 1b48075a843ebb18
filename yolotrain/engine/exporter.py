"""Export a trained detector for runtimes other than training: ONNX, TorchScript, safetensors.

The exported file sits beside the weights (`best.pt` -> `best.onnx`, `best.torchscript`), is written atomically,
and carries its metadata (names, stride, imgsz, batch, dynamic, half, task, yolotrain version): ONNX in
`metadata_props`, TorchScript in `_extra_files["config.json"]`. Its one input is `images` (B, 3, H, W) float in
[0, 1], its output `output0` (B, 4 + nc, A): xywh boxes in input pixels and class scores, the input of NMS (then
a pose model's keypoints or a segmentation model's nm mask coefficients per anchor); a segmentation model also
has `output1` (B, nm, H / 4, W / 4), its mask prototypes.
`yolotrain.nn.backends` runs both again for predict and val.
"""

import contextlib
import json
import logging
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from yolotrain import __version__
from yolotrain.errors import CfgError, YoloTrainError
from yolotrain.nn.backends import EXPORT_METADATA_FILE, load_checkpoint_model
from yolotrain.nn.modules import Segment
from yolotrain.utils.checkpoint import is_weights_file
from yolotrain.utils.files import write_atomic
from yolotrain.utils.nms import set_max_det

LOGGER = logging.getLogger(__name__)

class ExportError(YoloTrainError):
    """An export that cannot be done with the given arguments or installed packages."""

    exit_code = 2


class _HeadOutput(nn.Module):
    """The network with only the tensors inference needs as outputs (the eval head also returns its feature maps):
    the input of NMS and, for a segmentation model, its mask prototypes."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.with_protos = hasattr(model.model[-1], "proto")

    def forward(self, images):
        output = self.model(images)
        if self.with_protos:
            return output[0], Segment.eval_prototypes(output)
        return output[0] if isinstance(output, (list, tuple)) else output


def export_model(weights, args):
    """Export the checkpoint `weights` as `args.format` (checked by `get_cfg`); returns the written path."""
    weights = Path(weights)
    if not is_weights_file(weights):
        raise CfgError(f"export needs model=FILE.pt (a yolotrain checkpoint), got '{weights}'")
    if args.format == "safetensors":
        from yolotrain.utils.checkpoint import export_checkpoint_safetensors

        return export_checkpoint_safetensors(weights)
    model, example = _prepare(weights, args)
    metadata = _metadata(model, example, args)
    out = weights.with_suffix(f".{args.format}")
    writer = _write_onnx if args.format == "onnx" else _write_torchscript
    write_atomic(out, lambda path: writer(_HeadOutput(model), example, metadata, path, args))
    LOGGER.info(f"export: {out} ({args.format}, input {tuple(example.shape)}{', dynamic' if args.dynamic else ''})")
    return out


def _prepare(weights, args):
    device = torch.device("cuda:0" if args.half else "cpu")
    if args.half and not torch.cuda.is_available():
        raise ExportError("half=True exports fp16 and needs a CUDA device")
    model = load_checkpoint_model(weights).fuse().eval().to(device)
    set_max_det(model, args.max_det)  # an end-to-end export returns at most this many boxes per image
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    stride = max(int(model.stride.max()), 32)
    size = args.imgsz if isinstance(args.imgsz, (list, tuple)) else (args.imgsz, args.imgsz)
    height, width = (-(-int(s) // stride) * stride for s in size)  # up to a multiple of the stride
    example = torch.zeros(max(int(args.batch), 1), 3, height, width, device=device)
    if args.half:
        model, example = model.half(), example.half()
    return model, example


def _metadata(model, example, args):
    return {
        "names": {int(k): str(v) for k, v in model.names.items()},
        "stride": [int(s) for s in model.stride.tolist()],
        "imgsz": list(example.shape[2:]),
        "batch": int(example.shape[0]),
        "dynamic": bool(args.dynamic),
        "half": bool(args.half),
        "end2end": bool(getattr(model, "end2end", False)),
        "task": args.task,
        "version": __version__,
        **({"kpt_shape": list(model.kpt_shape)} if hasattr(model, "kpt_shape") else {}),  # a pose model's keypoints
    }


def _write_torchscript(model, example, metadata, path, args):
    with torch.no_grad(), _quiet_tracer():
        traced = torch.jit.trace(model, example, strict=False, check_trace=False)
    torch.jit.save(traced, str(path), _extra_files={EXPORT_METADATA_FILE: json.dumps(metadata)})


def _write_onnx(model, example, metadata, path, args):
    try:
        import onnx
    except ImportError:
        raise ExportError("format=onnx needs the onnx package: pip install 'yolotrain[export]'") from None
    output_names = ["output0", "output1"] if model.with_protos else ["output0"]
    dynamic_axes = None
    if args.dynamic:
        outputs = {0: "batch", 1: "detections"} if metadata["end2end"] else {0: "batch", 2: "anchors"}
        dynamic_axes = {"images": {0: "batch", 2: "height", 3: "width"}, "output0": outputs,
                        "output1": {0: "batch", 2: "mask_height", 3: "mask_width"}}
        dynamic_axes = {k: v for k, v in dynamic_axes.items() if k in ("images", *output_names)}
    options = {} if args.opset is None else {"opset_version": int(args.opset)}
    with torch.no_grad(), _quiet_tracer():
        # The TorchScript-based exporter: the detector has no data-dependent control flow to need dynamo.
        torch.onnx.export(model, (example,), str(path), input_names=["images"], output_names=output_names,
                          dynamic_axes=dynamic_axes, dynamo=False, **options)
    graph = onnx.load(str(path))
    if args.simplify:
        graph = _simplified(graph)
    for key, value in metadata.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(graph, str(path))


@contextlib.contextmanager
def _quiet_tracer():
    """Tracing warns about Python numbers taken from tensor shapes (the anchor grid); they are exact here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        yield


def _simplified(graph):
    try:
        import onnxslim
    except ImportError:
        LOGGER.info("export: onnxslim is not installed; the ONNX graph is left as exported")
        return graph
    try:
        return onnxslim.slim(graph)
    except Exception as error:  # a simplifier failure must not lose the export
        LOGGER.warning(f"export: onnxslim failed ({type(error).__name__}: {error}); keeping the graph as exported")
        return graph
