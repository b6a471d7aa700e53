"""The four training stages on the tiny preset: what trains in each, short CPU fits (loss, which
weights move, the warmup-then-cosine schedule, stage-specific logs), and the hand-off of weights
from one stage to the next through ``save_model`` / ``init_from``."""
from __future__ import annotations

import logging
import math
import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning.pytorch.callbacks import ModelCheckpoint

from lyra_pl.model import lora
from lyra_pl.model.assemble import IGNORE
from lyra_pl.model.audio import AudioBatch
from lyra_pl.model.info import parameter_rows
from lyra_pl.model.inputs import LyraInputs
from lyra_pl.training.stages import (
    JointSFTStage,
    LongSpeechStage,
    SpeechAlignStage,
    SpeechGenStage,
)

SPEECH, SOUND = 502, 503
SMALL_LORA = dict(lora_r=4, lora_alpha=8)  # the default ranks train too; small keeps CI fast


def speech_batch(seed: int, seconds: tuple[float, float] = (2.0, 1.5), transcripts: bool = False,
                 units: bool = False) -> LyraInputs | dict:
    """Two samples, one speech clip each; the last two real tokens of each are the answer."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[5, SPEECH, 6, 7, 8, 9], [SPEECH, 10, 11, 12, 13, 0]])
    ids[ids == 0] = 506  # padding (ignored: lengths say where samples end)
    lengths = torch.tensor([6, 5])
    labels = torch.full_like(ids, IGNORE)
    labels[0, 4:6] = ids[0, 4:6]
    labels[1, 3:5] = ids[1, 3:5]
    clips = [torch.randn(int(16000 * s), generator=g) * 0.1 for s in seconds]
    kw = {}
    if transcripts:
        kw = dict(transcript_ids=torch.randint(0, 400, (2, 4), generator=g),
                  transcript_lengths=torch.tensor([4, 3]))
    inputs = LyraInputs(ids, lengths, labels=labels, speech=AudioBatch.from_list(clips), **kw)
    if not units:
        return inputs
    return {"inputs": inputs, "units": torch.randint(0, 1000, (2, 6), generator=g),
            "unit_lengths": torch.tensor([6, 4])}


def loader(batches: list) -> DataLoader:
    return DataLoader(batches, batch_size=1, collate_fn=lambda x: x[0])


class Recorder(L.Callback):
    """The lr of every optimizer step, and which parameters had gradients."""

    def __init__(self):
        self.lrs: list[float] = []
        self.with_grad: set[str] = set()
        self.llm_training: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.llm_training.append(pl_module.model.llm.training)

    def on_after_backward(self, trainer, pl_module):
        self.with_grad |= {n for n, p in pl_module.named_parameters() if p.grad is not None}


# stage class, its batches' kwargs, the components that must train (the first one is trained by
# these batches), the adapters that must train
CASES = {
    "stage1": (SpeechAlignStage, dict(), ("speech_projector",), ()),
    "stage2": (JointSFTStage, dict(transcripts=True), ("speech_projector", "sound_projector"),
               ("speech", "sound")),
    "stage3": (LongSpeechStage, dict(seconds=(31.0, 2.0)), ("speech_projector",),
               ("long_speech",)),
    "stage4": (SpeechGenStage, dict(units=True), ("speech_generator",), ()),
}


def of_adapter(name: str, adapters) -> bool:
    """Whether a parameter name belongs to one of ``adapters`` (peft: ``lora_A.<adapter>.``)."""
    return any(f".{a}." in name for a in adapters)


def make(cls, **kw):
    if cls in (JointSFTStage, LongSpeechStage):
        kw = {**SMALL_LORA, **kw}
    return cls(**kw)


# ----------------------------------------------------------------------------- what trains
@pytest.mark.parametrize("case", list(CASES))
def test_trainable_set_per_stage(case):
    cls, _, parts, adapters = CASES[case]
    torch.manual_seed(0)
    stage = make(cls)
    stage.configure_model()
    stage.configure_model()  # idempotent
    model = stage.model
    trains = {row for row, (t, _) in parameter_rows(model).items() if t}
    assert trains == set(parts) | {f"lora:{a}" for a in adapters}
    for row, (t, f) in parameter_rows(model).items():
        assert (t == 0) or (f == 0), f"{row} is partly trainable"
    assert lora.adapter_names(model.llm) == list(adapters)
    for name, p in model.named_parameters():
        component = name.split(".")[0]
        component = "vision" if component == "visual" else component
        if ".lora_" in name:
            assert p.requires_grad == of_adapter(name, adapters), name
        else:
            assert p.requires_grad == (component in parts), name


def test_stage2_without_sound():
    stage = make(JointSFTStage, sound=False)
    stage.configure_model()
    trains = {row for row, (t, _) in parameter_rows(stage.model).items() if t}
    assert trains == {"speech_projector", "lora:speech"}


def test_stage_defaults_follow_spec():
    s1, s2 = SpeechAlignStage(), JointSFTStage()
    s3, s4 = LongSpeechStage(), SpeechGenStage()
    assert (s1.lr, s2.lr, s3.lr, s4.lr) == (1e-3, 2e-4, 1e-4, 2e-4)
    assert (s1.warmup_ratio, s4.warmup_ratio) == (0.03, 0.09)
    assert all(s.weight_decay == 0.0 for s in (s1, s2, s3, s4))
    assert (s1.config.lcmr_weight, s2.config.lcmr_weight, s3.config.lcmr_weight) == (0, 0.5, 0)
    assert (s2.lora_spec.r, s2.lora_spec.alpha, s3.lora_spec.r, s3.lora_spec.alpha) == \
        (64, 16, 128, 256)
    assert (s3.config.lmme_blocks, s3.config.lmme_keep_ratio) == (4, 0.7)
    assert s3.config.lmme_layers() == (0, 1, 2)  # tiny: 4 layers, valid
    # fewer layers than blocks: the default shrinks, an explicit value is the user's to fix
    assert LongSpeechStage(model_overrides={"num_layers": 2}).config.lmme_blocks == 2
    with pytest.raises(ValueError, match="lmme_blocks"):
        LongSpeechStage(model_overrides={"num_layers": 2, "lmme_blocks": 4})
    assert s2.hparams["lora_r"] == 64 and s4.hparams["warmup_ratio"] == 0.09


# ----------------------------------------------------------------------------- fitting
@pytest.mark.parametrize("case", list(CASES))
def test_fit_each_stage(case, caplog):
    cls, batch_kw, parts, adapters = CASES[case]
    torch.manual_seed(0)
    lr = 1e-2
    stage = make(cls, lr=lr, warmup_ratio=0.5)
    stage.configure_model()
    model = stage.model
    trained = next(getattr(model, parts[0]).parameters())
    frozen = model.llm.layers[0].mlp.up_proj
    frozen = getattr(frozen, "base_layer", frozen).weight
    before = trained.detach().clone(), frozen.detach().clone()
    recorder = Recorder()
    trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[recorder])
    batches = [speech_batch(i, **batch_kw) for i in range(4)]
    caplog.set_level(logging.INFO)
    logging.getLogger("lightning").addHandler(caplog.handler)
    try:
        trainer.fit(stage, loader(batches), loader(batches[:1]))
    finally:
        logging.getLogger("lightning").removeHandler(caplog.handler)

    m = trainer.callback_metrics
    assert math.isfinite(float(m["train/loss"])) and math.isfinite(float(m["val/loss"]))
    assert float(m["train/tokens"]) > 0 and "train/lr" in m
    # warmup over ceil(0.5 * 4) = 2 steps from 0, then cosine down (half way at the last step)
    assert recorder.lrs == pytest.approx([0.0, lr / 2, lr, lr / 2])
    assert not torch.equal(trained, before[0]), "a trainable weight did not move"
    assert torch.equal(frozen, before[1]), "a frozen weight moved"
    assert recorder.with_grad
    assert all(n.split(".")[1] in {"visual" if p == "vision" else p for p in parts}
               or of_adapter(n, adapters) for n in recorder.with_grad)

    table = caplog.text
    assert "trainable vs frozen" in table
    for part in [*parts, *(f"lora:{a}" for a in adapters)]:
        assert part in table

    # a fully frozen LLM runs in eval mode (no dropout); one with a trained adapter trains
    assert recorder.llm_training == [bool(adapters)] * 4
    if case == "stage1":
        assert "train/lcmr" not in m
    if case == "stage2":
        assert float(m["train/lcmr"]) > 0 and "val/lcmr" in m
    if case == "stage3":
        ratios = [float(m[f"train/kept_ratio_block{j}"]) for j in range(3)]
        assert all(0 < r < 1 for r in ratios), ratios
    if case == "stage4":
        assert float(m["train/generator"]) == pytest.approx(float(m["train/loss"]))
        assert recorder.with_grad and all(n.startswith("model.speech_generator.")
                                          for n in recorder.with_grad)
        assert not any(p.requires_grad for p in model.llm.parameters())
        out = stage(batches[0])  # the LLM records no graph: its states have no grad_fn
        assert out.state.hidden.grad_fn is None and out.generator_loss.requires_grad


def sound_batch() -> LyraInputs:
    """Two sound clips, a low tone and a noise burst, each answered by its own two tokens."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(8000) / 16000
    clips = [0.5 * torch.sin(2 * math.pi * 200 * t), torch.rand(6000, generator=g) - 0.5]
    ids = torch.tensor([[5, SOUND, 6, 40, 41], [5, SOUND, 6, 50, 51]])
    labels = torch.full_like(ids, IGNORE)
    labels[:, 3:] = ids[:, 3:]
    return LyraInputs(ids, torch.tensor([5, 5]), labels=labels, sound=AudioBatch.from_list(clips))


