"""Comparing the detections of two runtimes (ONNX Runtime and PyTorch, TorchScript and PyTorch, ...) as sets.

Two runtimes compute the same scores through different kernels, so two detections whose scores differ by less
than that rounding may leave a top-k or a sort in either order, and at the cut-off one runtime may keep the one
the other drops. Comparing rows by position then fails on one CPU and passes on another; these helpers match rows
by value instead.
"""

import torch

SCORE_COLUMN = 4


def close_pairs(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> torch.Tensor:
    """(N, M) bool: row i of `actual` equals row j of `expected` within the tolerances in every column."""
    difference = (actual[:, None, :] - expected[None, :, :]).abs()  # (N, M, 6)
    return (difference <= atol + rtol * expected[None, :, :].abs()).all(-1)


def unmatched_rows(close: torch.Tensor):
    """Pair rows greedily one-to-one (the tolerance is far below the distance between two distinct detections,
    so each row has at most one partner); return the indices of the rows left without one on each side."""
    used = torch.zeros(close.shape[1], dtype=torch.bool)
    lonely_actual = []
    for i in range(close.shape[0]):
        candidates = torch.nonzero(close[i] & ~used).flatten()
        if len(candidates):
            used[candidates[0]] = True
        else:
            lonely_actual.append(i)
    return lonely_actual, torch.nonzero(~used).flatten().tolist()


def assert_same_detections(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-4, rtol: float = 1e-4,
                           cut_off: bool = False) -> None:
    """Rows `(x1, y1, x2, y2, score, cls, ...)` of one image are the same set within the tolerances.

    With `cut_off=True` both sets are the top rows of a longer ranking (a top-k to a fixed count): a row may then
    lack a partner only when its score ties the lowest kept score within `atol`, where either runtime may keep
    either of the tied detections.
    """
    assert actual.shape[1:] == expected.shape[1:], (actual.shape, expected.shape)
    lonely_actual, lonely_expected = unmatched_rows(close_pairs(actual.float(), expected.float(), atol, rtol))
    if cut_off and len(actual) == len(expected) and len(actual):
        lowest = min(actual[:, SCORE_COLUMN].min(), expected[:, SCORE_COLUMN].min())
        lonely_actual = [i for i in lonely_actual if actual[i, SCORE_COLUMN] > lowest + atol]
        lonely_expected = [j for j in lonely_expected if expected[j, SCORE_COLUMN] > lowest + atol]
    assert not lonely_actual and not lonely_expected, (
        f"rows without a partner within atol={atol}, rtol={rtol}:\n"
        f"actual {actual[lonely_actual].tolist()}\nexpected {expected[lonely_expected].tolist()}"
    )
