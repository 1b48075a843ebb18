"""SegmentationPredictor: boxes and their masks from a trained segmentation model, in original-image pixels."""

import torch
from torch.nn import functional as F

from yolotrain.nn.modules import Segment
from yolotrain.tasks.detect.predict import DetectionPredictor
from yolotrain.tasks.detect.results import Results
from yolotrain.utils.boxes import scale_boxes_to_original
from yolotrain.utils.masks import masks_in_image


class SegmentationPredictor(DetectionPredictor):
    """`predictor(source, model)` -> list of `Results` with `boxes` and `masks` (at the original image size).

    With `retina_masks` the masks are computed at the original size; without, at the size the image had in the
    network input and then enlarged (nearest), cheaper for images larger than the input and coarser at the edges.
    """

    def setup_task(self, model):
        super().setup_task(model)
        self.num_masks = 0

    def postprocess(self, output):
        """Per image (detections (n, 6 + nm) in input pixels, the image's prototypes (nm, h, w)).
        output: `(y, (maps, coefficients, protos))` from a model, `(y, protos)` from an export."""
        protos = Segment.eval_prototypes(output)
        self.num_masks = int(protos.shape[1])
        return list(zip(super().postprocess(output), protos))

    def nms_extra_columns(self):
        """Each box keeps its nm mask coefficients."""
        return self.num_masks

    def construct_result(self, frame, sample, prediction):
        detections, protos = prediction
        detections = detections.float()
        image_hw = frame.image.shape[:2]
        boxes = detections[:, :6].clone()
        boxes[:, :4] = scale_boxes_to_original(boxes[:, :4], sample["ratio_pad"], image_hw)
        masks = self._masks(detections[:, 6:], protos, boxes[:, :4], sample, image_hw)
        return Results(frame.image, frame.path, self.names, boxes, masks=masks,
                       frame=frame.frame_index if frame.video else None)

    def _masks(self, coefficients, protos, boxes, sample, image_hw):
        input_hw = sample["img"].shape[:2]
        ratio_pad = sample["ratio_pad"]
        if self.args.retina_masks:
            return masks_in_image(coefficients, protos, boxes, input_hw, ratio_pad, image_hw)
        (gain_h, gain_w), pad = ratio_pad
        inside_input = (max(round(image_hw[0] * gain_h), 1), max(round(image_hw[1] * gain_w), 1))
        scaled_boxes = boxes * boxes.new_tensor([gain_w, gain_h] * 2)
        masks = masks_in_image(coefficients, protos, scaled_boxes, input_hw, ((1.0, 1.0), pad), inside_input)
        return F.interpolate(masks[None].float(), image_hw, mode="nearest")[0].bool() if len(masks) else \
            torch.zeros((0, *image_hw), dtype=torch.bool, device=masks.device)
