"""Stage 2 under FSDP2 on two CPU processes (gloo) against one process: the model built on
the meta device, sharded, then loaded slice by slice (each rank holds about half), the same losses and weights as a single process over the same
samples, a distributed checkpoint that resumes on two ranks and on one, and the stage
hand-off export gathered from the shards.

Every step sees the same global batch: two samples with equal answer and transcript lengths,
one per rank under FSDP2 (Lightning's distributed sampler), both in one batch otherwise, so
the mean of the ranks' losses is the single-process loss and FSDP2's averaged gradients are
its gradients. One batch per epoch, so resuming lands on an epoch boundary."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch

from lyra_pl.model.assemble import IGNORE
from lyra_pl.model.inputs import Sample, collate
from lyra_pl.training.stages import JointSFTStage

STAGE = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0, lr=1e-2, warmup_ratio=0.0,
             param_dtype=None, reduce_dtype=None)
PLACEHOLDERS = {"image": 500, "video": 501, "speech": 502, "sound": 503}
PAD = 506


def make_weights(root: Path) -> dict[str, str]:
    """A base model and a stage-1-style export (parts + trained ``speech`` and ``sound``
    adapters) that both the sharded and the single-process runs load: the sharded run builds
    on the meta device and loads slice by slice, so shared weights (not a shared seed) make the
    runs comparable."""
    from lyra_pl.model import LyraConfig, LyraModel, lora
    from lyra_pl.model.loading import save_parts, save_qwen2vl, save_whisper

    torch.manual_seed(0)
    model = LyraModel(LyraConfig.from_preset("tiny"))
    lora.add_adapter(model.llm, "speech", lora.LoraSpec(4, 8, 0.0))
    lora.add_adapter(model.llm, "sound", lora.LoraSpec(4, 8, 0.0))  # stage 2 trains it too
    with torch.no_grad():
        for n, p in model.llm.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.02)
    save_qwen2vl(model, root / "qwen2vl")
    save_whisper(model, root / "whisper")
    save_parts(model, root / "export")
    lora.save_adapter(model.llm, "speech", root / "export" / "adapter_speech")
    lora.save_adapter(model.llm, "sound", root / "export" / "adapter_sound")
    return {"qwen2vl": str(root / "qwen2vl"), "whisper": str(root / "whisper"),
            "init_from": str(root / "export")}


def samples() -> list[Sample]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i, seconds in enumerate((1.2, 0.8)):
        ids = [5 + i, 502, 7, 8, 9 + i, 10]
        labels = [IGNORE] * 4 + ids[4:]  # two answer tokens each
        out.append(Sample(input_ids=ids, labels=labels,
                          speech=[torch.randn(int(16000 * seconds), generator=g) * 0.1],
                          transcripts=[torch.randint(0, 400, (3,), generator=g).tolist()]))
    return out


def batch_of(items):
    return collate(items, PLACEHOLDERS, PAD)


def trainable_state(stage) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in stage.named_parameters()}


class Losses(L.Callback):
    def __init__(self):
        self.values = []
        self.lrs = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


_SCRIPT = textwrap.dedent("""
    import json, sys, torch, lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    sys.path.insert(0, TESTS)
    from test_distributed import STAGE, Losses, samples, batch_of, trainable_state
    from lyra_pl.cli import close_process_group
    from lyra_pl.training.parallelize import FSDP2Strategy
    from lyra_pl.training.stages import JointSFTStage
    devices, epochs, ckpt = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    WEIGHTS = json.loads(sys.argv[4])

    class StopAfter(L.Callback):  # an interrupted run: the schedule still spans 4 epochs
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = trainer.current_epoch + 1 >= epochs
    L.seed_everything(0)
    stage = JointSFTStage(**STAGE, **WEIGHTS)
    if devices == 2:  # the distributed sampler gives each rank one of the two samples
        data = torch.utils.data.DataLoader(samples(), batch_size=1, collate_fn=batch_of)
    else:  # one rank: both samples in its batch
        data = torch.utils.data.DataLoader([samples()], batch_size=1,
                                           collate_fn=lambda x: batch_of(x[0]))
    losses = Losses()
    trainer = L.Trainer(max_epochs=4, accelerator="cpu", devices=devices,
                        strategy=FSDP2Strategy(), logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=".",
                        callbacks=[losses, StopAfter(), ModelCheckpoint(f"ckpt_{devices}_{epochs}", save_last=True,
                                                           save_top_k=0)])
    trainer.fit(stage, data, ckpt_path=None if ckpt == "none" else ckpt)
    state = trainer_state = trainable_state(stage)  # every rank gathers
    from lyra_pl.training.parallelize import parameter_share
    held, sharded, whole = parameter_share(stage.model)
    out = {"losses": losses.values, "lrs": losses.lrs, "held": held, "sharded": sharded,
           "whole": whole, "encoders": sum(p.numel() for p in [
               *stage.model.visual.parameters(), *stage.model.audio_encoder.parameters()]),
           "type": type(next(stage.model.speech_projector.parameters())).__name__}
    stage.save_model(f"export_{devices}_{epochs}")  # every rank gathers, rank 0 writes
    if trainer.global_rank == 0:
        torch.save(state, f"state_{devices}_{epochs}.pt")
    json.dump(out, open(f"rank{trainer.global_rank}_{devices}_{epochs}.json", "w"))
    close_process_group()  # as `lyra-pl` does: gloo can abort the exit otherwise
