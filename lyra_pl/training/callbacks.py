"""Callbacks of a run: the hand-off export and the answer-accuracy evaluation (the stage
configs name them), and the progress bar and edge-step logs every `lyra-pl fit` adds."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info

from lyra_pl.eval.metrics import exact_match, normalize_answer
from lyra_pl.eval.runner import gather_lists, rows_from_outputs, write_rows
from lyra_pl.training.tracking import logger_step


class ExportModel(L.Callback):
    """At the end of ``fit``, writes the stage's hand-off directory (:meth:`LyraStage.save_model`:
    projectors, speech generator, LoRA adapters, config) for the next stage's ``init_from``.

    ``dirpath`` defaults to ``<trainer.default_root_dir>/export``."""

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(self.dirpath or Path(trainer.default_root_dir) / "export")
        pl_module.save_model(path)
        rank_zero_info(f"exported the stage's trained parts to {path}")


class AnswerAccuracy(L.Callback):
    """Scores ``predict`` outputs against the held-out answers: correct is the eval's exact
    match (:func:`lyra_pl.eval.metrics.exact_match`, EvalAI answer normalization). Writes
    ``predictions.jsonl`` and ``accuracy.json`` (overall, per instruction kind and per set of
    choices, with chance = 1 / number of choices and the majority baseline of always answering
    the most frequent reference answer), prints a table, and logs the numbers to the trainer's
    loggers. On several ranks the answers are gathered first: the files and numbers cover
    every sample once (padding batches are dropped)."""

    def __init__(self, output_dir: str | None = None, tokenizer: str | None = None):
        self.output_dir = output_dir
        self.tokenizer = tokenizer
        self.rows: list[dict[str, Any]] = []

    def on_predict_start(self, trainer, pl_module) -> None:
        self.rows = []
        from lyra_pl.data.datamodule import resolve_path
        from lyra_pl.data.decode import load_tokenizer

        path = self.tokenizer or getattr(trainer.datamodule, "tokenizer", None)
        if path is None:
            raise ValueError("AnswerAccuracy needs a tokenizer directory")
        self._tok = load_tokenizer(resolve_path(path))

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                             dataloader_idx=0) -> None:
        self.rows += rows_from_outputs(outputs, self._tok)  # none from a padding batch

    def on_predict_end(self, trainer, pl_module) -> None:
        rows = gather_lists(self.rows, trainer.world_size)  # every rank answered its share
        if not rows:
            return
        summary = accuracy_summary(rows)
        if trainer.is_global_zero:
            out = Path(self.output_dir or Path(trainer.default_root_dir) / "eval")
            out.mkdir(parents=True, exist_ok=True)
            write_rows(out / "predictions.jsonl", [{**r, "correct": correct(r)} for r in rows])
            (out / "accuracy.json").write_text(json.dumps(summary, indent=1))
        rank_zero_info(format_summary(summary))
        metrics = {f"eval/{k}": v for k, v in summary["overall"].items() if isinstance(v, float)}
        for name, stats in summary["groups"].items():
            if name.endswith(": all"):
                kind = name.split(":")[0]
                metrics.update({f"eval/{kind}_{k}": v for k, v in stats.items()
                                if isinstance(v, float)})
        for lg in trainer.loggers:
            lg.log_metrics(metrics)


def correct(row: dict[str, Any]) -> bool:
    """Whether a row's prediction is its answer, by the eval's exact match."""
    return exact_match(row["prediction"], [row["answer"]]) == 1.0


def accuracy_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy overall, per instruction kind (spoken, typed, sound) and per set of choices,
    with chance and majority baselines."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        choices = "/".join(r["choices"]) if r.get("choices") else "open"
        groups.setdefault(f"{r.get('instruction', '?')}: {choices}", []).append(r)
        groups.setdefault(f"{r.get('instruction', '?')}: all", []).append(r)

    def stats(rs: list[dict[str, Any]]) -> dict[str, Any]:
        n = len(rs)
        chance = [1.0 / len(r["choices"]) for r in rs if r.get("choices")]
        majority = Counter(normalize_answer(r["answer"]) for r in rs).most_common(1)[0][1] / n
        return {"n": n, "accuracy": sum(map(correct, rs)) / n,
                "chance": sum(chance) / len(chance) if chance else float("nan"),
                "majority": majority}

    return {"overall": stats(rows), "groups": {k: stats(v) for k, v in sorted(groups.items())}}


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{'instruction: choices':<48}{'n':>5}{'accuracy':>10}{'chance':>8}{'majority':>10}"]
    for name, s in [*summary["groups"].items(), ("overall", summary["overall"])]:
        lines.append(f"{name[:47]:<48}{s['n']:>5}{s['accuracy']:>10.3f}{s['chance']:>8.3f}"
                     f"{s['majority']:>10.3f}")
    return "\n".join(lines)


class StepProgressBar(TQDMProgressBar):
    """Lightning's bar whose total, and so its ETA, ends where the run ends: at ``max_steps``
    when that comes before the epoch's last batch (Lightning's counts the whole epoch)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        bar = self.train_progress_bar
        if bar is not None and bar.total is not None and trainer.max_steps > 0:
            # batch_idx counts this epoch's batches, those before a resume included
            left = (trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches
            bar.total = min(bar.total, batch_idx + left)


class EdgeStepLogs(L.Callback):
    """Sends the first and the last training step's metrics to the loggers when
    ``log_every_n_steps`` skips them: a run shorter than it logged no metric at all, and a
    longer one left its final loss out. At the same step numbers as Lightning's own logs."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Lightning logs this batch, after this hook, at step logger_step(trainer) when
        # (step + 1) % log_every_n_steps == 0 (LoggerConnector.should_update_logs)
        step = logger_step(trainer)
        last = (0 < trainer.max_steps <= trainer.global_step
                or (trainer.current_epoch + 1 == trainer.max_epochs
                    and batch_idx + 1 == trainer.num_training_batches))
        if (step > 0 and not last) or (step + 1) % trainer.log_every_n_steps == 0:
            return
        metrics = {k: float(v) for k, v in getattr(pl_module, "step_metrics", {}).items()}
        if metrics:
            for lg in trainer.loggers:
                lg.log_metrics(metrics, step=step)
