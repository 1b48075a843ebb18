"""freeze: a layer count, layer indices or parameter-name prefixes matched on whole dotted components; a bad entry
is a one-line error; frozen BatchNorm keeps its statistics."""

import pytest
import torch

from yolotrain import DetectionTrainer
from yolotrain.cfg import get_cfg, parse_cli_args
from yolotrain.engine.freeze import freeze_bn_statistics, freeze_prefixes, frozen_parameter_names, name_matches
from yolotrain.errors import CfgError

# Parameter names shaped like a detector's: layers 0-3, 20-22, a head (22) with branches and a DFL projection.
NAMES = [
    "model.0.conv.weight", "model.0.bn.weight", "model.1.conv.weight", "model.2.cv1.conv.weight",
    "model.3.conv.weight", "model.20.conv.weight", "model.21.cv1.conv.weight", "model.22.cv2.0.0.conv.weight",
    "model.22.cv2.1.0.conv.weight", "model.22.cv3.0.0.conv.weight", "model.22.dfl.conv.weight",
]  # fmt: skip


def layers_of(names):
    return sorted({int(n.split(".")[1]) for n in names})


def test_a_count_freezes_the_first_layers():
    assert layers_of(frozen_parameter_names(NAMES, 3)) == [0, 1, 2]
    assert frozen_parameter_names(NAMES, 0) == []
    assert frozen_parameter_names(NAMES, None) == []


def test_a_layer_index_is_that_layer_only():
    assert layers_of(frozen_parameter_names(NAMES, [2])) == [2]  # not 20, 21, 22
    assert layers_of(frozen_parameter_names(NAMES, [0, 21])) == [0, 21]


def test_a_prefix_matches_whole_dotted_components():
    assert frozen_parameter_names(NAMES, ["model.2"]) == ["model.2.cv1.conv.weight"]
    assert frozen_parameter_names(NAMES, ["model.22.cv2"]) == [
        "model.22.cv2.0.0.conv.weight", "model.22.cv2.1.0.conv.weight"
    ]  # fmt: skip
    assert frozen_parameter_names(NAMES, ["model.22.cv2.1."]) == ["model.22.cv2.1.0.conv.weight"]
    assert frozen_parameter_names(NAMES, ["model.0.bn.weight"]) == ["model.0.bn.weight"]  # a full name
    assert not name_matches("model.20.conv.weight", "model.2")
    assert not name_matches("model.22.cv3.0.0.conv.weight", "model.22.cv")


def test_a_leading_dot_matches_anywhere_and_always_frozen_adds_to_the_user_choice():
    assert frozen_parameter_names(NAMES, None, always_frozen=(".dfl",)) == ["model.22.dfl.conv.weight"]
    assert frozen_parameter_names(NAMES, [1], always_frozen=(".dfl",)) == [
        "model.1.conv.weight", "model.22.dfl.conv.weight"
    ]  # fmt: skip
    assert frozen_parameter_names(NAMES, None, always_frozen=(".absent",)) == []  # not every model has it


def test_mixed_indices_and_prefixes():
    assert layers_of(frozen_parameter_names(NAMES, [0, "model.22.cv3"])) == [0, 22]
    assert freeze_prefixes(2) == ["model.0", "model.1"]
    assert freeze_prefixes([3, "model.22.cv2."]) == ["model.3", "model.22.cv2"]


@pytest.mark.parametrize(
    "freeze, expected",
    [
        (["model.2.cv9"], "freeze=[model.2.cv9] is invalid: 'model.2.cv9' matches no parameter name"),
        (["backbone"], "freeze=[backbone] is invalid: 'backbone' matches no parameter name"),
        ([0, "model.22.cv"], "freeze=[0, model.22.cv] is invalid: 'model.22.cv' matches no parameter name"),
        ([23], "freeze=[23] is invalid: layer 23 is not one of the model's 23 layers (0 to 22)"),
        ([-1], "freeze=[-1] is invalid: layer -1 is not one of the model's 23 layers (0 to 22)"),
        (24, "freeze=24 is invalid: expected a count of layers from 0 to 23 (the model's layer count)"),
    ],
)
def test_an_entry_that_matches_nothing_is_a_one_line_error(freeze, expected):
    with pytest.raises(CfgError) as info:
        frozen_parameter_names(NAMES, freeze)
    assert str(info.value).startswith(expected)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "token, value",
    [
        ("freeze=[0,1]", [0, 1]),
        ("freeze=0,1", [0, 1]),
        ("freeze=10", 10),
        ("freeze=model.23.cv2", ["model.23.cv2"]),
        ("freeze=model.23.cv2,model.23.cv3", ["model.23.cv2", "model.23.cv3"]),
        ("freeze=[3,model.23.cv2]", [3, "model.23.cv2"]),
    ],
)
def test_freeze_from_the_command_line(token, value):
    assert get_cfg(parse_cli_args(["train", token])[1]).freeze == value


def test_a_negative_count_is_refused_by_the_argument_check():
    with pytest.raises(CfgError, match=r"^'freeze=-1' is invalid: expected int >= 0 or list"):
        get_cfg({"freeze": -1})


def test_frozen_batchnorm_keeps_its_statistics_and_a_trainable_one_does_not():
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)).train()
    model[0].requires_grad_(False)
    freeze_bn_statistics(model)
    assert not model[0].training and model[1].training


def test_training_leaves_frozen_prefixes_untouched_and_trains_their_neighbours(train_overrides):
    # The tiny model: layer 2 is a C2f, 21 a C2f and 22 the head (20 is a Concat); "model.2" freezes neither.
    trainer = DetectionTrainer(overrides={**train_overrides, "epochs": 1, "val": False, "freeze": ["model.2"]})
    before = {}
    trainer.add_callback(
        "on_pretrain_routine_end",
        lambda t: before.update({n: p.detach().clone() for n, p in t.model.named_parameters()}),
    )
    trainer.train()
    params = dict(trainer.model.named_parameters())
    frozen = {n for n, p in params.items() if not p.requires_grad}
    assert frozen == {n for n in params if n.startswith("model.2.") or ".dfl." in n}
    assert all(torch.equal(params[n], before[n]) for n in frozen)
    changed_layers = {n.split(".")[1] for n in params if not torch.equal(params[n], before[n])}
    assert {"21", "22"} <= changed_layers and "2" not in changed_layers


def test_a_prefix_that_matches_nothing_stops_before_training(train_overrides):
    trainer = DetectionTrainer(overrides={**train_overrides, "freeze": ["model.2.missing"]})
    with pytest.raises(CfgError, match=r"^freeze=\[model.2.missing\] is invalid: 'model.2.missing' matches no"):
        trainer.train()
