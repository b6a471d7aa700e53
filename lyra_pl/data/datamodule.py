"""`LyraDataModule`: converted shards -> batches for the stages, with a resumable position.

Datasets are directories written by ``lyra-pl data convert`` (:mod:`lyra_pl.data.shards`),
or URLs of such folders (``https://``, ``s3://``, ``pipe:`` ...: streamed, or cached in
``cache_dir``). When a local directory is missing and its source JSON is given
(``train_source``), the module converts it in ``prepare_data`` (once per node, under a file
lock). Relative paths resolve from the current directory, else from the repository root, so
the shipped configs run from anywhere.

Batches are dicts ``{"inputs": LyraInputs, "keys", "position", "skipped", "padding"}`` (+
``units`` / ``unit_lengths`` when ``units=True``, + ``answers`` / ``choices`` for prediction);
see :mod:`lyra_pl.data.stream` for the order and for the padding batches that keep ranks in
step on validation and prediction sets (the stages drop their results). The position of the last batch the trainer consumed
is the module's state, saved in every checkpoint: resuming continues with the very next batch.
"""
from __future__ import annotations

import fcntl
import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from lyra_pl.data import conversation as conv
from lyra_pl.data.decode import SampleDecoder
from lyra_pl.data.shards import (MANIFEST, file_sha256, is_url, manifest_source_sha256,
                                 read_manifest)
from lyra_pl.data.stream import ShardStream
from lyra_pl.data.video import VideoProcessor

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_path(path: str | Path) -> Path | str:
    """An absolute path as is; a relative one from the current directory when it exists
    there, else from the repository root (where ``configs/`` and ``data/`` live). A URL
    (:func:`~lyra_pl.data.shards.is_url`) as is, a string (``Path`` would merge its ``//``)."""
    if is_url(path):
        return str(path)
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


class _EpochLoader(DataLoader):
    """Tells its :class:`ShardStream` the epoch and resume offset as each epoch begins: when
    the epoch's first batch is drawn, not when ``iter`` is called. Under FSDP2 Lightning calls
    ``iter`` while setting up the optimizers (``estimated_stepping_batches``), before it
    restores a checkpoint's data position; drawn later, the first batch comes from there."""

    def __init__(self, stream: ShardStream, module: "LyraDataModule", **kwargs: Any):
        super().__init__(stream, batch_size=None, **kwargs)
        self.module = module

    def __iter__(self):
        return _Epoch(self)

    def start_epoch(self):
        """The epoch's batch iterator, from the position the module says."""
        stream = self.dataset
        stream.epoch, stream.start = self.module._next_epoch_start()
        trainer = self.module.trainer
        if stream.left_out() and trainer is not None and trainer.training:
            rank_zero_info(f"epoch {stream.epoch}: {stream.left_out()} of {stream.total} training "
                           f"samples wait for a later epoch, so that each of the {stream.world} "
                           f"ranks gets {stream.total // stream.world}")
        return super().__iter__()


class _Epoch:
    """One epoch of an :class:`_EpochLoader`, started (workers and all) at its first batch."""

    def __init__(self, loader: _EpochLoader):
        self.loader, self.batches = loader, None

    def __iter__(self):
        return self

    def __next__(self):
        if self.batches is None:
            self.batches = self.loader.start_epoch()
        return next(self.batches)

    def __len__(self) -> int:
        return len(self.loader)


