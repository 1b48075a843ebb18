"""Weights and images from integer hashing alone: the same values on every machine and torch version, for any
model with a given layout, ours or the reference's (tests compare our outputs with figures the reference printed
for the same weights)."""

import torch

FLOW_CONSTANTS = ("mask", "loc", "cov")  # a normalising flow's coupling masks and prior: fixed by its layout


def hashed_uniform(count, salt):
    """`count` values in [-1, 1) from integer hashing alone."""
    x = torch.arange(count, dtype=torch.int64) + salt * 1_000_003
    for _ in range(3):
        x = (x * 0x9E3779B1 + 0x7F4A7C15) & 0xFFFFFFFF
        x = x ^ (x >> 15)
    return (x & 0xFFFFFF).double() / 0x800000 - 1.0


def fixed_weights(state_dict):
    """Every float entry replaced by hashed values of a sensible size, entry by entry in state-dict order (the DFL
    bins and a flow's masks and prior kept)."""
    weights = {}
    for index, (name, tensor) in enumerate(state_dict.items()):
        if not tensor.is_floating_point() or ".dfl." in name or name.rsplit(".", 1)[-1] in FLOW_CONSTANTS:
            weights[name] = tensor.clone()
            continue
        u = hashed_uniform(tensor.numel(), index).view(tensor.shape)
        if name.endswith("running_var"):
            values = 0.75 + 0.25 * u
        elif name.endswith("running_mean"):
            values = 0.1 * u
        elif name.endswith("bn.weight"):
            values = 1.0 + 0.2 * u
        elif tensor.dim() >= 2:
            values = u * (3.0 / tensor[0].numel()) ** 0.5  # variance 1 / fan-in
        else:  # biases
            values = 0.5 * u
        weights[name] = values.to(tensor.dtype)
    return weights
