"""Experiment tracking: MLflow by default, in a local sqlite store, or any tracking URI.

- :class:`LyraMLFlowLogger`: Lightning's ``MLFlowLogger`` with our defaults (experiment
  ``lyra_pl``, ``sqlite:///mlflow.db`` in the working directory, which MLflow 3 accepts
  offline, unlike ``file:./mlruns``), and plots of every logged metric uploaded at the end.
- :class:`TrackConfig`: LightningCLI's config saver that also logs every config value as an
  MLflow param (flattened, ``trainer.max_epochs`` style) and the config file as an artifact.
- :class:`Throughput`: tokens per second of training, from the stage's ``train/tokens``,
  timed between device synchronizations (:func:`synced_clock`) on the logged steps.
- :func:`logger_step`: the step number Lightning logs training metrics at.

mlflow is imported only when used (the GPU machines may not have it).
"""
from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else a sqlite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


@contextmanager
def sqlite_store_lock(tracking_uri: str):
    """Holds an exclusive lock on ``<db>.lock`` while a ``sqlite:///`` store is opened.

    Every process builds the logger, and MLflow's client creates and migrates the database
    tables when it opens the store: processes started together (``torchrun``, several
    processes per node) on a new database would race in that migration and fail. Other
    stores (an ``http://`` server) need no lock."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        yield
        return
    import fcntl

    db = Path(tracking_uri[len(prefix):].split("?", 1)[0])
    if not db.parent.is_dir():  # let MLflow report the bad location itself
        yield
        return
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class LyraMLFlowLogger(MLFlowLogger):
    """MLFlowLogger with a local default store; uploads metric plots when the run finishes.

    ``save_dir``: a local directory for the run's files; unset, the CLI gives it the run's
    ``trainer.default_root_dir`` (:func:`lyra_pl.training.cli.bind_run_folder`)."""

    def __init__(self, experiment_name: str = "lyra_pl", run_name: str | None = None,
                 tracking_uri: str | None = None, tags: dict[str, Any] | None = None,
                 log_model: bool = False, artifact_location: str | None = None,
                 plots: bool = True, save_dir: str | None = None):
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.experiment_name = experiment_name
        with sqlite_store_lock(self.tracking_uri):
            super().__init__(experiment_name=experiment_name, run_name=run_name,
                             tracking_uri=self.tracking_uri, tags=tags,
                             log_model=log_model, artifact_location=artifact_location)
        self.plots = plots
        self.local_dir = save_dir

    @property
    def save_dir(self) -> str:
        """Where local files of the run go (Lightning writes the CLI's config.yaml there):
        ``save_dir`` if given, else MLflow's own directory for ``file:`` stores, else ".".
        The tracking store itself is ``tracking_uri``."""
        return self.local_dir or super().save_dir or "."

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if self.plots and self._initialized:
            try:
                self.log_metric_plots()
            except Exception as e:  # a plotting problem must not fail a finished run
                import warnings
                warnings.warn(f"could not upload metric plots to MLflow: {e}")
        super().finalize(status)

    def log_metric_plots(self) -> None:
        """One PNG per logged metric (value against step), uploaded under ``plots/``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        client, run_id = self.experiment, self.run_id
        names = sorted(client.get_run(run_id).data.metrics)
        with tempfile.TemporaryDirectory() as tmp:
            for name in names:
                history = client.get_metric_history(run_id, name)
                if len(history) < 2:
                    continue
                fig, ax = plt.subplots(figsize=(5, 3.2))
                ax.plot([m.step for m in history], [m.value for m in history])
                ax.set_xlabel("step")
                ax.set_title(name)
                fig.tight_layout()
                fig.savefig(Path(tmp) / (name.replace("/", "_") + ".png"), dpi=90)
                plt.close(fig)
            if any(Path(tmp).iterdir()):
                client.log_artifacts(run_id, tmp, "plots")


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/lists -> ``{"a.b.0": value}``."""
    out: dict[str, Any] = {}
    if isinstance(config, dict):
        for k, v in config.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(config, (list, tuple)) and config and any(isinstance(v, (dict, list))
                                                              for v in config):
        for i, v in enumerate(config):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = config
    return out


class TrackConfig(SaveConfigCallback):
    """Saves the CLI config as usual, and sends it to an MLflow logger: every value as a
    param, the YAML file as an artifact."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]
        if not loggers:
            return
        text = self.parser.dump(self.config, skip_none=False)
        import yaml

        params = flatten(yaml.safe_load(text))
        for lg in loggers:
            lg.log_hyperparams({k: ("null" if v is None else v) for k, v in params.items()})
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / self.config_filename
                path.write_text(text)
                lg.experiment.log_artifact(lg.run_id, str(path))


def logger_step(trainer: L.Trainer) -> int:
    """The step number Lightning gives the training metrics it logs: the batches that have
    stepped the optimizer so far. ``trainer.global_step`` is no substitute: it counts every
    optimizer's steps, and in ``on_train_batch_end`` it already includes this batch's step,
    unless the batch only accumulated gradients. Lightning has no public name for this
    number; its ``LoggerConnector``, ``LearningRateMonitor`` and ``DeviceStatsMonitor`` read
    the same loop attribute, and here only this function does."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def synced_clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the device has finished the work queued on it. CUDA runs
    kernels asynchronously: a clock read without the sync charges a step with the previous
    step's queued kernels instead of its own."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class Throughput(L.Callback):
    """Logs ``train/tokens_per_s``: tokens entering the decoder (the stage's ``train/tokens``)
    per second of training step (forward, backward and optimizer step), timed by
    :func:`synced_clock` from the step's start to its end. Only the steps that Lightning
    sends to the loggers are timed (its ``(step + 1) % log_every_n_steps == 0`` rule): a sync
    stops the host from queueing the next step's kernels while the device works."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        every = trainer.log_every_n_steps
        logged = every > 0 and (logger_step(trainer) + 1) % every == 0
        self._t0 = synced_clock(pl_module.device) if logged else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        tokens = trainer.callback_metrics.get("train/tokens")
        if self._t0 is None or tokens is None:
            return
        seconds = synced_clock(pl_module.device) - self._t0
        pl_module.log("train/tokens_per_s", float(tokens) / max(seconds, 1e-9), on_step=True,
                      on_epoch=False, batch_size=1)
