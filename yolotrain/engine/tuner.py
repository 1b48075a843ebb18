"""Hyperparameter tuning: many short training runs, each with values drawn from a search space, best kept.

`YOLO(...).tune(data=..., epochs=10, iterations=100)` or `yolotrain tune data=... iterations=100`. Each trial is
an ordinary training run in `<tune folder>/trials/trial{K}/` (its own args.yaml, results.csv and weights); its
fitness is the run's best validation fitness. The tuning folder (`runs/detect/tune`, `tune2`, ...) holds:

    study.db                    the Optuna study (sqlite): every trial, its values, state and fitness
    tune_args.yaml              what the tuning was started with: the training arguments, space and iterations
    tune_results.csv            one row per finished trial: trial, state, fitness, then each tuned value
    best_hyperparameters.yaml   the best trial's values, loadable as `cfg=best_hyperparameters.yaml`
    tune_scatter_plots.png      fitness against each tuned value

Resume: `resume=True` continues the newest tuning folder of the project, `resume=path/to/tuneN` that folder, and
`name=tuneN exist_ok=True` reuses it the same way. A resumed tuning keeps its saved arguments and space (only
`iterations`, `device`, `workers`, `verbose` and `plots` may change), first finishes the trial that was running
when it stopped (from that trial's last.pt), then runs only the trials still missing up to `iterations`.

A trial that raises or ends with a non-finite fitness is recorded as failed and the search goes on; an interrupt
(Ctrl-C) stops the tuning and leaves the running trial to be finished by a resume.

`backend=ray` runs the same trials with Ray Tune (Optuna's sampler through Ray's OptunaSearch), locally or on the
cluster at `ray_address=`; trial folders must then be on storage every Ray node can write to.
"""

import csv
import io
import logging
import math
from pathlib import Path
from typing import Optional

import yaml

from yolotrain.cfg import check_args, format_value, get_cfg
from yolotrain.engine.interrupt import TrainingInterrupted
from yolotrain.engine.tune_space import Dimension, load_space, split_tune_args
from yolotrain.errors import CfgError, YoloTrainError, one_line
from yolotrain.utils.checkpoint import save_atomic_text
from yolotrain.utils.files import ensure_writable_dir, project_dir, run_dir

LOGGER = logging.getLogger(__name__)

STUDY_FILE = "study.db"
SETTINGS_FILE = "tune_args.yaml"
RESULTS_FILE = "tune_results.csv"
BEST_FILE = "best_hyperparameters.yaml"
PLOT_FILE = "tune_scatter_plots.png"
TRIALS_DIR = "trials"
RAY_DIR = "ray"
# Arguments a resumed tuning may change; all others come from its tune_args.yaml.
RESUME_OVERRIDABLE = ("iterations", "device", "workers", "verbose", "plots")


