"""Rotated-box (OBB) geometry: conversions, probabilistic and exact IoU. Torch tensors unless noted; every function
is batched over leading dimensions and vectorised.

Conventions (the same as the reference YOLO OBB models, so their weights give the same boxes):

- `xywhr` = (cx, cy, w, h, angle), angle in radians. In image coordinates (x right, y down) the side of length w
  runs along u = (cos a, sin a) and the side of length h along v = (-sin a, cos a): a positive angle turns the w side
  from +x towards +y, clockwise on screen.
- Corners (..., 4, 2) come in the order c + u' + v', c + u' - v', c - u' - v', c - u' + v', with u' = w/2 u and
  v' = h/2 v; at angle 0 that is bottom-right, top-right, top-left, bottom-left: anticlockwise on screen.
- The OBB head predicts angles in [-pi/4, 3pi/4] ((sigmoid - 0.25) * pi) and w, h in either order, so one rectangle
  has up to two valid encodings there ((w, h, a) and (h, w, a + pi/2)); probiou and the IoUs treat both alike.
- `corners_to_xywhr` returns the canonical form the labels use: w >= h (w is the longer side) and angle in
  [-pi/4, 3pi/4), the long side's direction modulo pi. A square's orientation is only defined modulo pi/2; it gets
  the answer of the reference's OpenCV 5 min-area rectangle (whose angle lies in [-pi/2, 0)): angle in
  [-pi/4, 0) or [pi/2, 3pi/4).
- `regularize_xywhr` is the reference's final regularisation of predictions: angle in [0, pi/2), w and h swapped
  where the angle modulo pi is at least pi/2. It does not order w and h.
"""

import math

import numpy as np
import torch

# corners_to_xywhr tries every pair of points' direction: bound the (boxes, directions, points) temporaries.
MIN_AREA_ELEMENTS = 1 << 22
# polygon_iou intersects this many overlapping box pairs at a time: its (pairs, 24, 2) float64 temporaries then
# stay a few tens of MB on a CPU; a GPU takes larger chunks for fewer launches.
POLYGON_IOU_PAIRS = {"cpu": 1 << 14, "other": 1 << 17}
# Relative tolerances of the exact intersection, in units of the pair's coordinate scale (float64 rounding is
# ~1e-16 of it): points this close to the other box's boundary count as on it, and a polygon whose area is below
# this fraction of its squared extent is degenerate (IoU 0).
POINT_TOLERANCE = 1e-9
DEGENERATE_AREA = 1e-12


def _to_tensor(x):
    """(tensor, was_numpy): numpy input is computed on as a CPU tensor and handed back as numpy."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x), True
    return x, False


def _float_dtype(x):
    return x.dtype if x.is_floating_point() else torch.get_default_dtype()


def xywhr_to_corners(xywhr):
    """(..., 5) xywhr -> (..., 4, 2) corners in the module's order. Accepts numpy and returns numpy for it."""
    tensor, was_numpy = _to_tensor(xywhr)
    centre = tensor[..., None, :2]  # (..., 1, 2)
    half_w, half_h, angle = tensor[..., 2:3] / 2, tensor[..., 3:4] / 2, tensor[..., 4:5]
    cos, sin = angle.cos(), angle.sin()
    along_w = torch.cat((half_w * cos, half_w * sin), -1)[..., None, :]  # (..., 1, 2)
    along_h = torch.cat((-half_h * sin, half_h * cos), -1)[..., None, :]
    signs_w = tensor.new_tensor([1.0, 1.0, -1.0, -1.0])[:, None]  # (4, 1)
    signs_h = tensor.new_tensor([1.0, -1.0, -1.0, 1.0])[:, None]
    corners = centre + signs_w * along_w + signs_h * along_h  # (..., 4, 2)
    return corners.numpy() if was_numpy else corners


