"""Weights & Biases (offline run files) and DVCLive (its local files), driven by the trainer's events."""

import json
import time

import cv2
import numpy as np
import pytest
import yaml

from .conftest import expected_metrics, fake_training, make_fake_trainer

LOG_BLOCK = 32768  # the W&B run file is a LevelDB-style log: 32 KiB blocks of checksummed chunks
LOG_FILE_HEADER = 7  # ":W&B", a 2-byte magic and a version byte
CHUNK_HEADER = 7  # crc32 (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path):
    """Every complete record of a `.wandb` run file, as wandb's protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2

    data, position, pending, records = path.read_bytes(), LOG_FILE_HEADER, b"", []
    assert data.startswith(b":W&B")
    while position + CHUNK_HEADER <= len(data):
        left_in_block = LOG_BLOCK - position % LOG_BLOCK
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        if left_in_block < CHUNK_HEADER or (kind == 0 and length == 0):  # block padding
            position += left_in_block
            continue
        if position + CHUNK_HEADER + length > len(data):  # a tail still being written: read it next time
            break
        chunk = data[position + CHUNK_HEADER : position + CHUNK_HEADER + length]
        position += CHUNK_HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def finished_run_records(save_dir, limit_s=30.0):
    """The records of the run's `.wandb` file once its exit record is on disk: W&B's service process writes the
    file and may flush its tail a moment after `run.finish()` has returned."""
    deadline = time.monotonic() + limit_s
    while True:
        run_files = list((save_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(run_files) <= 1, run_files
        records = wandb_records(run_files[0]) if run_files else []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            assert run_files, f"no W&B run file under {save_dir / 'wandb'}"
            return records
        time.sleep(0.1)


def write_plot(save_dir):
    cv2.imwrite(str(save_dir / "results.png"), np.full((8, 8, 3), 200, np.uint8))


def test_wandb_offline_run_has_config_every_epoch_the_plots_and_the_model(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    trainer = make_fake_trainer(tmp_path / "proj" / "wb", wandb=True, epochs=3, lr0=0.02)
    write_plot(trainer.save_dir)
    fake_training(trainer, 3)

    records = finished_run_records(trainer.save_dir)
    by_kind = {}
    for record in records:
        by_kind.setdefault(record.WhichOneof("record_type"), []).append(record)
    (run,) = by_kind["run"]
    assert run.run.display_name == "wb" and run.run.project == "proj"
    config = {item.key: json.loads(item.value_json) for item in run.run.config.update}
    assert config["lr0"] == 0.02 and config["epochs"] == 3

    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in by_kind["history"]]
    epochs = [h for h in history if "metrics/mAP50-95(B)" in h]
    assert [h["_step"] for h in epochs] == [1, 2, 3]
    assert [h["metrics/mAP50-95(B)"] for h in epochs] == pytest.approx(
        [expected_metrics(e)["metrics/mAP50-95(B)"] for e in range(3)])
    assert all("train/box_loss" in h and "lr/pg0" in h for h in epochs)
    assert any(h.get("results/_type") == "image-file" for h in history)  # the plot, as an image

    (artifact,) = by_kind["artifact"]
    assert artifact.artifact.type == "model"
    assert [entry.path for entry in artifact.artifact.manifest.contents] == ["best.pt"]
    (exit_record,) = by_kind["exit"]
    assert exit_record.exit.exit_code == 0


def test_wandb_run_of_a_crashed_training_exits_failed(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    trainer = make_fake_trainer(tmp_path / "proj" / "wbcrash", wandb=True, epochs=3)
    with pytest.raises(RuntimeError):
        fake_training(trainer, 3, fail_at=1)
    (exit_record,) = [r for r in finished_run_records(trainer.save_dir) if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit.exit_code == 1


def read_tsv(path):
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    return [(int(step), float(value)) for step, value in rows[1:]]


def test_dvclive_writes_params_metrics_plots_and_tracks_the_model_in_a_dvc_repo(tmp_path, monkeypatch):
    pytest.importorskip("dvclive")
    from dvc.repo import Repo

    Repo.init(str(tmp_path), no_scm=True)
    monkeypatch.chdir(tmp_path)  # DVCLive finds the repository from the working folder, as `dvc` does
    trainer = make_fake_trainer(tmp_path / "proj" / "dv", dvclive=True, epochs=3, lr0=0.02)
    write_plot(trainer.save_dir)
    fake_training(trainer, 3)

    live_dir = trainer.save_dir / "dvclive"
    params = yaml.safe_load((live_dir / "params.yaml").read_text())
    assert params["lr0"] == 0.02 and params["epochs"] == 3
    expected = [(e + 1, pytest.approx(expected_metrics(e)["metrics/mAP50-95(B)"])) for e in range(3)]
    assert read_tsv(live_dir / "plots" / "metrics" / "metrics" / "mAP50-95(B).tsv") == expected
    assert [step for step, _ in read_tsv(live_dir / "plots" / "metrics" / "train" / "box_loss.tsv")] == [1, 2, 3]
    summary = json.loads((live_dir / "metrics.json").read_text())
    assert summary["metrics"]["mAP50-95(B)"] == pytest.approx(expected_metrics(2)["metrics/mAP50-95(B)"])
    assert (live_dir / "plots" / "images" / "results.png").exists()
    assert (trainer.save_dir / "weights" / "best.pt.dvc").exists()  # tracked by DVC
    artifacts = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["artifacts"]  # the repository's dvc.yaml
    assert artifacts["best"]["type"] == "model" and artifacts["best"]["path"].endswith("weights/best.pt")
