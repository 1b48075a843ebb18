"""Fixtures: a real `mlflow server` on loopback, a fault-injecting proxy in front of it, and a fake trainer that
fires the trainer's events with the attributes the integrations read."""

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlencode

import pytest
import torch

from yolotrain.cfg import get_cfg
from yolotrain.engine.callbacks import Callbacks
from yolotrain.integrations import add_integration_callbacks

SERVER_START_TIMEOUT_S = 120


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url, process, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError("mlflow server did not become healthy")


class MlflowServer:
    """A real tracking server; `stop()`/`start()` simulate an outage on the same port and stores."""

    def __init__(self, root):
        self.root = Path(root)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self):
        command = [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"), "--serve-artifacts", "--workers", "1",
        ]
        log = open(self.root / "server.log", "ab")
        # No job runner: its idle pollers (half a dozen processes) would take a core from everything else.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, env=env)
        _wait_healthy(self.url, self.process, SERVER_START_TIMEOUT_S)

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(3)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    # ------------------------------------------------------------------ queries the tests use
    def get(self, api_path, **query):
        with urllib.request.urlopen(f"{self.url}{api_path}?{urlencode(query)}", timeout=10) as response:
            return json.loads(response.read())

    def post(self, path, payload):
        request = urllib.request.Request(
            f"{self.url}{path}", json.dumps(payload).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def run_by_name(self, experiment, run_name):
        experiment_id = self.get("/api/2.0/mlflow/experiments/get-by-name", experiment_name=experiment)[
            "experiment"]["experiment_id"]
        runs = self.post("/api/2.0/mlflow/runs/search", {
            "experiment_ids": [experiment_id], "filter": f"attributes.run_name = '{run_name}'"}).get("runs", [])
        assert len(runs) == 1, f"expected one run named {run_name}, found {len(runs)}"
        return runs[0]

    def history(self, run_id, key):
        metrics = self.get("/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key=key).get("metrics", [])
        return sorted(metrics, key=lambda m: (m["timestamp"], m.get("step", 0)))

    def artifacts(self, run_id, path=""):
        files = self.get("/api/2.0/mlflow/artifacts/list", run_id=run_id, path=path).get("files", [])
        return {f["path"]: f for f in files}

    def artifact_path(self, run, relative):
        root = run["info"]["artifact_uri"].split(":", 1)[1].strip("/")
        return self.root / "artifacts" / root / relative


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real MLflow tracking server for the whole session (it takes seconds to start)."""
    if shutil.which("mlflow") is None:
        pytest.skip("the mlflow package (with its server) is not installed")
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


class FaultProxy:
    """HTTP proxy on loopback; `mode` is "forward", "slow" (forward after `delay` seconds), "500", "429", "drop"
    (close before forwarding) or "drop_after_forward" (forward, then close without answering: the server applied
    it, the client can't know)."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.mode = "forward"
        self.delay = 2.0
        self.retry_after = 1
        self.requests = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                proxy.requests.append((self.command, self.path, proxy.mode))
                mode = proxy.mode
                if mode == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if mode in ("500", "429"):
                    self.send_response(int(mode))
                    if mode == "429":
                        self.send_header("Retry-After", str(proxy.retry_after))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if mode == "slow":
                    time.sleep(proxy.delay)
                status, headers, data = proxy.forward(self.command, self.path, body, self.headers)
                if mode == "drop_after_forward":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response(status)
                for key, value in headers:
                    if key.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (its timeout)
                    self.close_connection = True

            do_GET = do_POST = do_PUT = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def forward(self, method, path, body, headers):
        connection = http.client.HTTPConnection("127.0.0.1", self.target_port, timeout=30)
        try:
            forwarded = {k: v for k, v in headers.items() if k.lower() in ("content-type", "authorization")}
            connection.request(method, path, body=body, headers=forwarded)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        except OSError:
            return 502, [], b"upstream down"
        finally:
            connection.close()


@pytest.fixture
def proxy(mlflow_server):
    proxy = FaultProxy(mlflow_server.port)
    proxy.thread.start()
    yield proxy
    proxy.server.shutdown()
    proxy.server.server_close()


# ---------------------------------------------------------------------- a fake trainer
class TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


def make_fake_trainer(save_dir, **overrides):
    """A SimpleNamespace with the trainer attributes the integrations read."""
    save_dir = Path(save_dir)
    (save_dir / "weights").mkdir(parents=True, exist_ok=True)
    args = get_cfg({"project": str(save_dir.parent), "name": save_dir.name, **overrides})
    loss_names = ("box_loss", "cls_loss", "dfl_loss")

    def label_loss_items(loss_items=None, prefix="train"):
        keys = [f"{prefix}/{n}" for n in loss_names]
        return keys if loss_items is None else {k: float(v) for k, v in zip(keys, loss_items)}

    trainer = SimpleNamespace(
        args=args, epoch=0, epochs=args.epochs, model=TinyModel(), ema=None, save_dir=save_dir,
        last=save_dir / "weights" / "last.pt", best=save_dir / "weights" / "best.pt", metrics=None,
        fitness=None, best_fitness=None, tloss=None, lr={}, csv=save_dir / "results.csv", callbacks=Callbacks(),
        label_loss_items=label_loss_items, validator=SimpleNamespace(primary_metric="metrics/mAP50-95(B)"),
    )
    trainer.run_callbacks = lambda event: trainer.callbacks.run(event, trainer)
    return trainer


def expected_metrics(epoch):
    """The numbers the fake trainer reports for `epoch` (0-based): distinct per epoch and per key."""
    return {
        "metrics/precision(B)": 0.1 + epoch / 100,
        "metrics/mAP50(B)": 0.2 + epoch / 100,
        "metrics/mAP50-95(B)": 0.05 + epoch / 100,
        "val/box_loss": 2.0 - epoch / 10,
    }


def fake_epoch(trainer, epoch, save=True):
    """Fire one epoch's events as the trainer does: train, validate, save (on_model_save), on_fit_epoch_end."""
    trainer.epoch = epoch
    trainer.run_callbacks("on_train_epoch_start")
    trainer.tloss = torch.tensor([1.0, 2.0, 3.0]) / (epoch + 1)
    trainer.lr = {"lr/pg0": 0.01 / (epoch + 1), "lr/pg1": 0.02 / (epoch + 1)}
    trainer.run_callbacks("on_train_epoch_end")
    trainer.metrics = dict(expected_metrics(epoch))
    trainer.fitness = trainer.metrics["metrics/mAP50-95(B)"]
    trainer.best_fitness = max(trainer.best_fitness or 0.0, trainer.fitness)
    if save:
        torch.save({"epoch": epoch, "model": trainer.model.state_dict()}, trainer.last)
        if trainer.best_fitness == trainer.fitness:
            shutil.copyfile(trainer.last, trainer.best)
        trainer.run_callbacks("on_model_save")
    trainer.run_callbacks("on_fit_epoch_end")


def fake_training(trainer, epochs, between_epochs=None, fail_at=None):
    """The whole event sequence of `BaseTrainer.train` for `epochs` epochs; `fail_at` raises in that epoch."""
    add_integration_callbacks(trainer)
    try:
        trainer.run_callbacks("on_pretrain_routine_start")
        trainer.run_callbacks("on_pretrain_routine_end")
        trainer.run_callbacks("on_train_start")
        for epoch in range(epochs):
            if epoch == fail_at:
                raise RuntimeError("simulated crash")
            fake_epoch(trainer, epoch)
            if between_epochs:
                between_epochs(epoch)
        trainer.run_callbacks("on_train_end")
    finally:
        trainer.run_callbacks("teardown")