def _min_area_rect(points):
    """(L, P, 2) float64 -> (L, 5): centre, extent along a direction, extent across it, the direction's angle.

    The minimum-area rectangle around a point set has a side along an edge of the set's convex hull, and every hull
    edge joins two of the points: trying all point pairs' directions finds it without building the hull, whatever
    order (or non-convex shape) the points come in.
    """
    num_points = points.shape[-2]
    first, second = torch.triu_indices(num_points, num_points, 1, device=points.device) if num_points > 1 else (
        torch.zeros(1, dtype=torch.long, device=points.device),) * 2
    origin = points.mean(-2, keepdim=True)  # centring keeps the projections' rounding relative to the box size
    local = points - origin  # (L, P, 2)
    edges = local[:, second] - local[:, first]  # (L, E, 2)
    direction = torch.atan2(edges[..., 1], edges[..., 0])  # (L, E); a zero edge gives 0: just one more candidate
    cos, sin = direction.cos()[..., None], direction.sin()[..., None]  # (L, E, 1)
    x, y = local[:, None, :, 0], local[:, None, :, 1]  # (L, 1, P)
    along = x * cos + y * sin  # (L, E, P)
    across = y * cos - x * sin
    along_lo, along_hi = along.aminmax(dim=-1)  # (L, E)
    across_lo, across_hi = across.aminmax(dim=-1)
    extent_along, extent_across = along_hi - along_lo, across_hi - across_lo
    best = (extent_along * extent_across).argmin(-1, keepdim=True)  # (L, 1)

    def pick(values):
        return values.gather(-1, best).squeeze(-1)  # (L,)

    mid_along, mid_across = pick((along_lo + along_hi) / 2), pick((across_lo + across_hi) / 2)
    cos, sin = pick(cos.squeeze(-1)), pick(sin.squeeze(-1))
    cx = origin[:, 0, 0] + mid_along * cos - mid_across * sin
    cy = origin[:, 0, 1] + mid_along * sin + mid_across * cos
    return torch.stack((cx, cy, pick(extent_along), pick(extent_across), pick(direction)), -1)


def _canonical(rect):
    """(..., 5) rectangles with the w side along any direction -> the canonical xywhr of `corners_to_xywhr`.

    Reproduces the reference's two steps, so that exact squares agree too (a near-square's orientation follows
    rounding, here as there): OpenCV's min-area rectangle reports the side whose direction lies in [-pi/2, 0) as w;
    the reference then swaps w and h (adding pi/2) when w < h and wraps the angle into [-pi/4, 3pi/4).
    """
    cx, cy, w, h, direction = rect.unbind(-1)
    quarter = math.pi / 2
    angle = torch.remainder(direction + quarter, quarter) - quarter  # [-pi/2, 0)
    odd_turns = torch.remainder(torch.round((direction - angle) / quarter), 2) == 1  # that side is the h side
    w, h = torch.where(odd_turns, h, w), torch.where(odd_turns, w, h)
    swap = w < h
    w, h = torch.where(swap, h, w), torch.where(swap, w, h)
    angle = torch.where(swap, angle + quarter, angle)
    angle = torch.where(angle >= 3 * math.pi / 4, angle - math.pi, angle)
    angle = torch.where(angle < -math.pi / 4, angle + math.pi, angle)
    return torch.stack((cx, cy, w, h, angle), -1)


