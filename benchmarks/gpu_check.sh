#!/usr/bin/env bash
# The checks that need a GPU, in one run of under 8 minutes on one GPU (run it whenever a GPU is at hand; no test
# ever needs one):
#   1. CUDA AMP training: a short run whose loss is finite and falls
#   2. training speed at 640 against the compute floor (and the reference where its venv exists)
#   3. device-side augmentation: its tests against the CPU pipeline, and its speed
#   4. autobatch: batch=-1 measures a batch on the GPU
#   5. NCCL with 2 processes, where 2 GPUs exist
# Every figure goes to benchmarks/RESULTS.md under a dated heading naming the GPU.
#   usage: bash benchmarks/gpu_check.sh [PYTHON]        (default: python)
set -uo pipefail
cd "$(dirname "$0")/.."
python=${1:-python}
results=benchmarks/RESULTS.md
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
report="$work/report.md"

gpu=$("$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))") || {
  echo "gpu_check: no CUDA device visible to $python"; exit 1; }
gpus=$("$python" -c "import torch; print(torch.cuda.device_count())")
echo "## $(date -u +%F): $gpu (x$gpus), torch $("$python" -c 'import torch; print(torch.__version__)')" > "$report"
echo >> "$report"

step() {  # step TITLE SECONDS COMMAND...: run with a time limit, keep the last lines of its output in the report
  local title=$1 limit=$2; shift 2
  echo "== $title"
  local began=$SECONDS
  timeout "$limit" "$@" > "$work/out.txt" 2>&1
  local code=$?
  tail -n 25 "$work/out.txt"
  { echo "### $title (exit $code, $((SECONDS - began)) s)"; echo; echo '```'; echo "$*"; tail -n 12 "$work/out.txt"; echo '```'; echo; } >> "$report"
}

step "CUDA AMP training: finite, falling loss" 120 "$python" - "$work" <<'EOF'
import csv, math, sys
from yolotrain import YOLO
project = sys.argv[1]
YOLO("yolo-n.yaml").train(epochs=4, imgsz=320, batch=32, device=0, amp=True, project=project, name="amp", plots=False)
rows = list(csv.DictReader(open(f"{project}/amp/results.csv")))
losses = [sum(float(r[k]) for k in r if k.strip().startswith("train/")) for r in rows]
print("train loss per epoch:", [round(x, 4) for x in losses])
assert all(math.isfinite(x) for x in losses), "a non-finite loss"
assert losses[-1] < losses[0], "the loss did not fall"
print("OK")
EOF

reference_flag=--skip-reference
[ -x "$(cat /tmp/ultralytics-venv.path 2>/dev/null || echo /tmp/ultralytics-venv)/bin/python" ] && reference_flag=
step "training speed at 640 (AMP)" 240 "$python" benchmarks/train_speed.py --device 0 --amp --imgsz 640 --batch 32 \
  --epochs 2 $reference_flag --data "${GPU_CHECK_DATA:-/work/shared/datasets/coco128/data.yaml}"

step "device-side augmentation: tests" 120 "$python" -m pytest -q -p no:cacheprovider tests/data/test_device_augment.py \
  tests/engine/test_step_sync.py
step "device-side augmentation: speed" 60 "$python" benchmarks/augment_speed.py --device cuda

step "autobatch" 60 "$python" -m yolotrain train batch=-1 epochs=1 imgsz=640 device=0 project="$work" name=autobatch \
  plots=False val=False

if [ "$gpus" -ge 2 ]; then
  step "NCCL, 2 processes" 120 "$python" -m torch.distributed.run --standalone --nproc_per_node 2 -m yolotrain train \
    device=0,1 epochs=2 imgsz=320 batch=32 project="$work" name=nccl plots=False
else
  echo "### NCCL, 2 processes: not run (1 GPU)" >> "$report"; echo >> "$report"
fi

# The new section goes above the earlier dates (before the first "## " heading).
awk -v report="$report" '/^## / && !done { while ((getline line < report) > 0) print line; done = 1 } { print }' \
  "$results" > "$work/results.md" && cp "$work/results.md" "$results"
echo "gpu_check: figures added to $results"
