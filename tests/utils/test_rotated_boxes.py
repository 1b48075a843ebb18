"""Rotated-box geometry (utils.obb) and rotated NMS: conventions, exact IoU against shapely, probiou against stored
values of the reference models' formula, NMS against a plain greedy loop."""

import math

import numpy as np
import pytest
import torch

from yolotrain.utils import nms as nms_module
from yolotrain.utils import obb
from yolotrain.utils.nms import non_max_suppression_rotated
from yolotrain.utils.obb import (corners_to_xywhr, min_area_corners, polygon_iou, probiou, probiou_pairs,
                                 regularize_xywhr, rotated_iou, xywhr_to_corners)

shapely = pytest.importorskip("shapely")


def random_xywhr(generator, n, low=1.0, high=60.0, spread=100.0):
    """(n, 5) float64 boxes with centres in [0, spread), sides in [low, high) and angles over [-2 pi, 2 pi)."""
    centre = torch.rand(n, 2, generator=generator, dtype=torch.float64) * spread
    sides = low + torch.rand(n, 2, generator=generator, dtype=torch.float64) * (high - low)
    angle = (torch.rand(n, 1, generator=generator, dtype=torch.float64) - 0.5) * 4 * math.pi
    return torch.cat((centre, sides, angle), 1)


def assert_same_corner_sets(corners_a, corners_b, atol=1e-6):
    """Each rectangle's four corners are the same points, in whatever order: (n, 4, 2) each."""
    distance = torch.cdist(corners_a, corners_b)  # (n, 4, 4)
    assert distance.amin(2).max() < atol and distance.amin(1).max() < atol


def angle_difference_mod_pi(a, b):
    return torch.remainder(a - b + math.pi / 2, math.pi) - math.pi / 2


# ---------------------------------------------------------------- conversions


def test_corners_follow_the_reference_order_and_take_numpy():
    boxes = np.array([[10.0, 20.0, 4.0, 2.0, 0.0], [0.0, 0.0, 4.0, 2.0, math.pi / 2]])
    corners = xywhr_to_corners(boxes)
    assert isinstance(corners, np.ndarray) and corners.shape == (2, 4, 2)
    # u' = (w/2 cos a, w/2 sin a), v' = (-h/2 sin a, h/2 cos a); c+u'+v', c+u'-v', c-u'-v', c-u'+v'
    np.testing.assert_allclose(corners[0], [[12, 21], [12, 19], [8, 19], [8, 21]], atol=1e-12)
    np.testing.assert_allclose(corners[1], [[-1, 2], [1, 2], [1, -2], [-1, -2]], atol=1e-12)
    batched = xywhr_to_corners(torch.from_numpy(boxes).reshape(1, 2, 5).expand(3, -1, -1))
    assert batched.shape == (3, 2, 4, 2) and torch.allclose(batched[2], torch.from_numpy(corners))


def test_corners_to_xywhr_matches_stored_reference_values():
    """Expected values from the reference's min-area-rectangle conversion (OpenCV, float32) on fixed points: a
    rectangle, a rotated square, three general quadrilaterals (whose best orientations are clearly better than the
    next: a near tie may go either way) and an upright rectangle."""
    points = np.array([[[0, 0], [4, 0], [4, 2], [0, 2]], [[0, 0], [3, 1], [2, 4], [-1, 3]],
                       [[5.5, 5.2], [25.1, 9.3], [21.7, 14.8], [3.2, 11.9]],
                       [[2.3, 1.1], [17.9, 4.4], [15.2, 16.8], [0.4, 9.7]],
                       [[40.2, 3.1], [61.0, 30.5], [38.7, 35.2], [30.1, 12.0]],
                       [[0, 0], [2, 0], [2, 4], [0, 4]]], dtype=np.float64)
    expected = np.array([[2.0, 1.0, 4.0, 2.0, 0.0],
                         [0.9999998807907104, 2.0, 3.1622776985168457, 3.1622774600982666, 1.8925469328411468],
                         [14.15000057220459, 10.600000381469727, 20.903669357299805, 7.028982162475586,
                          0.20621029425954385],
                         [8.746969223022461, 8.90095329284668, 15.971729278564453, 12.690546989440918,
                          0.214395386711848],
                         [42.39458465576172, 23.028926849365234, 34.40058135986328, 20.603721618652344,
                          0.921481367463726],
                         [1.0, 2.0, 4.0, 2.0, 1.5707963267948966]])
    ours = corners_to_xywhr(points)
    assert isinstance(ours, np.ndarray) and ours.dtype == np.float64
    np.testing.assert_allclose(ours, expected, atol=2e-5)
    tensor = corners_to_xywhr(torch.from_numpy(points).float())
    assert tensor.dtype == torch.float32 and torch.allclose(tensor.double(), torch.from_numpy(expected), atol=2e-5)