def corners_to_xywhr(corners):
    """(..., P, 2) points (P = 4: a box's corners, or any quadrilateral) -> (..., 5) canonical xywhr of their
    minimum-area enclosing rectangle (w >= h, angle in [-pi/4, 3pi/4); see the module docstring).

    Exact for any P >= 1 (cost grows as P**3, so meant for small P); computed in float64 and returned in the input's
    floating dtype (float64 for numpy, like the reference). Accepts numpy and returns numpy for it.
    """
    tensor, was_numpy = _to_tensor(corners)
    out_dtype = torch.float64 if was_numpy else _float_dtype(tensor)
    leading, num_points = tensor.shape[:-2], tensor.shape[-2]
    flat = tensor.reshape(-1, num_points, 2).to(torch.float64)
    per_box = max(1, num_points * num_points * (num_points - 1) // 2)
    chunk = max(1, MIN_AREA_ELEMENTS // per_box)
    rects = [_min_area_rect(flat[start : start + chunk]) for start in range(0, len(flat), chunk)]
    rect = torch.cat(rects) if rects else flat.new_zeros(0, 5)
    xywhr = _canonical(rect).reshape(*leading, 5).to(out_dtype)
    return xywhr.numpy() if was_numpy else xywhr


def min_area_corners(points):
    """(n, P, 2) numpy points -> (n, 4, 2) corners of each set's minimum-area rectangle, in the input's float dtype.

    What a rotated box becomes after a shear or perspective warp (its four corners no longer a rectangle): the
    tightest rectangle around them, in the canonical orientation of `corners_to_xywhr`.
    """
    points = np.asarray(points)
    dtype = points.dtype if np.issubdtype(points.dtype, np.floating) else np.float64
    return xywhr_to_corners(corners_to_xywhr(points.astype(np.float64, copy=False))).astype(dtype, copy=False)


def regularize_xywhr(xywhr):
    """(..., 5) -> (..., 5) the same rectangles with angle in [0, pi/2): w and h swap where angle mod pi >= pi/2
    (the reference's `regularize_rboxes`; it does not make w >= h). Accepts numpy and returns numpy for it."""
    tensor, was_numpy = _to_tensor(xywhr)
    cx, cy, w, h, angle = tensor.unbind(-1)
    swap = torch.remainder(angle, math.pi) >= math.pi / 2
    regular = torch.stack(
        (cx, cy, torch.where(swap, h, w), torch.where(swap, w, h), torch.remainder(angle, math.pi / 2)), -1)
    return regular.numpy() if was_numpy else regular


def _covariance(boxes, floor=0.0):
    """(..., 5) xywhr -> a, b, c (...,) each: the covariance [[a, c], [c, b]] of the uniform distribution over the
    box (variance side**2 / 12 along each side), rotated by its angle. `floor` is added to both variances."""
    var_w = boxes[..., 2].pow(2) / 12 + floor
    var_h = boxes[..., 3].pow(2) / 12 + floor
    angle = boxes[..., 4]
    cos, sin = angle.cos(), angle.sin()
    cos2, sin2 = cos.pow(2), sin.pow(2)
    return var_w * cos2 + var_h * sin2, var_w * sin2 + var_h * cos2, (var_w - var_h) * cos * sin


def _probiou(x1, y1, a1, b1, c1, x2, y2, a2, b2, c2, eps):
    """1 - Hellinger distance of two Gaussians from their centres and covariances (broadcast element-wise), via
    the Bhattacharyya distance (Llerena et al., 2021, "Gaussian Bounding Boxes and Probabilistic IoU"). The
    Bhattacharyya distance is clamped to [eps, 100], so identical boxes give 1 - sqrt(1 - exp(-eps) + eps) ~ 1."""
    sum_a, sum_b, sum_c = a1 + a2, b1 + b2, c1 + c2
    det_sum = sum_a * sum_b - sum_c.pow(2)
    mahalanobis = ((sum_a * (y1 - y2).pow(2) + sum_b * (x1 - x2).pow(2)) / (det_sum + eps)) * 0.25
    cross = ((sum_c * (x2 - x1) * (y1 - y2)) / (det_sum + eps)) * 0.5
    # clamp: rounding can make a degenerate (zero-width) box's determinant slightly negative
    det_product = ((a1 * b1 - c1.pow(2)).clamp(min=0) * (a2 * b2 - c2.pow(2)).clamp(min=0)).sqrt()
    log_term = (det_sum / (4 * det_product + eps) + eps).log() * 0.5
    bhattacharyya = (mahalanobis + cross + log_term).clamp(eps, 100.0)
    hellinger = (1.0 - (-bhattacharyya).exp() + eps).sqrt()
    return 1 - hellinger


def probiou(boxes1, boxes2, eps=1e-7):
    """Pairwise probabilistic IoU: (..., N, 5) x (..., M, 5) xywhr -> (..., N, M) (the reference's batch_probiou).

    Smooth and cheap, but not the polygon IoU: it compares the boxes' Gaussians, so it differs from the exact IoU
    wherever the boxes are not identical (and identical boxes give 1 - sqrt(2 eps) ~ 0.99955, from the clamp).
    Leading dimensions broadcast.
    """
    a1, b1, c1 = (v[..., :, None] for v in _covariance(boxes1))  # (..., N, 1)
    a2, b2, c2 = (v[..., None, :] for v in _covariance(boxes2))  # (..., 1, M)
    x1, y1 = boxes1[..., :, None, 0], boxes1[..., :, None, 1]
    x2, y2 = boxes2[..., None, :, 0], boxes2[..., None, :, 1]
    return _probiou(x1, y1, a1, b1, c1, x2, y2, a2, b2, c2, eps)


def probiou_above(boxes1, boxes2, threshold, wanted=None, eps=1e-7):
    """(B, N, M) bool: `probiou` of (B, N, 5) and (B, M, 5) xywhr boxes above `threshold`, computed only for the
    pairs close enough to reach it (what rotated NMS asks, cheaply) and, given `wanted` (B, N, M) bool, only for the
    pairs it marks (the others are False).

    The Bhattacharyya distance of two boxes is at least 0.75 d^2 / (r1^2 + r2^2), d the distance of their centres
    and r their half-diagonals: its log-determinant term is never negative, and each box's covariance has no
    eigenvalue above r^2 / 3. probiou = 1 - sqrt(1 - exp(-distance)) > threshold needs a distance below
    -log(1 - (1 - threshold)^2), so a pair further apart than that allows is below the threshold without computing
    it (at the usual threshold 0.7, every pair whose centres are more than 0.41 of their joint half-diagonal apart).
    """
    if threshold <= 0:
        above = probiou(boxes1, boxes2, eps) > threshold
        return above if wanted is None else above & wanted
    reach = -math.log(max(1 - (1 - threshold) ** 2, 1e-300)) / 0.75
    near = _centres_within(boxes1, boxes2, reach * (1 + 1e-6))  # the margin covers the product's rounding
    if wanted is not None:
        near &= wanted
    pairs = torch.nonzero(near, as_tuple=True)
    above = torch.zeros_like(near)
    if len(pairs[0]):
        batch, row, column = pairs
        above[pairs] = probiou_pairs(boxes1[batch, row], boxes2[batch, column], eps=eps) > threshold
    return above


def _centres_within(boxes1, boxes2, reach):
    """(B, N, M) bool: d^2 < reach (r1^2 + r2^2) for each pair of (B, N, 5) and (B, M, 5) xywhr boxes, d the
    distance of their centres, r their half-diagonals.

    One batched matrix product instead of (B, N, M, 2) differences: d^2 - reach (r1^2 + r2^2) = s1 + s2 - 2 c1.c2
    with s = |c|^2 - reach r^2, the inner product of [x1, y1, s1, 1] and [-2 x2, -2 y2, 1, s2]. In float64, where
    the expansion's cancellation of large terms costs no precision that matters.
    """
    def lifted(boxes):
        boxes = boxes.double()
        centre_norm = boxes[..., :2].pow(2).sum(-1) - reach * boxes[..., 2:4].pow(2).sum(-1) / 4
        return boxes[..., 0], boxes[..., 1], centre_norm, torch.ones_like(centre_norm)

    x1, y1, s1, one1 = lifted(boxes1)
    x2, y2, s2, one2 = lifted(boxes2)
    rows = torch.stack((x1, y1, s1, one1), -1)  # (B, N, 4)
    columns = torch.stack((-2 * x2, -2 * y2, one2, s2), -1)  # (B, M, 4)
    return torch.bmm(rows, columns.transpose(1, 2)) < 0


def probiou_pairs(boxes1, boxes2, ciou=False, eps=1e-7, floor=0.0):
    """Element-wise probabilistic IoU of broadcastable (..., 5) xywhr tensors -> (...) (the reference's probiou);
    differentiable, for the box loss.

    `floor` is added to each Gaussian's variances (bounds the gradients of boxes smaller than a stride); `ciou`
    subtracts CIoU's aspect-ratio penalty, with its weight not differentiated, as in CIoU.
    """
    a1, b1, c1 = _covariance(boxes1, floor)
    a2, b2, c2 = _covariance(boxes2, floor)
    iou = _probiou(boxes1[..., 0], boxes1[..., 1], a1, b1, c1, boxes2[..., 0], boxes2[..., 1], a2, b2, c2, eps)
    if not ciou:
        return iou
    aspect1 = (boxes1[..., 2] / boxes1[..., 3]).atan()
    aspect2 = (boxes2[..., 2] / boxes2[..., 3]).atan()
    penalty = (4 / math.pi**2) * (aspect2 - aspect1).pow(2)
    with torch.no_grad():
        alpha = penalty / (penalty - iou + (1 + eps))
    return iou - penalty * alpha


def _cross(a, b):
    """z of the cross product of (..., 2) vectors."""
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _signed_area(corners):
    """(..., V, 2) polygon -> (...,) shoelace area, positive when counter-clockwise in x-right, y-up axes. Taken
    relative to the first vertex, so that far-off coordinates do not cancel."""
    local = corners - corners[..., :1, :]
    return _cross(local, local.roll(-1, -2)).sum(-1) / 2


def _intersection_area(subject, clip):
    """(P, 4, 2) x (P, 4, 2) convex quadrilaterals, both counter-clockwise (positive signed area), float64 ->
    (P,) the area of each pair's intersection.

    The intersection of two convex polygons is the convex polygon whose vertices are among: each polygon's vertices
    that lie inside the other, and the crossings of their edges (4 + 4 + 16 = 24 candidates at fixed positions, so
    every pair is computed alike with masks instead of variable-length vertex lists). The valid candidates are
    sorted by angle around their mean, which lies inside the intersection, and the shoelace formula gives the area.
    Near-duplicate candidates (a vertex on the other's edge is both "inside" and an edge crossing) add nothing.
    Points within a tolerance of the other polygon's boundary count as inside, so that touching and shared edges
    stay exact despite rounding.
    """
    origin = subject.mean(1, keepdim=True)  # (P, 1, 2) local coordinates: small values, small rounding
    subject, clip = subject - origin, clip - origin
    scale = torch.maximum(subject.abs().amax((1, 2)), clip.abs().amax((1, 2))).clamp(min=1e-300)  # (P,)
    tolerance = POINT_TOLERANCE * scale[:, None, None]  # (P, 1, 1) a distance
    subject_edges = subject.roll(-1, 1) - subject  # (P, 4, 2): edge i runs from vertex i to vertex i + 1
    clip_edges = clip.roll(-1, 1) - clip

    def inside(points, polygon, edges):  # (P, 4) points on the inner side of every edge, within the tolerance
        offset = points[:, :, None] - polygon[:, None]  # (P, 4 points, 4 edges, 2)
        distance_times_length = _cross(edges[:, None], offset)  # (P, 4, 4)
        return (distance_times_length >= -tolerance * edges.norm(dim=-1)[:, None]).all(-1)

    # Edge crossings: subject edge i (s + t r) meets clip edge j (c + u q) where t, u are both in [0, 1].
    r, q = subject_edges[:, :, None], clip_edges[:, None]  # (P, 4, 1, 2), (P, 1, 4, 2)
    start_offset = clip[:, None] - subject[:, :, None]  # (P, 4, 4, 2)
    denominator = _cross(r, q)  # (P, 4, 4); 0 for parallel edges, whose overlap the vertex tests cover
    lengths = r.norm(dim=-1) * q.norm(dim=-1)
    crossing = denominator.abs() > 1e-12 * lengths
    safe = torch.where(crossing, denominator, torch.ones_like(denominator))
    t, u = _cross(start_offset, q) / safe, _cross(start_offset, r) / safe
    slack_t = tolerance / r.norm(dim=-1).clamp(min=1e-300)  # the distance tolerance as a fraction of each edge
    slack_u = tolerance / q.norm(dim=-1).clamp(min=1e-300)
    crossing &= (t >= -slack_t) & (t <= 1 + slack_t) & (u >= -slack_u) & (u <= 1 + slack_u)
    crossing_points = subject[:, :, None] + t[..., None].clamp(0, 1) * r  # (P, 4, 4, 2)

    points = torch.cat((subject, clip, crossing_points.flatten(1, 2)), 1)  # (P, 24, 2)
    valid = torch.cat((inside(subject, clip, clip_edges), inside(clip, subject, subject_edges),
                       crossing.flatten(1)), 1)  # (P, 24)
    count = valid.sum(1)  # (P,)
    centre = (points * valid[..., None]).sum(1) / count.clamp(min=1)[:, None]  # (P, 2)
    relative = points - centre[:, None]
    angle = torch.atan2(relative[..., 1], relative[..., 0]).masked_fill(~valid, 4.0)  # invalid last (atan2 <= pi)
    order = angle.argsort(1)
    ordered = relative.gather(1, order[..., None].expand(-1, -1, 2))  # (P, 24, 2)
    ordered_valid = valid.gather(1, order)
    # Invalid slots repeat the first point: the edges through them have zero length and the polygon closes.
    ordered = torch.where(ordered_valid[..., None], ordered, ordered[:, :1])
    area = _cross(ordered, ordered.roll(-1, 1)).sum(1).abs() / 2
    return torch.where(count >= 3, area, torch.zeros_like(area))


def polygon_iou(corners1, corners2, at_least=0.0):
    """Exact pairwise IoU of convex quadrilaterals: (..., N, 4, 2) x (..., M, 4, 2) -> (..., N, M).

    Vertices may run either way round. Degenerate (zero-area) quadrilaterals have IoU 0 with everything. Computed in
    float64 (accurate to ~1e-12 of the boxes' size) and returned in the inputs' floating dtype. Only pairs whose
    axis-aligned extents overlap are intersected, in chunks of POLYGON_IOU_PAIRS pairs, so memory stays bounded
    for many boxes. Leading dimensions broadcast. Not differentiable where it matters (use probiou for a loss).
    `at_least`: pairs whose IoU cannot reach it are given 0 without being intersected (what matching at thresholds
    asks): the intersection is at most the smaller area and the overlap of the extents, and the IoU grows with it.
    """
    out_dtype = torch.promote_types(_float_dtype(corners1), _float_dtype(corners2))
    batch_shape = torch.broadcast_shapes(corners1.shape[:-3], corners2.shape[:-3])
    num1, num2 = corners1.shape[-3], corners2.shape[-3]
    num_sets = math.prod(batch_shape)
    polygons1 = corners1.to(torch.float64).expand(*batch_shape, num1, 4, 2).reshape(num_sets, num1, 4, 2)  # (L,N,4,2)
    polygons2 = corners2.to(torch.float64).expand(*batch_shape, num2, 4, 2).reshape(num_sets, num2, 4, 2)
    area1, area2 = _signed_area(polygons1), _signed_area(polygons2)  # (L, N), (L, M)
    low1, high1 = polygons1.amin(2), polygons1.amax(2)  # (L, N, 2)
    low2, high2 = polygons2.amin(2), polygons2.amax(2)
    proper1 = area1.abs() > DEGENERATE_AREA * (high1 - low1).pow(2).sum(-1)
    proper2 = area2.abs() > DEGENERATE_AREA * (high2 - low2).pow(2).sum(-1)
    # Counter-clockwise vertex order for the intersection (reverse the clockwise ones).
    polygons1 = torch.where((area1 < 0)[..., None, None], polygons1.flip(2), polygons1)
    polygons2 = torch.where((area2 < 0)[..., None, None], polygons2.flip(2), polygons2)
    overlap_extent = torch.minimum(high1[:, :, None], high2[:, None]) - torch.maximum(low1[:, :, None], low2[:, None])
    candidate = (overlap_extent > 0).all(-1) & proper1[:, :, None] & proper2[:, None]  # (L, N, M)
    if at_least > 0:
        size1, size2 = area1.abs()[:, :, None], area2.abs()[:, None]  # (L, N, 1), (L, 1, M)
        shared = torch.minimum(torch.minimum(size1, size2), overlap_extent.clamp(min=0).prod(-1))  # the most shared
        candidate &= shared >= at_least * (size1 + size2 - shared) * (1 - 1e-9)  # IoU <= shared / (union's least)
    iou = polygons1.new_zeros(candidate.shape)
    image, row, col = candidate.nonzero(as_tuple=True)  # (K,) each
    chunk = POLYGON_IOU_PAIRS["cpu" if iou.device.type == "cpu" else "other"]
    for start in range(0, len(image), chunk):  # a few chunks: bounded temporaries, not a per-box loop
        pair = slice(start, start + chunk)
        i, n, m = image[pair], row[pair], col[pair]
        inter = _intersection_area(polygons1[i, n], polygons2[i, m])  # (k,)
        union = area1[i, n].abs() + area2[i, m].abs() - inter
        iou[i, n, m] = (inter / union).clamp(0, 1)
    return iou.reshape(*batch_shape, num1, num2).to(out_dtype)


def rotated_iou(xywhr1, xywhr2):
    """Exact pairwise IoU of rotated boxes: (..., N, 5) x (..., M, 5) xywhr -> (..., N, M); the polygon IoU of
    their corners (taken in float64)."""
    out_dtype = torch.promote_types(_float_dtype(xywhr1), _float_dtype(xywhr2))
    corners1, corners2 = xywhr_to_corners(xywhr1.to(torch.float64)), xywhr_to_corners(xywhr2.to(torch.float64))
    return polygon_iou(corners1, corners2).to(out_dtype)
