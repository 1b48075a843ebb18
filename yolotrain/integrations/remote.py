"""Remote session: sync a run with an MLflow tracking server over its REST API, off the training thread.

Enabled with ``remote=http://host:port``. Credentials come from the environment only: ``YOLOTRAIN_REMOTE_TOKEN``
(sent as ``Authorization: Bearer``) or ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (basic auth); a
URI holding ``user:password@`` is refused, because the arguments are saved with the run.

A background worker sends queued metrics every ``remote_metrics_period`` seconds (log-batch, at most 1000 metrics a
call), the latest checkpoint at most every ``remote_ckpt_period`` seconds (through the server's artifact proxy,
``mlflow server --serve-artifacts``) and a ``heartbeat`` tag every ``remote_heartbeat_period`` seconds. Failures
(server down, 5xx, 429 with Retry-After) keep the queue and retry later with exponential backoff; training never
waits on the server except at the end, for at most ``remote_final_timeout`` seconds. What is still unsent then is
written to ``<run>/remote_pending.json`` and sent later by ``yolotrain sync <run>`` (`sync_run`).

Exactly once: a metric batch is fixed when first sent (same keys, steps, timestamps, values on every retry) and
leaves the queue only when the server acknowledges it. MLflow would store a re-sent batch twice, so after an
*ambiguous* failure (the request went out but no answer came back: timeout, dropped connection, 5xx from a
gateway) the batch is not re-sent blindly: its first metric is looked up with metrics/get-history and the batch
counts as acknowledged when the server already has it (a log-batch is stored in one transaction).
"""

import base64
import http.client
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote, urlencode, urlsplit

from yolotrain.errors import CfgError, YoloTrainError
from yolotrain.integrations.common import experiment_name, plain_params, safe_uri, sanitize_metric_name
from yolotrain.utils.checkpoint import save_atomic_text

LOGGER = logging.getLogger(__name__)

PENDING_FILE = "remote_pending.json"
METRICS_PER_CALL = 1000  # MLflow log-batch limits
PARAMS_PER_CALL = 100
MAX_PARAM_LENGTH = 6000
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 60.0
FINAL_BACKOFF_MAX_S = 5.0  # at the end the deadline is short: retry more often
SESSION_TAG = "yolotrain.session"  # finds the run again after an unanswered runs/create
TOKEN_ENV = "YOLOTRAIN_REMOTE_TOKEN"


class RemoteError(Exception):
    """A failed request. `retryable`: worth trying again; `ambiguous`: the server may have applied it."""

    def __init__(self, message, retryable=True, ambiguous=False, retry_after=None):
        super().__init__(message)
        self.retryable = retryable
        self.ambiguous = ambiguous
        self.retry_after = retry_after


def check_remote_uri(uri):
    """Return `uri` if usable as a remote; raise `CfgError` for a bad scheme or embedded credentials."""
    parts = urlsplit(str(uri))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CfgError(f"remote={safe_uri(uri)!r} is not an http(s) URI; expected e.g. remote=http://127.0.0.1:5000")
    if parts.username is not None or parts.password is not None:
        raise CfgError(
            f"remote={safe_uri(uri)!r} holds credentials, which would be saved with the run; remove them from the "
            f"URI and set {TOKEN_ENV} (or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD) instead"
        )
    return str(uri).rstrip("/")


def _auth_header():
    """The Authorization header from the environment (read per client, never stored in a file)."""
    token = os.environ.get(TOKEN_ENV)
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        encoded = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {encoded}"}
    return {}


def _retry_after_seconds(value):
    try:
        return max(float(value), 0.0)
    except (TypeError, ValueError):  # an HTTP date or garbage: fall back to our own backoff
        return None


