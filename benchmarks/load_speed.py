"""Training in company: the wall time of one run alone and of N runs started at once (a shared machine, a tuning
sweep), for yolotrain and the reference trainer, on the same data and arguments.

    python benchmarks/load_speed.py                                   # 3 at once, built-in data, yolo11n, imgsz 64
    python benchmarks/load_speed.py --runs 3 --imgsz 160 --epochs 1 --skip-reference
    python benchmarks/load_speed.py --env OMP_WAIT_POLICY=ACTIVE      # an environment setting for yolotrain's runs

Every run is its own process started from the command line (`python -m yolotrain train ...`, the reference's
`YOLO(...).train(...)`), with the environment of this script: no thread setting is added on either side, so each
trainer's own defaults are what is measured. Printed: the wall time of each run, alone and together.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

DEFAULT_REFERENCE_PYTHON = "/work/shared/anchor/ultralytics-python"

REFERENCE_CHILD = textwrap.dedent(
    """
    import json, sys
    from ultralytics import YOLO
    overrides = json.loads(sys.argv[1])
    YOLO(overrides.pop("model")).train(**overrides)
    """
)


def yolotrain_command(args, project, name):
    settings = dict(model=args.model, data=args.data, imgsz=args.imgsz, epochs=args.epochs, batch=args.batch,
                    workers=args.workers, val=False, plots=False, project=project, name=name, exist_ok=True)
    return [sys.executable, "-m", "yolotrain", "train", *(f"{k}={v}" for k, v in settings.items())]


def reference_command(args, project, name):
    model = args.reference_model or args.model.replace("yolo-", "yolov8")
    settings = dict(model=model, data=args.data, imgsz=args.imgsz, epochs=args.epochs, batch=args.batch,
                    workers=args.workers, val=False, plots=False, project=project, name=name, exist_ok=True,
                    device="cpu", amp=True)
    return [args.reference_python, "-c", REFERENCE_CHILD, json.dumps(settings)]


def run_together(commands, env):
    """Start every command at once; return each one's wall time in seconds (None where it failed)."""
    began = time.perf_counter()
    processes = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
                 for c in commands]
    times = []
    for process in processes:
        _, errors = process.communicate()
        ok = process.returncode == 0
        times.append(time.perf_counter() - began if ok else None)
        if not ok:
            print(f"a run failed (exit code {process.returncode}): {errors[-1500:]}", file=sys.stderr)
    return times


def show(label, times):
    figures = ", ".join("failed" if t is None else f"{t:.1f}" for t in times)
    print(f"{label:<34} {figures} s", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--data", default="", help="data yaml (default: the built-in shapes)")
    parser.add_argument("--model", default="yolo11n.yaml")
    parser.add_argument("--reference-model", default="", help="default: the same name (yolo-n -> yolov8n)")
    parser.add_argument("--imgsz", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for yolotrain's runs")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--reference-python", default=DEFAULT_REFERENCE_PYTHON)
    args = parser.parse_args()
    if not args.data:
        from yolotrain.data.builtin import builtin_data_yaml

        args.data = str(builtin_data_yaml())
    ours_env = {**os.environ, **dict(item.split("=", 1) for item in args.env)}
    print(f"{args.model}, {args.data}, imgsz {args.imgsz}, batch {args.batch}, {args.epochs} epoch(s), "
          f"workers {args.workers}, {os.cpu_count()} CPUs; extra environment: {args.env or 'none'}", flush=True)
    sides = [("yolotrain", yolotrain_command, ours_env)]
    if not args.skip_reference:
        sides.append(("reference", reference_command, dict(os.environ)))
    with tempfile.TemporaryDirectory() as project:
        for label, command, env in sides:
            show(f"{label} alone", run_together([command(args, project, f"{label}-alone")], env))
            together = [command(args, project, f"{label}-{i}") for i in range(args.runs)]
            show(f"{label}, {args.runs} at once", run_together(together, env))


if __name__ == "__main__":
    sys.exit(main())
