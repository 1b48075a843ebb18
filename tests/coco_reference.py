"""pycocotools' COCO evaluation of a results list against a ground truth given as a dict, for the tests that check
our metrics equal it."""

import contextlib
import io


def cocoeval_stats(ground_truth, detections, iou_type, keypoint_sigmas=None):
    """pycocotools' (mAP50-95, mAP50) of `detections` (a COCO results list) against `ground_truth` (a COCO dataset
    dict: images, annotations, categories) by `iou_type` ("bbox", "segm" or "keypoints" with `keypoint_sigmas`)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = ground_truth
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(detections), iou_type)
        if keypoint_sigmas is not None:
            evaluation.params.kpt_oks_sigmas = keypoint_sigmas
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation.stats[0], evaluation.stats[1]
