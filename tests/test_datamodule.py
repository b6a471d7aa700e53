"""The shard data module: what a batch holds, every sample once per epoch (any worker count),
training ranks disjoint, equal and in step, every validation sample exactly once on any number
of ranks, corrupt samples skipped and counted, and resuming mid-epoch (in
the stream and through a killed Lightning run) continuing with exactly the batches an
uninterrupted run would have seen."""
from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lyra_pl.data.datamodule import LyraDataModule
from lyra_pl.data.shards import read_manifest
from lyra_pl.model.assemble import IGNORE
from lyra_pl.model.inputs import LyraInputs
from lyra_pl.training.stages import SpeechAlignStage

N = 37  # not a multiple of the batch size or the shard size


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, color_dataset) -> dict[str, Path]:
    """37 samples (image + spoken question + transcript, or text only) in shards of 5."""
    return color_dataset(tmp_path_factory.mktemp("ds"), N, samples_per_shard=5)


def module(ds, **kw) -> LyraDataModule:
    kw = {"train": str(ds["shards"]), "val": str(ds["shards"]),
          "tokenizer": str(ds["tokenizer"]), "batch_size": 4, "group_batches": 2, **kw}
    return LyraDataModule(**kw)


def keys_of(loader) -> list[list[str]]:
    return [b["keys"] for b in loader]


def test_batch_contents(dataset):
    dm = module(dataset)
    batch = next(iter(dm.train_dataloader()))
    inputs = batch["inputs"]
    assert isinstance(inputs, LyraInputs) and inputs.batch_size == len(batch["keys"]) == 4
    assert inputs.pixel_values is not None and inputs.image_grid_thw.shape == (4, 3)
    tok = dm.stream("train", False, 4).decoder.tokenizer
    for b, key in enumerate(batch["keys"]):
        i = int(key[1:])
        n = int(inputs.lengths[b])
        labels = inputs.labels[b, :n]
        answer = tok.decode(labels[labels != IGNORE])
        assert answer == dataset["answers"][key] + "<|im_end|>"  # answer + its end token only
        assert (inputs.input_ids[b, :n] == 502).sum() == i % 2  # one <speech> when spoken
    if inputs.speech is not None:  # transcripts for LCMR, one per clip
        assert inputs.transcript_ids.shape[0] == len(inputs.speech)
    assert batch["skipped"] == [] and tuple(batch["position"]) == (0, 0)


@pytest.mark.parametrize("workers", [0, 2])
def test_every_sample_once_per_epoch(dataset, workers):
    dm = module(dataset, num_workers=workers)
    loader = dm.train_dataloader()
    batches = keys_of(loader)
    flat = [k for b in batches for k in b]
    assert sorted(flat) == sorted(f"s{i:02d}" for i in range(N))
    assert len(batches) == len(loader)
    again = keys_of(dm.train_dataloader())
    assert again == batches  # deterministic for a seed and epoch


def rank_streams(dm, split: str, world: int) -> list:
    streams = []
    for rank in range(world):
        s = dm.stream(split, split == "train", 4)
        s.rank, s.world = rank, world
        streams.append(s)
    return streams


def batches_of(stream, workers: int) -> list[dict]:
    return list(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers))


@pytest.mark.parametrize("world", [2, 3])
def test_training_ranks_get_equal_disjoint_shares(dataset, world):
    """Each rank trains on N // world samples, disjoint from the others'; the N mod world left
    over (a different set each epoch) are the only ones left out, and are reported."""
    dm = module(dataset)
    for epoch in (0, 1):
        streams = rank_streams(dm, "train", world)
        got = []
        for s in streams:
            s.epoch = epoch
            batches = batches_of(s, 0)
            assert len(batches) == len(s) == len(streams[0])  # in step
            assert sum(len(b["keys"]) for b in batches) == N // world
            got += [k for b in batches for k in b["keys"]]
        assert len(set(got)) == len(got) == N - N % world
        assert streams[0].left_out() == N % world


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory, color_dataset) -> dict[str, Path]:
    """The tiny corpus's validation layout in small: two shards."""
    return color_dataset(tmp_path_factory.mktemp("two"), 10, samples_per_shard=5)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("which", ["two_shards", "dataset"])
def test_every_validation_sample_once_on_any_number_of_ranks(request, which, world, workers):
    """Issue 12: ranks split validation by shard and stopped at the smallest share, so two
    shards gave 0 batches on 3 ranks and 37 samples in shards of 5 lost some on 2 or 3. Now
    every sample is validated by exactly one rank, and the ranks, padded to the same number of
    batches (padding batches marked, to be dropped), stay in step."""
    ds = request.getfixturevalue(which)
    total = sum(n for _, n in read_manifest(ds["shards"]))
    dm = module(ds, num_workers=workers)
    seen, lengths = [], set()
    for s in rank_streams(dm, "val", world):
        batches = batches_of(s, workers)
        lengths.add(len(batches))
        assert len(batches) == len(s)
        assert sum(b["padding"] for b in batches) == s.padding_batches()
        seen += [k for b in batches if not b["padding"] for k in b["keys"]]
    assert len(lengths) == 1  # the same number of batches on every rank
    assert sorted(seen) == sorted(f"s{i:02d}" for i in range(total))


