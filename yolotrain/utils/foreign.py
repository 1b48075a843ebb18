"""Read a checkpoint written by the Ultralytics trainer (a pickle of whole model objects) without running any code
from it.

The file is unpickled by `torch.load` with `RecordUnpickler`: tensors, parameters, storages and plain containers
are rebuilt by torch's own functions (a short allowlist); every other class named in the file becomes an inert
`Record` of its saved state, and any instruction that would *call* something outside the allowlist (the way a
malicious pickle runs `os.system`) raises `CheckpointError` before anything runs. From the records we take the
state dict (the EMA's first, as the reference does), the model yaml, `names` and `nc`.
"""

import _compat_pickle
import pickle

import torch

from yolotrain.errors import CheckpointError

# Callables a checkpoint may use to rebuild tensors and containers: torch's tensor rebuilders and a few builtins.
ALLOWED_CALLS = frozenset({
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("_codecs", "encode"),  # bytes in protocol-2 pickles
    ("torch", "Size"),
    ("torch", "device"),
    ("numpy", "dtype"),  # numpy scalars and arrays (a numpy float as best_fitness, ...)
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
})


class Record:
    """What an unknown class in the file becomes: its name and the state it was saved with, nothing else."""

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict, slots) form
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def __repr__(self):
        return f"Record({type(self).__module__}.{type(self).__qualname__})"


class _RecordMeta(type):
    """Record classes: creating an instance the pickle way (`__new__`, then state) is allowed, calling the class
    with arguments (a REDUCE instruction) is not: that is how a pickle would run code at load time."""

    def __call__(cls, *args, **kwargs):
        raise CheckpointError(f"the file calls {cls.__module__}.{cls.__qualname__} while unpickling")


def _record_class(module, name):
    return _RecordMeta(name, (Record,), {"__module__": module, "__qualname__": name})


def _reconstruct(cls, base, state):
    """copyreg._reconstructor for protocol 0/1 pickles: an instance of the record class, never of `base`."""
    if not (isinstance(cls, type) and issubclass(cls, Record)):
        raise CheckpointError(f"the file reconstructs {cls!r} while unpickling")
    return Record.__new__(cls)


class RecordUnpickler(pickle.Unpickler):
    """An Unpickler that rebuilds tensors and containers and turns everything else into inert records."""

    def find_class(self, module, name):
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names of protocol-2 pickles
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in ALLOWED_CALLS:
            return getattr(__import__(module, fromlist=[name]), name)
        if module == "copyreg" and name == "_reconstructor":
            return _reconstruct
        if module == "torch" and (name.endswith("Storage") or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        # Anything else, os.system included, is only a name here: calling it raises (see _RecordMeta).
        return _record_class(module, name)


class _RestrictedPickleModule:
    """What `torch.load(pickle_module=...)` needs: an Unpickler class and `load`."""

    Unpickler = RecordUnpickler
    __name__ = "yolotrain_record_pickle"

    @staticmethod
    def load(file, **kwargs):
        return RecordUnpickler(file, **kwargs).load()


def load_records(path):
    """The unpickled file, foreign objects as `Record`s; raises `CheckpointError` for any forbidden call."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule)
    except CheckpointError as error:
        raise CheckpointError(f"{path} needs arbitrary code to unpickle and was refused ({error})") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as error:
        raise CheckpointError(f"{path} is not a readable checkpoint: {type(error).__name__}: {error}") from None


def module_state_dict(record, prefix=""):
    """The state dict an `nn.Module` saved as a record would give: its parameters and persistent buffers."""
    state = {}
    skipped = set(getattr(record, "_non_persistent_buffers_set", ()) or ())
    for name, tensor in (getattr(record, "_parameters", None) or {}).items():
        if tensor is not None:
            state[prefix + name] = tensor.detach().clone()
    for name, tensor in (getattr(record, "_buffers", None) or {}).items():
        if tensor is not None and name not in skipped:
            state[prefix + name] = tensor.detach().clone()
    for name, child in (getattr(record, "_modules", None) or {}).items():
        if child is not None:
            state.update(module_state_dict(child, f"{prefix}{name}."))
    return state


def is_ultralytics_model(obj):
    return isinstance(obj, Record) and type(obj).__module__.split(".")[0] == "ultralytics"


def read_ultralytics_checkpoint(path):
    """A yolotrain checkpoint dict (`model`, `model_yaml`, `names`, `nc`, ...) from an Ultralytics `.pt`."""
    checkpoint = load_records(path)
    if not isinstance(checkpoint, dict):
        checkpoint = {"model": checkpoint}
    network = next((checkpoint.get(k) for k in ("ema", "model") if is_ultralytics_model(checkpoint.get(k))), None)
    if network is None:
        raise CheckpointError(
            f"{path} needs arbitrary code to unpickle and was refused; it holds neither a yolotrain checkpoint "
            f"(tensors and plain types only) nor an Ultralytics detection model"
        )
    model_yaml = getattr(network, "yaml", None)
    if not isinstance(model_yaml, dict) or "backbone" not in model_yaml:
        raise CheckpointError(f"{path}: its model carries no yaml to rebuild it from")
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in module_state_dict(network).items()}
    names = getattr(network, "names", None) or {i: str(i) for i in range(int(model_yaml.get("nc", 0)))}
    names = {int(k): str(v) for k, v in (names.items() if isinstance(names, dict) else enumerate(names))}
    model_yaml = {**model_yaml, "nc": len(names)}
    return {"epoch": -1, "model": state_dict, "ema": None, "model_yaml": model_yaml, "names": names,
            "nc": len(names), "source": f"ultralytics {checkpoint.get('version', '')}".strip()}
