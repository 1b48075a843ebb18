"""Label rows per task: polygons, keypoints and rotated corners parsed, cleaned, counted and cached with their box."""

from pathlib import Path

import numpy as np
import pytest

from yolotrain.data.instances import keep_objects
from yolotrain.data.label_rows import LabelLayout
from yolotrain.data.scan import img2label_paths, label_cache_path, scan_labels

POLYGON = "1 0.1 0.2 0.5 0.2 0.3 0.6\n"  # a triangle: extent x 0.1-0.5, y 0.2-0.6
POLYGON_BOX = [0.3, 0.4, 0.4, 0.4]
SQUARE = "0 0.6 0.6 0.9 0.6 0.9 0.9 0.6 0.9\n"  # 4 points
POSE = LabelLayout.for_task("pose", kpt_shape=[2, 3])


def scan(yolo_split, labels: dict, layout: LabelLayout, cached=False, nc=3, write=True):
    images = yolo_split({stem: (32, 32, label) for stem, label in labels.items()}) if write else yolo_split({})
    files = sorted(str(p) for p in images.iterdir())
    cache = label_cache_path(img2label_paths(files)) if cached else None
    records, report = scan_labels(files, nc, cache, prefix="train", layout=layout)
    return {Path(r["im_file"]).stem: r for r in records}, report


def test_detection_takes_a_polygon_rows_extent_as_its_box(yolo_split):
    records, report = scan(yolo_split, {"a": "0 0.5 0.5 0.2 0.2\n" + POLYGON}, LabelLayout.for_task("detect"))
    np.testing.assert_allclose(records["a"]["bboxes"], [[0.5, 0.5, 0.2, 0.2], POLYGON_BOX], atol=1e-6)
    assert records["a"]["cls"][:, 0].tolist() == [0, 1] and "segments" not in records["a"]
    assert not report.offenders and not report.counts["clipped"]


def test_segment_rows_keep_each_polygon_with_its_extent(yolo_split):
    records, report = scan(yolo_split, {"a": POLYGON + SQUARE}, LabelLayout.for_task("segment"))
    record = records["a"]
    np.testing.assert_allclose(record["bboxes"], [POLYGON_BOX, [0.75, 0.75, 0.3, 0.3]], atol=1e-6)
    assert [s.shape for s in record["segments"]] == [(3, 2), (4, 2)]
    np.testing.assert_allclose(record["segments"][0], [[0.1, 0.2], [0.5, 0.2], [0.3, 0.6]], atol=1e-6)
    assert report.boxes == 2 and not report.offenders


@pytest.mark.parametrize(
    "task, row, reason",
    [
        ("segment", "0 0.5 0.5 0.2 0.2\n", "expected a polygon (class and at least 3 x y points"),
        ("segment", "0 0.1 0.1 0.2 0.2 0.3\n", "got 6"),
        ("obb", "0 0.5 0.5 0.2 0.2\n", "expected 9 values (class and 4 corners x y), got 5"),
        ("pose", "0 0.5 0.5 0.2 0.2 0.1 0.1\n", "expected 11 values (class x y w h and 2 keypoints of 3), got 7"),
    ],
)
def test_a_row_of_another_tasks_shape_is_dropped_with_the_expected_layout(yolo_split, task, row, reason):
    layout = POSE if task == "pose" else LabelLayout.for_task(task)
    good = {"segment": POLYGON, "obb": SQUARE, "pose": "0 0.5 0.5 0.4 0.4 0.4 0.4 2 0.6 0.6 1\n"}[task]
    records, report = scan(yolo_split, {"a": good + row}, layout)
    assert len(records["a"]["cls"]) == 1 and report.counts["wrong_columns"] == 1
    assert reason in report.offenders[0][1] and report.offenders[0][1].startswith("line 2: ")


