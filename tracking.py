"""Where a run's numbers go besides the log lines: TensorBoard, and the trackers asked for with ``--log wandb|mlflow``.

:class:`RunRecorder` is the one object the loop talks to: ``log_step(step, metrics)`` at the log steps (loss, lr,
grad_norm) and ``log_epoch(...)`` after each epoch (summary.csv's row); it fans them out to TensorBoard (as before:
``train/*`` by batch, ``train/epoch_loss``, ``val/*`` by epoch) and to each tracker. Rank 0 only; on the other
ranks it holds nothing and every call is a no-op.

Trackers are optional packages, imported only when asked for. A resumed run continues the same tracker run:
each tracker's run id, with the last step and epoch it was sent, is kept in the checkpoints under 'trackers'
(:meth:`RunRecorder.checkpoint_entry`) and in ``OUTPUT/trackers.json`` (rewritten before every send, so it is
newer than the checkpoint after a ``kill -9``); MLflow's store answers exactly what it holds. A resumed run sends
nothing at or below those marks, so the steps it trains again never reach a tracker twice. A tracker that fails
while the run goes on is switched off with one warning: a tracker outage never stops a training run.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional, Sequence

import yaml

from logger import create_tb_writer
from utils.errors import UserError
from utils.summary import COLUMNS as SUMMARY_COLUMNS

CHECKPOINT_KEY = 'trackers'
MARKS_FILE = 'trackers.json'
DEFAULT_PROJECT = 'swin_transformer'
_PACKAGES = {'wandb': ('wandb', 'pip install wandb'), 'mlflow': ('mlflow', 'pip install mlflow-skinny (or mlflow)')}


def import_backend(name: str):
    """The tracker's package, or one UserError line saying what to install."""
    module, install = _PACKAGES[name]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"--log {name} (LOG.BACKENDS) needs the {module} package, which is not installed: "
                        f"{install}") from None


@dataclass
class Mark:
    """A tracker run's id and the last step and epoch it was sent."""
    run_id: str
    step: int = -1
    epoch: int = -1


@dataclass
class TrackerSettings:
    """What a tracker run is created with: where, under which project and name, with the run's config."""
    output_dir: str
    project: str
    run_name: str
    config: dict = field(default_factory=dict)  # the run's config as nested plain data
    mlflow_uri: str = ''


class WandbTracker:
    """Weights & Biases: one run per training run, resumed by id (``resume='allow'``); steps are explicit, per-epoch
    figures are plotted against 'epoch'. WANDB_MODE=offline writes under OUTPUT/wandb for a later ``wandb sync``."""
    name = 'wandb'

    def __init__(self, settings: TrackerSettings, run_id: Optional[str] = None):
        wandb = import_backend('wandb')
        self.run = wandb.init(project=settings.project, name=settings.run_name, id=run_id, resume='allow',
                              dir=settings.output_dir, config=settings.config, allow_val_change=True)
        self.run.define_metric('epoch')
        for column in SUMMARY_COLUMNS[1:]:
            self.run.define_metric(column, step_metric='epoch')
        self.run_id = self.run.id

    def log_step(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def log_epoch(self, row: Mapping[str, float], step: int) -> None:
        # W&B has one step axis per run, increasing: the epoch's row goes at the step after its last batch
        self.run.log(dict(row), step=step)

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


def _flat(tree: Mapping, prefix: str = '') -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f'{prefix}{key}.'))
        else:
            out[f'{prefix}{key}'] = value
    return out