def test_round_trip_over_the_whole_angle_range():
    generator = torch.Generator().manual_seed(0)
    boxes = random_xywhr(generator, 4000)
    boxes[::7, 4] = torch.arange(0, len(boxes[::7]), dtype=torch.float64) * (math.pi / 4)  # exact multiples of pi/4
    corners = xywhr_to_corners(boxes)
    back = corners_to_xywhr(corners)
    assert back.shape == boxes.shape and back.dtype == torch.float64
    assert_same_corner_sets(xywhr_to_corners(back), corners)
    # canonical: w is the longer side, the angle its direction in [-pi/4, 3pi/4)
    assert (back[:, 2] >= back[:, 3]).all()
    assert (back[:, 4] >= -math.pi / 4).all() and (back[:, 4] < 3 * math.pi / 4).all()
    w, h, angle = boxes[:, 2], boxes[:, 3], boxes[:, 4]
    long_angle = torch.where(w >= h, angle, angle + math.pi / 2)
    torch.testing.assert_close(back[:, 2], torch.maximum(w, h), rtol=0, atol=1e-9)
    torch.testing.assert_close(back[:, 3], torch.minimum(w, h), rtol=0, atol=1e-9)
    assert angle_difference_mod_pi(back[:, 4], long_angle).abs().max() < 1e-9
    torch.testing.assert_close(back[:, :2], boxes[:, :2], rtol=0, atol=1e-9)
    # canonical boxes come back as they are (up to rounding at the ends of the angle range)
    again = corners_to_xywhr(xywhr_to_corners(back))
    torch.testing.assert_close(again[:, :4], back[:, :4], rtol=0, atol=1e-9)
    assert angle_difference_mod_pi(again[:, 4], back[:, 4]).abs().max() < 1e-9


