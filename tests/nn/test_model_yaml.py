"""Model yaml resolution (built-in names, user files with and without scales) and one-line CfgErrors."""

import pytest
import torch
import yaml

from yolotrain.errors import CfgError
from yolotrain.nn.model import DetectionModel
from yolotrain.nn.modules import C3k2

TINY_LAYERS = {
    "backbone": [
        [-1, 1, "Conv", [16, 3, 2]],  # 0 /2
        [-1, 1, "Conv", [32, 3, 2]],  # 1 /4
        [-1, 1, "Conv", [32, 3, 2]],  # 2 /8
        [-1, 2, "C3k2", [32, True]],  # 3
        [-1, 1, "Conv", [64, 3, 2]],  # 4 /16
        [-1, 1, "C3k2", [64, False]],  # 5
        [-1, 1, "Conv", [64, 3, 2]],  # 6 /32
        [-1, 1, "SPPF", [64, 5]],  # 7
    ],
    "head": [
        [-1, 1, "nn.Upsample", ["None", 2, "nearest"]],  # 8
        [[-1, 5], 1, "Concat", [1]],  # 9
        [-1, 1, "C2f", [64]],  # 10
        [[3, 10, 7], 1, "Detect", ["nc"]],  # 11
    ],
}


def _write_yaml(path, content):
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def _one_line_error(cfg, *fragments):
    with pytest.raises(CfgError) as info:
        DetectionModel(cfg, verbose=False)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_user_yaml_without_scales_builds_with_c3k2(tmp_path):
    path = _write_yaml(tmp_path / "tiny.yaml", {"nc": 2, **TINY_LAYERS})
    model = DetectionModel(str(path), verbose=False)
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    assert isinstance(model.model[3], C3k2) and len(model.model[3].m) == 2
    maps = model(torch.zeros(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, 66, 8, 8), (1, 66, 4, 4), (1, 66, 2, 2)]


def test_user_yaml_scale_suffix_resolves_to_the_base_file(tmp_path):
    scales = {"a": [1.0, 0.5, 1024], "b": [1.0, 1.0, 48]}
    _write_yaml(tmp_path / "tiny.yaml", {"nc": 2, "scales": scales, **TINY_LAYERS})
    half = DetectionModel(str(tmp_path / "tiny-a.yaml"), verbose=False)
    capped = DetectionModel(str(tmp_path / "tiny-b.yaml"), verbose=False)
    assert half.yaml["scale"] == "a" and capped.yaml["scale"] == "b"
    assert half.model[0].conv.out_channels == 8  # 16 * 0.5
    assert capped.model[4].conv.out_channels == 48  # 64 capped at 48


def test_yaml_without_scale_picks_the_first_with_a_warning(tmp_path, caplog):
    scales = {"a": [1.0, 0.5, 1024], "b": [1.0, 1.0, 1024]}
    path = _write_yaml(tmp_path / "tiny.yaml", {"nc": 2, "scales": scales, **TINY_LAYERS})
    assert DetectionModel(str(path), verbose=False).yaml["scale"] == "a"
    assert "names no scale" in caplog.text


def test_missing_file_and_unknown_scale(tmp_path):
    _one_line_error(str(tmp_path / "nothing.yaml"), "nothing.yaml", "not found")
    _one_line_error("yolo-q.yaml", "yolo.yaml", "unknown scale 'q'")
    _one_line_error("yolo-n.pt", "yolo-n.pt", ".yaml")


def test_unknown_module_names_the_file_and_layer(tmp_path):
    layers = {"nc": 2, "backbone": [[-1, 1, "Conv", [16, 3, 2]], [-1, 1, "Bogus", [8]]], "head": TINY_LAYERS["head"]}
    path = _write_yaml(tmp_path / "bad.yaml", layers)
    _one_line_error(str(path), "bad.yaml", "layer 1", "'Bogus'")


def test_bad_from_index(tmp_path):
    forward_reference = {"nc": 2, "backbone": [[-1, 1, "Conv", [16, 3, 2]], [5, 1, "Conv", [16, 3, 2]]], "head": []}
    _one_line_error(str(_write_yaml(tmp_path / "fwd.yaml", forward_reference)), "fwd.yaml", "layer 1", "from index 5")
    first_layer = {"nc": 2, "backbone": [[0, 1, "Conv", [16, 3, 2]]], "head": []}
    _one_line_error(first_layer, "layer 0", "from index 0")
    too_far_back = {"nc": 2, "backbone": [[-1, 1, "Conv", [16, 3, 2]], [-3, 1, "Conv", [16, 3, 2]]], "head": []}
    _one_line_error(too_far_back, "layer 1", "from index -3")


def test_malformed_yaml_shapes(tmp_path):
    _one_line_error(str(_write_yaml(tmp_path / "list.yaml", [1, 2])), "list.yaml", "mapping")
    _one_line_error({"nc": 2, "backbone": [[-1, 1, "Conv"]], "head": []}, "layer 0", "[from, repeats, module, args]")
    _one_line_error({"nc": 0, **TINY_LAYERS}, "nc=0")
    _one_line_error({"nc": 2, "backbone": TINY_LAYERS["backbone"], "head": []}, "the last layer must be a head (Detect, Segment, Segment26, Pose, Pose26, OBB, OBB26, Classify)")
    (tmp_path / "broken.yaml").write_text("nc: [1,\n  backbone")
    _one_line_error(str(tmp_path / "broken.yaml"), "broken.yaml", "cannot be read")


def test_layers_that_do_not_fit_together(tmp_path):
    mismatched = {"nc": 2, **TINY_LAYERS, "head": [[[-1, 5], 1, "Concat", [1]], [[3, 8, 7], 1, "Detect", ["nc"]]]}
    _one_line_error(str(_write_yaml(tmp_path / "shapes.yaml", mismatched)), "shapes.yaml", "do not fit")
    bad_args = {"nc": 2, **TINY_LAYERS, "backbone": [[-1, 1, "Conv", [16, 3, 2, 1, 1, 1, 1, 1, 1]]] + TINY_LAYERS["backbone"][1:]}
    _one_line_error(bad_args, "cannot build layers")