class Tuner:
    """Runs the trials of one tuning folder and writes its results; `run()` returns the best values found."""

    def __init__(self, model: str, task: str, callbacks, overrides: dict):
        self.model, self.task, self.callbacks = model, task, callbacks
        self.settings, given = split_tune_args(overrides)
        resume = given.pop("resume", False)
        self.given_space = "space" in self.settings["given"]
        self.tune_dir = _tune_folder({**given, "model": model, "task": task}, resume)
        self.resumed = (self.tune_dir / SETTINGS_FILE).exists()
        if self.resumed:
            self.train_args, self.space = self._resumed_settings(given)
        else:
            self.train_args, self.space = given, self._space_for(given)
            get_cfg({**given, "model": model, "task": task, "mode": "train"})  # bad arguments fail before any trial
        self.iterations = self.settings["iterations"]

    # ------------------------------------------------------------------ settings
    def _space_for(self, given: dict) -> dict:
        space = load_space(self.settings["space"])
        fixed = sorted(set(space) & set(given))
        if fixed and self.given_space:
            raise CfgError(f"{', '.join(fixed)} both set and in the search space: set it or tune it, not both")
        if fixed:
            LOGGER.info(f"tune: {', '.join(fixed)} set by you, so kept fixed rather than tuned")
        tuned = {name: dim for name, dim in space.items() if name not in given}
        ignored_by_auto = [name for name in ("lr0", "momentum") if name in tuned]
        if ignored_by_auto and given.get("optimizer", "auto") == "auto" and "optimizer" not in tuned:
            LOGGER.warning(
                f"tune: optimizer=auto picks its own learning rate and momentum, so tuning {' and '.join(ignored_by_auto)}"
                f" changes nothing: set optimizer=SGD (or another) to tune them"
            )
        return tuned

    def _resumed_settings(self, given: dict) -> tuple:
        saved = yaml.safe_load((self.tune_dir / SETTINGS_FILE).read_text(encoding="utf-8")) or {}
        train_args = dict(saved.get("train_args") or {})
        changed = {k: v for k, v in given.items() if k in RESUME_OVERRIDABLE and train_args.get(k) != v}
        placing = ("project", "name", "exist_ok")  # they found this folder
        ignored = sorted(
            k for k in given if k not in (*RESUME_OVERRIDABLE, *placing) and train_args.get(k) != given[k]
        )
        self.model = saved.get("model", self.model)
        train_args.update(changed)
        ignored += [name for name in ("space", "backend") if name in self.settings["given"]]
        if ignored:
            LOGGER.warning(f"tune: resuming {self.tune_dir}: ignoring {ignored}; these come from its {SETTINGS_FILE}")
        if "iterations" not in self.settings["given"]:
            self.settings["iterations"] = saved.get("iterations", self.settings["iterations"])
        self.settings["backend"] = saved.get("backend", self.settings["backend"])
        return train_args, load_space(saved.get("space") or {})

    def _save_settings(self) -> None:
        settings = {
            "model": self.model,
            "iterations": self.iterations,
            "backend": self.settings["backend"],
            "space": {name: _space_entry(dim) for name, dim in self.space.items()},
            # Objects a Python caller passed (augment=fn) cannot be saved: a resume must pass them again.
            "train_args": {k: v for k, v in self.train_args.items() if not callable(v)},
        }
        save_atomic_text(yaml.safe_dump(settings, sort_keys=False), self.tune_dir / SETTINGS_FILE)

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        """Run the missing trials (Optuna or Ray), write the outputs and return the best trial's values."""
        ensure_writable_dir(self.tune_dir / TRIALS_DIR)
        self._save_settings()
        verb = "resuming" if self.resumed else "tuning"
        LOGGER.info(f"tune: {verb} {len(self.space)} hyperparameters over {self.iterations} trials in {self.tune_dir}")
        if self.settings["backend"] == "ray":
            rows = self._run_ray()
        else:
            rows = self._run_optuna()
        best = write_outputs(self.tune_dir, rows, list(self.space))
        if best is None:
            LOGGER.warning(f"tune: no trial completed; see the trial folders in {self.tune_dir / TRIALS_DIR}")
            return {}
        LOGGER.info(f"tune: best trial {best['trial']} fitness {best['fitness']:.5g}; {self.tune_dir / BEST_FILE}")
        return {name: best[name] for name in self.space}

    # ------------------------------------------------------------------ optuna
    def _run_optuna(self) -> list:
        optuna = _import_backend("optuna", "tune")
        storage = f"sqlite:///{(self.tune_dir / STUDY_FILE).resolve()}"
        study = optuna.create_study(
            study_name="yolotrain", storage=storage, direction="maximize", load_if_exists=True,
            # A new seed per start: a resumed study must not redraw the values of its first random trials.
            sampler=optuna.samplers.TPESampler(seed=int(self.seed) + _count_trials(storage, optuna)),
        )
        distributions = {name: _optuna_distribution(optuna, dim) for name, dim in self.space.items()}
        try:
            for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                self._optuna_trial(study, stale.number, stale.params, optuna, resume=True)
            while _finished(study, optuna) < self.iterations:
                trial = study.ask(distributions)
                self._optuna_trial(study, trial.number, trial.params, optuna)
        finally:  # also when interrupted: the results so far are on disk
            rows = _optuna_rows(study, optuna)
            write_outputs(self.tune_dir, rows, list(self.space))
        return rows

    def _optuna_trial(self, study, number: int, params: dict, optuna, resume: bool = False) -> None:
        folder = self.tune_dir / TRIALS_DIR / f"trial{number}"
        LOGGER.info(f"tune: trial {number} {'resumed ' if resume else ''}{_describe(params)}")
        try:
            fitness = run_trial(self.model, self.task, self.callbacks, self.train_args, params, folder, resume)
        except TrainingInterrupted:  # a signal: the tuning stops, and this trial continues when it resumes
            raise
        except Exception as error:  # noqa: BLE001 - a trial's failure, whatever it is, must not end the search
            LOGGER.warning(f"tune: trial {number} failed: {one_line(error) or type(error).__name__}")
            study.tell(number, state=optuna.trial.TrialState.FAIL)
            return
        if fitness is None or not math.isfinite(fitness):
            LOGGER.warning(f"tune: trial {number} failed: its fitness is {fitness}")
            study.tell(number, state=optuna.trial.TrialState.FAIL)
            return
        study.tell(number, fitness)
        LOGGER.info(f"tune: trial {number} fitness {fitness:.5g} (best {study.best_value:.5g})")

    @property
    def seed(self) -> int:
        """The trials' seed argument, also the sampler's seed."""
        return self.train_args.get("seed", get_cfg().seed)

    # ------------------------------------------------------------------ ray
    def _run_ray(self) -> list:
        from yolotrain.engine import tuner_ray

        return tuner_ray.run(self)


