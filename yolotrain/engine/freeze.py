"""Which parameters do not train: the `freeze` argument, the trainer's always-frozen names, frozen BatchNorm.

`freeze` is an int N (layers 0 to N-1), or a list of layer indices and parameter-name prefixes
(`[0, 1, "model.23.cv2"]`). A prefix matches whole dotted components: `model.2` freezes `model.2.conv.weight`, never
`model.20.conv.weight`. A prefix that starts with a dot matches those components anywhere in the name (`.dfl`
matches `model.22.dfl.conv.weight`). A layer index past the model's layers, or a prefix that matches no parameter,
is a one-line error: a misspelt prefix would otherwise train everything without a word.
"""

import torch

from yolotrain.cfg import format_value
from yolotrain.errors import CfgError

LAYER_PREFIX = "model"  # parameter names of layer i start with "model.{i}."


def freeze_prefixes(freeze):
    """The name prefixes `freeze` asks for: `freeze=3` -> ["model.0", "model.1", "model.2"]; layer indices of a
    list become "model.{i}", strings stay (a trailing dot dropped)."""
    if freeze is None:
        return []
    items = range(freeze) if isinstance(freeze, int) else freeze
    return [f"{LAYER_PREFIX}.{x}" if isinstance(x, int) else str(x).rstrip(".") for x in items]


def name_matches(name, prefix):
    """True when `prefix` is the start of `name` in whole dotted components (anywhere in it for a leading dot)."""
    if prefix.startswith("."):
        return f".{prefix[1:]}." in f".{name}."
    return name == prefix or name.startswith(prefix + ".")


def frozen_parameter_names(names, freeze=None, always_frozen=()):
    """The parameter names to freeze, in the order of `names`.

    Args:
        names: every parameter name of the model (e.g. from `named_parameters()`).
        freeze: the `freeze` argument (None, an int, or a list of layer indices and name prefixes).
        always_frozen: prefixes that never train whatever the user asks (e.g. a fixed projection); one that
            matches nothing is fine (not every model has it).

    Raises CfgError naming the entry when a layer index is not one of the model's layers or a prefix matches no
    parameter.
    """
    names = list(names)
    _check_freeze(names, freeze)
    prefixes = freeze_prefixes(freeze) + list(always_frozen)
    return [name for name in names if any(name_matches(name, p) for p in prefixes)]


def _check_freeze(names, freeze):
    if freeze is None:
        return
    num_layers = _layer_count(names)
    if isinstance(freeze, int):
        if not 0 <= freeze <= num_layers:
            raise CfgError(f"freeze={freeze} is invalid: expected a count of layers from 0 to {num_layers} "
                           f"(the model's layer count)")
        return
    for entry in freeze:
        if isinstance(entry, int):
            if not 0 <= entry < num_layers:
                raise CfgError(
                    f"freeze={format_value(freeze)} is invalid: layer {entry} is not one of the model's "
                    f"{num_layers} layers (0 to {num_layers - 1})"
                )
        elif not any(name_matches(name, freeze_prefixes([entry])[0]) for name in names):
            example = names[0] if names else f"{LAYER_PREFIX}.0.conv.weight"
            raise CfgError(
                f"freeze={format_value(freeze)} is invalid: '{entry}' matches no parameter name (names look like "
                f"'{example}'; a prefix matches whole dotted parts)"
            )


def _layer_count(names):
    """1 + the largest layer index in names of the form model.{i}.*; 0 when there is none."""
    indices = [int(parts[1]) for parts in (n.split(".") for n in names)
               if len(parts) > 2 and parts[0] == LAYER_PREFIX and parts[1].isdigit()]
    return max(indices, default=-1) + 1


def freeze_parameters(model, freeze=None, always_frozen=()):
    """Set `requires_grad=False` on the parameters `freeze` and `always_frozen` name; return their names."""
    frozen = set(frozen_parameter_names((n for n, _ in model.named_parameters()), freeze, always_frozen))
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad = False
    return [n for n, _ in model.named_parameters() if n in frozen]


def freeze_bn_statistics(model):
    """Put every normalisation layer whose weight does not train into eval mode, so its running statistics stay
    fixed too. Called at the start of each epoch (after `model.train()`): a callback may have unfrozen layers."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            if module.weight is not None and not module.weight.requires_grad:
                module.eval()