def test_ranks_without_a_validation_sample_still_take_part(tmp_path, color_dataset):
    """Two samples on three ranks: one rank validates padding only (so it joins every
    collective), and the two samples are each validated once."""
    ds = color_dataset(tmp_path, 2, samples_per_shard=2)
    streams = rank_streams(module(ds), "val", 3)
    runs = [batches_of(s, 0) for s in streams]
    assert [len(r) for r in runs] == [1, 1, 1]
    assert [[(b["padding"], b["keys"]) for b in r] for r in runs] == [
        [(True, ["s00"])], [(False, ["s00"])], [(False, ["s01"])]]


def test_a_shard_shorter_than_its_manifest_is_an_error(tmp_path, color_dataset):
    """A shard holding fewer samples than the manifest says would shift every later rank's
    range (samples read twice or never): the stream stops with the shard named."""
    ds = color_dataset(tmp_path, 6, samples_per_shard=3)
    url = read_manifest(ds["shards"])[0][0]
    src = tarfile.open(url)
    members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    with tarfile.open(url, "w") as dst:
        for m, data in members:
            if not m.name.startswith("s02."):
                dst.addfile(m, io.BytesIO(data))
    with pytest.raises(RuntimeError, match=f"shard {url} holds 2 samples but the manifest says 3"):
        batches_of(rank_streams(module(ds), "val", 1)[0], 0)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("consumed", [1, 3, 6])
def test_stream_resume_continues_the_sequence(dataset, workers, consumed):
    stream = module(dataset, num_workers=workers).stream("train", True, 4)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    full = keys_of(loader)
    stream.start = consumed
    rest = keys_of(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers))
    assert rest == full[consumed:]


def test_corrupt_sample_is_skipped_counted_and_logged(dataset, tmp_path, caplog):
    """A member that no longer decodes (here: an image overwritten in the shard) drops that
    sample from its batch, with its key and reason, and nothing takes its place."""
    shards = tmp_path / "shards"
    shards.mkdir()
    for url, _ in read_manifest(dataset["shards"]):
        src = tarfile.open(url)
        with tarfile.open(shards / Path(url).name, "w") as dst:
            for m in src.getmembers():
                data = src.extractfile(m).read()
                if m.name.startswith("s07.image"):
                    data = b"not an image"
                    m.size = len(data)
                dst.addfile(m, io.BytesIO(data))
    (shards / "manifest.json").write_text((dataset["shards"] / "manifest.json").read_text())
    dm = module(dataset, train=str(shards))
    with caplog.at_level(logging.WARNING):
        batches = list(dm.train_dataloader())
    skipped = [s for b in batches for s in b["skipped"]]
    assert [k for k, _ in skipped] == ["s07"] and "image" in skipped[0][1]
    assert "s07" in caplog.text
    flat = [k for b in batches for k in b["keys"]]
    assert len(flat) == N - 1 and "s07" not in flat


class Killed(Exception):
    pass


class Recorder(L.Callback):
    def __init__(self, kill_at: int | None = None):
        self.keys: list[list[str]] = []
        self.kill_at = kill_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.kill_at is not None and trainer.global_step == self.kill_at:
            raise Killed  # dies after step kill_at and its checkpoint, before the next step
        self.keys.append(batch["keys"])


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("workers", [0, 2])
def test_killed_run_resumes_with_the_same_remaining_samples(dataset, tmp_path, workers):
    """Two epochs uninterrupted vs. killed at step 3 (mid-epoch 0) or 12 (mid-epoch 1) and
    resumed with ckpt_path="last": the same batches, none lost or repeated."""

    def fit(recorder, ckpt_path=None, root="run"):
        torch.manual_seed(0)
        trainer = L.Trainer(
            max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path / root,
            callbacks=[recorder, ModelCheckpoint(tmp_path / root / "ckpt", save_last=True,
                                                 save_top_k=0, every_n_train_steps=1)])
        stage = SpeechAlignStage(lr=1e-3)
        try:
            trainer.fit(stage, datamodule=module(dataset, num_workers=workers),
                        ckpt_path=ckpt_path)
        except Killed:
            pass
        return recorder.keys

    full = fit(Recorder(), root="full")
    per_epoch = len(full) // 2
    for kill in (3, per_epoch + 2):
        before = fit(Recorder(kill_at=kill), root=f"k{kill}")
        assert len(before) == kill
        after = fit(Recorder(), ckpt_path=str(tmp_path / f"k{kill}" / "ckpt" / "last.ckpt"),
                    root=f"k{kill}")
        assert before + after == full