class RemoteClient:
    """HTTP calls to the tracking server, with errors classified for retrying (standard library only)."""

    def __init__(self, uri, timeout=30.0):
        self.uri = check_remote_uri(uri)
        parts = urlsplit(self.uri)
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port
        self._prefix = parts.path.rstrip("/")
        self._headers = _auth_header()
        self.timeout = timeout

    def call(self, method, path, payload=None, query=None, body=None, timeout=None, headers=None):
        """Send one request; return the decoded JSON answer ({} when empty) or raise `RemoteError`."""
        url = self._prefix + path + (f"?{urlencode(query)}" if query else "")
        headers = {**self._headers, **(headers or {})}
        if payload is not None:
            body = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        connection = self._connect(timeout or self.timeout)
        try:
            try:
                connection.request(method, url, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as error:
                # The request (or part of it) went out: the server may or may not have applied it.
                raise RemoteError(f"{method} {path}: no answer ({type(error).__name__})", ambiguous=True) from None
        finally:
            connection.close()
        return self._decode(method, path, response, data)

    def _connect(self, timeout):
        kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        connection = kind(self._host, self._port, timeout=timeout)
        try:
            connection.connect()
        except OSError as error:  # nothing was sent: safe to retry anything
            connection.close()
            raise RemoteError(f"cannot connect to {self.uri} ({type(error).__name__})") from None
        return connection

    @staticmethod
    def _decode(method, path, response, data):
        status = response.status
        if status == 200:
            return json.loads(data) if data.strip() else {}
        message = f"{method} {path}: HTTP {status} {data[:200].decode(errors='replace')}"
        if status in (429, 503):  # refused before any work: retry, after Retry-After when given
            raise RemoteError(message, retry_after=_retry_after_seconds(response.getheader("Retry-After")))
        if status >= 500 or status == 408:
            raise RemoteError(message, ambiguous=status != 500)
        raise RemoteError(message, retryable=status in (401, 403, 404))  # 400: the request itself is invalid


class RemoteRun:
    """One run on the server: create/find it, log batches exactly once, upload artifacts, tags and status."""

    def __init__(self, client, experiment_name, run_name, params=None, run_id=None, experiment_id=None):
        self.client = client
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.params = dict(params or {})
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.session_id = uuid.uuid4().hex
        self._artifact_path = None
        self._create_ambiguous = False

    # ------------------------------------------------------------------ the run
    @property
    def ready(self):
        """True once the run exists on the server and its artifact location is known."""
        return self.run_id is not None and self._artifact_path is not None

    def ensure_run(self, timeout=None):
        """Create the run (and experiment) on first use, or reconnect to the known run id; log the params once."""
        if self.ready:
            return
        if self.run_id is not None:
            info = self.client.call("GET", "/api/2.0/mlflow/runs/get", query={"run_id": self.run_id}, timeout=timeout)
            self._set_run_info(info["run"]["info"])
            if info["run"]["info"].get("status") != "RUNNING":  # a resumed run: it is running again
                self.set_status("RUNNING", timeout)
            return
        self.experiment_id = self.experiment_id or self._experiment_id(timeout)
        info = self._find_created_run(timeout) if self._create_ambiguous else None
        if info is None:
            info = self._create_run(timeout)
        self._set_run_info(info)
        self._log_params(timeout)

    def _experiment_id(self, timeout):
        try:
            answer = self.client.call(
                "GET", "/api/2.0/mlflow/experiments/get-by-name",
                query={"experiment_name": self.experiment_name}, timeout=timeout,
            )
            return answer["experiment"]["experiment_id"]
        except RemoteError as error:
            if "RESOURCE_DOES_NOT_EXIST" not in str(error):
                raise
        answer = self.client.call(
            "POST", "/api/2.0/mlflow/experiments/create", {"name": self.experiment_name}, timeout=timeout
        )
        return answer["experiment_id"]

    def _create_run(self, timeout):
        payload = {
            "experiment_id": self.experiment_id,
            "run_name": self.run_name,
            "start_time": int(time.time() * 1000),
            "tags": [{"key": SESSION_TAG, "value": self.session_id}],
        }
        try:
            return self.client.call("POST", "/api/2.0/mlflow/runs/create", payload, timeout=timeout)["run"]["info"]
        except RemoteError as error:
            self._create_ambiguous = self._create_ambiguous or error.ambiguous
            raise

    def _find_created_run(self, timeout):
        """After an unanswered runs/create: the run it may have created, found by this session's tag."""
        payload = {"experiment_ids": [self.experiment_id], "filter": f"tags.`{SESSION_TAG}` = '{self.session_id}'"}
        runs = self.client.call("POST", "/api/2.0/mlflow/runs/search", payload, timeout=timeout).get("runs", [])
        return runs[0]["info"] if runs else None

    def _set_run_info(self, info):
        self.run_id = info["run_id"]
        self.experiment_id = info.get("experiment_id", self.experiment_id)
        artifact_uri = info.get("artifact_uri", "")
        # "mlflow-artifacts:/<exp>/<run>/artifacts" (or with a host): the path under the server's artifact proxy.
        if artifact_uri.startswith("mlflow-artifacts:"):
            path = artifact_uri.split(":", 1)[1]
            path = "/" + path.lstrip("/").split("/", 1)[1] if path.startswith("//") else path
            self._artifact_path = path.strip("/")
        else:
            self._artifact_path = ""  # the server does not proxy artifacts; uploads will fail with a clear message

    def _log_params(self, timeout):
        params = [{"key": k, "value": v[:MAX_PARAM_LENGTH]} for k, v in self.params.items()]
        for start in range(0, len(params), PARAMS_PER_CALL):
            chunk = params[start : start + PARAMS_PER_CALL]
            self.client.call("POST", "/api/2.0/mlflow/runs/log-batch", {"run_id": self.run_id, "params": chunk},
                             timeout=timeout)

    # ------------------------------------------------------------------ metrics
    def send_batch(self, batch, timeout=None):
        """Log one fixed batch exactly once. `batch` = {"metrics": [...], "ambiguous": bool}; on an ambiguous
        failure the flag is set, and the next attempt first checks whether the server already stored it."""
        if batch.get("ambiguous") and self._batch_stored(batch, timeout):
            return
        try:
            self.client.call("POST", "/api/2.0/mlflow/runs/log-batch",
                             {"run_id": self.run_id, "metrics": batch["metrics"]}, timeout=timeout)
        except RemoteError as error:
            batch["ambiguous"] = batch.get("ambiguous", False) or error.ambiguous
            raise

    def _batch_stored(self, batch, timeout):
        marker = batch["metrics"][0]
        query = {"run_id": self.run_id, "metric_key": marker["key"]}
        history = self.client.call("GET", "/api/2.0/mlflow/metrics/get-history", query=query, timeout=timeout)
        return any(
            int(m.get("step", 0)) == marker["step"] and int(m["timestamp"]) == marker["timestamp"]
            for m in history.get("metrics", [])
        )

    # ------------------------------------------------------------------ artifacts, tags, status
    def upload_artifact(self, local_path, artifact_path, timeout=None):
        """PUT a file through the server's artifact proxy (idempotent: a retry overwrites)."""
        if not self._artifact_path:
            raise RemoteError("the server does not serve artifacts (start it with --serve-artifacts)", retryable=False)
        path = f"/api/2.0/mlflow-artifacts/artifacts/{self._artifact_path}/{quote(artifact_path)}"
        # Streamed from the file with an explicit length: no chunked encoding, which some proxies refuse.
        headers = {"Content-Length": str(os.path.getsize(local_path)), "Content-Type": "application/octet-stream"}
        with open(local_path, "rb") as file:
            self.client.call("PUT", path, body=file, timeout=timeout, headers=headers)

    def set_tag(self, key, value, timeout=None):
        """Set one run tag (idempotent)."""
        payload = {"run_id": self.run_id, "key": key, "value": str(value)}
        self.client.call("POST", "/api/2.0/mlflow/runs/set-tag", payload, timeout=timeout)

    def set_status(self, status, timeout=None):
        """End the run with `status` ("FINISHED" or "FAILED")."""
        payload = {"run_id": self.run_id, "status": status}
        if status != "RUNNING":
            payload["end_time"] = int(time.time() * 1000)
        self.client.call("POST", "/api/2.0/mlflow/runs/update", payload, timeout=timeout)


def metric_entries(values, step, timestamp=None):
    """MLflow metric records for {name: value} at `step`, names sanitised, one shared timestamp (ms)."""
    timestamp = int(time.time() * 1000) if timestamp is None else timestamp
    return [{"key": sanitize_metric_name(k), "value": float(v), "timestamp": timestamp, "step": int(step)}
            for k, v in values.items()]


class RemoteSession:
    """The queue of metrics and checkpoints and the worker thread that sends them, on its timers."""

    def __init__(self, run, metrics_period, ckpt_period, heartbeat_period, timeout):
        self.run = run
        self.metrics_period = metrics_period
        self.ckpt_period = ckpt_period
        self.heartbeat_period = heartbeat_period
        self.timeout = timeout
        self._lock = threading.Condition()
        self._batches = []  # fixed batches, oldest first; the head may be in flight
        self._metrics = []  # entries not yet grouped into a batch
        self._artifacts = {}  # artifact path -> {"file": snapshot, "tags": {...}}
        self._status = None  # final status once closing
        self._status_sent = False
        self._deadline = None
        self._last_metrics_upload = float("-inf")
        self._last_heartbeat = float("-inf")
        self._retry_at = 0.0
        self._failures = 0
        self._last_warning = None
        self.wakeups = 0  # times the worker woke up to send something: a bounded, observable cost
        self._thread = None
        self._snapshot_dir = Path(tempfile.mkdtemp(prefix="yolotrain-remote-"))

    # ------------------------------------------------------------------ training-thread side
    def start(self):
        """Start the worker (daemon: an interpreter exit is never held up by the network)."""
        self._thread = threading.Thread(target=self._work, name="yolotrain-remote", daemon=True)
        self._thread.start()

    def queue_metrics(self, entries):
        """Queue metric records; the worker sends them when the metrics period has elapsed."""
        with self._lock:
            self._metrics.extend(entries)
            self._lock.notify()

    def queue_artifact(self, path, artifact_path, tags=None):
        """Snapshot `path` now (later saves must not race the upload) and queue it; a newer snapshot of the
        same artifact replaces one not yet sent."""
        snapshot = self._snapshot_dir / f"{uuid.uuid4().hex}{Path(path).suffix}"
        shutil.copyfile(path, snapshot)
        with self._lock:
            replaced = self._artifacts.get(artifact_path)
            self._artifacts[artifact_path] = {"file": snapshot, "tags": dict(tags or {}), "source": str(path)}
            self._lock.notify()
        if replaced:
            replaced["file"].unlink(missing_ok=True)

    def close(self, status, final_timeout):
        """Flush everything (retrying until `final_timeout` seconds have passed), set `status`, stop the worker.

        Returns what could not be sent: {"batches": [...], "artifacts": {...}, "status": str or None}.
        """
        with self._lock:
            self._status = status
            self._deadline = time.monotonic() + final_timeout
            self._retry_at = 0.0  # the end is worth an immediate try, whatever the backoff said
            self._failures = 0
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(final_timeout + 1.0)
        with self._lock:
            self._deadline = 0.0  # a worker still blocked in a request stops after it
            return self._leftovers(in_flight=self._thread is not None and self._thread.is_alive())

    def _leftovers(self, in_flight):
        batches = [dict(b) for b in self._batches] + self._group(self._metrics)
        if in_flight and batches:
            batches[0]["ambiguous"] = True  # it may be acknowledged after we stop waiting: verify before re-sending
        return {
            "batches": batches,
            "artifacts": {path: job["source"] for path, job in self._artifacts.items()},
            "status": None if self._status_sent else self._status,
        }

    def cleanup(self):
        """Remove the snapshots (call once the worker is done)."""
        shutil.rmtree(self._snapshot_dir, ignore_errors=True)

    # ------------------------------------------------------------------ worker side
    def _work(self):
        while True:
            with self._lock:
                while not self._finished() and (delay := self._seconds_until_due()) > 0:
                    # Woken by queue_*/close (notify) or when the earliest due job's time comes; never sooner.
                    self._lock.wait(timeout=None if delay == math.inf else delay)
                if self._finished():
                    return
            self.wakeups += 1
            try:
                self._send_due()
                self._failures = 0
            except RemoteError as error:
                self._on_failure(error)
            except Exception as error:  # a bug or a bad answer must not kill the worker silently
                self._on_failure(RemoteError(f"{type(error).__name__}: {error}"))

    def _finished(self):
        closing = self._deadline is not None
        if closing and time.monotonic() >= self._deadline:
            return True
        return closing and self._status_sent

    def _seconds_until_due(self):
        """Seconds until the worker has something to send (0: now; inf: nothing until notified). Call locked.

        Only work that exists counts: an elapsed metrics period with no metrics queued is not a reason to wake,
        which would otherwise turn the worker into a loop that spins on the GIL beside the training thread.
        """
        now = time.monotonic()
        if self._deadline is not None:  # closing: everything left is due, as soon as the backoff allows
            return min(self._retry_at, self._deadline) - now
        due = math.inf
        if not self.run.ready:
            due = now
        if self._metrics or self._batches:
            due = min(due, self._last_metrics_upload + self.metrics_period)
        if self._artifacts:
            due = now  # checkpoint uploads are rate-limited where they are queued (RemoteSync.on_model_save)
        due = min(due, self._last_heartbeat + self.heartbeat_period)
        return max(due, self._retry_at) - now

    def _request_timeout(self):
        """Seconds the next request may take; past the final deadline no request may start (what is left then
        is written to the pending file, and must not also reach the server)."""
        if self._deadline is None:
            return self.timeout
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise RemoteError("final timeout reached")
        return max(min(self.timeout, remaining), 0.1)

    def _send_due(self):
        """Send whatever is due now, in order: run, metrics, checkpoints, heartbeat, then the final status."""
        self.run.ensure_run(self._request_timeout())
        closing = self._deadline is not None
        now = time.monotonic()
        if closing or now - self._last_metrics_upload >= self.metrics_period:
            self._send_metrics()
        self._send_artifacts()
        if not closing and now - self._last_heartbeat >= self.heartbeat_period:
            self.run.set_tag("heartbeat", datetime.now(timezone.utc).isoformat(), self._request_timeout())
            self._last_heartbeat = now
        if closing:
            with self._lock:
                done = not (self._batches or self._metrics or self._artifacts)
            if done and not self._status_sent:
                self.run.set_status(self._status, self._request_timeout())
                self._status_sent = True

    def _send_metrics(self):
        with self._lock:
            self._batches.extend(self._group(self._metrics))
            self._metrics = []
            sent_any = bool(self._batches)
        while True:
            with self._lock:
                if not self._batches:
                    break
                batch = self._batches[0]
            try:
                self.run.send_batch(batch, self._request_timeout())
            except RemoteError as error:
                if error.retryable:
                    raise
                LOGGER.warning(f"remote: a metric batch was refused and dropped ({error})")
            with self._lock:
                self._batches.pop(0)  # acknowledged (or refused for good): never sent again
        if sent_any:
            self._last_metrics_upload = time.monotonic()

    @staticmethod
    def _group(entries):
        return [{"metrics": entries[i : i + METRICS_PER_CALL], "ambiguous": False}
                for i in range(0, len(entries), METRICS_PER_CALL)]

    def _send_artifacts(self):
        while True:
            with self._lock:
                if not self._artifacts:
                    return
                artifact_path, job = next(iter(self._artifacts.items()))
            try:
                self.run.upload_artifact(job["file"], artifact_path, self._request_timeout())
                for key, value in job["tags"].items():
                    self.run.set_tag(key, value, self._request_timeout())
            except RemoteError as error:
                if error.retryable:
                    raise
                LOGGER.warning(f"remote: upload of {artifact_path} refused ({error}); not retried")
            with self._lock:
                if self._artifacts.get(artifact_path) is job:  # not replaced by a newer snapshot meanwhile
                    del self._artifacts[artifact_path]
            job["file"].unlink(missing_ok=True)

    def _on_failure(self, error):
        self._failures += 1
        cap = FINAL_BACKOFF_MAX_S if self._deadline is not None else BACKOFF_MAX_S
        delay = min(BACKOFF_START_S * 2 ** (self._failures - 1), cap)
        if error.retry_after is not None:
            delay = max(delay, error.retry_after)
        with self._lock:
            self._retry_at = time.monotonic() + delay
        message = str(error).split(":", 1)[0] if "HTTP" not in str(error) else str(error)[:120]
        if message != self._last_warning:  # one line per kind of trouble, not one per retry
            LOGGER.warning(f"remote: {safe_uri(self.run.client.uri)} unavailable ({message}); "
                           f"will retry, training continues")
            self._last_warning = message


class RemoteSync:
    """The trainer callbacks of the remote session. Stateful: a resumed run keeps logging to the same remote run."""

    integration_owner = True  # marks callbacks registered by add_integration_callbacks

    state_key = "remote"

    def __init__(self, uri):
        self.uri = check_remote_uri(uri)
        self.session = None
        self._restored = {}
        self._last_ckpt_upload = float("-inf")
        self._model_info_sent = False
        self._closed = False

    def callbacks(self):
        """{event: fn(trainer)} to register on the trainer."""
        return {
            "on_pretrain_routine_end": self.on_pretrain_routine_end,
            "on_fit_epoch_end": self.on_fit_epoch_end,
            "on_model_save": self.on_model_save,
            "on_train_end": self.on_train_end,
            "teardown": self.teardown,
        }

    def state_dict(self):
        """The remote run's ids (no credentials: those live in the environment only)."""
        run = self.session.run if self.session else None
        ids = self._restored if run is None else {"run_id": run.run_id, "experiment_id": run.experiment_id}
        return {"uri": safe_uri(self.uri), **ids}

    def load_state_dict(self, state):
        """Continue the run saved in a checkpoint when it was logged to this same server."""
        if state.get("uri") == safe_uri(self.uri):
            self._restored = {"run_id": state.get("run_id"), "experiment_id": state.get("experiment_id")}

    def on_pretrain_routine_end(self, trainer):
        """Open the session: the worker creates the run in the background and starts the timers."""
        args = trainer.args
        client = RemoteClient(self.uri, timeout=float(args.remote_timeout))
        run = RemoteRun(client, experiment_name(args), Path(trainer.save_dir).name, plain_params(vars(args)),
                        **self._restored)
        self.session = RemoteSession(
            run,
            metrics_period=float(args.remote_metrics_period),
            ckpt_period=float(args.remote_ckpt_period),
            heartbeat_period=float(args.remote_heartbeat_period),
            timeout=float(args.remote_timeout),
        )
        self.session.start()
        LOGGER.info(f"remote: syncing this run with {safe_uri(self.uri)}")

    def on_fit_epoch_end(self, trainer):
        """Queue the epoch's losses, metrics and lrs (and the model size once)."""
        if self.session is None:
            return
        from yolotrain.integrations.common import epoch_metrics

        values = epoch_metrics(trainer)
        if not self._model_info_sent:
            values.update(self._model_info(trainer))
            self._model_info_sent = True
        self.session.queue_metrics(metric_entries(values, trainer.epoch + 1))

    @staticmethod
    def _model_info(trainer):
        from yolotrain.utils.torch_utils import de_parallel, get_flops

        model = de_parallel(trainer.model)
        info = {"model/parameters": sum(p.numel() for p in model.parameters())}
        gflops = get_flops(model, trainer.args.imgsz)  # counted on a stride-sized probe: cheap
        if gflops:
            info["model/GFLOPs"] = gflops
        return info

    def on_model_save(self, trainer):
        """Queue last.pt when the checkpoint period has elapsed since the last upload (the first save always)."""
        if self.session is None or not Path(trainer.last).exists():
            return
        now = time.monotonic()
        if now - self._last_ckpt_upload < self.session.ckpt_period:
            return
        self._last_ckpt_upload = now
        is_best = trainer.fitness is not None and trainer.best_fitness == trainer.fitness
        tags = {"checkpoint.last.epoch": trainer.epoch + 1}
        if is_best:
            tags["checkpoint.best.epoch"] = trainer.epoch + 1
        self.session.queue_artifact(trainer.last, "weights/last.pt", tags)

    def on_train_end(self, trainer):
        """Send best.pt with the task's headline metric (detection: mAP50-95), flush everything within
        remote_final_timeout and end FINISHED."""
        if self.session is None:
            return
        if Path(trainer.best).exists():
            key = getattr(getattr(trainer, "validator", None), "primary_metric", None)  # "metrics/mAP50-95(B)"
            score = (trainer.metrics or {}).get(key) if key else None
            tags = {}
            if score is not None:
                name = key.split("/", 1)[-1]
                tags = {f"best.{name.split('(')[0]}": f"{float(score):.6g}"}  # best.mAP50-95
                self.session.queue_metrics(metric_entries({f"best/{name}": score}, trainer.epoch + 1))
            self.session.queue_artifact(trainer.best, "weights/best.pt", tags)
        self._close(trainer, "FINISHED")

    def teardown(self, trainer):
        """Training failed before on_train_end: end the remote run FAILED (same bounded flush)."""
        if self.session is not None and not self._closed:
            self._close(trainer, "FAILED")

    def _close(self, trainer, status):
        self._closed = True
        session = self.session
        leftovers = session.close(status, float(trainer.args.remote_final_timeout))
        session.cleanup()
        pending_path = Path(trainer.save_dir) / PENDING_FILE
        if leftovers["batches"] or leftovers["artifacts"] or leftovers["status"]:
            write_pending(pending_path, session.run, leftovers, Path(trainer.save_dir))
            LOGGER.warning(
                f"remote: {len(leftovers['batches'])} metric batches could not be sent to {safe_uri(self.uri)}; "
                f"send them later with: yolotrain sync {trainer.save_dir}"
            )
        else:
            pending_path.unlink(missing_ok=True)
            LOGGER.info(f"remote: run synced to {safe_uri(self.uri)} ({status})")


# ---------------------------------------------------------------------- pending file and `yolotrain sync`
def write_pending(path, run, leftovers, run_dir):
    """Write what was not sent to `path` (JSON; the URI without credentials, no headers)."""
    artifacts = {}
    for artifact_path, source in leftovers["artifacts"].items():
        try:  # stored relative to the run folder, so a moved folder still syncs
            artifacts[artifact_path] = str(Path(source).resolve().relative_to(Path(run_dir).resolve()))
        except ValueError:
            artifacts[artifact_path] = str(source)
    record = {
        "uri": safe_uri(run.client.uri),
        "experiment_name": run.experiment_name,
        "experiment_id": run.experiment_id,
        "run_name": run.run_name,
        "run_id": run.run_id,
        "params": run.params if run.run_id is None else {},
        "batches": leftovers["batches"],
        "artifacts": artifacts,
        "status": leftovers["status"],
    }
    save_atomic_text(json.dumps(record, indent=1), path)


def sync_run(run_dir, timeout=30.0):
    """Send what a run left in `remote_pending.json` (`yolotrain sync RUN_DIR`); remove the file when done.

    Each acknowledged batch is removed from the file at once, so an interrupted sync never sends it twice.
    Returns {"batches": n, "artifacts": n, "status": str or None}; raises `YoloTrainError` if anything fails.
    """
    run_dir = Path(run_dir)
    path = run_dir / PENDING_FILE
    if not path.exists():
        raise YoloTrainError(f"nothing to sync: '{path}' does not exist")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise YoloTrainError(f"cannot read '{path}': {error}") from None
    client = RemoteClient(record["uri"], timeout=timeout)
    run = RemoteRun(client, record["experiment_name"], record["run_name"], record.get("params"),
                    run_id=record.get("run_id"), experiment_id=record.get("experiment_id"))
    summary = {"batches": 0, "artifacts": 0, "status": None}
    try:
        _sync_record(run, record, run_dir, path, summary)
    except RemoteError as error:
        raise YoloTrainError(f"sync of '{run_dir}' to {record['uri']} failed: {error}") from None
    path.unlink()
    LOGGER.info(f"sync: sent {summary['batches']} metric batches and {summary['artifacts']} files to "
                f"{record['uri']} (run {run.run_id})")
    return summary


def _sync_record(run, record, run_dir, path, summary):
    run.ensure_run()
    record.update(run_id=run.run_id, experiment_id=run.experiment_id, params={})
    while record["batches"]:
        run.send_batch(record["batches"][0])
        record["batches"].pop(0)
        summary["batches"] += 1
        save_atomic_text(json.dumps(record, indent=1), path)
    for artifact_path, relative in list(record["artifacts"].items()):
        local = run_dir / relative
        if local.exists():
            run.upload_artifact(local, artifact_path)
            summary["artifacts"] += 1
        else:
            LOGGER.warning(f"sync: {local} no longer exists; {artifact_path} not uploaded")
        del record["artifacts"][artifact_path]
        save_atomic_text(json.dumps(record, indent=1), path)
    if record.get("status"):
        run.set_status(record["status"])
        summary["status"] = record["status"]
