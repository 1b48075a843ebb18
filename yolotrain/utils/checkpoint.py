"""Checkpoint I/O: atomic saves, safe (weights-only) loads, RNG state, stripping and safetensors export.

A save never damages the previous file: the data goes to a temporary file in the same folder, is flushed to disk
and then renamed over the target in one step. A load never executes code from the file: ``torch.load`` runs with
``weights_only=True``, so a checkpoint may only hold tensors and plain Python types.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from yolotrain.errors import CheckpointError
from yolotrain.utils.files import write_atomic, write_atomic_stream

LOGGER = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

# Keys whose values are weight state dicts that must be finite before they are written.
WEIGHT_KEYS = ("model", "ema")
SAFETENSORS_SUFFIX = ".safetensors"
# Checkpoint entries stored as JSON in a .safetensors file's metadata, so the file rebuilds its model on its own.
SAFETENSORS_METADATA_KEYS = ("model_yaml", "names", "nc", "task", "train_args")
# Keys only needed to resume training; a stripped (inference/fine-tune) checkpoint drops them.
RESUME_ONLY_KEYS = ("optimizer", "scaler", "ema", "ema_updates", "rng", "schedule", "stopper", "callbacks")


class NonFiniteCheckpointError(CheckpointError, ValueError):
    """Refusal to save weights that contain NaN or infinity (the training run has diverged)."""


# ----------------------------------------------------------------------------------------------------------- saving

WEIGHT_SUFFIXES = (".pt", ".safetensors")


def is_weights_file(path):
    """True for a path that names stored weights (a checkpoint or a safetensors export) rather than a yaml."""
    return str(path).lower().endswith(WEIGHT_SUFFIXES)

def save_atomic_bytes(data: bytes, path: PathLike) -> Path:
    """Write ``data`` to ``path`` atomically (readers see the old file or the new one, never a mix)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_atomic_stream(path, lambda file: file.write(data))


