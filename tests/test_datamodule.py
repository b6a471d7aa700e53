"""The shard data module: what a batch holds, every sample once per epoch (any worker count),
ranks disjoint and in step, corrupt samples skipped and counted, and resuming mid-epoch (in
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


def test_ranks_are_disjoint_and_in_step(dataset):
    dm = module(dataset)
    streams = []
    for rank in range(2):
        s = dm.stream("train", True, 4)
        s.rank, s.world = rank, 2
        streams.append(s)
    assert len(streams[0]) == len(streams[1])
    got = [[k for b in s for k in b["keys"]] for s in streams]
    assert not set(got[0]) & set(got[1])
    assert len(list(streams[0])) == len(list(streams[1])) == len(streams[0])
    # what a rank leaves out this epoch is reported, not lost silently
    total = sum(n for _, n in read_manifest(dataset["shards"]))
    assert len(got[0]) + len(got[1]) + streams[0].left_out() + streams[1].left_out() >= total


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
