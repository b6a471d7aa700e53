"""``parallelize(compile=True)`` with LMME and a LoRA adapter: several training steps of the
compiled tiny model (every decoder layer ``torch.compile``d, ``fullgraph=True``, inductor on
CPU) follow the eager model step for step: the same keep sets, losses and weights within
float32 rounding."""
from __future__ import annotations

import copy

import torch

from lyra_pl import LyraConfig, LyraInputs, LyraModel
from lyra_pl.model import lora
from lyra_pl.model.assemble import IGNORE
from lyra_pl.training.parallelize import parallelize

IMG = 500
STEPS = 3


def _batch(step: int) -> LyraInputs:
    """Two samples, an 8x8 image each (16 context tokens) and text around it; the same shapes
    every step (one set of compiled graphs), new pixels (new keep sets)."""
    g = torch.Generator().manual_seed(step)
    ids = torch.tensor([[5, IMG, 7, 8, 9, 10, 11, 12], [6, 7, IMG, 9, 10, 11, 12, 0]])
    labels = torch.full_like(ids, IGNORE)
    labels[0, 6:] = ids[0, 6:]
    labels[1, 5:7] = ids[1, 5:7]
    grid = torch.tensor([[1, 8, 8], [1, 8, 8]])
    return LyraInputs(ids, torch.tensor([8, 7]), labels=labels,
                      pixel_values=torch.randn(128, 3 * 2 * 14 * 14, generator=g),
                      image_grid_thw=grid)


def test_compiled_lmme_training_follows_eager():
    cfg = LyraConfig.from_preset("tiny", lmme_blocks=2, lmme_keep_ratio=0.5, lmme_min_keep=2)
    torch.manual_seed(0)
    eager = LyraModel(cfg)
    lora.add_adapter(eager.llm, "speech", lora.LoraSpec(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # a non-zero B, so that the adapter changes q and k
        for name, p in eager.llm.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05)
    eager.train()
    compiled = parallelize(copy.deepcopy(eager), None, compile=True)
    models = (eager, compiled)
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
                  for m in models]
    for step in range(STEPS):
        batch = _batch(step)
        outs = [m(batch, adapters=["speech"]) for m in models]
        assert len(outs[0].keeps) == 1
        # Same tokens survive: a swap would need two context scores within float32 rounding.
        for a, b in zip(outs[0].keeps, outs[1].keeps):
            assert torch.equal(a, b), f"step {step}: compiled LMME kept other tokens"
        assert torch.equal(outs[0].state.index, outs[1].state.index)
        # Inductor reorders and fuses float32 sums (~1e-7 relative per op); a few steps of SGD
        # carry that to ~1e-6, far below what a wrong graph (say, stale q/k) would change.
        torch.testing.assert_close(outs[1].loss, outs[0].loss, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"step {step}: {m}")
        for out, opt in zip(outs, optimizers):
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    ref = dict(eager.named_parameters())
    for name, p in compiled.named_parameters():
        torch.testing.assert_close(p, ref[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