""")


def launch(tmp_path: Path, devices: int, epochs: int, weights: dict[str, str],
           ckpt: str = "none") -> list[dict]:
    script = tmp_path / "fsdp2_run.py"  # Lightning relaunches sys.argv: a file, not -c
    tests = Path(__file__).resolve().parent
    script.write_text(f"TESTS = {str(tests)!r}\n" + _SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(devices), str(epochs), ckpt,
                           json.dumps(weights)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads((tmp_path / f"rank{r}_{devices}_{epochs}.json").read_text())
            for r in range(devices)]


def single_process(epochs: int, weights: dict[str, str]
                   ) -> tuple[list[float], dict[str, torch.Tensor]]:
    L.seed_everything(0)
    stage = JointSFTStage(**STAGE, **weights)
    both = torch.utils.data.DataLoader([samples()], batch_size=1, collate_fn=lambda x: batch_of(x[0]))
    losses = Losses()
    L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              callbacks=[losses]).fit(stage, both)
    return losses.values, trainable_state(stage)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fsdp2_two_processes_match_one_and_resume(tmp_path):
    weights = make_weights(tmp_path / "weights")
    ref_losses, ref_state = single_process(4, weights)

    ranks = launch(tmp_path, devices=2, epochs=2, weights=weights)
    for r in ranks:  # each rank holds about half of every sharded parameter; only the
        assert r["type"] == "DTensor"  # frozen encoders (replicated) are held whole
        assert 0.45 < r["held"] / r["sharded"] < 0.55, r
        assert r["whole"] == r["encoders"], r
    mean = [sum(v) / 2 for v in zip(*(r["losses"] for r in ranks))]
    assert mean[1] < mean[0]  # it learns
    torch.testing.assert_close(torch.tensor(mean), torch.tensor(ref_losses[:2]),
                               rtol=1e-4, atol=1e-5)
    ckpt = tmp_path / "ckpt_2_2" / "last.ckpt"
    assert ckpt.is_dir(), "expected a distributed (sharded) checkpoint directory"
    assert len(list(ckpt.glob("*.distcp"))) == 2  # one shard file per rank

    # the stage hand-off export of a sharded model: gathered, written once
    from safetensors.torch import load_file
    state = torch.load(tmp_path / "state_2_2.pt")
    saved = load_file(tmp_path / "export_2_2" / "speech_projector.safetensors")
    for k, v in saved.items():
        torch.testing.assert_close(v, state[f"model.speech_projector.{k}"], rtol=0, atol=0)
    assert (tmp_path / "export_2_2" / "adapter_speech" / "adapter_model.safetensors").is_file()

    for devices in (2, 1):  # resume on the same and on a different number of ranks
        resumed = launch(tmp_path, devices=devices, epochs=4, weights=weights, ckpt=str(ckpt))
        mean = [sum(v) / devices for v in zip(*(r["losses"] for r in resumed))]
        torch.testing.assert_close(torch.tensor(mean), torch.tensor(ref_losses[2:]),
                                   rtol=1e-4, atol=1e-5)
        state = torch.load(tmp_path / f"state_{devices}_4.pt")
        assert state.keys() == ref_state.keys()
        for k in ref_state:
            # Adam divides by sqrt(v): gradient-reduction order differences (~1e-7) can move
            # a near-zero-gradient weight by up to ~lr * 1e-2 after four steps at lr 1e-2.
            torch.testing.assert_close(state[k], ref_state[k], rtol=1e-3, atol=2e-4,
                                       msg=lambda m: f"{devices} rank(s), {k}: {m}")


_MIXED = textwrap.dedent("""
    import sys, torch, lightning as L
    sys.path.insert(0, TESTS)
    from test_distributed import STAGE, samples, batch_of
    from lyra_pl.cli import close_process_group
    from lyra_pl.model.inputs import Sample
    from lyra_pl.training.parallelize import FSDP2Strategy
    from lyra_pl.training.stages import LongSpeechStage
    L.seed_everything(0)
    text = Sample(input_ids=[5, 7, 8, 9, 10], labels=[-100, -100, -100, 9, 10])
    data = torch.utils.data.DataLoader([samples()[0], text], batch_size=1, collate_fn=batch_of)
    stage = LongSpeechStage(**{**STAGE, "lr": 1e-2})  # LMME on as well


    class LoraCalls(L.Callback):  # forward calls of the adapter's LoRA linears
        calls = 0

        def count(self, *_):
            self.calls += 1

        def on_train_start(self, trainer, pl_module):
            for m in pl_module.model.llm.modules():
                for attr in ("lora_A", "lora_B"):
                    for linear in getattr(m, attr, {}).values():
                        linear.register_forward_hook(self.count)
    calls = LoraCalls()
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=2, strategy=FSDP2Strategy(),
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=[calls])
    trainer.fit(stage, data)
    moved = float(next(stage.model.speech_projector.parameters()).full_tensor().abs().sum())
    open(f"mixed{trainer.global_rank}.txt", "w").write(f"{moved} {calls.calls}")
    close_process_group()  # as `lyra-pl` does: gloo can abort the exit otherwise
