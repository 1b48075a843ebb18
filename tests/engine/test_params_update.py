"""on_params_update and trainer.update_args: fired at set-up with the final arguments and on each update; updates
are checked, reach args.yaml and the run, and are refused once set-up has read the arguments."""

import pytest
import yaml

from yolotrain import DetectionTrainer
from yolotrain.errors import CfgError, YoloTrainError
from yolotrain.utils.checkpoint import load_checkpoint


def test_updated_arguments_are_announced_and_used(train_overrides):
    trainer = DetectionTrainer(overrides={**train_overrides, "epochs": 3, "val": False})
    seen = []
    trainer.add_callback("on_pretrain_routine_start", lambda t: seen.append("on_pretrain_routine_start"))
    trainer.add_callback(
        "on_params_update",
        lambda t: seen.append(("on_params_update", t.args.lr0, t.args.epochs, (t.save_dir / "args.yaml").exists())),
    )
    trainer.add_callback("on_pretrain_routine_end", lambda t: seen.append("on_pretrain_routine_end"))

    trainer.update_args(lr0=0.02, epochs=1)  # as a tuning trial sets its hyperparameters
    trainer.train()
    assert seen == [
        ("on_params_update", 0.02, 1, False),  # the update itself
        "on_pretrain_routine_start",
        ("on_params_update", 0.02, 1, False),  # set-up: final, before args.yaml is written
        "on_pretrain_routine_end",
    ]
    assert yaml.safe_load((trainer.save_dir / "args.yaml").read_text())["lr0"] == 0.02
    assert load_checkpoint(trainer.last)["train_args"]["lr0"] == 0.02
    assert trainer.epoch == 0 and trainer.epochs == 1  # one epoch trained, not three


def test_updates_are_allowed_until_set_up_reads_the_arguments(train_overrides):
    trainer = DetectionTrainer(overrides={**train_overrides, "epochs": 1, "val": False, "optimizer": "SGD"})
    refused = []

    def too_late(t):
        with pytest.raises(YoloTrainError, match=r"^update_args\(\) after set-up has read the arguments"):
            t.update_args(lr0=0.5)
        refused.append(True)

    trainer.add_callback("on_pretrain_routine_start", lambda t: t.update_args(lr0=0.003))
    trainer.add_callback("on_train_start", too_late)
    trainer.train()
    assert refused == [True]
    assert trainer.args.lr0 == 0.003
    assert trainer.optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.003)


@pytest.mark.parametrize(
    "update, error, message",
    [
        ({"lr0": "fast"}, CfgError, "'lr0=fast' is invalid: expected float, e.g. lr0=0.01"),
        ({"epoch": 2}, CfgError, "'epoch' is not a valid yolotrain argument, did you mean 'epochs'?"),
        ({"name": "other", "lr0": 0.1}, YoloTrainError, "update_args(): name cannot change after the trainer is"),
    ],
)
def test_a_bad_update_is_a_one_line_error_and_changes_nothing(train_overrides, update, error, message):
    trainer = DetectionTrainer(overrides=train_overrides)
    fired = []
    trainer.add_callback("on_params_update", fired.append)
    with pytest.raises(error) as info:
        trainer.update_args(**update)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert fired == [] and trainer.args.lr0 == 0.01
