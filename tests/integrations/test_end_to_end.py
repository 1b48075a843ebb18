"""A real short training run synced to a real MLflow server through a failing proxy."""

import pytest
import torch

from yolotrain.integrations import add_integration_callbacks
from yolotrain.integrations.remote import PENDING_FILE, sync_run
from yolotrain.tasks.detect.train import DetectionTrainer
from yolotrain.utils.checkpoint import load_checkpoint

TINY = dict(model="yolo-n.yaml", epochs=2, imgsz=64, batch=4, workers=0, plots=False, fraction=0.25, seed=3)


def train(project, name, **extra):
    trainer = DetectionTrainer(overrides={**TINY, "project": str(project), "name": name, **extra})
    add_integration_callbacks(trainer)  # idempotent: the trainer's own call then adds nothing
    trainer.train()
    return trainer


@pytest.mark.slow
def test_training_with_a_failing_server_matches_offline_and_syncs_later(mlflow_server, proxy, tmp_path):
    torch.set_num_threads(1)
    offline = train(tmp_path / "proj", "offline")
    proxy.mode = "500"
    synced = train(tmp_path / "proj", "remote", remote=proxy.url, remote_final_timeout=1.0,
                   remote_metrics_period=0.01, remote_timeout=5.0)

    expected, got = load_checkpoint(offline.last)["model"], load_checkpoint(synced.last)["model"]
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert (synced.save_dir / PENDING_FILE).exists()

    proxy.mode = "forward"
    sync_run(synced.save_dir)
    run = mlflow_server.run_by_name("proj", "remote")
    assert run["info"]["status"] == "FINISHED"
    steps = [m["step"] for m in mlflow_server.history(run["info"]["run_id"], "train/box_loss")]
    assert steps == [1, 2]
    assert "weights/best.pt" in mlflow_server.artifacts(run["info"]["run_id"], "weights")
