"""The uniform-graph rule under FSDP2 (:mod:`lyra_pl.training.uniform_graph`): two gloo
processes whose batches hold different modalities (speech | text; sound | speech) train a
stage-2 model (both projectors, ``speech`` and ``sound`` LoRA adapters) for several AdamW steps
without hanging and end with the weights of one process that averages the same two batches'
losses; an adapter a batch does not select runs no matmul; the model knows nothing of
sharding."""
from __future__ import annotations

import copy
import datetime
import os
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lyra_pl
from lyra_pl import LyraConfig, LyraInputs, LyraModel
from lyra_pl.model import lora
from lyra_pl.model.assemble import IGNORE
from lyra_pl.model.audio import AudioBatch
from lyra_pl.training.parallelize import parallelize

from conftest import free_port

SPEECH, SOUND = 502, 503
STEPS = 3


def _batch(kind: str) -> LyraInputs:
    """One sample, answered by its last two tokens: with a speech clip, a sound clip or text."""
    g = torch.Generator().manual_seed({"speech": 1, "sound": 2, "text": 3}[kind])
    ids = torch.tensor([[5, {"speech": SPEECH, "sound": SOUND, "text": 6}[kind], 7, 8, 9, 10]])
    labels = torch.full_like(ids, IGNORE)
    labels[0, 4:] = ids[0, 4:]
    clip = AudioBatch.from_list([torch.randn(16000, generator=g) * 0.1], kind=kind) \
        if kind != "text" else None
    return LyraInputs(ids, torch.tensor([6]), labels=labels,
                      speech=clip if kind == "speech" else None,
                      sound=clip if kind == "sound" else None)


def _stage2_model() -> LyraModel:
    """Stage 2's trainable set on the tiny preset: projectors and two adapters, base frozen."""
    torch.manual_seed(0)
    model = LyraModel(LyraConfig.from_preset("tiny", lcmr_weight=0.0)).train()
    for name in ("speech", "sound"):
        lora.add_adapter(model.llm, name, lora.LoraSpec(4, 8, 0.0))
    with torch.no_grad():
        for n, p in model.llm.named_parameters():
            if ".lora_B." in n:  # B = 0 would leave A without a gradient
                p.normal_(0, 0.02)
    model.requires_grad_(False)
    lora.trainable_adapter_parameters(model.llm, ["speech", "sound"])
    model.speech_projector.requires_grad_(True)
    model.sound_projector.requires_grad_(True)
    return model


def _adam(model) -> torch.optim.Optimizer:
    # no weight decay: AdamW would shrink a weight with a zero gradient, not one without
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                             weight_decay=0.0)


def _count_lora_calls(model) -> dict[str, int]:
    """Forward calls of every adapter's lora_A / lora_B linears, by adapter, from now on."""
    calls = {name: 0 for name in lora.adapter_names(model.llm)}
    for module in model.llm.modules():
        for attr in ("lora_A", "lora_B"):
            for name, linear in getattr(module, attr, {}).items():
                linear.register_forward_hook(
                    lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


def _part(name: str) -> str:
    """``lora.<adapter>`` for an adapter weight, else the model component."""
    found = re.search(r"\.lora_[AB]\.(\w+)\.", name)
    return f"lora.{found[1]}" if found else name.split(".")[0]


def _worker(rank: int, port: int, kinds: tuple[str, str], out_dir: str,
            compile: bool = False) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a collective mismatch fails within a minute instead of hanging the test run
    dist.init_process_group("gloo", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        batches = [_batch(k) for k in kinds]
        model = _stage2_model()
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        ref = copy.deepcopy(model)
        opt = _adam(ref)
        for _ in range(STEPS):  # one process: the mean of the two batches' losses
            ((ref(batches[0]).loss + ref(batches[1]).loss) / 2).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        from torch.distributed.device_mesh import init_device_mesh

        parallelize(model, init_device_mesh("cpu", (2,)), compile=compile, param_dtype=None,
                    reduce_dtype=None)
        calls = _count_lora_calls(model)
        opt = _adam(model)
        for step in range(STEPS):  # each rank its own batch; FSDP2 averages the gradients
            out = model(batches[rank])
            assert out.loss.requires_grad  # also with no adapter and no projector used
            out.loss.backward()
            if step == 0:
                missing = [n for n, p in model.named_parameters()
                           if p.requires_grad and p.grad is None]
                assert not missing, missing
                used = lora.select_adapters({kinds[rank]}, ["speech", "sound"])
                assert {n for n, c in calls.items() if c} == set(used), calls
            opt.step()
            opt.zero_grad(set_to_none=True)
        gathered = {n: p.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
        want = dict(ref.named_parameters())
        for n, p in gathered.items():
            # Adam divides by sqrt(v): reduction-order differences (~1e-7) can move a
            # near-zero-gradient weight by up to ~lr * 1e-2.
            torch.testing.assert_close(p, want[n], rtol=1e-3, atol=2e-4,
                                       msg=lambda m: f"rank {rank}, {n}: {m}")
        # exactly the parts the two batches use moved; the others had zero gradients
        used = {part for k in kinds if k != "text"
                for part in (f"{k}_projector", f"lora.{k}")}
        moved = {_part(n) for n, p in gathered.items() if not torch.equal(p, initial[n])}
        assert moved == used, (moved, used)
        torch.save({"calls": calls}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kinds, compile", [(("speech", "text"), False),
                                            (("sound", "speech"), False),
                                            (("speech", "text"), True)],
                         ids=["speech|text", "sound|speech", "speech|text-compiled"])
def test_ranks_with_different_modalities_train_as_one_process(kinds, compile, tmp_path):
    """Compiled: the decoder layers ``torch.compile``d (fullgraph) with their hooks."""
    mp.spawn(_worker, args=(free_port(), kinds, str(tmp_path), compile), nprocs=2, join=True)
    calls = [torch.load(tmp_path / f"rank{r}.pt")["calls"] for r in (0, 1)]
    if kinds[1] == "text":  # the text rank ran no LoRA matmul of any adapter, in any step
        assert calls[1] == {"speech": 0, "sound": 0}, calls


def test_the_model_knows_nothing_of_sharding():
    """Only ``lyra_pl/model/loading.py`` (checkpoint shards, and ``is_sharded``, the one test of
    a sharded tensor) speaks of DTensors; no duck typing of them anywhere."""
    root = Path(lyra_pl.__file__).parent
    for path in sorted((root / "model").glob("*.py")):
        if path.name != "loading.py":
            found = re.findall(r"uniform_graph|to_local|DTensor", path.read_text())
            assert not found, (path.name, found)
    for path in sorted(root.rglob("*.py")):
        assert not re.search(r"hasattr\([^)]*\"(to_local|full_tensor)\"", path.read_text()), path
