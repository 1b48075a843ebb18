"""Two trainings from one YOLO object log where each call says: integrations belong to the run, not the object."""

import pytest

from yolotrain import YOLO


def test_second_train_call_logs_to_its_own_integrations_only(train_overrides, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    overrides = {**train_overrides, "epochs": 1}
    del overrides["name"]
    model = YOLO(overrides.pop("model"))
    model.train(**overrides, name="first", tensorboard=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model.train(**overrides, name="second", tensorboard=False, mlflow=True)

    runs = tmp_path / "runs"
    assert list((runs / "first").glob("events.out.tfevents.*"))
    assert not list((runs / "second").glob("events.out.tfevents.*"))
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("runs").experiment_id])
    assert run.info.run_name == "second" and run.info.status == "FINISHED"
    # The object's own registry holds only what the user registered: nothing an integration added.
    assert all(not model.callbacks.get(event) for event in ("on_fit_epoch_end", "on_train_end", "teardown"))
