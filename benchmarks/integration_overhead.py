"""What each integration costs a training run: epoch time with none, TensorBoard, MLflow (local store), W&B
(offline), DVCLive, and remote sync against a healthy MLflow server, one answering after 2 s, and a dead address.

    python benchmarks/integration_overhead.py [--epochs 3] [--imgsz 96] [--batch 8] [--fraction 1.0] [--repeats 2]

Every case is the same short training on the built-in dataset (same seed, workers=0, plots=False). The MLflow
server runs on loopback (`mlflow server`, started here); the slow server is a proxy in front of it that waits 2 s
before forwarding each request. Prints, for each case, the time of the first epoch (train + validation, from the
trainer's own events; it also carries each tracker's one-off start: its store, service process or graph trace
run on the tracker's worker beside training), the mean of the later epochs (the steady cost), and the whole run
(with the bounded final flush), each as a ratio to the run without integrations; the cases run in turn,
`--repeats` rounds, and each figure is the median over the rounds. Goal: epoch ratios <= 1.05.
Integrations whose package is not installed are skipped.
"""

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' MLflow server and fault proxy

from tests.integrations.conftest import FaultProxy, MlflowServer, free_port  # noqa: E402
from yolotrain.tasks.detect.train import DetectionTrainer  # noqa: E402
from yolotrain.utils.log import setup_logging  # noqa: E402


def timed_training(project, name, settings, **integration):
    """([seconds of each epoch], whole-run seconds) of one training with `integration` arguments."""
    starts, epoch_seconds = {}, []
    trainer = DetectionTrainer(overrides={**settings, "project": str(project), "name": name, **integration})
    trainer.add_callback("on_train_epoch_start", lambda t: starts.update(epoch=time.perf_counter()))
    trainer.add_callback("on_fit_epoch_end", lambda t: epoch_seconds.append(time.perf_counter() - starts["epoch"]))
    started = time.perf_counter()
    trainer.train()
    return epoch_seconds, time.perf_counter() - started


def cases(server, slow_proxy):
    """(label, training arguments, python package needed or None), in the order they run."""
    remote = dict(remote_metrics_period=3.0, remote_final_timeout=10.0)
    return [
        ("none", {}, None),
        ("tensorboard", {"tensorboard": True}, "tensorboard"),
        ("mlflow (local store)", {"mlflow": True}, "mlflow"),
        ("wandb (offline)", {"wandb": True}, "wandb"),
        ("dvclive", {"dvclive": True}, "dvclive"),
        ("remote, healthy server", {"remote": server.url, **remote}, None),
        ("remote, server answers after 2 s", {"remote": slow_proxy.url, **remote}, None),
        ("remote, dead address", {"remote": f"http://127.0.0.1:{free_port()}", **remote}, None),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--imgsz", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--fraction", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2)
    options = parser.parse_args()
    settings = dict(model="yolo-n.yaml", epochs=options.epochs, imgsz=options.imgsz, batch=options.batch,
                    workers=0, plots=False, seed=0, fraction=options.fraction, verbose=False)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    setup_logging(verbose=False)

    with tempfile.TemporaryDirectory(prefix="yolotrain-overhead-") as folder:
        root = Path(folder)
        os.chdir(root)  # DVCLive runs `dvc init` in the enclosing git repository, which must not be this project
        (root / "server").mkdir()
        server = MlflowServer(root / "server")
        server.start()
        slow_proxy = FaultProxy(server.port)
        slow_proxy.mode, slow_proxy.delay = "slow", 2.0
        slow_proxy.thread.start()
        try:
            timed_training(root / "warmup", "warmup", {**settings, "epochs": 1, "fraction": 0.1})  # caches, imports
            runs = {}  # label -> [(first epoch s, later epochs s, run s)] over the rounds
            for round_index in range(options.repeats):
                for label, integration, package in cases(server, slow_proxy):
                    if package and importlib.util.find_spec(package) is None:
                        print(f"{label:34s} skipped ({package} is not installed)")
                        continue
                    name = f"r{round_index}-case{len(runs.get(label, []))}-{len(runs)}"
                    epochs_s, run_s = timed_training(root / "runs", name, settings, **integration)
                    later = epochs_s[1:] or epochs_s
                    runs.setdefault(label, []).append((epochs_s[0], statistics.mean(later), run_s))
                    print(f"{label:34s} epochs {' '.join(f'{s:.2f}' for s in epochs_s)} s   run {run_s:.2f} s",
                          flush=True)
        finally:
            slow_proxy.server.shutdown()
            server.stop()

    medians = {label: [statistics.median(column) for column in zip(*figures)] for label, figures in runs.items()}
    base = medians["none"]
    print(f"\n{'integration':34s} {'epoch 1 s':>9s} {'ratio':>6s} {'later s':>8s} {'ratio':>6s} {'run s':>7s} {'ratio':>6s}")
    for label, figures in medians.items():
        print(f"{label:34s} " + " ".join(f"{value:{width}.2f} {value / ref:6.3f}"
                                           for value, ref, width in zip(figures, base, (9, 8, 7))))


if __name__ == "__main__":
    main()
