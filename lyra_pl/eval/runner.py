"""Running an eval task: its data as shards, the model's answers as rows, the scores as a
table, a JSON file and logger metrics.

- :func:`prepare_data`: a task's samples (:mod:`lyra_pl.eval.tasks`) -> the training shard
  format (``lyra-pl data convert``), converted again only when the samples change.
- :func:`evaluate`: one task on a stage module: shards, greedy answers (:func:`answer`),
  scores. The one eval path: ``lyra-pl eval`` runs it per task, :class:`EvalTask` at the end
  of validation.
- :class:`EvalTask`: a callback for ``fit`` configs: the task at the end of validation every
  ``every_n_epochs``, logged as ``eval/<task>/<group>/<metric>`` (so ``ModelCheckpoint`` can
  monitor it).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from tqdm import tqdm

from lyra_pl.eval.tasks import SPEECH, TEXT, Row, Task, get_task, with_spelling_map

SOURCE = "samples.json"
_GROUP_KEYS = {TEXT: "text_instruction", SPEECH: "speech_instruction",
               f"gap {SPEECH} - {TEXT}": "gap_speech_minus_text"}


# ----------------------------------------------------------------------------- data
def prepare_data(task: Task, data: str | Path | None, cache: str | Path,
                 progress: bool = True, limit: int | None = None) -> tuple[Path, dict[str, Any]]:
    """The task's data as a shard directory, and its conversion report (``{}`` when ``data``
    already is a shard directory, or the URL of one: returned as a string). ``data``
    (default: the task's tiny-corpus set) is what :attr:`Task.load` reads; the samples go to
    ``cache/samples.json`` and are converted into ``cache/shards`` unless that already holds
    exactly these samples. ``limit``: only the first samples (after any S+I twins are added)."""
    from lyra_pl.data.convert import REPORT, convert
    from lyra_pl.data.datamodule import resolve_path
    from lyra_pl.data.shards import MANIFEST, is_url

    src = resolve_path(data or task.data)
    if is_url(src) or (src / MANIFEST).is_file():  # a URL can only be a shard folder
        return src, {}
    samples = task.samples(src)[:limit]
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    source, shards, stamp = cache / SOURCE, cache / "shards", cache / "samples.sha256"
    media_root = (src if src.is_dir() else src.parent).resolve()
    text = json.dumps(samples, indent=0)
    # The media root is part of the key: the same JSON elsewhere points at other media.
    key = hashlib.sha256(f"{media_root}\n{text}".encode()).hexdigest()
    if (shards / MANIFEST).is_file() and stamp.is_file() and stamp.read_text() == key:
        return shards, json.loads((shards / REPORT).read_text())  # other ranks: rank 0's
    stamp.unlink(missing_ok=True)
    source.write_text(text)
    report = convert(source, shards, media_root=media_root, progress=progress, overwrite=True)
    if not report.converted:
        first = report.skipped[0]
        raise ValueError(f"{task.name}: no sample of {src} could be converted (e.g. "
                         f"{first['id']}: {first['reason']}); see {shards / REPORT}")
    stamp.write_text(key)
    rank_zero_info(f"{task.name}: {report.summary()}")
    return shards, report.to_dict()


def prepare_data_once(task: Task, data: str | Path | None, cache: str | Path, first: bool,
                      broadcast: Callable[[Any], Any], **kwargs: Any
                      ) -> tuple[Path, dict[str, Any]]:
    """:func:`prepare_data` in several processes: the ``first`` converts, then
    ``broadcast`` (from it to all) says whether that worked. The others then read its
    shards, or raise with its error instead of waiting for it forever."""
    out, error = None, None
    if first:
        try:
            out = prepare_data(task, data, cache, **kwargs)
        except Exception as e:
            error = e
    failure = broadcast(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if failure is not None:
        raise RuntimeError(f"{task.name}: the first rank could not prepare the data: {failure}")
    return out or prepare_data(task, data, cache, **kwargs)


# ----------------------------------------------------------------------------- rows
def rows_from_outputs(outputs: dict[str, Any], tokenizer) -> list[Row]:
    """Rows to score from one ``predict_step`` output (a dict per sample); none from a padding
    batch (:mod:`lyra_pl.data.stream`)."""
    if outputs.get("padding"):
        return []
    n = len(outputs["tokens"])
    extras = outputs.get("extras") or [{}] * n
    choices = outputs.get("choices") or [None] * n
    return [{"key": outputs["keys"][i], "variant": extras[i].get("variant"),
             "pair": extras[i].get("pair"), "instruction": outputs["instruction"][i],
             "prediction": tokenizer.decode(ids, skip_special_tokens=True).strip(),
             "answer": outputs["answers"][i], "choices": choices[i], "extra": extras[i]}
            for i, ids in enumerate(outputs["tokens"])]


def gather_lists(items: list[Any], world: int) -> list[Any]:
    """Every rank's ``items`` on every rank, concatenated in rank order (the default process
    group's ranks; ``items`` itself with one process)."""
    if world == 1:
        return items
    parts: list[Any] = [None] * world
    torch.distributed.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def results(task: Task, rows: Sequence[Row], **info: Any) -> dict[str, Any]:
    """The task's result record: scores per group plus what produced them."""
    scores = task.score(rows)
    return {"task": task.name, "headline": task.headline,
            "lower_is_better": task.lower_is_better, "scores": scores, **info}


def metric_dict(result: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """``{prefix}/<task>/<group>/<metric>``: value, with logger-safe group names."""
    out = {}
    for group, values in result["scores"].items():
        key = _GROUP_KEYS.get(group) or re.sub(r"[^\w./-]+", "_", group)
        for metric, value in values.items():
            out[f"{prefix}/{result['task']}/{key}/{metric}"] = float(value)
    return out


def format_results(records: Sequence[dict[str, Any]]) -> str:
    """One line per task, group and metric."""
    head = f"{'task':<15}{'group':<24}{'n':>6}  {'metric':<14}{'value':>9}"
    lines = [head, "-" * len(head)]
    for r in records:
        for group, values in r["scores"].items():
            for metric, value in values.items():
                if metric != "n":
                    arrow = ""
                    if metric == r["headline"] and group == "all":
                        arrow = "  (lower is better)" if r["lower_is_better"] else "  <-"
                    lines.append(f"{r['task']:<15}{group:<24}{int(values['n']):>6}  "
                                 f"{metric:<14}{value:>9.4f}{arrow}")
    return "\n".join(lines)


def write_rows(path: Path, rows: Sequence[Row]) -> None:
    """Rows as JSON lines."""
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def write_outputs(out: Path, result: dict[str, Any], rows: Sequence[Row]) -> list[Path]:
    """``out/<task>/predictions.jsonl`` and ``out/<task>/results.json``."""
    d = out / result["task"]
    d.mkdir(parents=True, exist_ok=True)
    write_rows(d / "predictions.jsonl", rows)
    (d / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    return [d / "predictions.jsonl", d / "results.json"]


def log_to(loggers: Sequence[Any], metrics: dict[str, float], files: Sequence[Path] = (),
           step: int | None = None) -> None:
    """Metrics to every logger; files as artifacts to MLflow loggers."""
    from lightning.pytorch.loggers import MLFlowLogger

    for lg in loggers:
        lg.log_metrics(metrics, step=step)
        if isinstance(lg, MLFlowLogger):
            for f in files:
                lg.experiment.log_artifact(lg.run_id, str(f), artifact_path="eval")


# ----------------------------------------------------------------------------- answers
def answer(module: L.LightningModule, loader, tokenizer, max_new_tokens: int,
           limit_batches: int | None = None, context: Callable[[], Any] = nullcontext,
           progress: bool = False, rank: int = 0, world: int = 1
           ) -> tuple[list[Row], list[tuple[str, str]]]:
    """Greedy answers of a stage module (:meth:`LyraStage.predict_step`) to every batch of a
    prompt loader: (rows in batch order, samples the loader skipped as undecodable, with the
    reason).

    With ``world`` > 1 (the ranks of a default process group, each iterating the same
    loader), the batches are dealt out in rounds: rank ``r`` answers batch ``k * world + r``.
    Every rank makes the same number of ``predict_step`` calls, as sharded generation needs:
    in a last round short of batches, a rank without one answers the round's last batch
    again and drops those answers. The rows are then gathered, so every rank returns all of
    them, in batch order, and scores them alike."""
    rows: list[tuple[int, list[Row]]] = []
    skipped: list[tuple[str, str]] = []
    batches = itertools.islice(loader, limit_batches)
    rounds = iter(lambda: list(itertools.islice(batches, world)), [])
    previous = module.max_new_tokens
    module.max_new_tokens = max_new_tokens
    try:
        with torch.no_grad():
            for k, group in enumerate(tqdm(rounds, desc="answering", unit="round" if world > 1
                                           else "batch", disable=not progress, leave=False)):
                for b in group:
                    skipped += [tuple(s) for s in b.get("skipped", [])]
                mine = rank < len(group)
                batch = module.transfer_batch_to_device(group[rank if mine else -1],
                                                        module.device, 0)
                index = k * world + rank
                with context():
                    out = rows_from_outputs(module.predict_step(batch, index), tokenizer)
                if mine:
                    rows.append((index, out))
    finally:
        module.max_new_tokens = previous
    rows = sorted(gather_lists(rows, world), key=lambda r: r[0])
    return [row for _, batch_rows in rows for row in batch_rows], skipped


def evaluate(task: Task, module: L.LightningModule, tokenizer: str | Path,
             data: str | Path | None, cache: str | Path, batch_size: int = 8,
             max_new_tokens: int | None = None, limit: int | None = None,
             limit_batches: int | None = None, spelling_map: str | Path | None = None,
             context: Callable[[], Any] = nullcontext, progress: bool = False, rank: int = 0,
             world: int = 1, broadcast: Callable[[Any], Any] = lambda obj: obj, **info: Any
             ) -> tuple[dict[str, Any], list[Row]]:
    """One eval task on a stage module: (its result record, the scored rows). The task's
    ``data`` as shards under ``cache`` (:func:`prepare_data_once`; ``limit``: first samples),
    the module's greedy answers (:func:`answer`; ``limit_batches``: first batches), scored
    (asr: with Whisper's ``spelling_map``, by default the module's Whisper checkpoint's,
    :func:`~lyra_pl.eval.tasks.with_spelling_map`). ``info`` goes into the record. With
    ``world`` > 1 every rank calls it and gets the same record; ``broadcast`` sends rank 0's
    object to all."""
    from lyra_pl.data.datamodule import LyraDataModule, resolve_path
    from lyra_pl.data.decode import load_tokenizer

    t0 = time.perf_counter()
    task, spelling = with_spelling_map(task, spelling_map, getattr(module, "whisper", None))
    shards, report = prepare_data_once(task, data, cache, rank == 0, broadcast,
                                       progress=progress, limit=limit)
    dm = LyraDataModule(predict=str(shards), tokenizer=str(tokenizer), batch_size=batch_size,
                        max_length=None, expected_ids=dict(module.config.placeholder_ids))
    rows, skipped = answer(module, dm.predict_dataloader(),
                           load_tokenizer(resolve_path(tokenizer)),
                           max_new_tokens or task.max_new_tokens, limit_batches, context,
                           progress, rank, world)
    if not rows:
        raise RuntimeError(f"{task.name}: the model answered no sample of {shards} (see the "
                           "warnings above)")
    used = {"spelling_map": str(spelling) if spelling else None} if task.name == "asr" else {}
    record = results(task, rows, **info, **used, data=str(resolve_path(data or task.data)),
                     shards=str(shards), not_converted=report.get("skipped", []),
                     skipped_at_decode=[list(s) for s in skipped],
                     seconds=round(time.perf_counter() - t0, 1))
    return record, rows


# ----------------------------------------------------------------------------- callback
class EvalTask(L.Callback):
    """An eval task at the end of validation during ``fit``: greedy answers to the task's
    data, scored and logged as ``eval/<task>/<group>/<metric>`` (e.g.
    ``eval/textvqa/speech_instruction/vqa_accuracy``), and written to
    ``<default_root_dir>/eval/<task>/step<global step>.json``.

    The ranks share the work (each answers every ``world``-th batch, in step, as generation
    under FSDP2 needs) and gather the answers, so every rank scores the whole set alike and
    the scores need no reduction. Rank 0 also writes the answers to
    ``step<global step>.predictions.jsonl``.

    Args:
        task: a name from :data:`lyra_pl.eval.tasks.TASKS`.
        data: its data (default: the task's tiny-corpus set).
        tokenizer: default: the data module's.
        every_n_epochs: run after every n-th validation run (an epoch's end, or each
            ``val_check_interval``).
        batch_size, max_new_tokens: generation batches and answer length (default: the task's).
        limit_batches: only the first batches (a quick signal on a big set).
        spelling_map: asr: Whisper's spelling map file applied before WER (default: the
            module's Whisper checkpoint's ``normalizer.json`` when it has one; ``"none"``: no
            map).
    """

    def __init__(self, task: str, data: str | None = None, tokenizer: str | None = None,
                 every_n_epochs: int = 1, batch_size: int = 8, max_new_tokens: int | None = None,
                 limit_batches: int | None = None, spelling_map: str | None = None):
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.task = get_task(task)
        self.data = data
        self.tokenizer = tokenizer
        self.every_n_epochs = every_n_epochs
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.limit_batches = limit_batches
        self.spelling_map = spelling_map
        self._validations = 0

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        if self._validations % self.every_n_epochs:
            return
        tokenizer = self.tokenizer or getattr(trainer.datamodule, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(f"EvalTask({self.task.name}) needs a tokenizer directory")
        root = Path(trainer.default_root_dir)
        result, rows = evaluate(
            self.task, pl_module, tokenizer, self.data, root / "eval_data" / self.task.name,
            self.batch_size, self.max_new_tokens, limit_batches=self.limit_batches,
            spelling_map=self.spelling_map, context=trainer.precision_plugin.forward_context,
            rank=trainer.global_rank, world=trainer.world_size,
            broadcast=lambda obj: trainer.strategy.broadcast(obj, src=0),
            epoch=trainer.current_epoch, step=trainer.global_step)
        pl_module.log_dict(metric_dict(result), sync_dist=False)
        if trainer.is_global_zero:
            out = root / "eval" / self.task.name
            out.mkdir(parents=True, exist_ok=True)
            (out / f"step{trainer.global_step}.json").write_text(json.dumps(result, indent=1))
            write_rows(out / f"step{trainer.global_step}.predictions.jsonl", rows)
            rank_zero_info(format_results([result]))
