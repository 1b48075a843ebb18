"""BasePredictor: run a trained model on images and videos, and write what users look at.

Each image is resized (long side = imgsz) and letterboxed to its own smallest stride-multiple shape with
validation's own code (validation adds a margin of half a stride, `rect_pad`); results come back in
original-image pixels. Frames are read, predicted and written one batch at a time (`stream`), so a long video
never sits in memory.

Outputs in `runs/<task>/predict{N}/` (`project`/`name`): annotated images under their own file names (`save`),
annotated videos as .mp4 with the source's frame count and fps (`save`), YOLO labels in `labels/` (`save_txt`,
`save_conf`), crops in `crops/<class>/` (`save_crop`).
"""

import itertools
import logging
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from yolotrain.cfg import Args, check_class_ids, get_cfg
from yolotrain.data.augment import LetterBox
from yolotrain.data.dataset import rect_shapes, resize_long_side
from yolotrain.data.sources import iter_frames
from yolotrain.errors import CfgError
from yolotrain.nn.backends import ExportedModel, fixed_input_size, load_inference_model
from yolotrain.utils.files import ensure_writable_dir, run_dir
from yolotrain.utils.threads import start_thread_governor
from yolotrain.utils.torch_utils import channels_last_pays, de_parallel, fused_for_inference, select_device

LOGGER = logging.getLogger(__name__)


