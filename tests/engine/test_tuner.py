"""Hyperparameter tuning: trials are training runs whose fitness and values land in tune_results.csv; the best
values load back with cfg=; an interrupted tuning resumes with only its missing trials; a failing trial is recorded
as failed and the search goes on; a bad space is a one-line error."""

import csv

import pytest
import yaml

from yolotrain import YOLO
from yolotrain.cfg import get_cfg, load_arg_specs
from yolotrain.cli import main
from yolotrain.engine.callbacks import Callbacks
from yolotrain.engine.tune_space import DEFAULT_SPACE_PATH, load_space
from yolotrain.engine.tuner import Tuner
from yolotrain.errors import CfgError

SPACE = "lr0: [0.001, 0.02, log]\nmosaic: [0.0, 1.0]\noptimizer: [SGD, AdamW, Adam]\n"
TUNED = ["lr0", "mosaic", "optimizer"]


@pytest.fixture
def tune_args(tiny_model_yaml, tiny_data, tmp_path):
    """A tuning of 1-epoch CPU trials on 16 images of 64 px over three hyperparameters."""
    pytest.importorskip("optuna")
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    return dict(
        data=tiny_data, epochs=1, imgsz=64, batch=4, workers=0, device="cpu", plots=False, verbose=False,
        close_mosaic=0, warmup_epochs=0.5, project=str(tmp_path / "runs"), space=str(space),
    )


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def trial_folders(tune_dir):
    return sorted(p.name for p in (tune_dir / "trials").iterdir())


# ----------------------------------------------------------------------------------------------- the space
def test_default_space_is_shipped_and_every_key_is_a_float_argument():
    space = load_space()
    specs = load_arg_specs()
    assert DEFAULT_SPACE_PATH.name == "tune_space.yaml"
    assert {"lr0", "lrf", "momentum", "weight_decay", "box", "cls", "dfl", "hsv_h", "mosaic", "mixup"} <= set(space)
    for name, dim in space.items():
        assert "float" in specs[name].types
        assert dim.low < dim.high
    assert space["lr0"].log and not space["mosaic"].log


def test_space_forms_ranges_log_ranges_ints_and_choices():
    space = load_space({"lr0": [1e-4, 1e-1, "log"], "close_mosaic": [0, 5], "optimizer": ["SGD", "AdamW"],
                        "mosaic": [0.0, 0.5, 1.0]})
    assert (space["lr0"].low, space["lr0"].high, space["lr0"].log) == (1e-4, 1e-1, True)
    assert space["close_mosaic"].integer and (space["close_mosaic"].low, space["close_mosaic"].high) == (0, 5)
    assert space["optimizer"].choices == ("SGD", "AdamW")
    assert space["mosaic"].choices == (0.0, 0.5, 1.0)  # three numbers are choices, not a range


@pytest.mark.parametrize(
    "content, message",
    [
        ("lr: [0.1, 0.2]\n", "'lr' is not a yolotrain argument, did you mean"),
        ("lr0: [0.1, 0.01]\n", "'lr0: [0.1, 0.01]' is invalid: expected low < high"),
        ("mosaic: [0.0, 2.0]\n", "'mosaic=2.0' is invalid: expected float in [0, 1]"),
        ("lr0: [0.0, 0.1, log]\n", "a log range needs low > 0"),
        ("lr0: 0.01\n", "'lr0: 0.01' is invalid: expected [low, high]"),
        ("optimizer: [SGD, Nope]\n", "'optimizer=Nope' is invalid"),
        ("name: [a, b]\n", "'name' cannot be tuned"),
        ("- lr0\n", "must be a mapping"),
        ("", "is empty"),
    ],
)
def test_bad_space_file_is_a_one_line_error_naming_the_file_and_key(tmp_path, capsys, content, message):
    space = tmp_path / "tune.yaml"
    space.write_text(content)
    with pytest.raises(CfgError, match=f"space file '{space}'") as error:
        load_space(str(space))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert main(["tune", f"space={space}", "epochs=1"]) == 2  # the command answers before any trial
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("yolotrain: error: ") and message in err


def test_bad_tuning_arguments_are_one_line_errors(capsys):
    assert main(["tune", "iterations=0"]) == 2
    assert "'iterations=0' is invalid: expected int >= 1" in capsys.readouterr().err
    assert main(["tune", "backend=dask"]) == 2
    assert "'backend=dask' is invalid: expected one of optuna, ray" in capsys.readouterr().err
    assert main(["tune", "epoch=3"]) == 2
    assert "'epoch' is not a valid yolotrain argument" in capsys.readouterr().err


