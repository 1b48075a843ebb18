"""OBBPredictor: rotated boxes from a trained oriented-box model, in original-image pixels."""

import torch

from yolotrain.tasks.detect.predict import DetectionPredictor
from yolotrain.tasks.detect.results import Results
from yolotrain.utils.nms import non_max_suppression_rotated
from yolotrain.utils.obb import corners_to_xywhr, xywhr_to_corners


class OBBPredictor(DetectionPredictor):
    """`predictor(source, model)` -> list of `Results` with `obb` (rotated boxes; `boxes` is None)."""

    def suppress(self, output, **options):
        """Rotated NMS -> per image (n, 7) cx, cy, w, h, conf, cls, angle in input pixels, descending conf."""
        return non_max_suppression_rotated(output, **options)

    def construct_result(self, frame, sample, prediction):
        prediction = prediction.float()
        corners = xywhr_to_corners(prediction[:, [0, 1, 2, 3, 6]])  # (n, 4, 2) input pixels
        (gain_h, gain_w), (pad_w, pad_h) = sample["ratio_pad"]
        corners = (corners - corners.new_tensor([pad_w, pad_h])) / corners.new_tensor([gain_w, gain_h])
        rotated = torch.cat((corners_to_xywhr(corners), prediction[:, 4:6]), 1)  # (n, 7) xywhr, conf, cls
        return Results(frame.image, frame.path, self.names, obb=rotated,
                       frame=frame.frame_index if frame.video else None)
