"""Anchor points and the distance <-> box conversions shared by the Detect and OBB heads and the losses.

An anchor-free head predicts, for every grid cell centre (an *anchor point*), the distances from that point to
the four sides of the box: (left, top, right, bottom), in units of the level's stride.
"""

import torch


def make_anchors(feats, strides, offset=0.5):
    """Grid-cell centres of every feature level, concatenated level after level.

    Args:
        feats: list of (B, C, H_i, W_i) tensors (only their shapes, dtype and device are used).
        strides: the stride of each level (sequence or tensor, same length as feats).
        offset: position of the point inside its cell (0.5 = the centre).

    Returns:
        anchor_points (A, 2) as (x, y) in grid units of their level, and stride_tensor (A, 1), with
        A = sum(H_i * W_i).
    """
    points, stride_columns = [], []
    dtype, device = feats[0].dtype, feats[0].device
    for feat, stride in zip(feats, strides):
        height, width = feat.shape[-2:]
        xs = torch.arange(width, device=device, dtype=dtype) + offset
        ys = torch.arange(height, device=device, dtype=dtype) + offset
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((grid_x, grid_y), -1).view(-1, 2))  # (H*W, 2), row-major like the flattened map
        stride_columns.append(torch.full((height * width, 1), float(stride), dtype=dtype, device=device))
    return torch.cat(points), torch.cat(stride_columns)


def dist2bbox(distance, anchor_points, xywh=True, dim=-1):
    """Turn (left, top, right, bottom) distances from anchor points into boxes (xywh or xyxy) along `dim`."""
    left_top, right_bottom = distance.chunk(2, dim)
    top_left_corner = anchor_points - left_top
    bottom_right_corner = anchor_points + right_bottom
    if xywh:
        centre = (top_left_corner + bottom_right_corner) / 2
        size = bottom_right_corner - top_left_corner
        return torch.cat((centre, size), dim)
    return torch.cat((top_left_corner, bottom_right_corner), dim)


def dist2rbox(distance, angle, anchor_points, dim=-1):
    """Turn (left, top, right, bottom) distances measured along a rotated box's own axes into its centre and size.

    The box's width axis is the image x axis turned by `angle` radians towards the y axis (clockwise on screen,
    where y points down). The centre lies (right - left) / 2, (bottom - top) / 2 from the anchor along the box's
    own axes; rotating that offset into image axes gives the centre. Width and height are left + right and
    top + bottom. Returns (cx, cy, w, h) along `dim`; the angle is not included.

    Shapes: distance (..., 4, ...) and angle (..., 1, ...) with the 4 / 1 along `dim`; anchor_points broadcast
    against the (cx, cy) half.
    """
    left_top, right_bottom = distance.chunk(2, dim)
    half_offset_x, half_offset_y = ((right_bottom - left_top) / 2).chunk(2, dim)  # centre - anchor, box frame
    cos, sin = angle.cos(), angle.sin()
    centre = torch.cat((half_offset_x * cos - half_offset_y * sin, half_offset_x * sin + half_offset_y * cos), dim)
    return torch.cat((centre + anchor_points, left_top + right_bottom), dim)


def bbox2dist(anchor_points, bbox, reg_max):
    """Turn xyxy boxes into (left, top, right, bottom) distances from anchor points, clamped to [0, reg_max - 1.01].

    reg_max is the number of DFL bins (`Detect.reg_max`, 16), so bins cover distances 0..reg_max-1. The 0.01 margin
    keeps the upper neighbour bin of a target (floor + 1) inside the range when the loss interpolates between bins.
    Inputs share units (grid units of each anchor's level, as the loss uses them).
    """
    top_left, bottom_right = bbox.chunk(2, -1)
    return torch.cat((anchor_points - top_left, bottom_right - anchor_points), -1).clamp_(0, reg_max - 1 - 0.01)
