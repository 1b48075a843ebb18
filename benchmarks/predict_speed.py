"""Predict speed: images per second of yolotrain (PyTorch and onnxruntime, batch 1 and 16) and of the reference
trainer's predict, on the same weights and images, measured one after the other in one run.

    python benchmarks/predict_speed.py --weights REF.pt [--source DIR] [--imgsz 224] [--repeats 2]

REF.pt is a YOLOv8n checkpoint written by the reference trainer (see benchmarks/val_parity.py, which can train
one); its weights are copied key for key into a yolotrain checkpoint and exported to ONNX (dynamic). Source
default: the built-in dataset's val images. Each figure is the best of `--repeats` passes over all images, after
one warm-up pass; no files are written by either side (save=False), conf 0.25. Both read the folder (the
reference would run a list of files as one batch, whatever `batch` says).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nms_speed import best_time  # noqa: E402
from val_parity import REFERENCE_VAL, reference  # noqa: E402  (the reference's weights, dumped as tensors)

REFERENCE_PREDICT = r"""
import json, sys, time
from pathlib import Path
from ultralytics import YOLO
weights, source, imgsz, batch, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
model = YOLO(weights)
files = sorted(str(p) for p in Path(source).glob("*.jpg"))
# The folder, not the list of files: the reference runs a list as one batch whatever `batch` says.
run = lambda: [None for _ in model.predict(source, imgsz=imgsz, batch=batch, conf=0.25, device="cpu", save=False,
                                           verbose=False, stream=True)]
run()
times = []
for _ in range(repeats):
    started = time.perf_counter(); run(); times.append(time.perf_counter() - started)
print("RESULT " + json.dumps({"images": len(files), "seconds": min(times)}))
"""


def timed(fn, repeats):
    fn()  # warm-up: first-call allocations, lazy imports
    return best_time(fn, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", required=True, help="a YOLOv8n checkpoint written by the reference trainer")
    parser.add_argument("--source", help="folder of .jpg images (default: the built-in dataset's val images)")
    parser.add_argument("--imgsz", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2)
    options = parser.parse_args()
    from val_parity import yolotrain_checkpoint

    from yolotrain import YOLO
    from yolotrain.data.builtin import builtin_data_yaml

    source = Path(options.source or Path(builtin_data_yaml()).parent / "images" / "val")
    files = sorted(str(p) for p in source.glob("*.jpg"))
    work = Path(tempfile.mkdtemp(prefix="yolotrain-predict-speed-"))
    answer = reference(REFERENCE_VAL, Path(options.weights).resolve(), builtin_data_yaml(), options.imgsz, 16,
                       work / "ref")
    names = {int(k): v for k, v in json.loads(answer.split("RESULT ", 1)[1])["names"].items()}
    yolotrain_checkpoint(torch.load(work / "ref" / "state_dict.pt", weights_only=True), names, work / "best.pt")
    onnx_file = YOLO(str(work / "best.pt")).export(format="onnx", imgsz=options.imgsz, dynamic=True, verbose=False)

    rows = []
    for batch in (1, 16):
        out = reference(REFERENCE_PREDICT, Path(options.weights).resolve(), source, options.imgsz, batch,
                        options.repeats)
        result = json.loads(out.split("RESULT ", 1)[1])
        rows.append((f"reference, batch {batch}", result["images"] / result["seconds"]))
        for label, weights in (("yolotrain PyTorch", work / "best.pt"), ("yolotrain onnxruntime", onnx_file)):
            model = YOLO(str(weights))
            settings = dict(imgsz=options.imgsz, batch=batch, conf=0.25, device="cpu", save=False, verbose=False)
            seconds = timed(lambda: [None for _ in model.predict(str(source), stream=True, **settings)],
                            options.repeats)
            rows.append((f"{label}, batch {batch}", len(files) / seconds))
    print(f"{len(files)} images from {source}, imgsz {options.imgsz}, torch threads {torch.get_num_threads()}")
    reference_speed = {label.split(", ")[1]: speed for label, speed in rows if label.startswith("reference")}
    for label, speed in rows:
        ratio = speed / reference_speed[label.split(", ")[1]]
        print(f"{label:34s} {speed:7.1f} img/s   {ratio:5.2f}x the reference at the same batch")


if __name__ == "__main__":
    main()
