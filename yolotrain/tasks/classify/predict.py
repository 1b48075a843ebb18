"""ClassificationPredictor: class probabilities from a trained classifier; reading, batching and writing are
`BasePredictor`'s."""

from yolotrain.engine.predictor import BasePredictor
from yolotrain.tasks.classify.dataset import centre_crop
from yolotrain.tasks.detect.results import Results


class ClassificationPredictor(BasePredictor):
    """`predictor(source, model)` -> list of `Results` (probs); `predictor.stream(source, model)` yields them."""

    def prepare_image(self, image):
        """What validation does to one image: the short side to imgsz, then the centre crop."""
        imgsz = self.fixed_shape[0] if self.fixed_shape else self.args.imgsz
        return {"img": centre_crop(image, int(imgsz if isinstance(imgsz, int) else max(imgsz)))}

    def postprocess(self, output):
        """The model's output -> per image the class probabilities (nc,)."""
        probabilities = output[0] if isinstance(output, (list, tuple)) else output
        return probabilities.float()

    def construct_result(self, frame, sample, prediction):
        return Results(frame.image, frame.path, self.names, frame=frame.frame_index if frame.video else None,
                       probs=prediction.detach().clone())