class LyraDataModule(L.LightningDataModule):
    """Streams converted shards for training, validation and prediction.

    Args:
        train / val / predict: converted dataset directories (with ``manifest.json``), or
            URLs of such folders.
        train_source / val_source / predict_source: official-format JSON files converted into
            the (local) directories above by ``prepare_data`` when those do not exist yet.
        tokenizer: a local Hugging Face tokenizer directory (Qwen2-VL's, or the tiny corpus's).
        batch_size: samples per batch on each rank (dynamic padding to the longest).
        group_batches: batches per length-grouping buffer (larger: less padding, less mixing).
        max_length: samples with more text tokens are skipped and reported (None: no limit).
        units: batches carry stage 4's unit targets (``units`` / ``unit_lengths``).
        transcripts: tokenize ``speech_asr`` for LCMR.
        min_pixels / max_pixels: the resize bounds of Qwen2-VL's image processor and of
            :class:`~lyra_pl.data.video.VideoProcessor` (per frame).
        expected_ids: modality -> placeholder id the model uses (checked against the tokenizer;
            the stage fills it from its LyraConfig).
        samples_per_shard: for conversions done by ``prepare_data``.
        cache_dir: remote shards are downloaded there once and read from disk (None: they are
            streamed every epoch). Keyed by URL: clear it when a dataset is re-converted.
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        predict: str | None = None,
        train_source: str | None = None,
        val_source: str | None = None,
        predict_source: str | None = None,
        tokenizer: str = "data/tiny/tokenizer",
        batch_size: int = 8,
        val_batch_size: int | None = None,
        group_batches: int = 16,
        max_length: int | None = 2048,
        num_workers: int = 0,
        seed: int = 0,
        units: bool = False,
        transcripts: bool = True,
        system_prompt: str | None = conv.SYSTEM_PROMPT,
        min_pixels: int = 56 * 56,
        max_pixels: int = 28 * 28 * 256,
        expected_ids: dict[str, int] | None = None,
        samples_per_shard: int = 64,
        cache_dir: str | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.paths = {"train": train, "val": val, "predict": predict}
        self.sources = {"train": train_source, "val": val_source, "predict": predict_source}
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.group_batches = group_batches
        self.max_length = max_length
        self.num_workers = num_workers
        self.seed = seed
        self.units = units
        self.transcripts = transcripts
        self.system_prompt = system_prompt
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.expected_ids = expected_ids
        self.samples_per_shard = samples_per_shard
        self.cache_dir = cache_dir
        self._consumed: tuple[int, int] | None = None  # (epoch, batches) of the last train batch
        self._resume: dict[str, Any] | None = None
        self._epoch: int | None = None  # epoch of the current training iteration
        self._skipped = 0

    def setup(self, stage: str) -> None:
        """Takes the placeholder ids to check the tokenizer against from the stage's model
        config, unless given."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        config = getattr(module, "config", None)
        if self.expected_ids is None and config is not None:
            self.expected_ids = dict(config.placeholder_ids)

    # ------------------------------------------------------------------ preparation
    def prepare_data(self) -> None:
        """Converts each split whose source JSON is given and whose directory is missing or
        was converted from a different version of that JSON (the manifest keeps its hash).
        Remote datasets (URLs) are read as they are."""
        from lyra_pl.data.convert import convert

        done: set[Path] = set()
        for split, path in self.paths.items():
            source = self.sources[split]
            if path is None or source is None or is_url(path) or resolve_path(path) in done:
                continue
            src, out = resolve_path(source), resolve_path(path)
            if not src.is_file():
                raise FileNotFoundError(f"{split}_source {str(src)!r} does not exist "
                                        "(build the tiny corpus with `lyra-pl corpus build`)")
            done.add(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            # Several nodes (or jobs) may share this directory: one converts, the others wait
            # for it, then find its manifest fresh and skip.
            with open(out.with_name(out.name + ".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if (out / MANIFEST).is_file() and manifest_source_sha256(out) == file_sha256(src):
                    continue
                rank_zero_info(f"converting {src} -> {out}")
                try:  # an interrupted conversion of this JSON continues where it stopped
                    report = convert(src, out, samples_per_shard=self.samples_per_shard)
                except FileExistsError:  # converted from another version of it: redone
                    report = convert(src, out, samples_per_shard=self.samples_per_shard,
                                     overwrite=True)
                rank_zero_info(report.summary())

    def _shards(self, split: str) -> list[tuple[str, int]]:
        path = self.paths[split]
        if path is None:
            raise ValueError(f"no {split} dataset configured (data.{split})")
        return read_manifest(resolve_path(path))

    def image_processor(self):
        """The Qwen2-VL image processor with this module's pixel bounds (training and chat)."""
        try:  # transformers >= 5 names the torchvision-free processor *Pil
            from transformers import Qwen2VLImageProcessorPil as Processor
        except ImportError:
            from transformers import Qwen2VLImageProcessor as Processor
        return Processor(min_pixels=self.min_pixels, max_pixels=self.max_pixels)

    def stream(self, split: str, shuffle: bool, batch_size: int) -> ShardStream:
        """The rank's stream of ``split``. Validation and prediction sets are finite: every
        sample is read by exactly one rank, and padding batches keep the ranks in step."""
        mode = "prompt" if split == "predict" else "train"
        decoder = SampleDecoder(resolve_path(self.tokenizer), mode=mode,
                                max_length=self.max_length, system_prompt=self.system_prompt,
                                units=self.units and mode == "train",
                                transcripts=self.transcripts and mode == "train",
                                expected_ids=self.expected_ids)
        rank, world = self._ranks(split)
        return ShardStream(self._shards(split), decoder, batch_size, rank=rank, world=world,
                           num_workers=self.num_workers, seed=self.seed, shuffle=shuffle,
                           finite=split != "train",
                           group_batches=self.group_batches, cache_dir=self.cache_dir,
                           collate_kwargs={"image_processor": self.image_processor(),
                                           "video_processor": VideoProcessor(self.min_pixels,
                                                                             self.max_pixels)})

    def _ranks(self, split: str = "train") -> tuple[int, int]:
        """(rank, ranks) the samples of ``split`` are shared over: the data-parallel replicas
        the model reports (context-parallel ranks read the same batches) for training and
        validation, every rank for prediction."""
        if self.trainer is None:
            return 0, 1
        module = self.trainer.lightning_module
        if split != "predict" and hasattr(module, "data_parallel"):
            return module.data_parallel
        return self.trainer.global_rank, self.trainer.world_size

    def _loader(self, stream: ShardStream) -> DataLoader:
        return _EpochLoader(stream, self, num_workers=self.num_workers,
                            persistent_workers=False,
                            multiprocessing_context="fork" if self.num_workers else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.stream("train", True, self.batch_size))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.stream("val", False, self.val_batch_size))

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.stream("predict", False, self.val_batch_size))

    # ------------------------------------------------------------------ position
    def _next_epoch_start(self) -> tuple[int, int]:
        """(epoch, batches to skip) for the training iteration about to begin: the restored
        position first (Lightning's ``current_epoch`` is not yet restored when it asks for
        the resumed epoch's iterator), then one epoch after another."""
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return 0, 0
        resume, self._resume = self._resume, None
        if resume is not None:
            epoch, start = resume["epoch"], resume["batches"]
        elif self._epoch is not None:
            epoch, start = self._epoch + 1, 0
        else:
            epoch, start = trainer.current_epoch, 0
        self._epoch = epoch
        return epoch, start

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if isinstance(batch, dict) and trainer is not None and trainer.training:
            epoch, index = batch["position"]
            self._consumed = (epoch, index + 1)
            self._skipped += len(batch["skipped"])
        return batch

    def state_dict(self) -> dict[str, Any]:
        if self._consumed is None:
            return {}
        epoch, batches = self._consumed
        world = self._ranks()[1]
        return {"epoch": epoch, "batches": batches, "world_size": world,
                "num_workers": self.num_workers, "batch_size": self.batch_size,
                "seed": self.seed, "skipped": self._skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        world = self._ranks()[1]
        now = {"world_size": world, "num_workers": self.num_workers,
               "batch_size": self.batch_size, "seed": self.seed}
        changed = {k: (state.get(k), v) for k, v in now.items() if state.get(k) != v}
        self._skipped = state.get("skipped", 0)
        if changed:
            rank_zero_warn(f"the data order depends on {sorted(changed)}, which changed since the "
                           f"checkpoint ({changed}); epoch {state['epoch']} restarts from its first "
                           f"batch instead of batch {state['batches']}")
            self._resume = {"epoch": state["epoch"], "batches": 0}
            return
        self._resume = {"epoch": state["epoch"], "batches": state["batches"]}