def test_stage2_trains_sound():
    """Stage 2's sound samples train the sound projector and the ``sound`` adapter, which MLoRA
    runs on sound batches, and nothing else (Whisper stays frozen): their loss falls."""
    torch.manual_seed(0)
    stage = make(JointSFTStage, lr=1e-2, warmup_ratio=0.0, lora_dropout=0.0)
    stage.configure_model()
    model = stage.model
    batch = sound_batch()
    assert model.adapters_for(batch) == ["sound"]

    def ce() -> float:
        model.eval()
        with torch.no_grad():
            return float(stage(batch).ce_loss)

    before = ce()
    whisper = [p.detach().clone() for p in model.audio_encoder.parameters()]
    recorder = Recorder()
    L.Trainer(max_steps=30, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder]
              ).fit(stage, loader([batch] * 30))
    after = ce()
    assert after < before - 1.0, (before, after)  # 6.47 -> 4.10 when written
    assert {n.split(".")[1] for n in recorder.with_grad} == {"sound_projector", "llm"}
    assert all(".sound." in n for n in recorder.with_grad if ".llm." in n)
    assert all(torch.equal(a, b) for a, b in zip(whisper, model.audio_encoder.parameters()))


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.filterwarnings("ignore:`training_step` returned `None`")
def test_batches_that_miss_the_trained_adapter():
    """A text-only batch in stage 2 runs the base model (MLoRA): nothing trainable ran, so on
    one process the step is skipped (no loss to backward, no weight moves), no crash.
    Stage 3 warns when a batch's speech is too short to run its long_speech adapter."""
    text = LyraInputs(torch.tensor([[5, 6, 7, 8]]),
                      labels=torch.tensor([[IGNORE, IGNORE, 7, 8]]))
    stage = make(JointSFTStage)
    stage.configure_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = stage.training_step(text, 0)
    assert not [w for w in caught if "adapter" in str(w.message)]
    assert loss is None and "train/loss" in stage.step_metrics  # still logged
    before = [p.detach().clone() for p in stage.trainable_parameters()]
    L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False
              ).fit(stage, loader([text] * 2))
    assert all(torch.equal(a, b) for a, b in zip(before, stage.trainable_parameters()))
    stage3 = make(LongSpeechStage)
    stage3.configure_model()
    with pytest.warns(UserWarning, match="long_speech"):
        stage3.training_step(speech_batch(0), 0)