def test_help_lists_tune_and_its_arguments(capsys):
    assert main(["help"]) == 0
    out = capsys.readouterr().out
    assert "yolotrain tune data=data.yaml" in out
    assert "iterations=100" in out and "backend=optuna" in out and "space=" in out


def test_an_argument_set_by_the_user_is_kept_fixed_and_not_tuned(tmp_path):
    tuner = Tuner("yolo-n.yaml", "detect", Callbacks(), {"mosaic": 0.0, "project": str(tmp_path)})
    assert "mosaic" not in tuner.space and "lr0" in tuner.space
    assert tuner.train_args["mosaic"] == 0.0
    assert tuner.tune_dir == tmp_path / "tune" and not tuner.resumed


def test_resume_without_a_tuning_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(CfgError, match="no tuning folder .* was found under"):
        Tuner("yolo-n.yaml", "detect", Callbacks(), {"resume": True, "project": str(tmp_path)})
    with pytest.raises(CfgError, match="is not a tuning folder"):
        Tuner("yolo-n.yaml", "detect", Callbacks(), {"resume": str(tmp_path)})


def test_a_key_both_set_and_in_the_given_space_is_refused(tiny_model_yaml, tune_args):
    with pytest.raises(CfgError, match="mosaic both set and in the search space"):
        YOLO(tiny_model_yaml).tune(**tune_args, mosaic=0.0, iterations=1)


# ----------------------------------------------------------------------------------------------- tuning runs
@pytest.mark.slow
def test_three_trials_write_results_best_values_and_plot(tiny_model_yaml, tune_args, tmp_path):
    best = YOLO(tiny_model_yaml).tune(**tune_args, iterations=3)

    tune_dir = tmp_path / "runs" / "tune"
    rows = read_rows(tune_dir / "tune_results.csv")
    assert list(rows[0]) == ["trial", "state", "fitness", *TUNED]
    assert [row["trial"] for row in rows] == ["0", "1", "2"] and {row["state"] for row in rows} == {"COMPLETE"}
    assert len({row["lr0"] for row in rows}) == 3  # each trial drew its own values
    assert trial_folders(tune_dir) == ["trial0", "trial1", "trial2"]
    for row in rows:  # each trial is a normal run trained with its own values
        trial = tune_dir / "trials" / f"trial{row['trial']}"
        assert (trial / "results.csv").exists() and (trial / "weights" / "last.pt").exists()
        trained = yaml.safe_load((trial / "args.yaml").read_text())
        assert trained["lr0"] == pytest.approx(float(row["lr0"])) and trained["optimizer"] == row["optimizer"]

    best_row = max(rows, key=lambda row: float(row["fitness"]))
    args = get_cfg(cfg=str(tune_dir / "best_hyperparameters.yaml"))
    assert args.lr0 == pytest.approx(float(best_row["lr0"])) and args.optimizer == best_row["optimizer"]
    assert best == {"lr0": args.lr0, "mosaic": args.mosaic, "optimizer": args.optimizer}
    assert (tune_dir / "tune_scatter_plots.png").stat().st_size > 0
    assert (tune_dir / "study.db").exists()


@pytest.mark.slow
def test_resume_runs_only_the_missing_trials(tiny_model_yaml, tune_args, tmp_path):
    command = ["tune", f"model={tiny_model_yaml}", *(f"{k}={v}" for k, v in tune_args.items()), "iterations=2"]
    assert main(command) == 0
    tune_dir = tmp_path / "runs" / "tune"
    first = {name: (tune_dir / "trials" / name / "args.yaml").stat().st_mtime_ns for name in trial_folders(tune_dir)}
    assert sorted(first) == ["trial0", "trial1"]

    YOLO(tiny_model_yaml).tune(project=tune_args["project"], resume=True, iterations=3)

    assert trial_folders(tune_dir) == ["trial0", "trial1", "trial2"]  # one new trial, the old ones untouched
    assert {name: (tune_dir / "trials" / name / "args.yaml").stat().st_mtime_ns for name in first} == first
    rows = read_rows(tune_dir / "tune_results.csv")
    assert [(row["trial"], row["state"]) for row in rows] == [("0", "COMPLETE"), ("1", "COMPLETE"), ("2", "COMPLETE")]
    assert not (tmp_path / "runs" / "tune2").exists()
    trained = yaml.safe_load((tune_dir / "trials" / "trial2" / "args.yaml").read_text())
    assert trained["epochs"] == 1 and trained["imgsz"] == 64  # the saved arguments, not the defaults


