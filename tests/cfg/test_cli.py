"""The `yolotrain` command line: dispatch, one-line errors, exit codes, no heavy import on errors."""

import logging
import subprocess
import sys
import types

import pytest
import yaml

from yolotrain import __version__
from yolotrain.cli import help_text, main
from yolotrain.cfg import load_arg_specs
from yolotrain.errors import DatasetError


def run_module(*argv):
    return subprocess.run([sys.executable, "-m", "yolotrain", *argv], capture_output=True, text=True, timeout=60)


class RecordingYOLO:
    """Stands in for yolotrain.engine.model.YOLO: records what the CLI asked for."""

    calls = []
    tasks = []

    def __init__(self, model, task=None):
        self.model = model
        self.task = task
        self.tasks.append(task)

    def train(self, **kwargs):
        self.calls.append((self.model, "train", kwargs))

    def val(self, **kwargs):
        self.calls.append((self.model, "val", kwargs))


@pytest.fixture(autouse=True)
def restore_package_logger():
    # main() configures the "yolotrain" logger for the terminal; undo it so other tests see it untouched.
    logger = logging.getLogger("yolotrain")
    handlers, level = list(logger.handlers), logger.level
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


@pytest.fixture
def fake_yolo(monkeypatch):
    RecordingYOLO.calls, RecordingYOLO.tasks = [], []
    module = types.ModuleType("yolotrain.engine.model")
    module.YOLO = RecordingYOLO
    monkeypatch.setitem(sys.modules, "yolotrain.engine.model", module)
    return RecordingYOLO


def fake_module(monkeypatch, name, **functions):
    module = types.ModuleType(name)
    for function_name, function in functions.items():
        setattr(module, function_name, function)
    monkeypatch.setitem(sys.modules, name, module)


# ----------------------------------------------------------------------------------------------- errors


def test_unknown_key_prints_one_line_with_suggestion(capsys):
    assert main(["train", "epoch=3"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("yolotrain: error: ")
    assert "did you mean 'epochs'" in lines[0]
    assert captured.out == ""


def test_unknown_mode_suggests_a_mode(capsys):
    assert main(["trian", "epochs=3"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'train'?" in err and len(err.strip().splitlines()) == 1


def test_no_mode_is_an_argument_error(capsys):
    assert main(["epochs=3"]) == 2
    assert "no mode given" in capsys.readouterr().err


def test_no_arguments_prints_usage(capsys):
    assert main([]) == 0
    assert "usage: yolotrain [TASK] MODE" in capsys.readouterr().out


def test_error_raised_by_the_engine_is_one_line_with_its_exit_code(monkeypatch, capsys):
    class FailingYOLO(RecordingYOLO):
        def train(self, **kwargs):
            raise DatasetError("data yaml 'x.yaml' does not exist")

    fake_module(monkeypatch, "yolotrain.engine.model", YOLO=FailingYOLO)
    assert main(["train", "data=x.yaml"]) == DatasetError.exit_code
    assert capsys.readouterr().err == "yolotrain: error: data yaml 'x.yaml' does not exist\n"


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    class InterruptedYOLO(RecordingYOLO):
        def train(self, **kwargs):
            raise KeyboardInterrupt

    fake_module(monkeypatch, "yolotrain.engine.model", YOLO=InterruptedYOLO)
    assert main(["train"]) == 130
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------- dispatch


def test_train_passes_the_users_arguments_as_given(fake_yolo, tmp_path):
    cfg_file = tmp_path / "hyp.yaml"
    cfg_file.write_text(yaml.safe_dump({"lr0": 0.02, "epochs": 50}))
    assert main(["train", "model=yolo-s.yaml", "data=x.yaml", "epochs=3", f"cfg={cfg_file}", "device=0"]) == 0
    assert fake_yolo.calls == [("yolo-s.yaml", "train", {"lr0": 0.02, "epochs": 3, "data": "x.yaml", "device": "0"})]


@pytest.mark.parametrize("mode", ["val", "predict", "export"])
def test_a_mode_that_runs_weights_without_a_model_is_a_one_line_error(fake_yolo, mode, capsys, tmp_path,
                                                                    monkeypatch):
    """Untrained weights would give meaningless results (and a run folder): nothing runs, nothing is written."""
    monkeypatch.chdir(tmp_path)
    assert main([mode, "data=x.yaml"]) == 2
    assert capsys.readouterr().err == (f"yolotrain: error: {mode} needs model=: trained weights (.pt) or an exported "
                                       f"file, e.g. yolotrain {mode} model=runs/detect/train/weights/best.pt\n")
    assert fake_yolo.calls == [] and not any(tmp_path.iterdir())


def test_a_task_before_the_mode_reaches_the_model_and_not_its_arguments(fake_yolo):
    assert main(["detect", "train", "data=x.yaml"]) == 0
    assert fake_yolo.calls == [("yolo-n.yaml", "train", {"data": "x.yaml"})] and fake_yolo.tasks == ["detect"]


def test_bad_arguments_never_reach_the_model(fake_yolo):
    assert main(["train", "epochs=abc"]) == 2
    assert fake_yolo.calls == []


def test_convert_calls_convert_coco(monkeypatch):
    calls = []
    fake_module(monkeypatch, "yolotrain.data.convert", convert_coco=lambda *args: calls.append(args))
    assert main(["convert", "coco", "instances.json", "images", "out"]) == 0
    assert calls == [("instances.json", "images", "out")]


def test_convert_with_wrong_arguments_shows_usage(capsys):
    assert main(["convert", "coco", "instances.json"]) == 2
    assert "yolotrain convert coco SRC.json IMAGES_DIR OUT_DIR" in capsys.readouterr().err
    assert main(["convert", "voc", "a", "b", "c"]) == 2


def test_sync_calls_sync_run(monkeypatch):
    calls = []
    fake_module(monkeypatch, "yolotrain.integrations.remote", sync_run=calls.append)
    assert main(["sync", "runs/detect/train"]) == 0
    assert calls == ["runs/detect/train"]


def test_version(capsys):
    assert main(["version"]) == 0
    assert __version__ in capsys.readouterr().out


def test_help_lists_every_argument_grouped_with_defaults(capsys):
    assert main(["help"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == help_text().strip()
    for spec in load_arg_specs().values():
        assert f"  {spec.name}=" in out
    assert "Hyperparameters:" in out and "lr0=0.01" in out
    assert out.index("Augmentation:") < out.index("mosaic=1.0")


# ----------------------------------------------------------------------------------------------- subprocess


def test_module_help_exits_0_and_lists_lr0():
    result = run_module("help")
    assert result.returncode == 0
    assert "lr0=0.01" in result.stdout


def test_module_bad_value_exits_2_without_traceback():
    result = run_module("train", "epochs=abc")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == "yolotrain: error: 'epochs=abc' is invalid: expected int, e.g. epochs=100"


def test_argument_errors_and_help_do_not_import_torch():
    # A fresh interpreter: in this test process another test may already have imported torch.
    code = (
        "import sys\n"
        "from yolotrain.cli import main\n"
        "codes = [main(['epochs=abc', 'train']), main(['help']), main(['trian'])]\n"
        "print(codes, 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "[2, 0, 2] False"