class MlflowTracker:
    """MLflow through its client (no global active run): the config as parameters (dotted keys) when the run is
    created, metrics with their step; per-epoch figures by epoch. A resumed run reopens the same run id."""
    name = 'mlflow'

    def __init__(self, settings: TrackerSettings, run_id: Optional[str] = None):
        import_backend('mlflow')
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        uri = settings.mlflow_uri or os.environ.get('MLFLOW_TRACKING_URI') or \
            'file:' + os.path.join(os.path.abspath(settings.output_dir), 'mlruns')
        if uri.startswith('file:'):  # MLflow 3 keeps its file store behind this switch; ours are local test runs
            os.environ.setdefault('MLFLOW_ALLOW_FILE_STORE', 'true')
        self.client = MlflowClient(tracking_uri=uri)
        self.logged = None
        if run_id is not None and self._exists(run_id):
            self.client.update_run(run_id, status='RUNNING')
            self.run_id = run_id
            self.logged = self._last_logged()
            return  # its parameters were logged when it was created (MLflow refuses to change them)
        experiment = self.client.get_experiment_by_name(settings.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(settings.project)
        self.run_id = self.client.create_run(experiment_id, run_name=settings.run_name).info.run_id
        params = [Param(key, str(value)[:500]) for key, value in _flat(settings.config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException
        try:
            self.client.get_run(run_id)
            return True
        except MlflowException:  # another tracking store than the one the run was logged to: a new run
            return False

    def _last_logged(self) -> tuple[int, int]:
        """(step, epoch) the run has up to: MLflow writes each call through, so its store knows exactly."""
        steps = [m.step for m in self.client.get_metric_history(self.run_id, 'train/loss')]
        epochs = [m.step for m in self.client.get_metric_history(self.run_id, 'epoch')]
        return max(steps, default=-1), max(epochs, default=-1)

    def _log(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def log_step(self, metrics: Mapping[str, float], step: int) -> None:
        self._log(metrics, step)

    def log_epoch(self, row: Mapping[str, float], step: int) -> None:
        self._log(row, int(row['epoch']))  # MLflow's steps are per metric: per-epoch figures by epoch

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, status='FINISHED' if ok else 'FAILED')


TRACKERS = {'wandb': WandbTracker, 'mlflow': MlflowTracker}


class RunRecorder:
    """Receives the run's per-step and per-epoch metrics and sends them to TensorBoard and the trackers.

    ``marks`` (name -> saved :class:`Mark` fields) say what each tracker run has already received (a resumed run's);
    ``marks_file`` is rewritten with the new marks before every send."""

    def __init__(self, tb_writer: Any = None, trackers: Sequence = (), marks: Optional[dict] = None,
                 marks_file: Optional[str] = None, logger: Optional[logging.Logger] = None):
        self.tb_writer, self.trackers, self.marks_file = tb_writer, list(trackers), marks_file
        self.logger = logger or logging.getLogger(__name__)
        marks = marks or {}
        self.marks = {t.name: Mark(t.run_id, *_resumed_marks(marks.get(t.name), t)) for t in self.trackers}

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        """Per-step figures (TensorBoard: by global batch index ``step``)."""
        if self.tb_writer is not None:
            for name, value in metrics.items():
                self.tb_writer.add_scalar(name, value, step)
        due = self._due(lambda mark: step > mark.step)
        for tracker in due:
            self.marks[tracker.name].step = step
        if due:  # saved before sending: a kill in between loses the step rather than sending it twice
            self._save_marks()
        for tracker in due:
            self._call(tracker, 'log_step', metrics, step)

    def log_epoch(self, epoch: int, step: int, scalars: Mapping[str, float], row: Mapping[str, Any]) -> None:
        """An epoch's figures: ``scalars`` to TensorBoard by epoch, summary.csv's ``row`` (empty cells left out)
        to the trackers, at ``step`` (the global batch index after the epoch's last) where one axis is shared."""
        if self.tb_writer is not None:
            for name, value in scalars.items():
                self.tb_writer.add_scalar(name, value, epoch)
            self.tb_writer.flush()
        row = {k: v for k, v in row.items() if v is not None}
        due = self._due(lambda mark: epoch > mark.epoch)
        for tracker in due:
            self.marks[tracker.name].epoch = epoch
        if due:
            self._save_marks()
        for tracker in due:
            self._call(tracker, 'log_epoch', row, step)

    def checkpoint_entry(self) -> dict:
        """The checkpoint entry that lets a resumed run continue the same tracker runs ({} without trackers)."""
        if not self.marks:
            return {}
        return {CHECKPOINT_KEY: {name: asdict(mark) for name, mark in self.marks.items()}}

    def close(self, ok: bool = True) -> None:
        """End the tracker runs (``ok`` False: as failed) and close TensorBoard's file."""
        for tracker in list(self.trackers):
            self._call(tracker, 'close', ok)
        self.trackers = []
        if self.tb_writer is not None:
            self.tb_writer.close()
            self.tb_writer = None

    def __enter__(self) -> 'RunRecorder':
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)

    def _due(self, wanted) -> list:
        return [t for t in self.trackers if wanted(self.marks[t.name])]

    def _call(self, tracker, method: str, *args) -> None:
        try:
            getattr(tracker, method)(*args)
        except Exception as e:  # a tracker's outage must not end a training run
            self.logger.warning(f"--log {tracker.name}: {type(e).__name__}: {e}; {tracker.name} is off for the rest "
                                f"of this run")
            self.trackers.remove(tracker)

    def _save_marks(self) -> None:
        if not self.marks_file or not self.marks:
            return
        tmp = f'{self.marks_file}.tmp{os.getpid()}'
        with open(tmp, 'w') as f:
            json.dump({name: asdict(mark) for name, mark in self.marks.items()}, f)
        os.replace(tmp, self.marks_file)  # atomic: a kill leaves the previous version


def _resumed_marks(saved: Optional[dict], tracker) -> tuple[int, int]:
    """(step, epoch) a tracker run has received: what its store says where it knows (``tracker.logged``), else the
    saved marks of the same run id; (-1, -1) for a new run."""
    if getattr(tracker, 'logged', None) is not None:
        return tracker.logged
    if not saved or saved.get('run_id') != tracker.run_id:
        return -1, -1
    return int(saved.get('step', -1)), int(saved.get('epoch', -1))


def read_marks(checkpoint_entry: Optional[dict], marks_file: str) -> dict:
    """The marks a resumed run starts from: the run ids of the checkpoint, each with the later of the checkpoint's
    and ``marks_file``'s step and epoch where the file names the same run (it is newer after a kill)."""
    marks = {name: dict(mark) for name, mark in (checkpoint_entry or {}).items() if isinstance(mark, dict)}
    try:
        with open(marks_file) as f:
            newer = json.load(f)
    except (OSError, ValueError):
        newer = {}
    for name, mark in marks.items():
        other = newer.get(name) if isinstance(newer, dict) else None
        if isinstance(other, dict) and other.get('run_id') == mark.get('run_id'):
            mark['step'] = max(int(mark.get('step', -1)), int(other.get('step', -1)))
            mark['epoch'] = max(int(mark.get('epoch', -1)), int(other.get('epoch', -1)))
    return marks


def build_recorder(config, rank: int, resumed_extras: Optional[dict], logger: logging.Logger) -> RunRecorder:
    """The run's :class:`RunRecorder` from OUTPUT, LOG.BACKENDS, LOG.PROJECT and LOG.MLFLOW_URI: TensorBoard and
    the trackers on rank 0 (a resumed run's trackers continue the runs its checkpoint names), nothing elsewhere."""
    if rank != 0:
        return RunRecorder()
    names = list(dict.fromkeys(config.LOG.BACKENDS))
    for name in names:  # every missing package is the one error line before any run is created
        import_backend(name)
    marks_file = os.path.join(config.OUTPUT, MARKS_FILE)
    marks = read_marks((resumed_extras or {}).get(CHECKPOINT_KEY), marks_file)
    settings = TrackerSettings(config.OUTPUT, config.LOG.PROJECT or DEFAULT_PROJECT,
                               f'{config.MODEL.NAME}/{config.TAG}', yaml.safe_load(config.dump()),
                               config.LOG.MLFLOW_URI)
    trackers = []
    for name in names:
        run_id = marks.get(name, {}).get('run_id')
        try:
            trackers.append(TRACKERS[name](settings, run_id))
        except UserError:
            raise
        except Exception as e:  # no credentials, an unreachable server: one line, before any training
            raise UserError(f"--log {name}: the tracker run could not be started: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
    recorder = RunRecorder(create_tb_writer(config.OUTPUT, rank), trackers, marks, marks_file, logger)
    for name, mark in recorder.marks.items():
        logger.info(f"--log {name}: run {mark.run_id}" + (
            f" continued: it has steps up to {mark.step} and epochs up to {mark.epoch}, not sent again"
            if marks.get(name, {}).get('run_id') == mark.run_id else ''))
    return recorder