# ----------------------------------------------------------------------------------------------- one trial


def run_trial(model: str, task: str, callbacks, train_args: dict, params: dict, folder: Path, resume=False):
    """Train one trial in `folder` (continuing its last.pt when `resume` and one exists); return its fitness."""
    from yolotrain.engine.model import YOLO

    runner = YOLO(model, task=task)
    runner.callbacks = callbacks
    last = folder / "weights" / "last.pt"
    if resume and last.exists():
        finished = _finished_fitness(last)
        if finished is not None:  # trained to the end; only its result was not recorded
            return finished
        keep = {k: v for k, v in train_args.items() if k in ("device", "workers", "verbose")}
        runner.train(**keep, resume=str(last))
    else:
        placed = {"project": str(folder.parent), "name": folder.name, "exist_ok": True}
        runner.train(**{**train_args, **params, **placed})
    return trial_fitness(runner.trainer, last)


def trial_fitness(trainer, last: Path) -> Optional[float]:
    """The best fitness a trial reached: from its trainer, or (multi-process trials) from its last.pt."""
    if trainer is not None:
        return None if trainer.best_fitness is None else float(trainer.best_fitness)
    if last.exists():
        from yolotrain.utils.checkpoint import load_checkpoint

        value = load_checkpoint(last).get("best_fitness")
        return None if value is None else float(value)
    return None


def _finished_fitness(last: Path) -> Optional[float]:
    from yolotrain.utils.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(last)
    epochs = (checkpoint.get("train_args") or {}).get("epochs")
    done = "batch_index" not in checkpoint and epochs is not None and checkpoint.get("epoch", -1) + 1 >= epochs
    return checkpoint.get("best_fitness") if done else None


# ----------------------------------------------------------------------------------------------- folders


