"""The benchmark command runs end to end (smallest sizes) and writes its files; its FLOP
count agrees with torch's FlopCounterMode, and the training throughput is timed in sync with
the device."""
import csv
import json
import time

import lightning as L
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

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


def test_bench_kernels_contention(tmp_path):
    """--contention: ours with all threads and with one, quiet and beside a busy process."""
    rc = main(["kernels", "--quick", "--device", "cpu", "--only", "softdtw", "--contention",
               "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    assert rc == 0
    rows = list(csv.DictReader(next(tmp_path.glob("*.csv")).open()))
    threads = torch.get_num_threads()
    for size in {r["size"] for r in rows}:
        impls = {r["impl"]: r for r in rows if r["size"] == size}
        assert {"ours", "ours 1 thread", f"ours {threads} threads + busy",
                "ours 1 thread + busy"} <= set(impls)
        assert all(float(impls[i]["median_ms"]) > 0 for i in impls if i.startswith("ours"))
        # Each state timed after settling in it; the settling calls are summed up in a note.
        assert impls["ours"]["note"].startswith("timed after ")
        assert impls[f"ours {threads} threads + busy"]["note"].startswith("timed after ")


def test_side_by_side_timing_takes_turns():
    """Compared steps are timed in rounds, one run of each per round, so a change in the
    machine's load falls on all of them alike; each gets its own median."""
    from lyra_pl.bench.kernels import measure_side_by_side

    calls = []
    steps = {"fast": lambda: calls.append("fast"),
             "slow": lambda: (calls.append("slow"), time.sleep(0.01))}
    m = measure_side_by_side(steps, torch.device("cpu"), repeats=5, warmup=1, budget_s=10)
    assert calls[-10:] == ["fast", "slow"] * 5
    assert m["fast"].repeats == m["slow"].repeats == 5
    assert m["slow"].median_ms >= 10 > m["fast"].median_ms


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


def test_bench_train_context_parallel_cpu(tmp_path):
    """``--context-parallel 2``: the setting runs as one CP group of two CPU processes (a
    process tree of its own), the row says so, tokens/s per rank is the group's over 2, and
    the MFU counts each rank's half of the step's FLOPs. One Whisper window for two ranks:
    one of them encodes nothing and still takes part in every collective."""
    rc = main(["train", "--device", "cpu", "--seq", "256", "--steps", "1", "--warmup", "1",
               "--settings", "LMME(4,0.7)", "--context-parallel", "2", "--peak-tflops", "1",
               "--out", str(tmp_path)])
    assert rc == 0
    (row,) = csv.DictReader(next(tmp_path.glob("train_tiny_seq256_cp2_*.csv")).open())
    assert row["setting"] == "LMME(4,0.7)" and int(row["context_parallel"]) == 2
    step, tokens = float(row["step_s"]), float(row["tokens_per_s"])
    assert step > 0 and tokens == pytest.approx(256 / step, rel=1e-6)
    assert float(row["tokens_per_s_rank"]) == pytest.approx(tokens / 2, rel=1e-6)
    assert float(row["mfu"]) == pytest.approx(float(row["tflops_per_step"]) / 2 / step, rel=1e-6)
    layers = [int(n) for n in row["decoder_tokens"].split("/")]
    assert layers[0] == 256 and layers[-1] < 256
    info = json.loads(next(tmp_path.glob("train_*.json")).read_text())
    assert info["context_parallel"] == 2 and info["strategy"] == "fsdp"


class _CountFlops(L.Callback):
    """torch's FlopCounterMode over one training step's forward and backward: from the
    batch's start to just before the optimizer step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.mode = FlopCounterMode(display=False)
        self.mode.__enter__()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.mode.__exit__(None, None, None)


def test_train_flops_match_torch_flop_counter():
    """step_flops against FlopCounterMode on a real stage-2 training step (tiny, baseline: an
    LMME step also scores its tokens, work step_flops leaves out as overhead, not model
    FLOPs; the benchmark run shows LMME's count below the baseline's). The stage may hold a
    sound adapter that a speech batch does not run. Attention runs ``eager``: FlopCounterMode
    cannot see inside CPU SDPA, and eager attention computes the full n x n products, so the
    count to compare is ``causal=False``. The log-mel features (not model FLOPs) are
    measured on their own and taken off. Left out by step_flops and in the measurement: the
    LCMR similarity (about 0.1% here), hence the 0.2% tolerance; elementwise ops neither
    counts. Errors it catches, as shares of this step: the projector's second layer's input
    gradient 0.33%, conv1 at the encoder state rate instead of the mel frame rate 2.6%, the
    idle sound adapter counted 4%."""
    from lyra_pl.bench.train import ANSWER_TOKENS, _decoder_tokens, make_batch, step_flops
    from lyra_pl.model.audio import WINDOW_SAMPLES, log_mel
    from lyra_pl.training.stages import JointSFTStage

    stage = JointSFTStage(preset="tiny", lora_r=8, lora_alpha=16, param_dtype=None,
                          reduce_dtype=None, warmup_ratio=0.0,
                          model_overrides={"attn_implementation": "eager"})
    batch_size = 2
    batch = make_batch(stage.config, 256, batch_size)
    counter = _CountFlops()
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, callbacks=[counter],
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(stage, torch.utils.data.DataLoader([batch], batch_size=None))
    tokens, speech = _decoder_tokens(stage.model, batch)
    windows = int(batch["inputs"].speech.num_windows().sum())
    with FlopCounterMode(display=False) as features:
        log_mel(torch.zeros(windows, WINDOW_SAMPLES), stage.config.num_mel_bins)
    measured = counter.mode.get_total_flops() - features.get_total_flops()
    counted = step_flops(stage.model, tokens, speech, windows, batch_size * ANSWER_TOKENS,
                         stage.model.adapters_for(batch["inputs"]), causal=False)
    assert counted == pytest.approx(measured, rel=2e-3)


class _Waits(L.LightningModule):
    """Each training step waits ``seconds`` (CUDA: a kernel that spins that long, queued
    asynchronously; CPU: the host sleeps) and reports 1000 tokens."""

    def __init__(self, seconds: float, cycles_per_s: float = 0.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seconds, self.cycles_per_s = seconds, cycles_per_s

    def training_step(self, batch, batch_idx):
        if self.device.type == "cuda":
            torch.cuda._sleep(int(self.seconds * self.cycles_per_s))
        else:
            time.sleep(self.seconds)
        self.log("train/tokens", 1000.0, on_step=True, on_epoch=False, batch_size=1)
        return (self.weight * batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_throughput_charges_each_step_its_own_device_time(device):
    """train/tokens_per_s of a step that takes 0.2 s: at most 1000 / 0.2. On CUDA the wait is
    a queued kernel, so a clock read without a sync would see almost no time and report far
    more."""
    from lyra_pl.training.tracking import Throughput, synced_clock

    cycles_per_s = 0.0
    if device.type == "cuda":  # calibrate the spinning kernel
        t0 = synced_clock(device)
        torch.cuda._sleep(10**8)
        cycles_per_s = 10**8 / (synced_clock(device) - t0)
    seconds = 0.2
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                        max_steps=2, log_every_n_steps=1, logger=False,
                        callbacks=[Throughput()], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_Waits(seconds, cycles_per_s),
                torch.utils.data.DataLoader([torch.ones(1)] * 2, batch_size=None))
    rate = float(trainer.callback_metrics["train/tokens_per_s"])
    assert 1000 / (seconds + 2.0) < rate <= 1000 / (0.9 * seconds)