def save_atomic_text(text: str, path: PathLike, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (for results.csv, args.yaml and other small text files)."""
    return save_atomic_bytes(text.encode(encoding), path)


def _as_state_dict(weights: Any) -> Optional[Mapping]:
    if isinstance(weights, torch.nn.Module):
        return weights.state_dict()
    return weights if isinstance(weights, Mapping) else None


def _first_non_finite(state_dict: Mapping) -> Optional[str]:
    for name, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            return name
    return None


def check_finite_weights(obj: Mapping, path: PathLike = "<checkpoint>") -> None:
    """Raise ``NonFiniteCheckpointError`` if a floating tensor of ``obj["model"]`` or ``obj["ema"]`` is NaN/inf."""
    for key in WEIGHT_KEYS:
        state_dict = _as_state_dict(obj.get(key))
        if state_dict is None:
            continue
        bad = _first_non_finite(state_dict)
        if bad is not None:
            raise NonFiniteCheckpointError(
                f"refusing to save {path}: {key}['{bad}'] contains NaN or inf (training diverged; "
                "lower lr0, check the data or disable amp)"
            )


def save_checkpoint(obj: dict, path: PathLike, copies=()) -> Path:
    """Save ``obj`` with ``torch.save`` atomically, and the same bytes to each of ``copies`` (best.pt beside last.pt:
    serialised once, copied after); refuse non-finite model/EMA weights before writing anything.

    On any failure the temporary file is removed and the exception re-raised; the file being written when it
    failed keeps its previous content.
    """
    check_finite_weights(obj, path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic_stream(path, lambda file: torch.save(obj, file))
    for target in copies:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, lambda temp: shutil.copyfile(path, temp))
    return Path(path)


# ---------------------------------------------------------------------------------------------------------- loading
def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)``; nothing in the file is executed.

    Raises ``CheckpointError`` (one line) when the file is missing, needs arbitrary code to unpickle, is corrupt,
    or does not hold a dict. A ``.safetensors`` file is read with ``checkpoint_from_safetensors``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} not found; yolotrain never downloads weights: give the path of an existing .pt, "
            f"or train from scratch with model={_scratch_yaml(path)}"
        )
    if path.suffix == SAFETENSORS_SUFFIX:
        return checkpoint_from_safetensors(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # A pickle of whole objects: an Ultralytics checkpoint is read as inert records, anything that would
        # run code is refused (yolotrain.utils.foreign).
        from yolotrain.utils.foreign import read_ultralytics_checkpoint

        return read_ultralytics_checkpoint(path)
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {first_line}") from error
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a yolotrain checkpoint dict")
    return obj


def _scratch_yaml(path: Path) -> str:
    """The model yaml that trains the architecture `path` is named after, when yolotrain has it (yolov8n.pt ->
    yolov8n.yaml if it resolves), else the default yolo-n.yaml."""
    from yolotrain.nn.model import load_model_yaml

    try:
        load_model_yaml(f"{path.stem}.yaml")
        return f"{path.stem}.yaml"
    except Exception:  # no such yaml: any error here only picks the hint
        return "yolo-n.yaml"


# -------------------------------------------------------------------------------------------------------- stripping
def _to_half(state_dict: Mapping) -> dict:
    return {
        name: value.half() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
        for name, value in state_dict.items()
    }


def strip_optimizer(path: PathLike, out: Optional[PathLike] = None) -> Path:
    """Turn a training checkpoint into a small inference/fine-tune one, atomically.

    ``model`` becomes the EMA weights (the model's when there is no EMA) in float16; everything only needed to
    resume (optimizer, scaler, ema, rng, schedule, stopper, callbacks) is dropped. Other keys (epoch, best_fitness,
    train_args, train_metrics, date, version, ...) are kept. Writes to ``out`` (default: over ``path``).
    """
    ckpt = load_checkpoint(path)
    weights = ckpt.get("ema") if ckpt.get("ema") is not None else ckpt.get("model")
    if weights is not None:
        ckpt["model"] = _to_half(_as_state_dict(weights) or {})
    for key in RESUME_ONLY_KEYS:
        ckpt.pop(key, None)
    out = Path(out) if out is not None else Path(path)
    save_checkpoint(ckpt, out)
    LOGGER.info("stripped optimizer from %s, saved as %s (%.1f MB)", path, out, out.stat().st_size / 1e6)
    return out


# --------------------------------------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """Capture Python, NumPy and torch (CPU and CUDA) RNG states as plain types and tensors.

    The result loads with ``torch.load(weights_only=True)``.
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state = {
        "python": {"version": py_version, "state": list(py_internal), "gauss_next": py_gauss},
        "numpy": {
            "bit_generator": str(np_name),
            "keys": [int(k) for k in np_keys],
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping) -> None:
    """Restore RNG states captured by ``rng_state()``; parts absent from ``state`` are left as they are."""
    if "python" in state:
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    if "numpy" in state:
        npy = state["numpy"]
        keys = np.asarray(npy["keys"], dtype=np.uint32)
        np.random.set_state((npy["bit_generator"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        # A resume on fewer GPUs restores the devices that still exist.
        for device_index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device_index)


# ------------------------------------------------------------------------------------------------------ safetensors
def _safetensors_torch():
    try:
        import safetensors.torch as st
    except ImportError as error:
        raise CheckpointError(
            "safetensors export/import needs the 'safetensors' package: pip install safetensors"
        ) from error
    return st


def _safetensors_ready(state_dict: Mapping) -> dict:
    """Detached, contiguous CPU tensors; tensors sharing storage with an earlier one are cloned (safetensors
    refuses shared storage)."""
    tensors: dict = {}
    seen_storages: set = set()
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            LOGGER.warning("safetensors export skips '%s': %s is not a tensor", name, type(value).__name__)
            continue
        tensor = value.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen_storages or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        seen_storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    return tensors


def export_safetensors(state_dict: Mapping, path: PathLike, metadata: Optional[dict] = None) -> Path:
    """Write a tensor state dict to a ``.safetensors`` file atomically (optional ``metadata`` of str -> str)."""
    st = _safetensors_torch()
    text_metadata = {str(k): str(v) for k, v in metadata.items()} if metadata else None
    data = st.save(_safetensors_ready(state_dict), metadata=text_metadata)
    return save_atomic_bytes(data, path)


def load_safetensors(path: PathLike) -> dict:
    """Read a ``.safetensors`` file into a dict of CPU tensors."""
    st = _safetensors_torch()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"safetensors file {path} not found; expected an existing .safetensors file")
    try:
        return st.load_file(str(path), device="cpu")
    except Exception as error:  # safetensors raises its own SafetensorError for bad headers
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from error


def load_safetensors_metadata(path: PathLike) -> dict:
    """The str -> str metadata of a ``.safetensors`` file (empty when it has none)."""
    _safetensors_torch()
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            return dict(file.metadata() or {})
    except Exception as error:
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from error


def export_checkpoint_safetensors(checkpoint: PathLike, out: Optional[PathLike] = None) -> Path:
    """Write the inference weights of a yolotrain checkpoint (its EMA, else its model) to ``.safetensors``.

    The model yaml, class names and class count go into the metadata as JSON, so ``load_checkpoint`` (and so
    ``pretrained=``, validation, ...) can rebuild the model from the file alone. Default ``out``: next to
    ``checkpoint`` with the ``.safetensors`` suffix.
    """
    ckpt = load_checkpoint(checkpoint)
    weights = _as_state_dict(ckpt.get("ema") if ckpt.get("ema") is not None else ckpt.get("model"))
    if not weights:
        raise CheckpointError(f"{checkpoint} holds no 'ema' or 'model' weights to export")
    metadata = {"format": "yolotrain"}
    metadata.update({key: json.dumps(ckpt[key], default=str) for key in SAFETENSORS_METADATA_KEYS if key in ckpt})
    out = Path(out) if out is not None else Path(checkpoint).with_suffix(SAFETENSORS_SUFFIX)
    return export_safetensors(weights, out, metadata)


def checkpoint_from_safetensors(path: PathLike) -> dict:
    """A checkpoint dict (``model`` weights plus the JSON metadata entries) read from a ``.safetensors`` file."""
    metadata = load_safetensors_metadata(path)
    ckpt = {"model": load_safetensors(path)}
    for key in SAFETENSORS_METADATA_KEYS:
        if key in metadata:
            try:
                ckpt[key] = json.loads(metadata[key])
            except ValueError as error:
                raise CheckpointError(f"{path}: metadata '{key}' is not valid JSON ({error})") from error
    if isinstance(ckpt.get("names"), dict):  # JSON object keys are strings; class ids are ints
        ckpt["names"] = {int(k) if str(k).isdigit() else k: v for k, v in ckpt["names"].items()}
    return ckpt


# ------------------------------------------------------------------------------------------------------- discovery
def find_latest_checkpoint(search_dir: PathLike = ".") -> Optional[Path]:
    """The most recently modified ``last.pt`` under ``search_dir`` (recursively), or None when there is none."""
    candidates = [p for p in Path(search_dir).rglob("last.pt") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None