def _tune_folder(args: dict, resume) -> Path:
    """The tuning folder: the one `resume` names (True: the newest of the project), else the next free one."""
    resolved = get_cfg({k: v for k, v in args.items() if k in ("project", "name", "exist_ok", "task")})
    if isinstance(resume, str):
        folder = Path(resume)
        folder = folder.parent if folder.name in (STUDY_FILE, SETTINGS_FILE) else folder
        if not (folder / SETTINGS_FILE).exists():
            raise CfgError(f"resume='{resume}' is not a tuning folder: expected a folder holding {SETTINGS_FILE}")
        return folder
    if resume:
        project = project_dir(resolved)
        found = sorted(project.glob(f"*/{SETTINGS_FILE}"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise CfgError(f"resume=True but no tuning folder (with {SETTINGS_FILE}) was found under '{project}'")
        return found[-1].parent
    return run_dir(resolved, "tune")


# ----------------------------------------------------------------------------------------------- outputs


def write_outputs(tune_dir: Path, rows: list, names: list) -> Optional[dict]:
    """Write tune_results.csv, best_hyperparameters.yaml and the scatter plot from `rows` (dicts with trial,
    state, fitness and each of `names`); return the best completed row, or None when none completed."""
    columns = ["trial", "state", "fitness", *names]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in sorted(rows, key=lambda r: r["trial"]):
        writer.writerow(["" if row.get(c) is None else row[c] for c in columns])
    save_atomic_text(buffer.getvalue(), tune_dir / RESULTS_FILE)
    completed = [row for row in rows if row["state"] == "COMPLETE"]
    if not completed:
        return None
    best = max(completed, key=lambda r: r["fitness"])
    header = f"# best of {len(completed)} completed trials: trial {best['trial']}, fitness {best['fitness']:.6g}\n"
    values = {name: _plain(best[name]) for name in names}
    check_args(values)  # what cfg= will read back must be valid arguments
    save_atomic_text(header + yaml.safe_dump(values, sort_keys=False), tune_dir / BEST_FILE)
    try:
        from yolotrain.utils.plotting import plot_tune_results

        plot_tune_results(tune_dir / RESULTS_FILE, tune_dir / PLOT_FILE)
    except Exception as error:  # noqa: BLE001 - a plot must never lose the results written above
        LOGGER.warning(f"tune: could not plot {tune_dir / PLOT_FILE}: {one_line(error)}")
    return best


def _optuna_rows(study, optuna) -> list:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        if trial.state == optuna.trial.TrialState.RUNNING:
            continue
        fitness = trial.value if trial.state == optuna.trial.TrialState.COMPLETE else None
        rows.append({"trial": trial.number, "state": trial.state.name, "fitness": fitness, **trial.params})
    return rows


# ----------------------------------------------------------------------------------------------- helpers


def _import_backend(name: str, extra: str):
    try:
        return __import__(name)
    except ImportError:
        raise YoloTrainError(f"tuning with {name} needs it installed: pip install 'yolotrain[{extra}]'") from None


def _count_trials(storage: str, optuna) -> int:
    try:
        return len(optuna.load_study(study_name="yolotrain", storage=storage).get_trials(deepcopy=False))
    except KeyError:  # no study yet
        return 0


def _finished(study, optuna) -> int:
    states = tuple(s for s in optuna.trial.TrialState if s.is_finished())
    return len(study.get_trials(deepcopy=False, states=states))


def _optuna_distribution(optuna, dim: Dimension):
    distributions = optuna.distributions
    if dim.choices is not None:
        return distributions.CategoricalDistribution(list(dim.choices))
    if dim.integer:
        return distributions.IntDistribution(int(dim.low), int(dim.high), log=dim.log)
    return distributions.FloatDistribution(dim.low, dim.high, log=dim.log)


def _space_entry(dim: Dimension) -> list:
    if dim.choices is not None:
        return list(dim.choices)
    return [dim.low, dim.high, "log"] if dim.log else [dim.low, dim.high]


def _plain(value):
    """numpy scalars (from Ray) as plain Python numbers, so yaml writes them as numbers."""
    return value.item() if hasattr(value, "item") else value


def _describe(params: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={format_value(v)}" for k, v in params.items())
