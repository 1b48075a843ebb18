"""Writing files in the reference trainer's pickle layout: our module classes pickled under its class names."""

import contextlib
import sys
import types


@contextlib.contextmanager
def classes_named_like_the_reference(model):
    """While saving: our module classes pickle as `ultralytics.nn.*` classes (stub modules in sys.modules)."""
    classes = {type(m) for m in model.modules() if type(m).__module__.startswith("yolotrain")}
    saved = {cls: cls.__module__ for cls in classes}
    stubs = {name: types.ModuleType(name) for name in ("ultralytics", "ultralytics.nn")}
    for cls in classes:
        name = "ultralytics.nn.tasks" if cls.__name__.endswith("Model") else "ultralytics.nn.modules.block"
        stubs.setdefault(name, types.ModuleType(name))
        setattr(stubs[name], cls.__qualname__, cls)
        cls.__module__ = name
    sys.modules.update(stubs)
    try:
        yield
    finally:
        for cls, module in saved.items():
            cls.__module__ = module
        for name in stubs:
            del sys.modules[name]
