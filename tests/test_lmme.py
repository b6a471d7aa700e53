"""``LyraConfig.lmme_causal=False`` reproduces the official LMME selection: each instruction
row's softmax over every key of its sample (not only the keys before it), averaged over heads
and instruction rows, then the top context tokens. The expectation is computed here in plain
PyTorch, one sample at a time, from the pruning layer's input."""
from __future__ import annotations

import math

import torch

from lyra_pl import LyraConfig, LyraInputs, LyraModel

IMG = 500
RATIO, MIN_KEEP = 0.5, 2


def _inputs() -> LyraInputs:
    g = torch.Generator().manual_seed(1)
    grid = torch.tensor([[1, 4, 6], [1, 4, 4], [1, 4, 4]])
    # Instruction text between two images: causal rows before the second image never see it,
    # non-causal rows do, so the two selections differ. The second sample is padded.
    ids = torch.tensor([[5, IMG, 7, 8, IMG, 9, 10], [6, IMG, 8, 9, 10, 0, 0]])
    return LyraInputs(ids, torch.tensor([7, 5]),
                      pixel_values=torch.randn(int(grid.prod(1).sum()), 3 * 2 * 14 * 14,
                                               generator=g, dtype=torch.float64),
                      image_grid_thw=grid)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def _official_keep(layer, h, cos, sin, instruction, context, heads: int, kv_heads: int):
    """One unpadded sample (N tokens): softmax over all N keys of each instruction row's
    q.k / sqrt(d), mean over heads and rows, top-k of the context tokens; k by the keep rule
    (all when fewer than MIN_KEEP, else max(MIN_KEEP, floor(RATIO * n)))."""
    x = layer.input_layernorm(h)  # (N, H)
    N, d = x.shape[0], x.shape[1] // heads
    q = layer.self_attn.q_proj(x).view(N, heads, d).transpose(0, 1)
    k = layer.self_attn.k_proj(x).view(N, kv_heads, d).transpose(0, 1)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    k = k.repeat_interleave(heads // kv_heads, dim=0)
    probs = torch.softmax(q[:, instruction] @ k.transpose(1, 2) / math.sqrt(d), dim=-1)
    scores = probs.mean(dim=(0, 1))  # (N,)
    n = int(context.sum())
    keep_n = n if n < MIN_KEEP else max(MIN_KEEP, math.floor(RATIO * n))
    ctx = context.nonzero().flatten()
    keep = ~context
    keep[ctx[scores[ctx].argsort(descending=True)[:keep_n]]] = True
    return keep


def _keeps(causal: bool):
    cfg = LyraConfig.from_preset("tiny", lmme_blocks=2, lmme_keep_ratio=RATIO,
                                 lmme_min_keep=MIN_KEEP, lmme_causal=causal)
    torch.manual_seed(0)
    model = LyraModel(cfg).double().eval()
    layer = model.llm.layers[cfg.lmme_layers()[0]]
    seen = []
    hook = layer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0], kwargs["position_embeddings"])),
        with_kwargs=True)
    with torch.no_grad():
        assembled, _ = model.prepare(_inputs())
        out = model(_inputs())
    hook.remove()
    (h, (cos, sin)), = seen
    return model, cfg, out.keeps[0], assembled, h, cos, sin


def test_non_causal_selection_is_the_official_all_keys_softmax():
    model, cfg, keep, a, h, cos, sin = _keeps(causal=False)
    layer = model.llm.layers[cfg.lmme_layers()[0]]
    for b in range(2):
        n = int(a.lengths[b])
        with torch.no_grad():
            want = _official_keep(layer, h[b, :n], cos[b, :n], sin[b, :n], a.instruction[b, :n],
                                  a.context[b, :n], cfg.num_heads, cfg.num_kv_heads)
        assert torch.equal(keep[b, :n], want), f"sample {b}"
        assert not keep[b, n:].any()
    causal = _keeps(causal=True)[2]
    assert not torch.equal(causal, keep)  # the switch reaches the selection
