"""Named events and the callbacks run on them: plain ``fn(owner)`` functions, one registry per trainer/validator.

Callbacks run in registration order. A user callback that raises stops the run with its own traceback (it is the
user's code and the error must be seen). An *integration* callback (TensorBoard, MLflow, remote sync, ...) that
raises is reported once and then skipped, so a logging backend going down never kills a training run.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Union

from yolotrain.errors import CfgError

LOGGER = logging.getLogger(__name__)

EVENTS = (
    "on_pretrain_routine_start",
    "on_pretrain_routine_end",
    "on_train_start",
    "on_train_epoch_start",
    "on_train_batch_start",
    "optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
    "on_train_epoch_end",
    "on_fit_epoch_end",
    "on_model_save",
    "on_train_end",
    # The trainer's arguments are final: once at set-up after on_pretrain_routine_start (before args.yaml is
    # written), and after each `trainer.update_args(...)` call.
    "on_params_update",
    "teardown",
    "on_val_start",
    "on_val_batch_start",
    "on_val_batch_end",
    "on_val_end",
)

Callback = Callable[[Any], Any]


class UnknownEventError(CfgError, ValueError):
    """A callback event name that does not exist."""


def check_event(event: str) -> str:
    """Return ``event`` if it is a known event name, else raise ``UnknownEventError`` with a did-you-mean."""
    if event in EVENTS:
        return event
    close = difflib.get_close_matches(str(event), EVENTS, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise UnknownEventError(f"unknown callback event '{event}'.{hint} Valid events: {', '.join(EVENTS)}")


def _integration_name(fn: Callback, integration: Union[bool, str]) -> str:
    if isinstance(integration, str):
        return integration
    explicit = getattr(fn, "integration_name", None)
    if explicit:
        return str(explicit)
    module = getattr(fn, "__module__", None) or type(fn).__module__
    return module.rsplit(".", 1)[-1]


def _callback_name(fn: Callback) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__qualname__


def _state_holder(fn: Callback) -> Optional[Any]:
    """The object whose ``state_dict`` belongs to this callback: the callable itself, or a bound method's owner
    when that owner declares a ``state_key`` (so a method of a model or trainer never drags its whole state in)."""
    if callable(getattr(fn, "state_dict", None)):
        return fn
    owner = getattr(fn, "__self__", None)
    if getattr(owner, "state_key", None) and callable(getattr(owner, "state_dict", None)):
        return owner
    return None


def _state_key(holder: Any) -> str:
    return str(getattr(holder, "state_key", None) or _callback_name(holder))


@dataclass
class _Registered:
    fn: Callback
    integration: Optional[str]  # the integration's name, None for a user callback
    disabled: bool = False


class Callbacks:
    """The callbacks of one trainer or validator, by event name."""

    def __init__(self) -> None:
        self._by_event: Dict[str, List[_Registered]] = {event: [] for event in EVENTS}

    def add(self, event: str, fn: Callback, integration: Union[bool, str] = False) -> None:
        """Register ``fn(owner)`` to run on ``event`` after those already registered.

        ``integration`` marks a third-party logging callback (True, or the integration's name): its errors are
        reported once and the callback is then skipped instead of stopping the run.
        """
        check_event(event)
        if not callable(fn):
            raise CfgError(f"callback for '{event}' must be callable, got {type(fn).__name__}")
        name = _integration_name(fn, integration) if integration else None
        self._by_event[event].append(_Registered(fn, name))

    def extend(
        self, callbacks: Mapping[str, Union[Callback, Iterable[Callback]]], integration: Union[bool, str] = False
    ) -> None:
        """Register a mapping of ``event -> fn`` (or a list of fns), e.g. what an integration module exports."""
        for event, fns in callbacks.items():
            for fn in [fns] if callable(fns) else fns:
                self.add(event, fn, integration)

    def set(self, event: str, fn: Callback) -> None:
        """Replace the user callbacks of ``event`` by ``fn``; integration callbacks stay registered."""
        if not callable(fn):
            raise CfgError(f"callback for '{event}' must be callable, got {type(fn).__name__}")
        self.clear(event)
        self._by_event[event].append(_Registered(fn, None))

    def clear(self, event: str) -> None:
        """Remove the user callbacks of ``event``; integration callbacks stay registered."""
        check_event(event)
        self._by_event[event] = [entry for entry in self._by_event[event] if entry.integration is not None]

    def get(self, event: str) -> List[Callback]:
        """The callbacks registered on ``event``, in the order they run."""
        check_event(event)
        return [entry.fn for entry in self._by_event[event]]

    def run(self, event: str, owner: Any) -> None:
        """Call every callback of ``event`` with ``owner`` (the trainer or validator), in registration order."""
        check_event(event)
        # A snapshot: a callback may register others while running without changing this pass.
        for entry in list(self._by_event[event]):
            if entry.disabled:
                continue
            if entry.integration is None:
                entry.fn(owner)
                continue
            self._run_integration(event, entry, owner)

    @staticmethod
    def _run_integration(event: str, entry: _Registered, owner: Any) -> None:
        try:
            entry.fn(owner)
        except Exception as error:  # any integration failure: report once, keep training
            entry.disabled = True
            LOGGER.warning(
                "integration '%s' failed in %s on %s (%s: %s); it is skipped for the rest of the run",
                entry.integration, _callback_name(entry.fn), event, type(error).__name__, error,
            )

    def _stateful(self) -> Dict[str, Any]:
        holders: Dict[str, Any] = {}
        for entries in self._by_event.values():
            for entry in entries:
                holder = _state_holder(entry.fn)
                if holder is None:
                    continue
                key = _state_key(holder)
                if holders.setdefault(key, holder) is not holder:
                    LOGGER.warning("two stateful callbacks share state_key '%s'; only the first is saved", key)
        return holders

    def state_dict(self) -> Dict[str, Any]:
        """``{state_key: callback.state_dict()}`` for every stateful callback (each object once).

        A callback is stateful when it has ``state_dict``/``load_state_dict``, or is a bound method of an object
        that has them and a ``state_key``; the key is ``state_key``, else the callable's qualified name.
        """
        return {key: holder.state_dict() for key, holder in self._stateful().items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Give each stateful callback its saved state; saved states without a matching callback are reported."""
        holders = self._stateful()
        for key, value in state.items():
            if key in holders:
                holders[key].load_state_dict(value)
            else:
                LOGGER.warning("checkpoint has state for callback '%s', which is not registered; ignored", key)

    def copy(self) -> "Callbacks":
        """An independent registry with the same callbacks (for a validator that shares the trainer's events)."""
        clone = Callbacks()
        clone._by_event = {
            event: [_Registered(e.fn, e.integration, e.disabled) for e in entries]
            for event, entries in self._by_event.items()
        }
        return clone

    def __repr__(self) -> str:
        counts = {event: len(entries) for event, entries in self._by_event.items() if entries}
        return f"Callbacks({counts})"
