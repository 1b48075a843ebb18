"""Checkpoints hold only tensors and plain types, load with weights_only=True, and a file that needs arbitrary
unpickling is refused (and nothing in it runs) on every user-facing path; safetensors export round trip."""

import json
import os
import signal

import pytest
import torch

from yolotrain import YOLO, DetectionTrainer
from yolotrain.cli import main as cli_main
from yolotrain.engine.trainer import TrainingInterrupted
from yolotrain.errors import CheckpointError
from yolotrain.tasks.detect.val import DetectionValidator
from yolotrain.utils.checkpoint import load_checkpoint, load_safetensors_metadata

PLAIN_TYPES = (int, float, str, bool, type(None), torch.Tensor)


def assert_plain(obj, where="checkpoint"):
    """Only tensors, numbers, strings, None and dict/list/tuple containers of them."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            assert isinstance(key, (str, int)), f"{where}: key {key!r}"
            assert_plain(value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            assert_plain(value, f"{where}[{i}]")
    else:
        assert isinstance(obj, PLAIN_TYPES), f"{where} is a {type(obj).__name__}"


class CountingCallback:
    """A stateful callback: its state must travel in the checkpoint as plain types."""

    state_key = "batch_counter"

    def __init__(self):
        self.batches = 0

    def __call__(self, trainer):
        self.batches += 1

    def state_dict(self):
        return {"batches": self.batches}

    def load_state_dict(self, state):
        self.batches = state["batches"]


def signal_at(epoch, batches_done):
    def send(trainer):
        if (trainer.epoch, trainer.batches_in_epoch) == (epoch, batches_done):
            os.kill(os.getpid(), signal.SIGTERM)

    return send


def test_every_checkpoint_the_trainer_writes_loads_weights_only(train_overrides):
    trainer = DetectionTrainer(overrides={**train_overrides, "epochs": 3, "save_period": 1})
    trainer.add_callback("on_train_batch_end", CountingCallback())
    trainer.add_callback("on_train_batch_end", signal_at(epoch=2, batches_done=2))
    with pytest.raises(TrainingInterrupted):
        trainer.train()
    weights = trainer.wdir
    written = sorted(p.name for p in weights.iterdir())
    assert written == ["best.pt", "epoch1.pt", "epoch2.pt", "last.pt"]  # no temp files left
    for path in weights.iterdir():
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        assert_plain(checkpoint, path.name)
    mid_epoch = torch.load(weights / "last.pt", weights_only=True)
    # Sent after batch 2 had been agreed on: the next batch's verdict sees it, so that batch completes first.
    assert mid_epoch["batch_index"] == 3 and mid_epoch["epoch"] == 2
    for key in ("optimizer", "scaler", "rng", "callbacks", "schedule", "stopper", "grads", "tloss"):
        assert key in mid_epoch, key
    assert mid_epoch["callbacks"] == {"batch_counter": {"batches": 11}}  # 4 + 4 + 3 batches


class Evil:
    """Unpickling this runs os.mkdir(marker): proof that code in the file was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture
def evil_checkpoint(tmp_path):
    marker = tmp_path / "code-was-executed"
    path = tmp_path / "evil.pt"
    torch.save({"model": Evil(marker), "epoch": 0, "optimizer": {}, "train_args": {}}, path)
    yield path
    assert not marker.exists(), "loading the file executed code from it"


def test_evil_checkpoint_is_refused_by_load_checkpoint(evil_checkpoint):
    with pytest.raises(CheckpointError, match="arbitrary code"):
        load_checkpoint(evil_checkpoint)


def test_evil_checkpoint_is_refused_by_yolo_val(evil_checkpoint, tiny_data, tmp_path):
    with pytest.raises(CheckpointError, match="arbitrary code"):
        YOLO(str(evil_checkpoint)).val(data=tiny_data, imgsz=64, device="cpu", project=str(tmp_path), plots=False)


def test_evil_checkpoint_is_refused_as_resume(evil_checkpoint):
    with pytest.raises(CheckpointError, match="arbitrary code"):
        DetectionTrainer(overrides={"resume": str(evil_checkpoint)})


@pytest.mark.parametrize("key", ["pretrained", "model"])
def test_evil_checkpoint_is_refused_as_weights(evil_checkpoint, train_overrides, key):
    events = []
    trainer = DetectionTrainer(overrides={**train_overrides, key: str(evil_checkpoint)})
    trainer.add_callback("on_train_start", lambda t: events.append("started"))
    with pytest.raises(CheckpointError, match="arbitrary code"):
        trainer.train()
    assert events == []


