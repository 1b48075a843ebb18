"""Validation during distributed training: each of 2 gloo processes validates its own share of the val set and the
gathered statistics give exactly the metrics (and val losses) of one process validating everything."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from yolotrain.cfg import get_cfg
from yolotrain.data.data_yaml import check_det_dataset
from yolotrain.data.dataset import YOLODataset
from yolotrain.data.loader import build_dataloader, is_exact_shard, unsharded
from yolotrain.data.samplers import ExactShardBatchSampler
from yolotrain.nn.model import DetectionModel
from yolotrain.tasks.detect.val import DetectionValidator

IMGSZ = 64
VAL_BATCH = 3  # 8 val images: batches of 3, 3, 2 -> rank 0 gets two, rank 1 one (uneven on purpose)
WORLD = 2


def build_model(model_yaml, nc):
    """A seeded untrained detector made to predict many scored boxes of about a shape's size: every side's distance
    distribution peaks at bin 2 (16 px from a stride-8 anchor) and every class scores well above conf."""
    torch.manual_seed(0)
    model = DetectionModel(model_yaml, nc=nc, verbose=False)
    reg_max = model.head.reg_max
    for box_branch, class_branch in zip(model.head.cv2, model.head.cv3):
        box_branch[-1].bias.data.zero_()
        box_branch[-1].bias.data.view(4, reg_max)[:, 2] = 6.0
        class_branch[-1].bias.data.fill_(1.0)
    model.args = get_cfg({})
    return model.eval()


def val_loader(data_yaml, rank, world_size):
    data = check_det_dataset(data_yaml)
    dataset = YOLODataset(data["val"], imgsz=IMGSZ, augment=False, hyp=get_cfg({}), rect=True, batch_size=VAL_BATCH,
                          stride=32, pad=0.5, data=data, prefix="val: ")  # fmt: skip
    return build_dataloader(dataset, VAL_BATCH, 0, shuffle=False, rank=rank, world_size=world_size, exact_shard=True)


def validate_as_trainer(model, loader, save_dir):
    """The validator in training mode, fed by a stand-in trainer (the EMA is the model itself)."""
    trainer = SimpleNamespace(
        ema=SimpleNamespace(module=model), model=model, device=torch.device("cpu"), save_dir=str(save_dir),
        epoch=0, epochs=1, stop=False, test_loader=loader, _wait_group=None,
        label_loss_items=lambda items, prefix: {f"{prefix}/{i}": float(v) for i, v in enumerate(items)},
    )  # fmt: skip
    validator = DetectionValidator(loader, save_dir=save_dir, args={"plots": False, "imgsz": IMGSZ})
    return validator(trainer=trainer), validator


def _worker(rank, model_yaml, data_yaml, init_file, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        loader = val_loader(data_yaml, rank, WORLD)
        assert is_exact_shard(loader)
        metrics, validator = validate_as_trainer(build_model(model_yaml, 6), loader, Path(out_dir) / f"rank{rank}")
        result = {"metrics": metrics, "seen": validator.seen, "batches": len(loader)}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def test_exact_shard_covers_every_batch_once():
    shares = [list(ExactShardBatchSampler(8, 3, num_replicas=2, rank=r)) for r in range(2)]
    assert shares == [[[0, 1, 2], [6, 7]], [[3, 4, 5]]]
    assert sorted(i for share in shares for batch in share for i in batch) == list(range(8))
    assert list(ExactShardBatchSampler(2, 3, num_replicas=2, rank=1)) == []  # a rank may get nothing


def test_unsharded_loader_reads_the_whole_set(tiny_model_yaml, tiny_data):
    shard = val_loader(tiny_data, rank=1, world_size=2)
    full = unsharded(shard)
    assert len(shard) == 1 and len(full) == 3
    assert sum(len(batch["im_file"]) for batch in full) == 8


@pytest.mark.numeric
@pytest.mark.slow
def test_two_ranks_validate_their_shards_to_the_single_process_metrics(tiny_model_yaml, tiny_data, tmp_path):
    model, loader = build_model(tiny_model_yaml, 6), val_loader(tiny_data, -1, 1)
    expected, single = validate_as_trainer(model, loader, tmp_path / "single")
    assert single.seen == 8 and expected["metrics/mAP50(B)"] > 0  # a real comparison: detections do match labels

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(tiny_model_yaml, tiny_data, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [r["batches"] for r in results] == [2, 1]  # each rank read only its share
    for result in results:
        assert result["seen"] == 8
        assert result["metrics"] == expected  # every metric and val loss, exactly
