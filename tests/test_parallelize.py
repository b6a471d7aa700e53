"""FSDP2 on CPU: two gloo processes shard the tiny model and reproduce the single-process loss
and gradients, also with compiled layers (PLATFORM.md: FSDP2 works on CPU with gloo); a model
built on the meta device, sharded and materialized starts by the single-process init rule."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lyra_pl import LyraConfig, LyraInputs, LyraModel
from lyra_pl.model.assemble import IGNORE
from lyra_pl.model.audio import AudioBatch
from lyra_pl.training.parallelize import parallelize, parameter_share
from conftest import free_port

IMG, SPEECH = 500, 502


def _batch() -> LyraInputs:
    g = torch.Generator().manual_seed(1)
    grid = torch.tensor([[1, 4, 4]])
    ids = torch.tensor([[5, IMG, 6, 7, 8, 9], [SPEECH, 10, 11, 12, 13, 0]])
    labels = torch.full_like(ids, IGNORE)
    labels[0, 4:] = ids[0, 4:]
    labels[1, 3:5] = ids[1, 3:5]
    return LyraInputs(
        ids, torch.tensor([6, 5]), labels=labels,
        pixel_values=torch.randn(16, 3 * 2 * 14 * 14, generator=g), image_grid_thw=grid,
        speech=AudioBatch.from_list([torch.randn(16000, generator=g) * 0.1]),
        transcript_ids=torch.tensor([[20, 21, 22]]), transcript_lengths=torch.tensor([3]),
    )


def _worker(rank: int, port: int, checkpointing: bool, hybrid: bool = False,
            compile: bool = False) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        cfg = LyraConfig.from_preset("tiny", lmme_blocks=2, lmme_keep_ratio=0.5, lmme_min_keep=2)
        model = LyraModel(cfg).train()
        batch = _batch()
        ref = model(batch)
        ref.loss.backward()
        names = ["llm.layers.0.self_attn.q_proj.weight", "speech_projector.linear1.weight",
                 "visual.blocks.0.mlp.fc1.weight", "llm.embed_tokens.weight"]
        params = dict(model.named_parameters())
        ref_grads = {n: params[n].grad.clone() for n in names}
        model.zero_grad(set_to_none=True)
        total = sum(p.numel() for p in model.parameters())

        from torch.distributed.device_mesh import init_device_mesh

        if hybrid:  # HSDP as on 2 nodes of 1 GPU: replicate across "nodes", shard within
            mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh("cpu", (2,))
        parallelize(model, mesh, activation_checkpointing=checkpointing, compile=compile,
                    param_dtype=None, reduce_dtype=None)
        held, sharded, whole = parameter_share(model)
        if hybrid:
            placements = next(model.llm.layers[0].parameters()).placements
            assert [type(p).__name__ for p in placements] == ["Replicate", "Shard"], placements
            assert held == sharded  # one rank per shard group: each holds every value
        else:
            assert 0.45 * sharded <= held <= 0.55 * sharded, (held, sharded)
        # only the frozen Whisper encoder is replicated (the ViT trains here, so it is sharded)
        assert whole == sum(p.numel() for p in model.audio_encoder.whisper.parameters())
        assert sharded + whole == total
        out = model(batch)
        assert all(torch.equal(a, b) for a, b in zip(out.keeps, ref.keeps))
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.lcmr_loss, ref.lcmr_loss, rtol=1e-5, atol=1e-6)
        out.loss.backward()
        params = dict(model.named_parameters())
        for n in names:
            torch.testing.assert_close(params[n].grad.full_tensor(), ref_grads[n],
                                       rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
    finally:
        dist.destroy_process_group()


def _init_worker(rank: int, port: int) -> None:
    """Meta build, a LoRA adapter, FSDP2, materialize: the gathered weights follow each part's
    rule and have the statistics of the model built on one process."""
    from test_init import check_rules, group_stats

    from lyra_pl.model import lora
    from lyra_pl.training.parallelize import materialize

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        cfg = LyraConfig.from_preset("tiny")
        torch.manual_seed(0)
        ref = LyraModel(cfg)
        lora.add_adapter(ref.llm, "speech", lora.LoraSpec(r=4, alpha=8))
        with torch.device("meta"):
            model = LyraModel(cfg)
        lora.add_adapter(model.llm, "speech", lora.LoraSpec(r=4, alpha=8))
        parallelize(model, init_device_mesh("cpu", (2,)), param_dtype=None, reduce_dtype=None)
        materialize(model, "cpu")
        assert parameter_share(model)[0] < parameter_share(model)[1]  # it is sharded
        whole = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
                 for n, p in model.named_parameters()}
        with torch.device("meta"):
            gathered = LyraModel(cfg)
        lora.add_adapter(gathered.llm, "speech", lora.LoraSpec(r=4, alpha=8))
        gathered.load_state_dict(whole, strict=False, assign=True)
        gathered.init_buffers("cpu")
        check_rules(gathered, padding_row=False)  # a padding-row write misses a shard
        want = group_stats(ref)
        for group, (mean, std) in group_stats(gathered).items():
            # >= 4,000 values per group: the std agrees within 5 sigma (~2% each)
            assert abs(std - want[group][1]) <= 0.05 * want[group][1], (group, std, want[group])
            assert abs(mean - want[group][0]) <= 0.05 * want[group][1], (group, mean, want[group])
        for n, b in model.named_buffers():
            torch.testing.assert_close(b, dict(ref.named_buffers())[n], rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fsdp2_two_processes_match_one(checkpointing):
    mp.spawn(_worker, args=(free_port(), checkpointing), nprocs=2, join=True)


def test_fsdp2_with_compiled_layers_matches_one():
    """Every decoder layer compiled (fullgraph) and sharded, LMME pruning between them: the
    single-process eager loss, keep sets and gradients."""
    mp.spawn(_worker, args=(free_port(), False, False, True), nprocs=2, join=True)


def test_sharded_materialize_follows_the_init_rule():
    mp.spawn(_init_worker, args=(free_port(),), nprocs=2, join=True)


def _saved_bytes(model) -> int:
    """Bytes autograd keeps for backward during one forward pass."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(_batch()).loss.backward()
    return sum(saved)


def test_no_mesh_is_single_process_and_checkpointing_saves_memory():
    torch.manual_seed(0)
    plain = LyraModel(LyraConfig.from_preset("tiny")).train()
    before = _saved_bytes(plain)
    assert parallelize(plain, None, activation_checkpointing=True) is plain
    after = _saved_bytes(plain)
    assert after < 0.7 * before, (after, before)


def test_hybrid_sharding_two_processes_match_one():
    """The 2-D ("replicate", "shard") mesh of hybrid sharding gives the same loss and gradients
    (replicas average their gradients)."""
    mp.spawn(_worker, args=(free_port(), False, True), nprocs=2, join=True)
