"""TensorBoard event files and MLflow runs in a local store, driven by the trainer's events; missing packages."""

import builtins
import logging

import cv2
import numpy as np
import pytest

from yolotrain.integrations import add_integration_callbacks

from .conftest import expected_metrics, fake_training, make_fake_trainer


def test_tensorboard_writes_every_column_as_scalars_and_the_plots(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = make_fake_trainer(tmp_path / "runs" / "tb", tensorboard=True, epochs=2)
    cv2.imwrite(str(trainer.save_dir / "results.png"), np.full((8, 8, 3), 200, np.uint8))
    fake_training(trainer, 2)
    events = list(trainer.save_dir.glob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(trainer.save_dir), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/box_loss", "metrics/mAP50-95(B)", "val/box_loss", "lr/pg0", "lr/pg1"} <= tags
    steps = [(e.step, e.value) for e in accumulator.Scalars("metrics/mAP50(B)")]
    assert steps == [(1, pytest.approx(expected_metrics(0)["metrics/mAP50(B)"])),
                     (2, pytest.approx(expected_metrics(1)["metrics/mAP50(B)"]))]
    assert "results" in accumulator.Tags()["images"]


def test_mlflow_local_store_run_finished_with_params_metrics_and_weights(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the env alone enables it
    trainer = make_fake_trainer(tmp_path / "proj" / "exp", epochs=2)
    fake_training(trainer, 2)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("proj")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "exp"
    assert run.data.params["epochs"] == "2"
    history = client.get_metric_history(run.info.run_id, "metrics/mAP50-95_B")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "weights")} == {"weights/best.pt", "weights/last.pt"}


def test_mlflow_run_of_a_crashed_training_ends_failed(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    trainer = make_fake_trainer(tmp_path / "proj" / "crash", epochs=2)
    with pytest.raises(RuntimeError):
        fake_training(trainer, 2, fail_at=1)
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("proj").experiment_id])
    assert run.info.status == "FAILED"


def test_missing_package_gives_one_clear_warning_and_no_callbacks(tmp_path, monkeypatch, caplog):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.split(".")[0] == "tensorboard":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    trainer = make_fake_trainer(tmp_path / "runs" / "x", tensorboard=True)
    with caplog.at_level(logging.WARNING, logger="yolotrain"):
        add_integration_callbacks(trainer)
    assert "tensorboard=True but the tensorboard package is not installed: pip install 'yolotrain[tensorboard]'" \
        in caplog.text
    assert trainer.callbacks.get("on_fit_epoch_end") == []


def test_adding_twice_registers_once(tmp_path):
    pytest.importorskip("tensorboard")
    trainer = make_fake_trainer(tmp_path / "runs" / "twice", tensorboard=True)
    add_integration_callbacks(trainer)
    add_integration_callbacks(trainer)
    assert len(trainer.callbacks.get("on_fit_epoch_end")) == 1