def test_square_orientation_and_axis_aligned_boxes():
    """A square's angle is only defined modulo pi/2; exact squares get the reference's answer."""
    points = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [2.0, 2.0], [0.0, 2.0]],
                           [[1.0, 0.0], [2.0, 1.0], [1.0, 2.0], [0.0, 1.0]],
                           [[0.0, 0.0], [4.0, 0.0], [4.0, 2.0], [0.0, 2.0]]], dtype=torch.float64)
    expected = torch.tensor([[1.0, 1.0, 2.0, 2.0, math.pi / 2], [1.0, 1.0, math.sqrt(2), math.sqrt(2), -math.pi / 4],
                             [2.0, 1.0, 4.0, 2.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(corners_to_xywhr(points), expected, rtol=0, atol=1e-12)


def test_point_order_does_not_matter():
    generator = torch.Generator().manual_seed(1)
    corners = xywhr_to_corners(random_xywhr(generator, 500))
    shuffled = corners[:, [0, 2, 1, 3]]  # a self-crossing order: the min-area rectangle is still the box
    assert_same_corner_sets(xywhr_to_corners(corners_to_xywhr(shuffled)), corners)


def test_min_area_rectangle_of_warped_box_is_tight():
    generator = torch.Generator().manual_seed(2)
    corners = xywhr_to_corners(random_xywhr(generator, 2000, spread=400.0)).numpy()  # (n, 4, 2)
    rng = np.random.default_rng(2)
    n = len(corners)
    matrix = np.tile(np.eye(3), (n, 1, 1))
    matrix[:, 0, 1] = rng.uniform(-0.4, 0.4, n)  # shear
    matrix[:, 1, 0] = rng.uniform(-0.4, 0.4, n)
    matrix[:, 2, :2] = rng.uniform(-5e-4, 5e-4, (n, 2))  # perspective
    homogeneous = np.concatenate((corners, np.ones((n, 4, 1))), 2) @ matrix.transpose(0, 2, 1)
    warped = homogeneous[..., :2] / homogeneous[..., 2:]  # (n, 4, 2) general quadrilaterals
    fitted = min_area_corners(warped.astype(np.float32))
    assert fitted.shape == (n, 4, 2) and fitted.dtype == np.float32
    rect = corners_to_xywhr(warped)  # (n, 5) float64
    area = rect[:, 2] * rect[:, 3]
    # it encloses the points...
    cos, sin = np.cos(rect[:, 4])[:, None], np.sin(rect[:, 4])[:, None]
    offset = warped - rect[:, None, :2]
    along, across = offset[..., 0] * cos + offset[..., 1] * sin, offset[..., 1] * cos - offset[..., 0] * sin
    assert (np.abs(along) <= rect[:, 2:3] / 2 + 1e-9).all() and (np.abs(across) <= rect[:, 3:4] / 2 + 1e-9).all()
    # ...no larger than the axis-aligned box, nor than the best of a fine search over orientations
    extent = warped.max(1) - warped.min(1)
    assert (area <= extent.prod(1) * (1 + 1e-12)).all()
    grid = np.linspace(0, math.pi / 2, 2001)
    along = warped[..., 0, None] * np.cos(grid) + warped[..., 1, None] * np.sin(grid)  # (n, 4, G)
    across = warped[..., 1, None] * np.cos(grid) - warped[..., 0, None] * np.sin(grid)
    searched = (np.ptp(along, axis=1) * np.ptp(across, axis=1)).min(1)
    assert (area <= searched * (1 + 1e-12)).all()
    np.testing.assert_allclose(xywhr_to_corners(rect), min_area_corners(warped), atol=1e-9)


def test_min_area_corners_of_a_rectangle_and_of_nothing():
    generator = torch.Generator().manual_seed(3)
    corners = xywhr_to_corners(random_xywhr(generator, 100))
    assert_same_corner_sets(torch.from_numpy(min_area_corners(corners.numpy())), corners)
    assert min_area_corners(np.zeros((0, 4, 2), np.float32)).shape == (0, 4, 2)
    assert corners_to_xywhr(torch.zeros(0, 4, 2)).shape == (0, 5)
    more_points = min_area_corners(np.array([[[0, 0], [4, 0], [4, 2], [0, 2], [2, 1], [1, 1.5]]], np.float64))
    assert_same_corner_sets(torch.from_numpy(more_points), torch.tensor([[[0, 0], [4, 0], [4, 2], [0, 2.0]]]).double())


def test_regularize_matches_the_reference_definition():
    boxes = torch.tensor([[0.0, 0.0, 4.0, 2.0, 0.3], [0.0, 0.0, 4.0, 2.0, 2.0], [0.0, 0.0, 4.0, 2.0, -0.5],
                          [0.0, 0.0, 4.0, 2.0, math.pi / 2], [1.0, 2.0, 2.0, 4.0, 3.5]], dtype=torch.float64)
    expected = torch.tensor([[0.0, 0.0, 4.0, 2.0, 0.3], [0.0, 0.0, 2.0, 4.0, 2.0 - math.pi / 2],
                             [0.0, 0.0, 2.0, 4.0, math.pi / 2 - 0.5], [0.0, 0.0, 2.0, 4.0, 0.0],
                             [1.0, 2.0, 2.0, 4.0, 3.5 - math.pi]], dtype=torch.float64)
    torch.testing.assert_close(regularize_xywhr(boxes), expected, rtol=0, atol=1e-12)
    generator = torch.Generator().manual_seed(4)
    boxes = random_xywhr(generator, 1000)
    regular = regularize_xywhr(boxes)
    assert (regular[:, 4] >= 0).all() and (regular[:, 4] < math.pi / 2).all()
    assert_same_corner_sets(xywhr_to_corners(regular), xywhr_to_corners(boxes))
    assert isinstance(regularize_xywhr(boxes.numpy()), np.ndarray)


# ---------------------------------------------------------------- probiou

PROBIOU_BOXES1 = [[10.0, 20.0, 30.0, 10.0, 0.3], [50.0, 50.0, 20.0, 20.0, 0.0], [0.0, 0.0, 8.0, 2.0, 1.2]]
PROBIOU_BOXES2 = [[12.0, 21.0, 28.0, 12.0, 0.5], [55.0, 45.0, 20.0, 10.0, -0.7],
                  [0.0, 0.0, 2.0, 8.0, 1.2 - math.pi / 2], [10.0, 20.0, 30.0, 10.0, 0.3]]
# The reference's batch_probiou / probiou on the boxes above (float64), computed once.
PROBIOU_EXPECTED = [[0.7955068216088794, 3.8885279758149593e-05, 0.0004602313744098696, 0.9995527864100204],
                    [0.0011962675685525115, 0.49098076300880944, -4.999999791976961e-08, 0.00047091244059016546],
                    [0.003457778389599042, -4.999999880794803e-08, 0.9995527864100204, 0.0004602313744098696]]
PROBIOU_PAIRS_FLOOR = [0.7956118070581246, 0.49112033671541144, 0.9995527864100204]  # floor=0.01
PROBIOU_PAIRS_CIOU = [0.7954689601002075, 0.4877858047802253, 0.5265408044151823]


def test_probiou_matches_stored_reference_values():
    boxes1 = torch.tensor(PROBIOU_BOXES1, dtype=torch.float64)
    boxes2 = torch.tensor(PROBIOU_BOXES2, dtype=torch.float64)
    expected = torch.tensor(PROBIOU_EXPECTED, dtype=torch.float64)
    torch.testing.assert_close(probiou(boxes1, boxes2), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(probiou_pairs(boxes1, boxes2[:3]), expected.diagonal(), rtol=0, atol=1e-12)
    torch.testing.assert_close(probiou_pairs(boxes1, boxes2[:3], floor=0.01),
                               torch.tensor(PROBIOU_PAIRS_FLOOR, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(probiou_pairs(boxes1, boxes2[:3], ciou=True),
                               torch.tensor(PROBIOU_PAIRS_CIOU, dtype=torch.float64), rtol=0, atol=1e-12)
    # float32: 1 - exp(-distance) cancels for near-identical boxes
    torch.testing.assert_close(probiou(boxes1.float(), boxes2.float()), expected.float(), rtol=0, atol=1e-4)


def test_probiou_batches_and_ignores_the_encoding_of_a_rectangle():
    generator = torch.Generator().manual_seed(5)
    boxes1, boxes2 = random_xywhr(generator, 24).view(3, 8, 5), random_xywhr(generator, 6)
    batched = probiou(boxes1, boxes2[None])  # (3, 8, 6)
    assert batched.shape == (3, 8, 6)
    torch.testing.assert_close(batched[1], probiou(boxes1[1], boxes2))
    torch.testing.assert_close(batched[1, :, 2], probiou_pairs(boxes1[1], boxes2[2]))  # pairs broadcast
    # (w, h, a), (h, w, a + pi/2) and (w, h, a + pi) are one rectangle
    swapped = boxes2[:, [0, 1, 3, 2, 4]] + torch.tensor([0, 0, 0, 0, math.pi / 2], dtype=torch.float64)
    turned = boxes2 + torch.tensor([0, 0, 0, 0, math.pi], dtype=torch.float64)
    torch.testing.assert_close(probiou(boxes1[1], swapped), probiou(boxes1[1], boxes2))
    torch.testing.assert_close(probiou(boxes1[1], turned), probiou(boxes1[1], boxes2))


def test_probiou_pairs_is_differentiable():
    generator = torch.Generator().manual_seed(6)
    pred = random_xywhr(generator, 32, spread=20.0).requires_grad_()
    target = random_xywhr(generator, 32, spread=20.0)
    (1 - probiou_pairs(pred, target, floor=0.01)).sum().backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda p: probiou_pairs(p, target[:4]), (pred.detach()[:4].requires_grad_(),))


# ---------------------------------------------------------------- exact polygon IoU


def shapely_iou(corners1, corners2):
    """IoU of paired (n, 4, 2) quadrilaterals with shapely (0 where the union is empty). On a 1e-12 grid: GEOS's
    default overlay can return a whole box as the intersection of two boxes that share an edge up to float
    rounding; its snap-rounding overlay is robust, and moves areas by ~1e-12 here."""
    polygons1 = shapely.polygons(corners1.numpy())
    polygons2 = shapely.polygons(corners2.numpy())
    inter = shapely.area(shapely.intersection(polygons1, polygons2, grid_size=1e-12))
    union = shapely.area(polygons1) + shapely.area(polygons2) - inter
    return torch.from_numpy(np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0))


def paired_cases(generator):
    """Pairs of rotated boxes (n, 5) x (n, 5): overlapping, nested, disjoint, touching, identical, thin."""
    boxes1 = random_xywhr(generator, 6000)
    boxes2 = random_xywhr(generator, 6000)
    near = boxes1[:2000, :2] + (torch.rand(2000, 2, generator=generator, dtype=torch.float64) - 0.5) * 40
    boxes2[:2000, :2] = near  # mostly overlapping
    nested = boxes1[2000:3000].clone()  # a smaller box inside: any angle fits inside the inscribed circle
    inner_side = boxes1[2000:3000, 2:4].amin(1, keepdim=True) / math.sqrt(2) * 0.9
    nested[:, 2:4] = inner_side * torch.rand(1000, 2, generator=generator, dtype=torch.float64).clamp(min=0.05)
    nested[:, 4] = torch.rand(1000, generator=generator, dtype=torch.float64) * math.pi
    boxes2[2000:3000] = nested
    touching = boxes1[3000:3500].clone()  # shifted by its width along its w side: the two share an edge
    angle = touching[:, 4]
    touching[:, 0] += touching[:, 2] * angle.cos()
    touching[:, 1] += touching[:, 2] * angle.sin()
    boxes2[3000:3500] = touching
    sliding = boxes1[3500:4000].clone()  # shifted along its h side by a fraction: collinear overlapping edges
    fraction = torch.rand(500, generator=generator, dtype=torch.float64)
    sliding[:, 0] -= fraction * sliding[:, 3] * sliding[:, 4].sin()
    sliding[:, 1] += fraction * sliding[:, 3] * sliding[:, 4].cos()
    boxes2[3500:4000] = sliding
    boxes2[4000:4500] = boxes1[4000:4500]  # identical
    boxes1[4500:5000, 3] = boxes1[4500:5000, 2] * 1e-3  # thin boxes crossing others
    boxes2[4500:5000, :2] = boxes1[4500:5000, :2] + 3
    boxes2[5000:5500, :2] += 500  # far apart
    return boxes1, boxes2


def test_polygon_iou_matches_shapely_on_random_pairs():
    generator = torch.Generator().manual_seed(7)
    boxes1, boxes2 = paired_cases(generator)
    corners1, corners2 = xywhr_to_corners(boxes1), xywhr_to_corners(boxes2)
    ours = polygon_iou(corners1[:, None], corners2[:, None])[:, 0, 0]  # (n,): each pair its own batch entry
    expected = shapely_iou(corners1, corners2)
    assert (ours - expected).abs().max() < 1e-9
    assert (ours[4000:4500] - 1).abs().max() < 1e-9  # identical
    assert ours[3000:3500].max() < 1e-9  # touching
    assert (ours[5000:5500] == 0).all()  # disjoint
    assert (ours[:2000] > 0).sum() > 1000 and (ours[2000:3000] > 0).all()


def test_polygon_iou_pairwise_matrix_matches_shapely():
    generator = torch.Generator().manual_seed(8)
    boxes1, boxes2 = random_xywhr(generator, 70, spread=80.0), random_xywhr(generator, 50, spread=80.0)
    corners1, corners2 = xywhr_to_corners(boxes1), xywhr_to_corners(boxes2)
    ours = polygon_iou(corners1, corners2)  # (70, 50)
    assert ours.shape == (70, 50)
    rows, cols = torch.meshgrid(torch.arange(70), torch.arange(50), indexing="ij")
    expected = shapely_iou(corners1[rows.flatten()], corners2[cols.flatten()]).view(70, 50)
    assert (ours - expected).abs().max() < 1e-9 and (expected > 0).sum() > 100
    batched = polygon_iou(corners1.view(7, 10, 4, 2), corners2[None])  # (7, 10, 50): leading dims broadcast
    torch.testing.assert_close(batched.view(70, 50), ours, rtol=0, atol=0)
    torch.testing.assert_close(rotated_iou(boxes1, boxes2), ours, rtol=0, atol=0)


@pytest.mark.parametrize("at_least", [0.5, 0.75])
def test_polygon_iou_at_least_keeps_every_pair_that_reaches_it(at_least):
    """Pairs skipped by the area bound are exactly those below the threshold: the rest are computed as they are."""
    generator = torch.Generator().manual_seed(7)
    boxes1, boxes2 = paired_cases(generator)
    corners1, corners2 = xywhr_to_corners(boxes1)[:, None], xywhr_to_corners(boxes2)[:, None]
    every = polygon_iou(corners1, corners2)[:, 0, 0]
    bounded = polygon_iou(corners1, corners2, at_least=at_least)[:, 0, 0]
    reaching = every >= at_least
    assert reaching.sum() > 100 and (every[~reaching] > 0).sum() > 100
    assert torch.equal(bounded[reaching], every[reaching])
    assert (bounded[~reaching] < at_least).all()
    assert (bounded[~reaching] == 0).sum() > (every[~reaching] == 0).sum() + 100  # many were never intersected


def test_polygon_iou_on_exact_hand_cases():
    square = torch.tensor([[0.0, 0.0], [2.0, 0.0], [2.0, 2.0], [0.0, 2.0]])
    cases = torch.stack([
        square,  # identical
        square + torch.tensor([1.0, 0.0]),  # half overlap: 2 / 6
        square + torch.tensor([2.0, 0.0]),  # shared edge
        square + torch.tensor([2.0, 2.0]),  # shared corner
        square * 0.5 + 0.5,  # inside: 1 / 4
        torch.tensor([[1.0, -0.5], [2.5, 1.0], [1.0, 2.5], [-0.5, 1.0]]),  # a diamond over the square
        torch.tensor([[0.0, 0.0], [2.0, 0.0], [2.0, 0.0], [0.0, 0.0]]),  # zero area
        square.flip(0),  # clockwise
    ])
    diamond_area = 3 * 3 / 2  # both diagonals 3
    inter = 4 - 4 * 0.5 * 0.5 * 0.5  # the square less four corner triangles with legs 0.5
    expected = torch.tensor([1.0, 1 / 3, 0.0, 0.0, 0.25, inter / (4 + diamond_area - inter), 0.0, 1.0])
    ours = polygon_iou(square[None, None], cases[None])[0, 0]
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-7)
    degenerate = polygon_iou(cases[6:7], cases[6:7])
    assert degenerate.item() == 0


def test_polygon_iou_in_small_chunks_is_the_same(monkeypatch):
    generator = torch.Generator().manual_seed(9)
    boxes1, boxes2 = random_xywhr(generator, 40, spread=60.0), random_xywhr(generator, 30, spread=60.0)
    whole = rotated_iou(boxes1, boxes2)
    monkeypatch.setattr(obb, "POLYGON_IOU_PAIRS", {"cpu": 7, "other": 7})
    torch.testing.assert_close(rotated_iou(boxes1, boxes2), whole, rtol=0, atol=0)
    assert polygon_iou(torch.zeros(2, 0, 4, 2), torch.zeros(2, 5, 4, 2)).shape == (2, 0, 5)


# ---------------------------------------------------------------- rotated NMS


def reference_probiou(a, b, eps=1e-7):
    """The probabilistic IoU of two xywhr boxes given as Python floats, written out term by term."""
    def covariance(box):
        var_w, var_h, cos, sin = box[2] ** 2 / 12, box[3] ** 2 / 12, math.cos(box[4]), math.sin(box[4])
        return var_w * cos**2 + var_h * sin**2, var_w * sin**2 + var_h * cos**2, (var_w - var_h) * cos * sin

    (a1, b1, c1), (a2, b2, c2) = covariance(a), covariance(b)
    det_sum = (a1 + a2) * (b1 + b2) - (c1 + c2) ** 2
    t1 = ((a1 + a2) * (a[1] - b[1]) ** 2 + (b1 + b2) * (a[0] - b[0]) ** 2) / (det_sum + eps) * 0.25
    t2 = ((c1 + c2) * (b[0] - a[0]) * (a[1] - b[1])) / (det_sum + eps) * 0.5
    t3 = 0.5 * math.log(det_sum / (4 * math.sqrt(max(a1 * b1 - c1**2, 0) * max(a2 * b2 - c2**2, 0)) + eps) + eps)
    distance = min(max(t1 + t2 + t3, eps), 100.0)
    return 1 - math.sqrt(1 - math.exp(-distance) + eps)


def reference_rotated_nms_one_image(pred, conf_thres, iou_thres, agnostic, max_det, multi_label=False):
    """Textbook greedy NMS one box at a time: pred (A, 4 + nc + 1) -> list of (cx, cy, w, h, conf, cls, angle)."""
    candidates = []
    for row in pred.tolist():
        box, scores, angle = row[:4], row[4:-1], row[-1]
        if multi_label:
            labels = [c for c in range(len(scores)) if scores[c] > conf_thres]
        else:
            best = max(range(len(scores)), key=lambda c: (scores[c], -c))
            labels = [best] if scores[best] > conf_thres else []
        candidates += [(*box, scores[c], float(c), angle) for c in labels]
    candidates.sort(key=lambda d: -d[4])
    kept = []
    for det in candidates:
        rotated = det[:4] + det[6:]
        if all((not agnostic and other[5] != det[5]) or reference_probiou(other[:4] + other[6:], rotated) <= iou_thres
               for other in kept):
            kept.append(det)
    return kept[:max_det]


def random_rotated_prediction(generator, batch, num_classes, num_anchors, image_size=64.0):
    """(B, 4 + nc + 1, A) float64: clustered boxes (many overlap), random scores, angles in [-pi/4, 3pi/4)."""
    centres = torch.rand(batch, 2, num_anchors, generator=generator, dtype=torch.float64) * image_size
    centres = torch.round(centres / 8) * 8 + torch.randn(batch, 2, num_anchors, generator=generator,
                                                         dtype=torch.float64) * 2
    sizes = 3 + torch.rand(batch, 2, num_anchors, generator=generator, dtype=torch.float64) * 20
    scores = torch.rand(batch, num_classes, num_anchors, generator=generator, dtype=torch.float64)
    angle = (torch.rand(batch, 1, num_anchors, generator=generator, dtype=torch.float64) - 0.25) * math.pi
    return torch.cat([centres, sizes, scores, angle], 1)


def prediction_from_rows(rows, num_classes):
    """(1, 4 + nc + 1, A) from rows (cx, cy, w, h, angle, cls, conf): one class scores, the others 0."""
    columns = []
    for cx, cy, w, h, angle, cls, conf in rows:
        scores = [0.0] * num_classes
        scores[cls] = conf
        columns.append([cx, cy, w, h, *scores, angle])
    return torch.tensor(columns).T[None]


def assert_same_rotated_detections(ours, reference):
    expected = torch.tensor(reference, dtype=ours.dtype).reshape(-1, 7)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("agnostic", [False, True])
@pytest.mark.parametrize("multi_label", [False, True])
def test_rotated_nms_matches_reference_greedy_nms(seed, agnostic, multi_label):
    generator = torch.Generator().manual_seed(seed)
    prediction = random_rotated_prediction(generator, batch=3, num_classes=3, num_anchors=150)
    output = non_max_suppression_rotated(prediction, conf_thres=0.3, iou_thres=0.5, agnostic=agnostic,
                                         multi_label=multi_label, max_det=40)
    assert len(output) == 3
    for image in range(3):
        expected = reference_rotated_nms_one_image(prediction[image].T, 0.3, 0.5, agnostic, 40, multi_label)
        assert_same_rotated_detections(output[image], expected)


def test_rotated_nms_in_small_blocks_is_still_exact(monkeypatch):
    generator = torch.Generator().manual_seed(11)
    prediction = random_rotated_prediction(generator, batch=2, num_classes=2, num_anchors=200)
    whole = non_max_suppression_rotated(prediction, conf_thres=0.2, iou_thres=0.4, max_det=300)
    monkeypatch.setattr(nms_module, "NMS_BLOCK_SIZE", 5)
    blocked = non_max_suppression_rotated(prediction, conf_thres=0.2, iou_thres=0.4, max_det=300)
    for ours, expected in zip(blocked, whole):
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_rotated_overlaps_of_one_class_keep_the_best_and_classes_stay_apart():
    rows = [(50, 50, 40, 10, 0.5, 0, 0.9), (51, 50, 40, 10, 0.55, 0, 0.8),  # one class, almost the same box
            (51, 51, 40, 10, 0.5, 1, 0.7),  # the same box, another class
            (10, 10, 8, 8, 0.0, 0, 0.6)]  # elsewhere
    prediction = prediction_from_rows(rows, num_classes=2)
    (kept,) = non_max_suppression_rotated(prediction, conf_thres=0.25, iou_thres=0.5)
    assert kept.shape == (3, 7)
    torch.testing.assert_close(kept[:, 4], torch.tensor([0.9, 0.7, 0.6]))  # descending conf
    torch.testing.assert_close(kept[:, 5], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(kept[0], torch.tensor([50, 50, 40, 10, 0.9, 0, 0.5]))  # cx, cy, w, h, conf, cls, angle
    (agnostic,) = non_max_suppression_rotated(prediction, conf_thres=0.25, iou_thres=0.5, agnostic=True)
    torch.testing.assert_close(agnostic[:, 4], torch.tensor([0.9, 0.6]))
    (capped,) = non_max_suppression_rotated(prediction, conf_thres=0.25, iou_thres=0.5, max_det=2)
    torch.testing.assert_close(capped[:, 4], torch.tensor([0.9, 0.7]))
    (only_one,) = non_max_suppression_rotated(prediction, conf_thres=0.25, iou_thres=0.5, classes=[1])
    torch.testing.assert_close(only_one[:, 4], torch.tensor([0.7]))


def test_rotated_nms_overlap_is_probiou_and_turns_with_the_box():
    """A long box and the same box turned by a right angle as (h, w): one rectangle, suppressed; turned by 30
    degrees: a cross whose exact IoU is low and whose probiou decides."""
    same = [(50, 50, 60, 10, 0.2, 0, 0.9), (50, 50, 10, 60, 0.2 + math.pi / 2, 0, 0.8)]
    (kept,) = non_max_suppression_rotated(prediction_from_rows(same, 1), conf_thres=0.25, iou_thres=0.7)
    assert len(kept) == 1
    crossing = [(50, 50, 60, 10, 0.0, 0, 0.9), (50, 50, 60, 10, math.pi / 6, 0, 0.8)]
    boxes = torch.tensor([row[:5] for row in crossing])
    probabilistic, exact = probiou(boxes[:1], boxes[1:]).item(), rotated_iou(boxes[:1], boxes[1:]).item()
    assert exact < 0.3 < probabilistic
    (kept,) = non_max_suppression_rotated(prediction_from_rows(crossing, 1), conf_thres=0.25, iou_thres=0.3)
    assert len(kept) == 1


def test_rotated_nms_takes_a_tuple_and_images_without_candidates():
    generator = torch.Generator().manual_seed(12)
    prediction = random_rotated_prediction(generator, batch=2, num_classes=2, num_anchors=20).float()
    prediction[1, 4:6] = 0.0  # no scores in the second image
    output = non_max_suppression_rotated((prediction, None), conf_thres=0.25)
    assert len(output) == 2 and output[1].shape == (0, 7) and len(output[0]) > 0
    assert output[0].dtype == torch.float32
    empty = non_max_suppression_rotated(torch.zeros(2, 7, 10), conf_thres=0.25)
    assert [tuple(rows.shape) for rows in empty] == [(0, 7), (0, 7)]


@pytest.mark.parametrize("threshold", [0.9, 0.7, 0.45, 0.1, 0.0])
def test_probiou_above_skips_only_pairs_that_cannot_reach_the_threshold(threshold):
    from yolotrain.utils.obb import probiou_above

    generator = torch.Generator().manual_seed(1)
    boxes = torch.rand(3, 300, 5, generator=generator)
    boxes[..., :2] *= 200
    boxes[..., 2:4] = boxes[..., 2:4] * 60 + 1
    boxes[..., 4] = (boxes[..., 4] - 0.25) * math.pi
    expected = probiou(boxes, boxes) > threshold
    assert torch.equal(probiou_above(boxes, boxes, threshold), expected)
    wanted = torch.rand(3, 300, 300, generator=generator) > 0.5
    assert torch.equal(probiou_above(boxes, boxes, threshold, wanted), expected & wanted)
    far = boxes.clone()
    far[..., :2] += 1e5  # far from the origin: the centres' distances come from differences of large squares
    assert torch.equal(probiou_above(far, far, threshold), probiou(far, far) > threshold)
