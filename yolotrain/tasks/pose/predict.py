"""PosePredictor: boxes and their keypoints from a trained pose model, in original-image pixels."""

from yolotrain.tasks.detect.predict import DetectionPredictor
from yolotrain.tasks.detect.results import Results
from yolotrain.utils.boxes import scale_boxes_to_original
from yolotrain.utils.torch_utils import de_parallel


class PosePredictor(DetectionPredictor):
    """`predictor(source, model)` -> list of `Results` with `boxes` and `keypoints`."""

    def setup_task(self, model):
        super().setup_task(model)
        self.kpt_shape = tuple(de_parallel(model).kpt_shape)  # a PoseModel's, or an export's metadata

    def nms_extra_columns(self):
        """Each box keeps its K * D keypoint values."""
        return self.kpt_shape[0] * self.kpt_shape[1]

    def construct_result(self, frame, sample, prediction):
        prediction = prediction.float()
        boxes = prediction[:, :6].clone()
        boxes[:, :4] = scale_boxes_to_original(boxes[:, :4], sample["ratio_pad"], frame.image.shape[:2])
        keypoints = prediction[:, 6:].reshape(len(prediction), *self.kpt_shape).clone()
        (gain_h, gain_w), (pad_w, pad_h) = sample["ratio_pad"]
        keypoints[..., 0] = (keypoints[..., 0] - pad_w) / gain_w
        keypoints[..., 1] = (keypoints[..., 1] - pad_h) / gain_h
        return Results(frame.image, frame.path, self.names, boxes, keypoints=keypoints,
                       frame=frame.frame_index if frame.video else None)
