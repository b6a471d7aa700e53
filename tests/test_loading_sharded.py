"""Loading hub-layout checkpoints into a model sharded by FSDP2 over two CPU processes (gloo):
each rank reads only its rows of the sharded parameters and the replicated frozen encoders
whole, and ends up with exactly the weights a one-process load gives.

What a process reads is measured by the kernel: ``rchar`` of ``/proc/thread-self/io``, the
bytes this thread's ``read`` calls returned (the loader reads with ``read``, not a memory map,
so every byte it takes from the checkpoint shows there)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open
from transformers import Qwen2VLForConditionalGeneration, WhisperForConditionalGeneration

from lyra_pl.model import LyraConfig, LyraModel
from lyra_pl.model.loading import full_tensor, load_qwen2vl, load_whisper
from conftest import free_port

pytestmark = pytest.mark.skipif(not Path("/proc/thread-self/io").exists(),
                                reason="needs Linux's per-thread I/O accounting")


def _rchar() -> int:
    for line in Path("/proc/thread-self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/thread-self/io")


def _loaded_modules(model: LyraModel) -> list[torch.nn.Module]:
    """The modules the two checkpoints fill."""
    return [model.llm, model.lm_head, model.visual, model.audio_encoder.whisper]


def _overhead(directory: Path) -> int:
    """Bytes of a checkpoint directory that are not tensor data: config.json, the index and
    every file's header (8-byte length + JSON), read twice (once by the check of the whole
    folder before anything loads, :mod:`lyra_pl.model.checkpoints`, once by the reader), plus
    1 KiB for reading the counter itself (``/proc/thread-self/io``, about 120 bytes)."""
    total = sum((directory / n).stat().st_size
                for n in ("config.json", "model.safetensors.index.json"))
    for path in directory.glob("*.safetensors"):
        with path.open("rb") as f:
            total += 8 + int.from_bytes(f.read(8), "little")
    return 1024 + 2 * total


def _hub_checkpoints(root: Path, cfg: LyraConfig) -> tuple[Path, Path]:
    """Qwen2-VL and Whisper as the hub has them: bf16, several safetensors shards and a
    ``model.safetensors.index.json``, written by transformers' ``save_pretrained``."""
    torch.manual_seed(0)
    qwen = Qwen2VLForConditionalGeneration(cfg.qwen2vl_config())
    whisper = WhisperForConditionalGeneration(cfg.whisper_config())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # zero-initialized biases too, so a missed or misplaced row shows
        for p in [*qwen.parameters(), *whisper.parameters()]:
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    dirs = root / "qwen2vl", root / "whisper"
    for model, d in zip((qwen, whisper), dirs):
        model.to(torch.bfloat16).save_pretrained(d, max_shard_size="1MB")
        files = set(json.loads((d / "model.safetensors.index.json").read_text())
                    ["weight_map"].values())
        assert len(files) > 1 and files == {p.name for p in d.glob("*.safetensors")}
        with safe_open(str(d / sorted(files)[0]), framework="pt") as f:
            assert f.get_slice(next(iter(f.keys()))).get_dtype() == "BF16"
    return dirs


def _worker(rank: int, port: int, qwen: str, whisper: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        from lyra_pl.training.parallelize import materialize, parallelize

        with torch.device("meta"):
            model = LyraModel(LyraConfig.from_preset("tiny"))
        model.visual.requires_grad_(False)  # frozen encoders, as in the stages: replicated
        model.audio_encoder.requires_grad_(False)
        parallelize(model, init_device_mesh("cpu", (2,)), param_dtype=None, reduce_dtype=None)
        materialize(model, "cpu")
        before = _rchar()
        load_qwen2vl(model, qwen)
        load_whisper(model, whisper)
        read = _rchar() - before
        params = [p for m in _loaded_modules(model) for p in m.parameters()]
        held = sum(p.to_local().numel() for p in params if hasattr(p, "to_local"))
        sharded = sum(p.numel() for p in params if hasattr(p, "to_local"))
        whole = sum(p.numel() for p in params if not hasattr(p, "to_local"))
        state = {k: full_tensor(v).detach().clone() for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save(state, Path(out) / "state.pt")
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(
            {"read": read, "held": held, "sharded": sharded, "whole": whole}))
    finally:
        dist.destroy_process_group()


def test_each_rank_reads_its_slices_and_loads_the_one_process_weights(tmp_path):
    cfg = LyraConfig.from_preset("tiny")
    qwen, whisper = _hub_checkpoints(tmp_path, cfg)
    overhead = _overhead(qwen) + _overhead(whisper)
    mp.spawn(_worker, args=(free_port(), str(qwen), str(whisper), str(tmp_path)), nprocs=2,
             join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    one = LyraModel(cfg)  # the same load in one process: every tensor whole
    before = _rchar()
    load_qwen2vl(one, qwen)
    load_whisper(one, whisper)
    one_read = _rchar() - before

    bf16 = 2  # bytes per value in the checkpoints
    sharded, whole = ranks[0]["sharded"], ranks[0]["whole"]
    assert whole == sum(p.numel() for p in [*one.visual.parameters(),
                                            *one.audio_encoder.parameters()])
    assert sharded + whole == sum(p.numel() for m in _loaded_modules(one) for p in m.parameters())
    # The measure itself: one process reads every value once, plus headers and JSON files.
    assert (sharded + whole) * bf16 <= one_read <= (sharded + whole) * bf16 + overhead, one_read
    # Each rank: the tensor bytes of its rows of the sharded parameters (about half: FSDP2
    # chunks dim 0 as torch.chunk does, so the ranks' shares differ by at most a row per
    # tensor) and of the replicated encoders, never less, and at most the non-tensor bytes
    # more. Reading every value, as before, would add sharded / 2 values, which is several
    # times that allowance.
    assert sharded / 2 * bf16 > 4 * overhead
    for r in ranks:
        assert 0.45 * sharded <= r["held"] <= 0.55 * sharded, r
        expected = (r["held"] + whole) * bf16
        assert expected <= r["read"] <= expected + overhead, (r, expected, overhead)
    assert ranks[0]["held"] + ranks[1]["held"] == sharded

    state = torch.load(tmp_path / "state.pt")
    ref = one.state_dict()
    assert state.keys() == ref.keys()
    for key in _loaded_state_keys(one):
        assert torch.equal(state[key], ref[key]), key


def _loaded_state_keys(model: LyraModel) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return [f"{names[id(m)]}.{k}" for m in _loaded_modules(model) for k in m.state_dict()]
