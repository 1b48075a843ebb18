"""check_det_dataset and list_image_files: path resolution, names, and one-line errors."""

from pathlib import Path

import pytest
import yaml

from yolotrain.data.data_yaml import check_det_dataset, list_image_files
from yolotrain.errors import DatasetError


def write_yaml(path: Path, content: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(content))
    return path


@pytest.fixture
def root(tmp_path, write_image):
    for split in ("train", "val"):
        for i in range(2):
            write_image(tmp_path / "ds" / "images" / split / f"{split}{i}.png", 16, 16)
    return tmp_path / "ds"


def test_folder_splits_resolve_to_absolute_paths_and_names_list_becomes_dict(root):
    data = check_det_dataset(write_yaml(root / "data.yaml", {
        "train": "images/train", "val": "images/val", "names": ["cat", "dog"]}))
    assert data["train"] == str((root / "images" / "train").resolve())
    assert data["val"] == str((root / "images" / "val").resolve())
    assert data["test"] is None
    assert data["names"] == {0: "cat", 1: "dog"} and data["nc"] == 2
    assert data["yaml_file"] == str((root / "data.yaml").resolve())
    assert len(list_image_files(data["train"])) == 2


def test_relative_path_key_is_taken_from_the_yaml_folder(root, tmp_path):
    yaml_file = write_yaml(tmp_path / "cfgs" / "data.yaml", {
        "path": "../ds", "train": "images/train", "val": "images/val", "names": {0: "a", 1: "b"}, "nc": 2})
    data = check_det_dataset(str(yaml_file))
    assert data["path"] == str(root.resolve())
    assert data["train"] == str((root / "images" / "train").resolve())
    assert data["names"] == {0: "a", 1: "b"}


def test_txt_lists_resolve_lines_beside_the_txt_then_against_path(root):
    (root / "lists").mkdir()
    (root / "lists" / "train.txt").write_text("../images/train/train0.png\n\n# comment\nimages/train/train1.png\n")
    data = check_det_dataset(write_yaml(root / "data.yaml", {
        "train": "lists/train.txt", "val": ["images/val", "lists/train.txt"], "names": ["x"]}))
    train = list_image_files(data["train"], root=data["path"])
    assert train == [str((root / "images" / "train" / f"train{i}.png").resolve()) for i in range(2)]
    both = list_image_files(data["val"], root=data["path"])  # a list of a folder and a .txt
    assert isinstance(data["val"], list) and len(both) == 4


def test_names_with_string_keys_and_nc_only(root):
    data = check_det_dataset({"path": str(root), "train": "images/train", "val": "images/val",
                              "names": {"1": "b", "0": "a"}})
    assert data["names"] == {0: "a", 1: "b"}
    data = check_det_dataset({"path": str(root), "train": "images/train", "val": "images/val", "nc": 3})
    assert data["nc"] == 3 and data["names"][2] == "class2"


@pytest.mark.parametrize(
    "content, expected",
    [
        ({"train": "images/train", "names": ["a"]}, "missing key 'val'"),
        ({"train": "images/train", "val": "images/nope", "names": ["a"]}, "images/nope"),
        ({"train": "images/train", "val": "images/val"}, "missing key 'names'"),
        ({"train": "images/train", "val": "images/val", "names": ["a"], "nc": 2}, "'nc' is 2"),
        ({"train": "images/train", "val": "images/val", "names": {0: "a", 2: "c"}}, "without gaps"),
        ({"path": "nowhere", "train": "images/train", "val": "images/val", "names": ["a"]}, "'path'"),
        ({"train": "images/train", "val": "images/val", "names": ["a", ["b"]]}, "class 1 name ['b'] is not a text"),
        ({"train": "images/train", "val": "images/val", "names": ["a", None]}, "class 1 name None is not a text"),
        ({"train": "images/train", "val": "images/val", "names": [True]}, "class 0 name True is not a text"),
        ({"train": "images/train", "val": "images/val", "names": {0: {"x": 1}}}, "class 0 name {'x': 1} is not"),
        ({"train": "images/train", "val": "images/val", "names": ["lol" * 100_000]}, "300,000 characters long"),
    ],
)
def test_bad_yaml_raises_one_line_naming_yaml_and_key(root, content, expected):
    yaml_file = write_yaml(root / "bad.yaml", content)
    with pytest.raises(DatasetError) as e:
        check_det_dataset(yaml_file)
    message = str(e.value)
    assert expected in message and "bad.yaml" in message and "\n" not in message


def test_missing_yaml_file_names_it(tmp_path):
    with pytest.raises(DatasetError, match="missing.yaml"):
        check_det_dataset(tmp_path / "missing.yaml")


def test_folder_listing_is_recursive_sorted_and_filters_suffixes(tmp_path, write_image):
    write_image(tmp_path / "imgs" / "b.jpg", 12, 12)
    write_image(tmp_path / "imgs" / "sub" / "a.PNG", 12, 12)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    files = list_image_files(tmp_path / "imgs")
    assert [Path(f).name for f in files] == ["b.jpg", "a.PNG"]  # sorted by full path: imgs/b < imgs/sub/a
