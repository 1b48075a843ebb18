"""OBBPredictor: rotated boxes from a trained oriented-box model, in original-image pixels."""

import torch

from yolotrain.tasks.detect.predict import DEFAULT_PREDICT_CONF, DetectionPredictor
from yolotrain.tasks.detect.results import Results
from yolotrain.utils.nms import end_to_end_detections, non_max_suppression_rotated
from yolotrain.utils.obb import corners_to_xywhr, xywhr_to_corners


class OBBPredictor(DetectionPredictor):
    """`predictor(source, model)` -> list of `Results` with `obb` (rotated boxes; `boxes` is None)."""

    def postprocess(self, output):
        """Per image (n, 7) cx, cy, w, h, conf, cls, angle in input pixels, descending conf."""
        output = (output[0] if isinstance(output, (list, tuple)) else output).float()
        conf = self.args.conf if self.args.conf is not None else DEFAULT_PREDICT_CONF
        if self.end2end:
            return end_to_end_detections(output, conf_thres=conf, classes=self.args.classes, max_det=self.args.max_det)
        return non_max_suppression_rotated(output, conf_thres=conf, iou_thres=self.args.iou, classes=self.args.classes,
                                           agnostic=self.args.agnostic_nms, multi_label=bool(self.args.multi_label),
                                           max_det=self.args.max_det)

    def construct_result(self, frame, sample, prediction):
        prediction = prediction.float()
        corners = xywhr_to_corners(prediction[:, [0, 1, 2, 3, 6]])  # (n, 4, 2) input pixels
        (gain_h, gain_w), (pad_w, pad_h) = sample["ratio_pad"]
        corners = (corners - corners.new_tensor([pad_w, pad_h])) / corners.new_tensor([gain_w, gain_h])
        rotated = torch.cat((corners_to_xywhr(corners), prediction[:, 4:6]), 1)  # (n, 7) xywhr, conf, cls
        return Results(frame.image, frame.path, self.names, obb=rotated,
                       frame=frame.frame_index if frame.video else None)
