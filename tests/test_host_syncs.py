"""Host syncs in one tiny training step (LMME + LCMR + a LoRA adapter; a batch with an image, a
speech clip with its transcript, and text). On a GPU each sync stalls the host until the stream
has run everything queued, so the step may hold only the syncs a dynamic shape forces or that
live in code we do not own, each listed with its reason in the budget below.

A batch is checked once, where collate builds it on the CPU, and carries its sizes as host ints;
this test runs on the CPU, where a sync cannot be told from a host read, so everything the step
reads is counted, from moving the collated batch to the device to the end of the backward pass.
"""
from __future__ import annotations

import traceback
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from lyra_pl import LyraConfig, LyraModel
from lyra_pl.model import Sample, collate, lora
from lyra_pl.model.assemble import IGNORE

aten = torch.ops.aten
IMG, SPEECH = 500, 502
# Ops that wait for the device: a scalar read (.item(), int(), bool(), float()), and ops whose
# output shape depends on values (nonzero, boolean-mask indexing, repeat_interleave without
# output_size).
SCALAR_READS = {aten._local_scalar_dense, aten.is_nonzero, aten.equal}
VALUE_SHAPED = {aten.nonzero, aten.masked_select}
MASK_INDEXED = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
# Syncs inside our compiled ops, where a dispatch mode cannot see: counted per call.
IN_OPS = {
    "lyra.compact_index": 1,  # the compacted length
    "lyra.prune_tokens": 1,  # csrc/prune/prune_op.cpp query_rows: counts.max().item()
    "lyra.soft_dtw_forward": 2,  # csrc/checks.h check_lengths: both length tensors .cpu()
    "lyra.soft_dtw_backward": 2,  # the same
    "lyra.soft_dtw_alignment": 2,  # the same (the forward and E in one call, ops.soft_dtw)
}


def budget(cfg: LyraConfig) -> dict[str, tuple[int, str]]:
    """Where a sync may happen: the innermost lyra_pl function that led to it, or the op."""
    vit = 3 + 3 * cfg.vision_depth
    return {
        "lyra_pl/model/lyra.py:encode_media": (vit, (
            "transformers' Qwen2-VL ViT, not ours: grid_thw.tolist() twice for its rotary "
            "position ids, repeat_interleave without output_size for cu_seqlens, and in its "
            "non-flash attention lengths.tolist() for each of q, k, v in every block")),
        "lyra.compact_index": (1, (
            "LMME: the compacted batch is as long as the most tokens a sample keeps, a dynamic "
            "shape (one per pruning step)")),
        "lyra.prune_tokens": (1, (
            "inside the op: its most instruction rows per sample, read to size its work; the "
            "host could pass it")),
        "lyra.soft_dtw_alignment": (2, (
            "inside the op: the speech and text lengths copied to the host for range checks; "
            "checkable on the host before the call (its backward, a scaling, checks nothing)")),
    }


def _is_sync(func, args, kwargs) -> str | None:
    packet = func.overloadpacket
    if packet in SCALAR_READS or packet in VALUE_SHAPED:
        return str(packet)
    if packet in MASK_INDEXED and any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] if i is not None
    ):
        return f"{packet}[bool mask]"
    if packet is aten.repeat_interleave and func is not aten.repeat_interleave.self_int \
            and kwargs.get("output_size") is None:
        return "aten.repeat_interleave without output_size"
    return None


class SyncCounter(TorchDispatchMode):
    """Counts host syncs by site; ``found`` lists each with where it came from."""

    def __init__(self):
        super().__init__()
        self.sites: Counter[str] = Counter()
        self.found: list[str] = []

    def record(self, what: str, n: int = 1, site: str | None = None) -> None:
        stack = traceback.extract_stack()
        ours = [f for f in stack if "/lyra_pl/" in f.filename]
        code = [f for f in stack if "/torch/" not in f.filename and f.filename != __file__]
        if site is None:
            site = (f"lyra_pl/{ours[-1].filename.split('/lyra_pl/')[-1]}:{ours[-1].name}"
                    if ours else "<outside lyra_pl: autograd>")
        self.sites[site] += n
        origin = (f"{code[-1].filename.split('site-packages/')[-1]}:{code[-1].lineno} "
                  f"{code[-1].line}" if code else "the backward pass")
        self.found.append(f"{n} x {what} at {site} (from {origin})")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = _is_sync(func, args, kwargs)
        if what:
            self.record(what)
        name = str(func.overloadpacket)
        if name in IN_OPS:
            self.record(f"syncs inside {name}", IN_OPS[name], site=name)
        return func(*args, **kwargs)


class ToListCounter(TorchFunctionMode):
    """``Tensor.tolist`` reads a CPU tensor's memory without dispatching an op; on a device it
    is a copy to the host, so it is counted at the function level."""

    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist:
            self.counter.record("Tensor.tolist")
        return func(*args, **(kwargs or {}))


def tiny_step_inputs():
    from transformers import Qwen2VLImageProcessor

    cfg = LyraConfig.from_preset("tiny", lmme_blocks=2, lmme_keep_ratio=0.5, lmme_min_keep=1,
                                 lcmr_weight=0.5)
    torch.manual_seed(0)
    model = LyraModel(cfg).train()
    lora.add_adapter(model.llm, "speech", lora.LoraSpec(r=4, alpha=8))
    proc = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 16)
    samples = [
        Sample([5, IMG, 6, 7, 8], labels=[IGNORE, IGNORE, IGNORE, 7, 8],
               images=[torch.randint(0, 255, (3, 60, 90), dtype=torch.uint8)]),
        Sample([SPEECH, 8, 9, 10], labels=[IGNORE, IGNORE, 9, 10],
               speech=[torch.randn(8000) * 0.1], transcripts=[[11, 12]]),
        Sample([5, 6, 7], labels=[IGNORE, 6, 7]),
    ]
    return cfg, model, collate(samples, cfg.placeholder_ids, cfg.pad_token_id, image_processor=proc)


def test_training_step_syncs_stay_within_budget():
    cfg, model, batch = tiny_step_inputs()
    counter = SyncCounter()
    with counter, ToListCounter(counter):
        out = model(batch.to("cpu"))
        out.loss.backward()
    assert out.lcmr_loss is not None and out.keeps and out.adapters == ["speech"]
    allowed = budget(cfg)
    print(f"\n{sum(counter.sites.values())} host syncs in one training step "
          f"(budget {sum(n for n, _ in allowed.values())}):")
    print("\n".join(counter.found))
    over = {site: n for site, n in counter.sites.items() if n > allowed.get(site, (0, ""))[0]}
    assert not over, (f"host syncs over budget at {over}; allowed: "
                      f"{ {s: n for s, (n, _) in allowed.items()} }")
