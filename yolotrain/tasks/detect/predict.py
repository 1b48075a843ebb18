"""DetectionPredictor: boxes from a trained detector (NMS, or an end-to-end head's own top-k), in original-image
pixels; the reading, batching, letterboxing and writing are `BasePredictor`'s."""

from yolotrain.engine.predictor import BasePredictor
from yolotrain.tasks.detect.results import Results
from yolotrain.utils.boxes import scale_boxes_to_original
from yolotrain.utils.nms import end_to_end_detections, is_end_to_end, non_max_suppression, set_max_det

DEFAULT_PREDICT_CONF = 0.25


class DetectionPredictor(BasePredictor):
    """`predictor(source, model)` -> list of `Results` (boxes); `predictor.stream(source, model)` yields them."""

    def setup_task(self, model):
        """An end-to-end head returns final detections (no NMS); either kind keeps at most `max_det` per image."""
        self.end2end = is_end_to_end(model)
        set_max_det(model, self.args.max_det)

    def postprocess(self, output):
        """The model's output -> per image (n, 6 + extra) x1, y1, x2, y2, conf, cls (then `nms_extra_columns`
        values) in input pixels, descending conf."""
        output = (output[0] if isinstance(output, (list, tuple)) else output).float()
        conf = self.args.conf if self.args.conf is not None else DEFAULT_PREDICT_CONF
        if self.end2end:
            return end_to_end_detections(output, conf_thres=conf, classes=self.args.classes, max_det=self.args.max_det)
        return self.suppress(output, conf_thres=conf, iou_thres=self.args.iou, classes=self.args.classes,
                             agnostic=self.args.agnostic_nms, max_det=self.args.max_det,
                             multi_label=bool(self.args.multi_label))  # one label per box unless asked

    def suppress(self, output, **options):
        """NMS of a decoded output (B, 4 + nc + extra, A) with these `options`; an oriented-box predictor
        suppresses rotated boxes instead."""
        return non_max_suppression(output, num_extra=self.nms_extra_columns(), **options)

    def nms_extra_columns(self):
        """Values per anchor that follow the class scores and each detection keeps through NMS (a pose model's
        keypoints); a detector has none."""
        return 0

    def construct_result(self, frame, sample, prediction):
        boxes = prediction.float().clone()
        boxes[:, :4] = scale_boxes_to_original(boxes[:, :4], sample["ratio_pad"], frame.image.shape[:2])
        return Results(frame.image, frame.path, self.names, boxes, frame=frame.frame_index if frame.video else None)
