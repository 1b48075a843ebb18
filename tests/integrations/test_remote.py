"""Remote session against a real MLflow tracking server, with faults injected by a proxy."""

import json
import logging
import time

import psutil
import pytest
import torch

from yolotrain.errors import CfgError, YoloTrainError
from yolotrain.integrations import add_integration_callbacks
from yolotrain.integrations.remote import PENDING_FILE, sync_run

from .conftest import expected_metrics, fake_epoch, fake_training, make_fake_trainer

FAST = dict(remote_metrics_period=0.01, remote_ckpt_period=0.01, remote_heartbeat_period=300.0, remote_timeout=5.0,
            remote_final_timeout=20.0)
CHECKED_KEYS = ("metrics/mAP50-95_B", "train/box_loss", "lr/pg0", "val/box_loss")


def remote_trainer(tmp_path, uri, name, **overrides):
    settings = {**FAST, "epochs": 3, **overrides}
    return make_fake_trainer(tmp_path / "runs" / name, remote=uri, **settings)


def wait_until(condition, limit_s=30.0):
    deadline = time.monotonic() + limit_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def assert_each_epoch_once(server, run_id, epochs):
    """Every checked key has steps 1..epochs exactly once, in order, with the values the trainer reported."""
    for key in CHECKED_KEYS:
        history = server.history(run_id, key)
        assert [m["step"] for m in history] == list(range(1, epochs + 1)), key
    mAP = [m["value"] for m in server.history(run_id, "metrics/mAP50-95_B")]
    assert mAP == pytest.approx([expected_metrics(e)["metrics/mAP50-95(B)"] for e in range(epochs)])


def test_every_epoch_arrives_once_in_order_and_run_finishes(mlflow_server, tmp_path):
    trainer = remote_trainer(tmp_path, mlflow_server.url, "once", epochs=4)
    fake_training(trainer, 4)
    run = mlflow_server.run_by_name("runs", "once")
    assert run["info"]["status"] == "FINISHED"
    assert_each_epoch_once(mlflow_server, run["info"]["run_id"], 4)
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["epochs"] == "4" and params["remote"] == mlflow_server.url
    assert [m["step"] for m in mlflow_server.history(run["info"]["run_id"], "model/parameters")] == [1]
    assert not (trainer.save_dir / PENDING_FILE).exists()


def test_checkpoint_uploads_respect_the_rate_limit_and_final_model_arrives(mlflow_server, proxy, tmp_path):
    trainer = remote_trainer(tmp_path, proxy.url, "ratelimit", remote_ckpt_period=3600.0)
    fake_training(trainer, 3)
    run = mlflow_server.run_by_name("runs", "ratelimit")
    puts = [path for method, path, _ in proxy.requests if method == "PUT"]
    assert [p.rsplit("/", 1)[-1] for p in puts] == ["last.pt", "best.pt"]  # the first save, then the final model
    assert set(mlflow_server.artifacts(run["info"]["run_id"], "weights")) == {"weights/last.pt", "weights/best.pt"}
    uploaded_last = torch.load(mlflow_server.artifact_path(run, "weights/last.pt"), weights_only=True)
    assert uploaded_last["epoch"] == 0  # later saves were inside the period
    uploaded_best = mlflow_server.artifact_path(run, "weights/best.pt").read_bytes()
    assert uploaded_best == trainer.best.read_bytes()
    best_score = mlflow_server.history(run["info"]["run_id"], "best/mAP50-95_B")
    assert [m["value"] for m in best_score] == pytest.approx([expected_metrics(2)["metrics/mAP50-95(B)"]])


@pytest.mark.parametrize("fault", ["500", "429", "drop", "drop_after_forward"])
def test_faults_are_retried_without_duplicates(mlflow_server, proxy, tmp_path, fault):
    """Epoch 1 and 2 meet the fault; the server is back for epoch 3 and the end: all arrive exactly once."""
    proxy.retry_after = 0

    def switch(epoch):
        proxy.mode = fault if epoch == 0 else proxy.mode
        if epoch == 1:
            wait_until(lambda: any(mode == fault for _, _, mode in proxy.requests))  # the worker met the fault
            proxy.mode = "forward"

    trainer = remote_trainer(tmp_path, proxy.url, f"fault{fault}")
    fake_training(trainer, 3, between_epochs=switch)
    assert any(mode == fault for _, _, mode in proxy.requests)
    run = mlflow_server.run_by_name("runs", f"fault{fault}")
    assert run["info"]["status"] == "FINISHED"
    assert_each_epoch_once(mlflow_server, run["info"]["run_id"], 3)


def test_server_down_until_the_end_leaves_a_pending_file_that_sync_sends(mlflow_server, proxy, tmp_path, caplog):
    proxy.mode = "500"
    trainer = remote_trainer(tmp_path, proxy.url, "offline", remote_final_timeout=1.0)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="yolotrain"):
        fake_training(trainer, 3)
    assert time.monotonic() - started < 30  # bounded: the final flush gives up after remote_final_timeout
    pending = json.loads((trainer.save_dir / PENDING_FILE).read_text())
    assert pending["status"] == "FINISHED" and pending["batches"]
    assert f"yolotrain sync {trainer.save_dir}" in caplog.text

    proxy.mode = "forward"
    summary = sync_run(trainer.save_dir)
    assert summary["status"] == "FINISHED" and summary["artifacts"] == 2
    assert not (trainer.save_dir / PENDING_FILE).exists()
    run = mlflow_server.run_by_name("runs", "offline")
    assert run["info"]["status"] == "FINISHED"
    assert_each_epoch_once(mlflow_server, run["info"]["run_id"], 3)
    assert set(mlflow_server.artifacts(run["info"]["run_id"], "weights")) == {"weights/last.pt", "weights/best.pt"}


