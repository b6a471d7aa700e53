"""Shard folders given as URLs: converted shards served by a real HTTP server on 127.0.0.1
(``python -m http.server``), also through ``pipe:`` and fsspec's ``memory://``. The manifest
and the samples read as from the local folder, streamed or cached, a missing manifest fails at
once naming its URL, and a stage trains on the served shards."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import lightning as L
import pytest

from lyra_pl.data.datamodule import LyraDataModule, resolve_path
from lyra_pl.data.shards import MANIFEST, file_sha256, manifest_source_sha256, read_manifest
from lyra_pl.training.stages import SpeechAlignStage
from conftest import free_port

N = 13  # shards of 4: the last one short


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, color_dataset) -> dict[str, Path]:
    """13 samples (image + question, every other one spoken) in shards of 4, as in
    test_datamodule.py."""
    return color_dataset(tmp_path_factory.mktemp("remote"), N, samples_per_shard=4)


@pytest.fixture(scope="module")
def server(dataset) -> str:
    """``http://127.0.0.1:PORT``: a real HTTP server on the dataset's root, for this module."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                             str(port), "--directory", str(dataset["root"])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(f"{base}/shards/{MANIFEST}", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"http.server on port {port} did not start")
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def module(ds, **kw) -> LyraDataModule:
    kw = {"train": str(ds["shards"]), "tokenizer": str(ds["tokenizer"]), "batch_size": 3,
          "group_batches": 2, **kw}
    return LyraDataModule(**kw)


def keys_of(dm: LyraDataModule) -> list[list[str]]:
    return [b["keys"] for b in dm.train_dataloader()]


def test_manifest_over_http_and_pipe(dataset, server):
    local = read_manifest(dataset["shards"])
    assert len(local) == 4 and sum(n for _, n in local) == N
    for url in (f"{server}/shards", f"{server}/shards/", f"pipe:cat {dataset['shards']}"):
        remote = read_manifest(url)
        base = url.rstrip("/")
        assert remote == [(f"{base}/{Path(p).name}", n) for p, n in local]
    assert resolve_path(f"{server}/shards") == f"{server}/shards"  # no Path('http:/...')


@pytest.mark.parametrize("cached", [False, True])
def test_every_sample_once_over_http(dataset, server, tmp_path, cached):
    cache = tmp_path / "cache" if cached else None
    expected = keys_of(module(dataset))
    dm = module(dataset, train=f"{server}/shards", cache_dir=str(cache) if cached else None,
                num_workers=2 if cached else 0)
    got = keys_of(dm)
    assert got == keys_of(module(dataset, num_workers=2 if cached else 0))
    assert sorted(k for b in got for k in b) == sorted(f"s{i:02d}" for i in range(N))
    if not cached:
        assert got == expected
        return
    tars = sorted(cache.glob("*.tar"))
    assert len(tars) == 4
    stamps = [t.stat().st_mtime_ns for t in tars]
    assert keys_of(dm) == got  # the next pass reads the cache, downloads nothing
    assert [t.stat().st_mtime_ns for t in sorted(cache.glob("*.tar"))] == stamps


def test_fsspec_url_streamed_and_cached(dataset, tmp_path):
    """A scheme webdataset does not know goes through fsspec (here its in-memory store)."""
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    for f in [dataset["shards"] / MANIFEST, *dataset["shards"].glob("*.tar")]:
        fs.pipe(f"/lyra_remote/{f.name}", f.read_bytes())
    try:
        expected = keys_of(module(dataset))
        assert keys_of(module(dataset, train="memory://lyra_remote")) == expected
        cache = tmp_path / "cache"
        assert keys_of(module(dataset, train="memory://lyra_remote",
                              cache_dir=str(cache))) == expected
        assert sum(1 for p in cache.rglob("*") if p.is_file() and p.name != "cache") >= 4
    finally:
        fs.rm("/lyra_remote", recursive=True)


@pytest.mark.parametrize("where", ["missing", "refused", "pipe"])
def test_missing_manifest_fails_fast_naming_the_url(dataset, server, where):
    url = {"missing": f"{server}/nowhere",
           "refused": f"http://127.0.0.1:{free_port()}/shards",
           "pipe": f"pipe:cat {dataset['root']}/nowhere"}[where]
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError) as e:
        module(dataset, train=url).train_dataloader()
    assert time.monotonic() - t0 < 10
    msg = str(e.value)
    assert f"{url}/{MANIFEST}" in msg and "\n" not in msg


def test_missing_fsspec_backend_is_one_line():
    if importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed")
    with pytest.raises(ImportError) as e:
        read_manifest("s3://bucket/shards")
    assert "s3://bucket/shards/manifest.json" in str(e.value) and "s3fs" in str(e.value)
    assert "\n" not in str(e.value)


def test_prepare_data_skips_urls_and_converts_once_under_a_lock(dataset, tmp_path,
                                                                monkeypatch):
    """A URL is never converted; two concurrent callers for one local directory: one
    converts, the other waits for its lock and then finds the manifest fresh."""
    source = dataset["root"] / "data.json"
    module(dataset, train="http://127.0.0.1:1/shards", train_source=str(source)).prepare_data()
    import lyra_pl.data.convert as cv

    real, calls, errors = cv.convert, [], []

    def counted(*args, **kwargs):  # the real conversion, counted
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cv, "convert", counted)
    out = tmp_path / "converted"

    def prepare():
        try:
            module(dataset, train=str(out), train_source=str(source)).prepare_data()
        except Exception as e:  # noqa: BLE001 (reported by the assertion below)
            errors.append(e)

    threads = [threading.Thread(target=prepare) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Without the lock the second caller would meet the converter's own one-writer lock
    # ("another conversion is writing") or convert a second time.
    assert errors == [] and calls == [1]
    assert read_manifest(out) and manifest_source_sha256(out) == file_sha256(source)
    assert (tmp_path / "converted.lock").exists()


def test_stage_trains_two_steps_on_http_shards(dataset, server, tmp_path):
    url = f"{server}/shards"
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(SpeechAlignStage(lr=1e-3), datamodule=module(dataset, train=url, val=url))
    assert trainer.global_step == 2