""")


def test_fsdp2_ranks_with_different_modalities(tmp_path):
    """One rank trains on a spoken sample, the other on a text-only one (its batch selects no
    adapter and never uses the speech projector): the uniform-graph hooks keep both ranks'
    gradient reductions identical, so training neither hangs nor crashes on a collective
    mismatch, and both ranks see the same (gathered) weights. Neither batch selects the
    ``long_speech`` adapter (the clip is short): it runs no LoRA matmul on either rank."""
    script = tmp_path / "mixed.py"
    script.write_text(f"TESTS = {str(Path(__file__).resolve().parent)!r}\n" + _MIXED)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (a, calls_a), (b, calls_b) = (map(float, (tmp_path / f"mixed{r}.txt").read_text().split())
                                  for r in (0, 1))
    assert a == pytest.approx(b, rel=1e-6)
    assert calls_a == calls_b == 0


_SYNCED = textwrap.dedent("""
    import sys, torch, lightning as L
    sys.path.insert(0, TESTS)
    from test_distributed import STAGE, samples, batch_of
    from lyra_pl.cli import close_process_group
    from lyra_pl.training.parallelize import FSDP2Strategy, unsharded_root
    from lyra_pl.training.stages import JointSFTStage
    L.seed_everything(0)
    data = torch.utils.data.DataLoader(samples(), batch_size=1, collate_fn=batch_of)
    stage = JointSFTStage(**STAGE)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=2, strategy=FSDP2Strategy(),
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    trainer.fit(stage, data)
    rank = trainer.global_rank
    # rank 0 stops at its first token (every id is an eos), rank 1 never stops early
    eos = list(range(stage.config.vocab_size)) if rank == 0 else []
    inputs = batch_of([samples()[rank]])
    with torch.no_grad(), unsharded_root(stage.model) as model:
        out = model.generate(inputs, max_new_tokens=6, eos_token_ids=eos, synced=True)
    open(f"synced{rank}.txt", "w").write(str(len(out.tokens[0])))
    close_process_group()  # as `lyra-pl` does: gloo can abort the exit otherwise
""")


def test_sharded_generation_keeps_ranks_in_step(tmp_path):
    """Under FSDP2 a rank whose samples finish early keeps decoding (and so joining the layers'
    all-gathers) until every rank is done: without ``synced`` this run would hang."""
    script = tmp_path / "synced.py"
    script.write_text(f"TESTS = {str(Path(__file__).resolve().parent)!r}\n" + _SYNCED)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert [int((tmp_path / f"synced{r}.txt").read_text()) for r in (0, 1)] == [1, 6]


_EVAL = textwrap.dedent("""
    import json, sys, torch, lightning as L
    sys.path.insert(0, TESTS)
    from test_distributed import STAGE, samples, batch_of
    from lyra_pl.cli import close_process_group
    from lyra_pl.eval.runner import EvalTask
    from lyra_pl.training.parallelize import FSDP2Strategy
    from lyra_pl.training.stages import JointSFTStage
    devices, weights = int(sys.argv[1]), json.loads(sys.argv[2])
    L.seed_everything(0)
    data = torch.utils.data.DataLoader(samples(), batch_size=1, collate_fn=batch_of)


    class Counted(JointSFTStage):  # which generation calls each rank makes
        calls = []

        def predict_step(self, batch, batch_idx):
            self.calls.append(batch_idx)
            return super().predict_step(batch, batch_idx)

    stage = Counted(**{**STAGE, "lr": 0.0}, **weights)  # the same weights in both runs
    task = EvalTask("docvqa", tokenizer="data/tiny/tokenizer", batch_size=4, limit_batches=3,
                    max_new_tokens=4)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=devices, strategy=FSDP2Strategy(),
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=1, val_check_interval=1,
                        num_sanity_val_steps=0,
                        default_root_dir=f"run{devices}", callbacks=[task])
    trainer.fit(stage, data, data)
    json.dump(stage.calls, open(f"calls{devices}_{trainer.global_rank}.json", "w"))
    close_process_group()
