"""The benchmark command runs end to end (smallest sizes) and writes its files."""
import csv
import json

import pytest

from lyra_pl.bench.__main__ import main


def test_bench_kernels_quick(tmp_path):
    rc = main(["kernels", "--quick", "--device", "cpu", "--repeats", "1", "--warmup", "0",
               "--out", str(tmp_path)])
    assert rc == 0
    written = {p.suffix for p in tmp_path.iterdir()}
    assert {".csv", ".json"} <= written
    rows = list(csv.DictReader(next(tmp_path.glob("*.csv")).open()))
    ours = [r for r in rows if r["impl"] == "ours"]
    assert {r["op"] for r in ours} == {"softdtw", "prune"}
    assert all(float(r["median_ms"]) > 0 for r in ours)


def test_bench_data_small(tmp_path):
    """A 36 s MP3 and 12 small samples with 1 and 2 workers: every sample converted, the
    same shards either way, a peak RSS read from the converter process."""
    rc = main(["data", "--long-hours", "0.01", "--samples", "12", "--work", str(tmp_path / "w"),
               "--out", str(tmp_path / "o")])
    assert rc == 0
    rows = list(csv.DictReader(next((tmp_path / "o").glob("*.csv")).open()))
    assert [(r["case"], r["workers"], r["converted"]) for r in rows] == [
        ("long", "1", "1"), ("small", "1", "12"), ("small", "2", "12")]
    assert rows[1]["shards_sha256"] == rows[2]["shards_sha256"]
    assert "byte-identical" in rows[2]["note"]
    assert all(50 < float(r["peak_rss_mib"]) < 2000 for r in rows)
    info = json.loads(next((tmp_path / "o").glob("*.json")).read_text())
    assert info["cpu_cores"] and len(info["rows"]) == 3


def test_bench_prefill_tiny_cpu(tmp_path):
    """Every setting at two lengths; LMME keeps fewer tokens than the baseline, and the
    stricter ratio fewer than the looser one; CSV, JSON and plot written."""
    rc = main(["prefill", "--device", "cpu", "--lengths", "256", "512", "--decode-tokens", "4",
               "--repeats", "1", "--out", str(tmp_path)])
    assert rc == 0
    assert {p.suffix for p in tmp_path.iterdir()} == {".csv", ".json", ".png"}
    rows = list(csv.DictReader(next(tmp_path.glob("*.csv")).open()))
    assert [(r["setting"], r["tokens"]) for r in rows] == [
        (s, n) for s in ("baseline", "LMME(4,0.8)", "LMME(4,0.7)") for n in ("256", "512")]
    kept = {(r["setting"], int(r["tokens"])): int(r["kept_after_last_block"]) for r in rows}
    for n in (256, 512):
        assert kept[("baseline", n)] == n
        assert kept[("LMME(4,0.7)", n)] < kept[("LMME(4,0.8)", n)] < n
    assert all(float(r["prefill_s"]) > 0 and float(r["decode_tok_s"]) > 0 for r in rows)


def test_bench_train_tiny_cpu(tmp_path):
    """A stage-2 step per setting through the Trainer (FSDP2 over one CPU process): LMME
    shrinks the later layers' tokens and with them the counted FLOPs; MFU from a given peak."""
    rc = main(["train", "--device", "cpu", "--seq", "256", "--steps", "1", "--warmup", "1",
               "--settings", "baseline", "LMME(4,0.7)", "--strategy", "fsdp",
               "--peak-tflops", "1", "--out", str(tmp_path)])
    assert rc == 0
    rows = list(csv.DictReader(next(tmp_path.glob("train_*.csv")).open()))
    assert [r["setting"] for r in rows] == ["baseline", "LMME(4,0.7)"]
    base, lmme = ({k: r[k] for k in r} for r in rows)
    assert base["decoder_tokens"] == "256/256/256/256"
    layers = [int(n) for n in lmme["decoder_tokens"].split("/")]
    assert layers[0] == 256 and layers == sorted(layers, reverse=True) and layers[-1] < 256
    assert 0 < float(lmme["tflops_per_step"]) < float(base["tflops_per_step"])
    for r in rows:
        step, mfu = float(r["step_s"]), float(r["mfu"])
        assert step > 0 and float(r["tokens_per_s"]) == pytest.approx(256 / step, rel=1e-6)
        assert mfu == pytest.approx(float(r["tflops_per_step"]) / step, rel=1e-6)
    assert json.loads(next(tmp_path.glob("train_*.json")).read_text())["strategy"] == "fsdp"
    # nothing of the one-process FSDP run outlives it (its port would block later launches)
    import os

    import torch.distributed as dist

    assert not dist.is_initialized() and "MASTER_PORT" not in os.environ


def test_train_flops_count_by_hand():
    """step_flops on a hand-countable case: one layer's linear weights, attention, encoder."""
    from lyra_pl.bench.train import _linear_params, step_flops
    from lyra_pl.model import LyraConfig, LyraModel

    model = LyraModel(LyraConfig.from_preset("tiny"))
    model.requires_grad_(False)
    cfg = model.config
    frozen = _linear_params(model.llm.layers[0])
    d = cfg.num_heads * cfg.head_dim
    enc = _linear_params(model.audio_encoder)
    proj = sum(p.numel() for p in model.speech_projector.parameters())
    n = 100
    expected = (cfg.num_layers * (4 * n * frozen + 6 * n * n * d)
                + 4 * 8 * cfg.hidden_size * cfg.vocab_size + 4 * 40 * proj
                + 2 * (2 * 1500 * enc + 4 * 1500 ** 2 * cfg.audio_dim * cfg.audio_layers))
    assert step_flops(model, [[n] * cfg.num_layers], [40], 2, 8) == expected
