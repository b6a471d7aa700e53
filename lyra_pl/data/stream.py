"""Streaming shards into length-grouped batches: deterministic, rank-balanced and resumable.

Each epoch the shard list is shuffled with ``seed + epoch`` (the same on every rank), which
puts the dataset's samples in one order, and that order is split **by sample**: each rank
takes a contiguous range of it, and each of its DataLoader workers a contiguous part of that
range. Every process works these ranges out from the manifest's sample counts alone, so it
reads only the shards its range covers (the first and last of them partly: the samples before
its range are read and discarded undecoded). Each worker reads its samples in order into a
buffer of ``group_batches`` batches, shuffles it, sorts it by the samples' length estimates,
cuts it into batches (so a batch pads little) and yields those batches in shuffled order. A
worker with n samples thus yields exactly ceil(n / batch_size) batches, known in advance,
which gives:

* **Ranks in step.** Training ranks take equal ranges: the N mod world samples left over wait
  for a later epoch (a different set each epoch, the shuffle differs) and their number is
  reported. Finite sets (validation, prediction: ``finite=True``) give every sample to exactly
  one rank; a rank with fewer batches than another adds *padding batches* (one copy of the
  dataset's first sample, ``"padding": True``) until all have the same count, so that every
  rank takes part in every step's collectives; their results are to be dropped.
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

import contextlib
import itertools
import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from lyra_pl.data.decode import Decoded, SampleDecoder, SampleError, sample_meta
from lyra_pl.data.shards import cached_file, is_url, open_url
from lyra_pl.model.inputs import collate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Position:
    """Where a batch sits: ``index``-th batch (0-based) of ``epoch`` on this rank."""

    epoch: int
    index: int


@dataclass(frozen=True)
class Plan:
    """What one rank's workers do in an epoch: the range of the epoch's sample order each
    reads, and how many batches each yields, padding batches included."""

    ranges: list[tuple[int, int]]
    counts: list[int]
    padding: list[int]


def _cuts(lo: int, hi: int, parts: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` in ``parts`` contiguous pieces whose sizes differ by at most one."""
    edges = [lo + (hi - lo) * p // parts for p in range(parts + 1)]
    return list(zip(edges, edges[1:]))


def rank_range(total: int, rank: int, world: int, finite: bool) -> tuple[int, int]:
    """The part of an epoch's ``total`` samples that ``rank`` reads: all of them shared out
    (``finite``), or equal shares with the remainder left out (training)."""
    if finite:
        return _cuts(0, total, world)[rank]
    share = total // world
    return rank * share, (rank + 1) * share


def plan(total: int, rank: int, world: int, workers: int, batch_size: int,
         finite: bool) -> Plan:
    def real(r: int) -> tuple[list[tuple[int, int]], list[int]]:
        ranges = _cuts(*rank_range(total, r, world, finite), workers)
        return ranges, [math.ceil((hi - lo) / batch_size) for lo, hi in ranges]

    ranges, counts = real(rank)
    padding = [0] * workers
    if finite:  # pad up to the busiest rank, one batch at a time on the least busy worker
        for _ in range(max(sum(real(r)[1]) for r in range(world)) - sum(counts)):
            w = counts.index(min(counts))
            counts[w] += 1
            padding[w] += 1
    return Plan(ranges, counts, padding)


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
                 shuffle: bool = True, finite: bool = False, group_batches: int = 16,
                 collate_kwargs: dict[str, Any] | None = None, cache_dir: str | None = None):
        if batch_size < 1 or group_batches < 1:
            raise ValueError(f"batch_size ({batch_size}) and group_batches ({group_batches}) "
                             "must be >= 1")
        self.total = sum(n for _, n in shards)
        if self.total < (1 if finite else world):
            raise ValueError(f"a dataset of {self.total} samples cannot give each of {world} "
                             "rank(s) a sample to train on")
        self.shards = shards
        self.decoder = decoder
        self.batch_size = batch_size
        self.rank, self.world = rank, world
        self.workers = max(1, num_workers)
        self.seed = seed
        self.shuffle = shuffle
        self.finite = finite
        self.group_batches = group_batches
        self.collate_kwargs = collate_kwargs or {}
        self.cache_dir = cache_dir
        self.epoch = 0
        self.start = 0
        self._pad: dict[str, Any] | None = None  # the padding batch, decoded once per worker

    # ------------------------------------------------------------------ sizes
    def plan(self) -> Plan:
        return plan(self.total, self.rank, self.world, self.workers, self.batch_size,
                    self.finite)

    def __len__(self) -> int:
        """Batches per epoch, the same on every rank (padding batches included)."""
        return sum(self.plan().counts)

    def left_out(self) -> int:
        """Samples of the epoch that no rank trains on, to give the ranks equal shares."""
        return 0 if self.finite else self.total % self.world

    def padding_batches(self) -> int:
        """Padding batches this rank adds to stay in step with the others."""
        return sum(self.plan().padding)

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        real = 0 if info is None else info.id
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(f"ShardStream built for {self.workers} workers runs under "
                               f"{info.num_workers}")
        work = self.plan()
        total = sum(work.counts)
        start = min(self.start, total)
        schedule = round_robin(work.counts, total)
        # Rotation: DataLoader worker 0 plays the worker that delivers batch ``start``.
        first = next((w for w, idx in enumerate(schedule) if start in idx), 0)
        worker = (real + first) % self.workers
        indices = schedule[worker]
        done = sum(i < start for i in indices)  # its batches consumed before the interruption
        order = epoch_shards(self.shards, self.epoch, self.seed, self.shuffle)
        rng = random.Random(hash((self.seed, self.epoch, self.rank, worker)) & 0xFFFFFFFF)
        batches = itertools.chain(self._raw_batches(self._samples(order, *work.ranges[worker]),
                                                    rng), itertools.repeat(None, work.padding[worker]))
        # strict: a worker yielding other than its planned count is a bug, not a short epoch
        for local, (index, raw_batch) in enumerate(zip(indices, batches, strict=True)):
            if local < done:
                continue  # consumed before the interruption: skipped undecoded
            position = Position(self.epoch, index)
            yield (self._padding(position) if raw_batch is None
                   else self._decode(raw_batch, position))

    def _samples(self, order: list[tuple[str, int]], lo: int, hi: int
                 ) -> Iterator[dict[str, Any]]:
        """Samples ``lo`` to ``hi - 1`` of the epoch's order, reading only the shards that
        hold them."""
        end = 0
        for url, n in order:
            begin, end = end, end + n
            if end > lo and begin < hi:
                yield from self._shard_samples(url, n, max(lo - begin, 0), min(hi - begin, n))

    def _shard_samples(self, url: str, n: int, skip: int, stop: int
                       ) -> Iterator[dict[str, Any]]:
        from webdataset.tariterators import group_by_keys, tar_file_expander

        # webdataset's tarfile_to_samples with our opener, which also knows fsspec's schemes;
        # closed after use (a curl pipe reports its exit status on close)
        source = self._open(url)
        try:
            count = 0
            for raw in group_by_keys(tar_file_expander([source])):
                if count >= skip:
                    yield raw
                count += 1
                if count == stop:
                    return
            # a shard shorter than its manifest would shift every later range: stop here
            raise RuntimeError(f"shard {url} holds {count} samples but the manifest says {n}; "
                               "re-convert the dataset (lyra-pl data convert --overwrite)")
        finally:
            source["stream"].close()

    def _raw_batches(self, samples: Iterator[dict[str, Any]], rng: random.Random
                     ) -> Iterator[list[dict[str, Any]]]:
        buffer: list[dict[str, Any]] = []
        size = self.batch_size * self.group_batches
        for raw in samples:
            buffer.append(raw)
            if len(buffer) == size:
                yield from self._group(buffer, rng)
                buffer = []
        if buffer:
            yield from self._group(buffer, rng)

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
        return self._collate(decoded, skipped, position)

    def _padding(self, position: Position) -> dict[str, Any]:
        """A batch of one copy of the dataset's first decodable sample, marked as padding."""
        if self._pad is None:
            with contextlib.closing(self._samples(self.shards, 0, self.total)) as samples:
                for raw in samples:
                    try:
                        self._pad = self._collate([self.decoder(raw)], [], position)
                        break
                    except SampleError:
                        continue
                else:
                    raise RuntimeError("no sample of the dataset decodes, not even for padding")
        return {**self._pad, "position": (position.epoch, position.index), "padding": True}

    def _collate(self, decoded: list[Decoded], skipped: list[tuple[str, str]],
                 position: Position) -> dict[str, Any]:
        ids = self.decoder.placeholder_ids()
        pad = self.decoder.tokenizer.pad_token_id
        inputs = collate([d.sample for d in decoded], ids, pad, **self.collate_kwargs)
        batch: dict[str, Any] = {"inputs": inputs, "keys": [d.key for d in decoded],
                                 "position": (position.epoch, position.index),
                                 "skipped": skipped, "padding": False}
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