def test_stage4_needs_unit_targets():
    stage = SpeechGenStage()
    stage.configure_model()
    with pytest.raises(ValueError, match="units"):
        stage(speech_batch(0))


# ----------------------------------------------------------------------------- hand-off
def test_handoff_stage1_to_2_to_3(tmp_path):
    torch.manual_seed(1)
    s1 = SpeechAlignStage()
    s1.configure_model()
    with torch.no_grad():  # stands in for stage 1's training
        for p in s1.model.speech_projector.parameters():
            p.add_(torch.randn_like(p))
    s1.save_model(tmp_path / "s1")
    assert (tmp_path / "s1" / "config.json").is_file()

    torch.manual_seed(2)
    s2 = JointSFTStage(init_from=str(tmp_path / "s1"), **SMALL_LORA)
    s2.configure_model()
    for a, b in zip(s1.model.speech_projector.state_dict().values(),
                    s2.model.speech_projector.state_dict().values()):
        assert torch.equal(a, b)
    assert lora.adapter_names(s2.model.llm) == ["speech", "sound"]
    with torch.no_grad():  # stage 2's training of its adapters and the sound projector
        for n, p in s2.model.llm.named_parameters():
            if ".lora_B.speech." in n or ".lora_B.sound." in n:
                p.add_(torch.randn_like(p))
        for p in s2.model.sound_projector.parameters():
            p.add_(torch.randn_like(p))
    s2.save_model(tmp_path / "s2")

    s3 = LongSpeechStage(init_from=str(tmp_path / "s2"), **SMALL_LORA)
    s3.configure_model()
    assert sorted(lora.adapter_names(s3.model.llm)) == ["long_speech", "sound", "speech"]
    p2 = dict(s2.model.llm.named_parameters())
    for n, p in s3.model.llm.named_parameters():
        if ".speech." in n or ".sound." in n:  # stage 2's adapters arrive, frozen
            assert torch.equal(p, p2[n]) and not p.requires_grad
    for a, b in zip(s2.model.sound_projector.parameters(), s3.model.sound_projector.parameters()):
        assert torch.equal(a, b) and not b.requires_grad
        if ".long_speech." in n:
            assert p.requires_grad
    with pytest.raises(ValueError, match="different model"):
        JointSFTStage(init_from=str(tmp_path / "s1"),
                      model_overrides={"hidden_size": 64, "mrope_section": (2, 3, 3)}
                      ).configure_model()


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before")
def test_resume_from_lightning_checkpoint(tmp_path):
    """Stopping at step 2 and resuming from Lightning's checkpoint ends where an uninterrupted
    run ends (adapters, optimizer and schedule state restored into a freshly built model)."""
    batches = [speech_batch(0, transcripts=True)] * 4  # same batch: data order cannot matter

    def run(seed, ckpt_path=None, **kw):
        torch.manual_seed(seed)
        stage = make(JointSFTStage, lr=1e-2, warmup_ratio=0.25, lora_dropout=0.0)
        L.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False,
                  enable_progress_bar=False, enable_model_summary=False, **kw
                  ).fit(stage, loader(batches), ckpt_path=ckpt_path)
        return stage.model

    every_2 = ModelCheckpoint(tmp_path, every_n_train_steps=2, save_top_k=-1)
    full = run(0, callbacks=[every_2])
    resumed = run(5, ckpt_path=str(tmp_path / "epoch=0-step=2.ckpt"), enable_checkpointing=False)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
