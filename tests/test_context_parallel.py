"""Context parallelism on CPU (gloo): 2 and 4 processes, CP alone and CP x FSDP (2 x 2), on the
tiny preset with a long-speech batch (several Whisper windows, an image, two samples of
different lengths, right padding, LCMR transcripts, an active LoRA adapter). The loss, the
LMME keep sets and the parameter gradients equal the one-process run; so does a resumed run.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lyra_pl import LyraConfig, LyraInputs, LyraModel
from lyra_pl.model import lora
from lyra_pl.model.assemble import IGNORE
from lyra_pl.model.audio import AudioBatch
from lyra_pl.training.context_parallel import context_parallel_split, data_parallel_rank
from lyra_pl.training.parallelize import parallelize
from conftest import free_port

IMG, SPEECH = 500, 502
SR = 16000
GRADS = ["llm.layers.0.self_attn.q_proj.base_layer.weight",
         "llm.layers.1.mlp.down_proj.base_layer.weight",
         "llm.layers.1.self_attn.k_proj.lora_B.long_speech.weight",
         "speech_projector.linear1.weight", "visual.blocks.0.mlp.fc1.weight",
         "llm.embed_tokens.weight"]


def long_speech_batch(seed: int, seconds: tuple[float, float]) -> LyraInputs:
    """Two samples: text, a speech clip (several 30 s windows), a question and an answer; the
    second also has an image. Clips and texts differ in length, so the batch is padded."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(max(seconds) * SR)) / SR
    clips = [(0.1 * torch.randn(int(s * SR), generator=g)
              + 0.2 * torch.sin(2 * torch.pi * (200 + 100 * i) * t[: int(s * SR)]))
             for i, s in enumerate(seconds)]
    ids = torch.tensor([[5, 6, SPEECH, 7, 8, 9, 10, 11, 12, 13, 14, 0, 0],
                        [5, IMG, 6, SPEECH, 15, 16, 17, 18, 19, 20, 21, 22, 23]])
    lengths = torch.tensor([11, 13])
    labels = torch.full_like(ids, IGNORE)
    labels[0, 8:11] = ids[0, 8:11]
    labels[1, 9:13] = ids[1, 9:13]
    return LyraInputs(
        ids, lengths, labels=labels,
        pixel_values=torch.randn(16, 3 * 2 * 14 * 14, generator=g),
        image_grid_thw=torch.tensor([[1, 4, 4]]),
        speech=AudioBatch.from_list(clips, sample_ids=[0, 1]),
        transcript_ids=torch.tensor([[30, 31, 32, 33, 34], [40, 41, 42, 0, 0]]),
        transcript_lengths=torch.tensor([5, 3]),
        media_counts=torch.tensor([[0, 0, 1, 0], [1, 0, 1, 0]]),
    )


BATCHES = [(1, (75.0, 41.5)), (2, (33.0, 62.0))]  # one per data-parallel replica


def build(lmme: bool) -> LyraModel:
    torch.manual_seed(0)
    overrides = dict(lmme_blocks=4, lmme_keep_ratio=0.5, lmme_min_keep=4) if lmme else {}
    model = LyraModel(LyraConfig.from_preset("tiny", lcmr_weight=0.5, **overrides)).train()
    lora.add_adapter(model.llm, "long_speech", lora.LoraSpec(r=4, alpha=8, dropout=0.0))
    lora.trainable_adapter_parameters(model.llm, ["long_speech"])
    with torch.no_grad():  # a trained-looking adapter, so that it shapes the activations
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model


def _worker(rank: int, port: int, world: int, cp: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        replica, replicas = data_parallel_rank(rank, world, cp)
        batches = [long_speech_batch(seed, seconds) for seed, seconds in BATCHES[:replicas]]
        for lmme in (False, True):
            # One process, each replica's batch: the losses, keep sets and mean gradients.
            model = build(lmme)
            params = dict(model.named_parameters())
            refs, grads = [], {n: 0.0 for n in GRADS}
            for batch in batches:
                out = model(batch)
                out.loss.backward()
                refs.append(out)
                for n in GRADS:
                    grads[n] = grads[n] + params[n].grad / replicas
                model.zero_grad(set_to_none=True)
            assert refs[replica].adapters == ["long_speech"]

            model = build(lmme)
            mesh = init_device_mesh("cpu", (world,))
            parallelize(model, mesh, param_dtype=None, reduce_dtype=None,
                        sequence_split=context_parallel_split(mesh, cp, world))
            out = model(batches[replica])
            ref = refs[replica]
            torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out.ce_loss, ref.ce_loss, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out.lcmr_loss, ref.lcmr_loss, rtol=1e-5, atol=1e-6)
            assert out.tokens == ref.tokens
            assert len(out.keeps) == len(ref.keeps) == (3 if lmme else 0)  # after layers 0, 1, 2
            for got, want in zip(out.keeps, ref.keeps):  # the split pads the sequence
                n = want.shape[1]
                assert torch.equal(got[:, :n], want) and not got[:, n:].any()
            out.loss.backward()
            params = dict(model.named_parameters())
            for n in GRADS:
                torch.testing.assert_close(params[n].grad.full_tensor(), grads[n], rtol=1e-4,
                                           atol=1e-6, msg=lambda m: f"lmme={lmme} {n}: {m}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,cp", [(2, 2), (4, 4), (4, 2)], ids=["cp2", "cp4", "cp2xfsdp2"])
def test_context_parallel_matches_one_process(world, cp):
    """Loss, keep sets (LMME on and off) and gradients under CP equal the one-process run;
    with two data-parallel replicas (CP 2 x FSDP 2) the gradients are the replicas' mean."""
    mp.spawn(_worker, args=(free_port(), world, cp), nprocs=world, join=True)
