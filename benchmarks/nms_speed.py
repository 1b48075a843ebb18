"""Seconds per batch of validation NMS (conf 0.001, IoU 0.7, max_det 300) on the yolo-n head's output, in the
worst case of early training: every class of every anchor scores above conf.

    python benchmarks/nms_speed.py [--batch 16] [--repeats 3]

Boxes come from an untrained yolo-n's forward pass on random images; class scores are set uniformly in
[0.002, 0.102], so every (anchor, class) pair is a candidate and `max_nms` caps each image. Prints the best of
`--repeats` timings for single- and multi-label NMS at a few image sizes and class counts.
"""

import argparse
import time

import torch

from yolotrain.nn.model import DetectionModel
from yolotrain.utils.nms import non_max_suppression, torchvision_nms

CASES = ((224, 6), (320, 80), (640, 80))  # (imgsz, classes)


def worst_case_prediction(imgsz, num_classes, batch):
    model = DetectionModel("yolo-n.yaml", nc=num_classes, verbose=False).eval()
    with torch.no_grad():
        prediction = model(torch.rand(batch, 3, imgsz, imgsz))[0]  # (B, 4 + nc, A)
    prediction[:, 4:] = torch.rand_like(prediction[:, 4:]) * 0.1 + 0.002
    return prediction


def best_time(fn, repeats):
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    torch.manual_seed(0)
    kernel = "torchvision" if torchvision_nms() else "pure torch"
    print(f"NMS kernel: {kernel}, torch threads: {torch.get_num_threads()}, batch {options.batch}")
    for imgsz, num_classes in CASES:
        prediction = worst_case_prediction(imgsz, num_classes, options.batch)
        candidates = prediction.shape[2] * num_classes
        for multi_label in (False, True):
            seconds = best_time(lambda: non_max_suppression(prediction, 0.001, 0.7, multi_label=multi_label),
                                options.repeats)
            print(f"imgsz {imgsz:4d}  classes {num_classes:3d}  {candidates:7d} pairs/image  "
                  f"multi_label={multi_label!s:5s}  {seconds:.3f} s/batch")


if __name__ == "__main__":
    main()