@pytest.mark.slow
def test_a_trial_interrupted_mid_run_is_finished_from_its_last_checkpoint(tiny_model_yaml, tune_args, tmp_path):
    def interrupt_trial1_after_its_first_epoch(trainer):
        if trainer.save_dir.name == "trial1" and trainer.epoch == 0:
            raise KeyboardInterrupt

    model = YOLO(tiny_model_yaml)
    model.add_callback("on_fit_epoch_end", interrupt_trial1_after_its_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        model.tune(**{**tune_args, "epochs": 2}, iterations=2, name="search")
    tune_dir = tmp_path / "runs" / "search"
    assert [row["trial"] for row in read_rows(tune_dir / "tune_results.csv")] == ["0"]  # trial 1 still running
    first_epoch = read_rows(tune_dir / "trials" / "trial1" / "results.csv")
    assert len(first_epoch) == 1

    # The same name with exist_ok continues the study in that folder.
    YOLO(tiny_model_yaml).tune(**{**tune_args, "epochs": 2}, name="search", exist_ok=True)

    rows = read_rows(tune_dir / "tune_results.csv")
    assert [(row["trial"], row["state"]) for row in rows] == [("0", "COMPLETE"), ("1", "COMPLETE")]  # iterations=2
    assert trial_folders(tune_dir) == ["trial0", "trial1"]
    trial1 = read_rows(tune_dir / "trials" / "trial1" / "results.csv")
    assert [float(row["epoch"]) for row in trial1] == [1.0, 2.0]
    assert trial1[0] == first_epoch[0]  # epoch 1 kept as it was (its time too): continued, not trained anew


@pytest.mark.slow
def test_failed_trials_are_recorded_and_the_search_goes_on(tiny_model_yaml, tune_args, tmp_path, yolotrain_log):
    def crash_trial0(trainer):
        if trainer.save_dir.name == "trial0":
            raise RuntimeError("trial crashed")

    def diverge_trial1(trainer):
        if trainer.save_dir.name == "trial1":
            trainer.best_fitness = float("nan")

    model = YOLO(tiny_model_yaml)
    model.add_callback("on_train_start", crash_trial0)
    model.add_callback("on_train_end", diverge_trial1)
    best = model.tune(**tune_args, iterations=3)

    tune_dir = tmp_path / "runs" / "tune"
    rows = read_rows(tune_dir / "tune_results.csv")
    assert [(row["trial"], row["state"]) for row in rows] == [("0", "FAIL"), ("1", "FAIL"), ("2", "COMPLETE")]
    assert rows[0]["fitness"] == "" and rows[1]["fitness"] == ""
    assert any("trial 0 failed: trial crashed" in m for m in yolotrain_log)
    assert any("trial 1 failed: its fitness is nan" in m for m in yolotrain_log)
    assert best["lr0"] == pytest.approx(float(rows[2]["lr0"]))  # the best is the one that completed


@pytest.mark.slow
def test_ray_backend_runs_the_trials_and_writes_the_same_outputs(tiny_model_yaml, tune_args, tmp_path):
    pytest.importorskip("ray")
    best = YOLO(tiny_model_yaml).tune(**tune_args, iterations=2, backend="ray")

    tune_dir = tmp_path / "runs" / "tune"
    rows = read_rows(tune_dir / "tune_results.csv")
    assert len(rows) == 2 and {row["state"] for row in rows} == {"COMPLETE"}
    assert trial_folders(tune_dir) == sorted(f"trial_{row['trial']}" for row in rows)  # named by Ray's trial ids
    for row in rows:
        trained = yaml.safe_load((tune_dir / "trials" / f"trial_{row['trial']}" / "args.yaml").read_text())
        assert trained["lr0"] == pytest.approx(float(row["lr0"]))
    assert get_cfg(cfg=str(tune_dir / "best_hyperparameters.yaml")).optimizer == best["optimizer"]
    assert (tune_dir / "tune_scatter_plots.png").exists()