@pytest.mark.parametrize("mode", ["val", "train"])
def test_cli_refuses_evil_checkpoint_in_one_line(evil_checkpoint, tiny_data, tmp_path, capsys, mode):
    key = "model" if mode == "val" else "resume"
    argv = [mode, f"{key}={evil_checkpoint}", f"data={tiny_data}", "imgsz=64", "device=cpu", f"project={tmp_path}"]
    code = cli_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("yolotrain: error:") and "arbitrary code" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"model": {"w": torch.randn(1000)}}, path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_safetensors_export_round_trip(train_overrides, tmp_path, capsys):
    trainer = DetectionTrainer(overrides={**train_overrides, "epochs": 1})
    trainer.train()
    assert cli_main(["export", f"model={trainer.best}", "format=safetensors"]) == 0
    exported = trainer.best.with_suffix(".safetensors")
    assert capsys.readouterr().out.strip() == str(exported)
    metadata = load_safetensors_metadata(exported)
    assert json.loads(metadata["model_yaml"])["backbone"] and json.loads(metadata["nc"]) == trainer.data["nc"]

    validator = DetectionValidator()
    from_pt, from_st = validator.load_model(trainer.best).eval(), validator.load_model(exported).eval()
    assert from_st.names == from_pt.names
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(from_pt(images)[0], from_st(images)[0])

    common = dict(data=train_overrides["data"], imgsz=64, device="cpu", plots=False, project=str(tmp_path / "val"))
    assert _validate(exported, common) == pytest.approx(YOLO(str(trainer.best)).val(**common))


def _validate(path, args):
    from yolotrain.cfg import get_cfg

    validator = DetectionValidator(save_dir=None, args=get_cfg({**args, "mode": "val", "name": "st"}))
    return validator(model=str(path))


def test_pretrained_safetensors_weights_are_loaded(train_overrides, tmp_path):
    source = DetectionTrainer(overrides={**train_overrides, "epochs": 1, "val": False, "name": "source"})
    source.train()
    assert cli_main(["export", f"model={source.best}", "format=safetensors"]) == 0
    exported = source.best.with_suffix(".safetensors")
    seen = {}
    trainer = DetectionTrainer(overrides={**train_overrides, "epochs": 1, "val": False, "pretrained": str(exported)})
    trainer.add_callback("on_pretrain_routine_end", lambda t: seen.update({k: v.clone() for k, v in t.model.state_dict().items()}))
    trainer.train()
    expected = load_checkpoint(exported)["model"]
    assert all(torch.equal(seen[k].float(), v.float()) for k, v in expected.items())


def test_export_rejects_unknown_format(capsys):
    assert cli_main(["export", "model=x.pt", "format=tflite"]) == 2
    assert "format=tflite" in capsys.readouterr().err


def test_a_checkpoint_cannot_choose_the_server_or_the_code_of_the_run_that_resumes_it(train_overrides, tmp_path,
                                                                                       monkeypatch, yolotrain_log):
    """A last.pt whose saved arguments name a server (remote=) and a code hook (augment=module:name) is resumed
    with this environment's token: no request reaches that server, the module is never imported, and one warning
    says what was not used. What the resuming command gives is used."""
    import http.server
    import sys
    import threading

    requests = []

    class Listener(http.server.BaseHTTPRequestHandler):
        def _record(self):
            requests.append((self.command, self.path, self.headers.get("Authorization")))
            self.send_response(200)
            self.end_headers()

        do_GET = do_POST = do_PUT = _record

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Listener)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hook_dir = tmp_path / "hooks"
    hook_dir.mkdir()
    (hook_dir / "planted_hook.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\n"
                                              "def run(*args):\n    return args\n")
    monkeypatch.syspath_prepend(str(hook_dir))
    monkeypatch.setenv("YOLOTRAIN_REMOTE_TOKEN", "secret-token")
    try:
        first = DetectionTrainer(overrides={**train_overrides, "epochs": 1})
        first.train()
        checkpoint = torch.load(first.last, weights_only=True)
        checkpoint["train_args"].update(remote=f"http://127.0.0.1:{server.server_port}", augment="planted_hook:run")
        torch.save(checkpoint, first.last)
        resumed = DetectionTrainer(overrides={"resume": str(first.last), "epochs": 2})
        resumed.train()
    finally:
        server.shutdown()
    assert requests == [] and not (tmp_path / "imported").exists() and "planted_hook" not in sys.modules
    assert resumed.args.remote is None and resumed.args.augment is None
    warned = [message for message in yolotrain_log if "not used" in message]
    assert len(warned) == 1 and "remote=http://127.0.0.1" in warned[0] and "augment=planted_hook:run" in warned[0]
    again = DetectionTrainer(overrides={"resume": str(resumed.last), "epochs": 3, "tensorboard": True})
    assert again.args.tensorboard is True  # what the resuming command gives is used