""")


def test_eval_task_shares_batches_across_ranks(tmp_path):
    """EvalTask under FSDP2 on two ranks: three batches dealt as 0, 2 | 1, (2 again, dropped),
    so neither rank waits on the other's collectives; the gathered answers are the one-rank
    run's, in the same order, none lost or doubled."""
    weights = make_weights(tmp_path / "weights")
    script = tmp_path / "eval_task.py"
    script.write_text(f"TESTS = {str(Path(__file__).resolve().parent)!r}\n" + _EVAL)
    out = {}
    for devices in (2, 1):
        proc = subprocess.run([sys.executable, str(script), str(devices), json.dumps(weights)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        d = tmp_path / f"run{devices}" / "eval" / "docvqa"
        rows = [json.loads(line) for line in (d / "step1.predictions.jsonl").open()]
        out[devices] = rows, json.loads((d / "step1.json").read_text())["scores"]
    (two, two_scores), (one, one_scores) = out[2], out[1]
    keys = [(r["key"], r["variant"]) for r in one]
    assert len(one) == 12 and len(set(keys)) == 12  # three batches of four
    assert [(r["key"], r["variant"]) for r in two] == keys
    assert [r["prediction"] for r in two] == [r["prediction"] for r in one]
    assert two_scores == one_scores
    calls = [json.loads((tmp_path / f"calls2_{r}.json").read_text()) for r in (0, 1)]
    assert calls == [[0, 2], [1, 3]]  # 3: batch 2 again, its answers dropped
    assert json.loads((tmp_path / "calls1_0.json").read_text()) == [0, 1, 2]


_VALIDATE = textwrap.dedent("""
    import json, sys, lightning as L
    from lyra_pl.cli import close_process_group
    from lyra_pl.data.datamodule import LyraDataModule
    from lyra_pl.training.parallelize import FSDP2Strategy
    from lyra_pl.training.stages import SpeechAlignStage
    devices, shards, tokenizer = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    weights = json.loads(sys.argv[4])


    class Seen(L.Callback):  # the samples each rank validates (padding batches aside)
        keys = []

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx,
                                      dataloader_idx=0):
            if not batch["padding"]:
                self.keys += batch["keys"]

    dm = LyraDataModule(val=shards, tokenizer=tokenizer, batch_size=1)
    stage = SpeechAlignStage(**weights, param_dtype=None, reduce_dtype=None)
    trainer = L.Trainer(accelerator="cpu", devices=devices, logger=False,
                        strategy=FSDP2Strategy() if devices > 1 else "auto",
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Seen()])
    metrics = trainer.validate(stage, datamodule=dm)[0]
    json.dump({"keys": Seen.keys, "metrics": metrics},
              open(f"val{devices}_{trainer.global_rank}.json", "w"))
    close_process_group()
""")


def test_validation_covers_every_sample_once_on_any_number_of_ranks(tmp_path, color_dataset):
    """Issue 12: ranks split the validation set by shard and stopped at the smallest share, so
    a rank count that did not divide the shards validated fewer samples (none at all with
    fewer shards than ranks), silently, and ``sync_dist`` averaged the ranks' means as if
    they held equal shares. Now, under FSDP2 on 1, 2 and 3 processes, each of 13 samples (5
    shards) is validated by exactly one rank (on 3: 4, 4 and 5, the first two ranks adding a
    padding batch), ``val/samples`` says 13 on every rank, and
    ``val/loss`` (one sample per batch, so the mean of the per-sample losses whatever the
    split) is the one-process value."""
    weights = make_weights(tmp_path / "weights")
    (tmp_path / "data").mkdir()
    data = color_dataset(tmp_path / "data", 13, samples_per_shard=3)
    script = tmp_path / "validate.py"
    script.write_text(_VALIDATE)
    loss = {}
    for devices in (1, 2, 3):
        proc = subprocess.run([sys.executable, str(script), str(devices), str(data["shards"]),
                               str(data["tokenizer"]), json.dumps(weights)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        ranks = [json.loads((tmp_path / f"val{devices}_{r}.json").read_text())
                 for r in range(devices)]
        keys = [k for r in ranks for k in r["keys"]]
        assert sorted(keys) == [f"s{i:02d}" for i in range(13)], devices  # each once
        for r in ranks:  # every rank reports the same whole-set numbers
            assert r["metrics"]["val/samples"] == 13
            assert r["metrics"] == ranks[0]["metrics"]
        loss[devices] = ranks[0]["metrics"]["val/loss"]
    assert loss[2] == pytest.approx(loss[1], rel=1e-5)
    assert loss[3] == pytest.approx(loss[1], rel=1e-5)