def test_sync_failure_is_one_line_and_keeps_the_file(mlflow_server, proxy, tmp_path):
    proxy.mode = "500"
    trainer = remote_trainer(tmp_path, proxy.url, "stilldown", remote_final_timeout=0.5)
    fake_training(trainer, 1)
    with pytest.raises(YoloTrainError) as error:
        sync_run(trainer.save_dir, timeout=2.0)
    assert "\n" not in str(error.value) and "HTTP 500" in str(error.value)
    assert (trainer.save_dir / PENDING_FILE).exists()
    with pytest.raises(YoloTrainError, match="nothing to sync"):
        sync_run(tmp_path / "no-such-run")


def test_a_crash_ends_the_remote_run_failed(mlflow_server, tmp_path):
    trainer = remote_trainer(tmp_path, mlflow_server.url, "crash")
    with pytest.raises(RuntimeError, match="simulated crash"):
        fake_training(trainer, 3, fail_at=2)
    run = mlflow_server.run_by_name("runs", "crash")
    assert run["info"]["status"] == "FAILED"
    assert [m["step"] for m in mlflow_server.history(run["info"]["run_id"], "train/box_loss")] == [1, 2]


def test_credentials_never_reach_the_run_folder_or_the_logs(mlflow_server, proxy, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("YOLOTRAIN_REMOTE_TOKEN", "secret-xyz")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pass-uvw")
    seen_auth = []
    original_forward = proxy.forward

    def recording_forward(method, path, body, headers):
        seen_auth.append(headers.get("Authorization"))
        return original_forward(method, path, body, headers)

    proxy.forward = recording_forward

    def go_down(epoch):  # after some requests went through, so the pending file is written too
        if epoch == 1:
            wait_until(lambda: len(seen_auth) >= 2)
            proxy.mode = "500"

    trainer = remote_trainer(tmp_path, proxy.url, "secret", remote_final_timeout=0.5)
    with caplog.at_level(logging.DEBUG):
        fake_training(trainer, 3, between_epochs=go_down)
    assert seen_auth and set(seen_auth) == {"Bearer secret-xyz"}
    assert (trainer.save_dir / PENDING_FILE).exists()
    files = [p for p in trainer.save_dir.rglob("*") if p.is_file()]
    for path in files:
        data = path.read_bytes()
        assert b"secret-xyz" not in data and b"pass-uvw" not in data, path
    assert "secret-xyz" not in caplog.text and "pass-uvw" not in caplog.text


def test_uri_with_credentials_is_refused(tmp_path):
    trainer = make_fake_trainer(tmp_path / "runs" / "creds", remote="http://bob:hunter2@127.0.0.1:1")
    with pytest.raises(CfgError) as error:
        add_integration_callbacks(trainer)
    assert "YOLOTRAIN_REMOTE_TOKEN" in str(error.value) and "hunter2" not in str(error.value)


IDLE_S = 3.0
MAX_WAKEUPS_PER_S = 10


def thread_cpu_seconds(thread):
    """User + system CPU time the OS has charged to `thread` so far."""
    times = {t.id: t.user_time + t.system_time for t in psutil.Process().threads()}
    return times[thread.native_id]


@pytest.mark.parametrize("fault", ["forward", "slow", "500", "drop"])
def test_an_idle_worker_sleeps_whatever_the_server_does(mlflow_server, proxy, tmp_path, fault):
    """Between epochs nothing is queued: the worker must sleep, not spin beside the training thread."""
    trainer = remote_trainer(tmp_path, proxy.url, f"idle{fault}", remote_metrics_period=0.2,
                             remote_heartbeat_period=1.0, remote_final_timeout=20.0)
    add_integration_callbacks(trainer)
    (sync,) = {fn.__self__ for fn in trainer.callbacks.get("teardown")}
    trainer.run_callbacks("on_pretrain_routine_end")
    fake_epoch(trainer, 0)
    session = sync.session
    wait_until(lambda: not session._batches and not session._metrics and not session._artifacts)
    proxy.mode, proxy.delay = fault, 2.0
    wakeups, cpu = session.wakeups, thread_cpu_seconds(session._thread)
    time.sleep(IDLE_S)
    idle_wakeups, idle_cpu = session.wakeups - wakeups, thread_cpu_seconds(session._thread) - cpu
    proxy.mode = "forward"
    trainer.run_callbacks("on_train_end")
    trainer.run_callbacks("teardown")

    assert idle_wakeups < MAX_WAKEUPS_PER_S * IDLE_S, f"{idle_wakeups} wake-ups in {IDLE_S} s of idle training"
    assert idle_cpu < 0.1 * IDLE_S, f"the idle worker used {idle_cpu:.2f} s of CPU in {IDLE_S} s"
    run = mlflow_server.run_by_name("runs", f"idle{fault}")
    assert run["info"]["status"] == "FINISHED"
    assert_each_epoch_once(mlflow_server, run["info"]["run_id"], 1)
