"""`backend=ray`: the trials of a `Tuner` run by Ray Tune, sampled by Optuna's TPE through Ray's OptunaSearch.

Each trial trains in `<tune folder>/trials/trial_{id}/`, named by its Ray trial id (the `trial` column of
tune_results.csv), so on a cluster the tuning folder must be on storage every node can write to. Ray keeps its own
experiment state in `<tune folder>/ray/`; a resumed tuning restores it and Ray finishes the unfinished trials (the
number of trials is fixed when the experiment starts: `iterations` cannot grow on resume).
"""

import logging
import math
from pathlib import Path

from yolotrain.engine.tuner import RAY_DIR, TRIALS_DIR, run_trial
from yolotrain.errors import YoloTrainError

LOGGER = logging.getLogger(__name__)


def run(tuner) -> list:
    """Run `tuner`'s missing trials on Ray; return the result rows (trial, state, fitness, values)."""
    ray, tune = _import_ray()
    started = not ray.is_initialized()
    if started:  # a caller's own ray.init() is used as it is, and left running
        address = tuner.settings.get("ray_address")
        ray.init(address=address) if address else ray.init()
    try:
        return _fit(tuner, tune)
    finally:
        if started:
            ray.shutdown()


def _fit(tuner, tune) -> list:
    from ray.tune.search.optuna import OptunaSearch

    trainable = tune.with_resources(
        tune.with_parameters(
            _ray_trial, model=tuner.model, task=tuner.task, callbacks=tuner.callbacks,
            train_args=tuner.train_args, trials_dir=str((tuner.tune_dir / TRIALS_DIR).resolve()),
        ),
        {"cpu": 1, "gpu": _gpus_per_trial(tuner.train_args)},
    )
    experiment = (tuner.tune_dir / RAY_DIR).resolve()
    if tune.Tuner.can_restore(str(experiment)):
        if "iterations" in tuner.settings["given"]:
            LOGGER.warning("tune: a resumed Ray tuning keeps the number of trials it started with")
        ray_tuner = tune.Tuner.restore(str(experiment), trainable, resume_errored=False)
    else:
        ray_tuner = tune.Tuner(
            trainable,
            param_space={name: _ray_dimension(tune, dim) for name, dim in tuner.space.items()},
            tune_config=tune.TuneConfig(
                num_samples=tuner.iterations, metric="fitness", mode="max",
                search_alg=OptunaSearch(seed=int(tuner.seed)),
            ),
            run_config=tune.RunConfig(
                name=experiment.name, storage_path=str(experiment.parent),
                verbose=1 if tuner.train_args.get("verbose", True) else 0,
            ),
        )
    return [_row(result, list(tuner.space)) for result in ray_tuner.fit()]


def _ray_trial(config, model, task, callbacks, train_args, trials_dir):
    """One Ray trial: an ordinary training run; reports its fitness, raises when it failed."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    # resume=True: a trial Ray restarts after an interruption continues its own last.pt.
    fitness = run_trial(model, task, callbacks, train_args, dict(config), Path(trials_dir) / f"trial_{trial_id}", True)
    if fitness is None or not math.isfinite(fitness):
        raise YoloTrainError(f"trial {trial_id} ended with fitness {fitness}")
    tune.report({"fitness": fitness})


def _row(result, names: list) -> dict:
    config, metrics = result.config or {}, result.metrics or {}
    failed = result.error is not None or "fitness" not in metrics
    return {
        "trial": metrics.get("trial_id", Path(result.path).name),
        "state": "FAIL" if failed else "COMPLETE",
        "fitness": None if failed else float(metrics["fitness"]),
        **{name: config.get(name) for name in names},
    }


def _ray_dimension(tune, dim):
    if dim.choices is not None:
        return tune.choice(list(dim.choices))
    if dim.integer:
        return tune.lograndint(dim.low, dim.high + 1) if dim.log else tune.randint(dim.low, dim.high + 1)
    return tune.loguniform(dim.low, dim.high) if dim.log else tune.uniform(dim.low, dim.high)


def _gpus_per_trial(train_args) -> int:
    import torch

    device = str(train_args.get("device") or "")
    return 1 if torch.cuda.is_available() and device not in ("cpu", "mps") else 0


def _import_ray():
    try:
        import ray
        from ray import tune
    except ImportError:
        raise YoloTrainError("backend=ray needs Ray Tune installed: pip install 'yolotrain[ray]'") from None
    return ray, tune