class BasePredictor:
    """`predictor(source, model)` -> list of results; `predictor.stream(source, model)` yields them, one per image
    or video frame. A task's predictor gives `postprocess` (the network's output -> per-image predictions) and
    `construct_result` (one prediction -> that task's `Results`), and may set up more in `setup_task`."""

    # Margin of each image's letterbox shape, in strides: none, the smallest shape the network takes. Validation
    # uses the same shapes with its own margin (the validator's `rect_pad`); with equal margins both see the
    # same pixels.
    rect_pad = 0.0

    def __init__(self, args=None):
        self.args = args if isinstance(args, Args) else get_cfg({"mode": "predict", **dict(args or {})})
        self.model = None
        self.device = None
        self.save_dir = None
        self._videos = {}  # source video path -> open cv2.VideoWriter
        self.governor = None  # this process's thread budget, started with the model

    def __call__(self, source, model):
        return list(self.stream(source, model))

    # ------------------------------------------------------------------ set-up
    def setup_model(self, model):
        """Load `model` (a path or an nn.Module) once, fused and in eval mode on `args.device`."""
        self.device = select_device(self.args.device)
        self.governor = start_thread_governor(self.args.threads)
        if self.args.half and self.device.type != "cuda":
            raise CfgError("half=True needs a CUDA device (fp16 inference on the CPU is slower, not faster)")
        loaded = isinstance(model, (str, Path))
        model = load_inference_model(model) if loaded else de_parallel(model)
        model = fused_for_inference(model, copy_first=not loaded).to(self.device).eval()
        self.channels_last = not isinstance(model, ExportedModel) and channels_last_pays(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.args.half and not hasattr(model, "session"):
            model = model.half()
        self.model = model
        self.setup_task(model)
        self.stride = max(int(model.stride.max()), 32)
        self.names = dict(model.names)
        check_class_ids(self.args.classes, getattr(model, "nc", len(self.names)), "the model")
        # An export of fixed shape (ONNX without dynamic=True) runs only at its own image size; batches of its own
        # batch size need no padding images.
        self.fixed_shape = fixed_input_size(model, self.args.imgsz)
        # batch=-1 / a share of memory sizes training batches; prediction then runs one image per call.
        self.batch_size = model.batch if self.fixed_shape else max(int(self.args.batch), 1)

    def setup_task(self, model):
        """What the task sets up once its model is loaded (called by `setup_model`, before the first batch)."""

    def _setup_save_dir(self):
        if not (self.args.save or self.args.save_txt or self.args.save_crop):
            return None
        return ensure_writable_dir(run_dir(self.args, "predict"))

    # ------------------------------------------------------------------ the loop
    def stream(self, source, model):
        """Yield one `Results` per image or video frame of `source`."""
        if self.model is None or model is not self.model:
            self.setup_model(model)
        frames = iter_frames(source, self.args.vid_stride)
        first = next(frames, None)  # a source that cannot be read fails here, before a run folder is made
        self.save_dir = self._setup_save_dir()
        try:
            for batch in self._batches(itertools.chain([first] if first is not None else [], frames)):
                yield from self._predict_batch(batch)
        finally:
            for writer in self._videos.values():
                writer.release()
            self._videos = {}
        if self.save_dir is not None:
            LOGGER.info(f"Results saved to {self.save_dir}")

    def _batches(self, frames):
        """Consecutive frames of the same letterboxed shape, at most `batch` of them (one network call each)."""
        batch, shape = [], None
        for frame in frames:
            sample = self.prepare_image(frame.image)
            if batch and (sample["img"].shape != shape or len(batch) == self.batch_size):
                yield batch
                batch = []
            batch.append((frame, sample))
            shape = sample["img"].shape
        if batch:
            yield batch

    def prepare_image(self, image):
        """One BGR image -> {"img": what the network takes (HxWx3 BGR uint8), "ratio_pad": how it maps back}. The
        default is detection validation's letterbox: long side to imgsz, then pad to its own rect shape."""
        h0, w0 = image.shape[:2]
        imgsz = max(self.fixed_shape) if self.fixed_shape else self.args.imgsz
        resized = resize_long_side(image, imgsz)
        h, w = resized.shape[:2]
        aspect = h0 / w0
        (target,) = rect_shapes(aspect, aspect, imgsz, self.stride, self.rect_pad)
        target = self.fixed_shape or target
        sample = {"img": resized, "bboxes": np.zeros((0, 4), np.float32), "rect_shape": tuple(target),
                  "ratio_pad": ((h / h0, w / w0), (0, 0))}
        return LetterBox(scaleup=False)(sample)

    def _predict_batch(self, batch):
        started = time.perf_counter()
        images = np.stack([sample["img"] for _, sample in batch])[..., ::-1].transpose(0, 3, 1, 2)  # BGR->RGB, BCHW
        tensor = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        tensor = (tensor.half() if self.args.half else tensor.float()) / 255
        if self.channels_last:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        prepared = time.perf_counter()
        with torch.no_grad():
            output = self.model(tensor)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        inferred = time.perf_counter()
        self.governor.check()
        predictions = self.postprocess(output)
        results = [self.construct_result(frame, sample, prediction)
                   for (frame, sample), prediction in zip(batch, predictions)]
        finished = time.perf_counter()
        per_image = {"preprocess": prepared - started, "inference": inferred - prepared,
                     "postprocess": finished - inferred}
        for result, (frame, sample) in zip(results, batch):
            result.speed = {stage: 1e3 * seconds / len(batch) for stage, seconds in per_image.items()}
            self._write(result, frame, sample)
        return results

    def postprocess(self, output):
        """The network's output for a batch -> one prediction per image, in the letterboxed input's pixels."""
        raise NotImplementedError

    def construct_result(self, frame, sample, prediction):
        """The `Results` of one image or frame from its prediction: mapped back to the original image's pixels
        (`sample["ratio_pad"]` holds its letterbox)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ outputs
    def _write(self, result, frame, sample):
        stem = Path(frame.path).stem
        label_stem = f"{stem}_{frame.frame_index}" if frame.video else stem
        if self.args.verbose:
            where = f"{frame.path} frame {frame.frame_index}" if frame.video else frame.path
            height, width = sample["img"].shape[:2]
            LOGGER.info(f"{where}: {width}x{height} {result.verbose()}, {result.speed['inference']:.1f}ms")
        if self.save_dir is None:
            return
        if self.args.save:
            plot = dict(line_width=self.args.line_width, labels=self.args.show_labels, conf=self.args.show_conf)
            if frame.video:
                self._video_writer(frame).write(result.plot(**plot))
            else:
                name = Path(frame.path).name if Path(frame.path).suffix else f"{stem}.jpg"
                result.save(self.save_dir / name, **plot)
        if self.args.save_txt:
            result.save_txt(self.save_dir / "labels" / f"{label_stem}.txt", save_conf=self.args.save_conf)
        if self.args.save_crop:
            result.save_crop(self.save_dir / "crops", label_stem)

    def _video_writer(self, frame):
        writer = self._videos.get(frame.path)
        if writer is None:
            info = frame.video
            path = self.save_dir / f"{Path(frame.path).stem}.mp4"
            fps = info.fps / self.args.vid_stride
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (info.width, info.height))
            self._videos[frame.path] = writer
        return writer