def test_pose_rows_keep_keypoints_and_do_not_range_check_visibility(yolo_split):
    rows = "0 0.5 0.5 0.4 0.4 0.4 0.4 2 1.005 0.6 1\n0 0.5 0.5 0.4 0.4 1.5 0.6 2 0.2 0.2 0\n"
    records, report = scan(yolo_split, {"a": rows}, POSE)
    keypoints = records["a"]["keypoints"]
    assert keypoints.shape == (1, 2, 3)
    np.testing.assert_allclose(keypoints[0], [[0.4, 0.4, 2], [1.0, 0.6, 1]], atol=1e-6)  # 1.005 clipped to 1
    assert report.counts["clipped"] == 1 and report.counts["out_of_range"] == 1  # the keypoint at x=1.5


def test_obb_rows_keep_their_four_corners(yolo_split):
    rotated = "2 0.5 0.1 0.9 0.5 0.5 0.9 0.1 0.5\n"  # a square turned by 45 degrees
    records, _ = scan(yolo_split, {"a": rotated}, LabelLayout.for_task("obb"))
    assert records["a"]["corners"].shape == (1, 4, 2)
    np.testing.assert_allclose(records["a"]["corners"][0], [[0.5, 0.1], [0.9, 0.5], [0.5, 0.9], [0.1, 0.5]])
    np.testing.assert_allclose(records["a"]["bboxes"], [[0.5, 0.5, 0.8, 0.8]], atol=1e-6)


def test_duplicate_polygons_are_removed_but_polygons_sharing_a_box_stay(yolo_split):
    same_extent = "1 0.1 0.2 0.5 0.6 0.1 0.6\n"  # another triangle in the same box as POLYGON
    records, report = scan(yolo_split, {"a": POLYGON + same_extent + POLYGON}, LabelLayout.for_task("segment"))
    assert len(records["a"]["segments"]) == 2 and report.counts["duplicates"] == 1


@pytest.mark.parametrize("task", ["detect", "segment", "pose", "obb"])
def test_cache_gives_back_the_same_records_for_each_layout(yolo_split, task):
    layout = POSE if task == "pose" else LabelLayout.for_task(task)
    labels = {
        "detect": {"a": "0 0.5 0.5 0.2 0.2\n" + POLYGON, "b": None},
        "segment": {"a": POLYGON + SQUARE, "b": SQUARE, "c": None},
        "pose": {"a": "0 0.5 0.5 0.4 0.4 0.4 0.4 2 0.6 0.6 1\n" * 1, "b": None},
        "obb": {"a": SQUARE + "1 0.1 0.1 0.3 0.1 0.3 0.3 0.1 0.3\n", "b": None},
    }[task]
    fresh, _ = scan(yolo_split, labels, layout, cached=True)
    again, report = scan(yolo_split, labels, layout, cached=True, write=False)
    assert report.from_cache and fresh.keys() == again.keys()
    for stem in fresh:
        assert fresh[stem].keys() == again[stem].keys()
        for key in fresh[stem]:
            if key in ("im_file", "shape"):
                assert fresh[stem][key] == again[stem][key]
            elif key == "segments":
                assert all(np.array_equal(x, y) for x, y in zip(fresh[stem][key], again[stem][key]))
                assert len(fresh[stem][key]) == len(again[stem][key])
            else:
                np.testing.assert_array_equal(fresh[stem][key], again[stem][key])
                assert fresh[stem][key].shape == again[stem][key].shape


def test_a_cache_scanned_for_one_task_is_not_read_for_another(yolo_split):
    scan(yolo_split, {"a": POLYGON}, LabelLayout.for_task("detect"), cached=True)
    records, report = scan(yolo_split, {"a": POLYGON}, LabelLayout.for_task("segment"), cached=True, write=False)
    assert not report.from_cache and len(records["a"]["segments"]) == 1


def test_pose_layout_needs_a_valid_kpt_shape():
    with pytest.raises(ValueError, match="kpt_shape"):
        LabelLayout.for_task("pose", kpt_shape=[17, 4])


def test_keeping_objects_of_a_record_keeps_its_polygons_of_varying_length(yolo_split):
    records, _ = scan(yolo_split, {"a": POLYGON + SQUARE}, LabelLayout.for_task("segment"))
    kept = keep_objects(records["a"], np.array([False, True]))
    assert kept["cls"][:, 0].tolist() == [0] and [s.shape for s in kept["segments"]] == [(4, 2)]
