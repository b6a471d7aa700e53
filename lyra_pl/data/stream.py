"""Streaming shards into length-grouped batches: deterministic, rank-balanced and resumable.

Each epoch the shard list is shuffled with ``seed + epoch`` (the same on every rank), split
across ranks and then across DataLoader workers exactly as webdataset's ``split_by_node`` and
``split_by_worker`` do (``shards[rank::world]``, then ``[worker::num_workers]``), but with rank
and worker given explicitly, so that every process can also work out the others' shares from
the manifest's sample counts. Each worker reads its shards in order into a buffer of
``group_batches`` batches, shuffles it, sorts it by the samples' length estimates, cuts it into
batches (so a batch pads little) and yields those batches in shuffled order. A worker with n
samples thus yields exactly ceil(n / batch_size) batches, known in advance, which gives:

* **Ranks in step.** Every rank stops the epoch after the same number of batches (the fewest
  any rank has); the samples past it on the longer ranks wait for a later epoch, whose shard
  shuffle differs, and the number left out is reported.
* **Exact resume.** The DataLoader takes batches from its workers round-robin, skipping
  exhausted ones. Given the batches already consumed, the stream computes how many each
  worker produced, lets each skip that many (before decoding anything), and rotates worker
  ids so that DataLoader worker 0 is the worker whose batch came next: the remaining sequence
  is the one the uninterrupted run would have seen.

Samples that fail to decode are skipped, logged with their key and reason, and reported in
the batch (``skipped``) for counting; the batch is smaller by that many.

Shards may be URLs (:func:`~lyra_pl.data.shards.open_url`): streamed, or with ``cache_dir``
downloaded there once and read from disk in every later epoch.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from lyra_pl.data.decode import SampleDecoder, SampleError, sample_meta
from lyra_pl.data.shards import cached_file, is_url, open_url
from lyra_pl.model.inputs import collate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Position:
    """Where a batch sits: ``index``-th batch (0-based) of ``epoch`` on this rank."""

    epoch: int
    index: int


def worker_batch_counts(shards: list[tuple[str, int]], epoch: int, seed: int, rank: int,
                        world: int, workers: int, batch_size: int, shuffle: bool) -> list[int]:
    """Batches each (logical) worker of ``rank`` yields in ``epoch``."""
    mine = epoch_shards(shards, epoch, seed, shuffle)[rank::world]
    return [math.ceil(sum(n for _, n in mine[w::workers]) / batch_size) for w in range(workers)]


def epoch_shards(shards: list[tuple[str, int]], epoch: int, seed: int,
                 shuffle: bool) -> list[tuple[str, int]]:
    order = list(shards)
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def round_robin(counts: list[int], total: int) -> list[list[int]]:
    """The DataLoader's order over workers with ``counts`` batches each (round-robin,
    exhausted ones skipped), for the first ``total`` batches: the indices each worker delivers."""
    out: list[list[int]] = [[] for _ in counts]
    w = 0
    for i in range(total):
        while len(out[w]) >= counts[w]:
            w = (w + 1) % len(counts)
        out[w].append(i)
        w = (w + 1) % len(counts)
    return out


class ShardStream(IterableDataset):
    """Batches of one rank from a converted dataset (see the module docstring).

    Set :attr:`epoch` and :attr:`start` (batches of this epoch already consumed) before each
    iteration; :class:`~lyra_pl.data.datamodule.LyraDataModule` does it.
    """

    def __init__(self, shards: list[tuple[str, int]], decoder: SampleDecoder, batch_size: int,
                 rank: int = 0, world: int = 1, num_workers: int = 0, seed: int = 0,
                 shuffle: bool = True, group_batches: int = 16,
                 collate_kwargs: dict[str, Any] | None = None, cache_dir: str | None = None):
        if batch_size < 1 or group_batches < 1:
            raise ValueError(f"batch_size ({batch_size}) and group_batches ({group_batches}) "
                             "must be >= 1")
        self.shards = shards
        self.decoder = decoder
        self.batch_size = batch_size
        self.rank, self.world = rank, world
        self.workers = max(1, num_workers)
        self.seed = seed
        self.shuffle = shuffle
        self.group_batches = group_batches
        self.collate_kwargs = collate_kwargs or {}
        self.cache_dir = cache_dir
        self.epoch = 0
        self.start = 0

    # ------------------------------------------------------------------ sizes
    def counts(self, rank: int | None = None) -> list[int]:
        return worker_batch_counts(self.shards, self.epoch, self.seed,
                                   self.rank if rank is None else rank, self.world,
                                   self.workers, self.batch_size, self.shuffle)

    def __len__(self) -> int:
        """Batches per epoch on every rank: the fewest any rank has."""
        return min(sum(self.counts(r)) for r in range(self.world))

    def left_out(self) -> int:
        """Samples of this rank beyond the common batch count, this epoch (at most)."""
        extra = sum(self.counts()) - len(self)
        return extra * self.batch_size

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        real = 0 if info is None else info.id
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(f"ShardStream built for {self.workers} workers runs under "
                               f"{info.num_workers}")
        total = len(self)
        start = min(self.start, total)
        schedule = round_robin(self.counts(), total)
        # Rotation: DataLoader worker 0 plays the worker that delivers batch ``start``.
        first = next((w for w, idx in enumerate(schedule) if start in idx), 0)
        worker = (real + first) % self.workers
        indices = schedule[worker]
        done = sum(i < start for i in indices)  # its batches consumed before the interruption
        mine = epoch_shards(self.shards, self.epoch, self.seed, self.shuffle)
        mine = mine[self.rank::self.world][worker::self.workers]
        rng = random.Random(hash((self.seed, self.epoch, self.rank, worker)) & 0xFFFFFFFF)
        for local, raw_batch in enumerate(self._raw_batches(mine, rng)):
            if local >= len(indices):
                return  # past the common batch count: left for a later epoch
            if local < done:
                continue  # consumed before the interruption: skipped undecoded
            yield self._decode(raw_batch, Position(self.epoch, indices[local]))

    def _raw_batches(self, shards: list[tuple[str, int]], rng: random.Random
                     ) -> Iterator[list[dict[str, Any]]]:
        from webdataset.tariterators import group_by_keys, tar_file_expander

        # webdataset's tarfile_to_samples with our opener, which also knows fsspec's schemes
        samples = group_by_keys(tar_file_expander(self._sources(shards)))
        buffer: list[dict[str, Any]] = []
        size = self.batch_size * self.group_batches
        for raw in samples:
            buffer.append(raw)
            if len(buffer) == size:
                yield from self._group(buffer, rng)
                buffer = []
        if buffer:
            yield from self._group(buffer, rng)

    def _sources(self, shards: list[tuple[str, int]]) -> Iterator[dict[str, Any]]:
        """Each shard opened when the previous one is read, and closed after it (a curl pipe
        reports its exit status on close)."""
        for url, _ in shards:
            source = self._open(url)
            try:
                yield source
            finally:
                source["stream"].close()

    def _open(self, url: str) -> dict[str, Any]:
        if not is_url(url):
            return {"url": url, "stream": open(url, "rb"), "local_path": url}
        if self.cache_dir is not None:
            path = cached_file(url, self.cache_dir)
            return {"url": url, "stream": open(path, "rb"), "local_path": path}
        return {"url": url, "stream": open_url(url)}

    def _group(self, buffer: list[dict[str, Any]], rng: random.Random
               ) -> Iterator[list[dict[str, Any]]]:
        if self.shuffle:
            rng.shuffle(buffer)
        buffer.sort(key=_length)
        batches = [buffer[i:i + self.batch_size] for i in range(0, len(buffer), self.batch_size)]
        if self.shuffle:
            rng.shuffle(batches)
        yield from batches

    def _decode(self, raw_batch: list[dict[str, Any]], position: Position) -> dict[str, Any]:
        decoded, skipped = [], []
        for raw in raw_batch:
            key = raw.get("__key__", "?")
            try:
                decoded.append(self.decoder(raw))
            except SampleError as e:
                skipped.append((key, str(e)))
                log.warning("skipping sample %s: %s", key, e)
        if not decoded:
            raise RuntimeError(f"every sample of batch {position.index} (epoch {position.epoch}) "
                               f"failed to decode: {skipped}")
        ids = self.decoder.placeholder_ids()
        pad = self.decoder.tokenizer.pad_token_id
        inputs = collate([d.sample for d in decoded], ids, pad, **self.collate_kwargs)
        batch: dict[str, Any] = {"inputs": inputs, "keys": [d.key for d in decoded],
                                 "position": (position.epoch, position.index),
                                 "skipped": skipped}
        if self.decoder.units:
            lengths = torch.tensor([len(d.units) for d in decoded])
            units = torch.zeros(len(decoded), int(lengths.max()), dtype=torch.long)
            for i, d in enumerate(decoded):
                units[i, : len(d.units)] = torch.tensor(d.units)
            batch.update(units=units, unit_lengths=lengths)
        if self.decoder.mode == "prompt":
            batch.update(answers=[d.answer for d in decoded], choices=[d.choices for d in decoded],
                         extras=[d.meta.get("extra") or {} for d in decoded])
        return batch


def _length(raw: dict[str, Any]) -> int:
    """The sample's length estimate; the parsed ``json`` member replaces its bytes, so the
    decoder does not parse it again."""
    try:
        raw["json"] = sample_meta(raw)
        return int(raw["json"].get("length", 0))
    except (SampleError, TypeError, ValueError):
        return 0  # a broken json member fails (and is reported) at decode time
