"""Context parallelism on CPU (gloo): 2 and 4 processes, CP alone and CP x FSDP (2 x 2), on the
tiny preset with a long-speech batch (several Whisper windows, an image, two samples of
different lengths, right padding, LCMR transcripts, an active LoRA adapter). The loss, the
LMME keep sets and the parameter gradients equal the one-process run; so does a resumed run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

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


# One per data-parallel replica: 3 and 5 Whisper windows (under CP 4 a rank encodes none).
BATCHES = [(1, (45.0, 12.0)), (2, (33.0, 62.0))]


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


# ----------------------------------------------------------------------------- Lightning
def write_long_speech_dataset(root: Path, n: int = 6) -> dict[str, Path]:
    """``n`` official-format long-speech samples (31-66 s FLAC and MP3 recordings, a question
    and a one-word answer), a tiny tokenizer and their shards."""
    from lyra_pl.data import encode
    from lyra_pl.data.convert import convert
    from lyra_pl.data.tokenizer import build_tiny_tokenizer

    samples, texts = [], []
    for i in range(n):
        seconds, suffix = 31.0 + 7 * i, (".flac", ".mp3")[i % 2]
        path = encode.write_audio(root / f"talk{i}{suffix}",
                                  encode.tone(seconds, 16000, 1, freq=220.0 + 40 * i), 16000)
        answer = ("low", "high", "middle")[i % 3]
        question = f"Is talk number {i} low or high?"
        texts.append(question + " " + answer)
        samples.append({"id": f"l{i}", "long_speech": path.name,
                        "conversations": [{"from": "human", "value": "<speech>\n" + question},
                                          {"from": "gpt", "value": answer}]})
    (root / "data.json").write_text(json.dumps(samples))
    build_tiny_tokenizer(texts * 20 + ["<|im_start|>system\nYou are a helpful assistant."
                                       "<|im_end|>\n<|im_start|>user\n",
                                       "abcdefghijklmnopqrstuvwxyz " * 30,
                                       " ".join(str(k) for k in range(300))], root / "tokenizer")
    convert(root / "data.json", root / "shards", samples_per_shard=2, progress=False)
    return {"shards": root / "shards", "tokenizer": root / "tokenizer"}


def write_weights(root: Path) -> dict[str, str]:
    """Base checkpoints and a stage-2-style export with a trained ``long_speech`` adapter, which
    the one-process and the sharded runs both load (a sharded run draws its random init per
    shard, so shared weights, not a shared seed, make the runs comparable)."""
    from lyra_pl.model.loading import save_parts, save_qwen2vl, save_whisper

    model = build(lmme=False)
    save_qwen2vl(model, root / "qwen2vl")
    save_whisper(model, root / "whisper")
    save_parts(model, root / "export")
    lora.save_adapter(model.llm, "long_speech", root / "export" / "adapter_long_speech")
    return {"qwen2vl": str(root / "qwen2vl"), "whisper": str(root / "whisper"),
            "init_from": str(root / "export")}


_FIT = textwrap.dedent("""
    import json, sys, lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lyra_pl.cli import close_process_group
    from lyra_pl.data.datamodule import LyraDataModule
    from lyra_pl.training.parallelize import FSDP2Strategy
    from lyra_pl.training.stages import LongSpeechStage
    devices, cp, kill_at, ckpt, data, weights = (int(sys.argv[1]), int(sys.argv[2]),
        int(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5]), json.loads(sys.argv[6]))


    class Killed(Exception):
        pass


    class Record(L.Callback):  # each step's batch keys and loss; dies before step kill_at
        steps = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == kill_at:
                raise Killed

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.steps.append([batch["keys"], float(outputs["loss"])])

    L.seed_everything(0)
    stage = LongSpeechStage(lora_r=4, lora_alpha=8, lora_dropout=0.0, lr=1e-2, warmup_ratio=0.0,
                            param_dtype=None, reduce_dtype=None, context_parallel=cp,
                            max_new_tokens=3, model_overrides={"lmme_min_keep": 4}, **weights)
    dm = LyraDataModule(train=data["shards"], val=data["shards"], predict=data["shards"],
                        tokenizer=data["tokenizer"], batch_size=2, num_workers=0)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=devices, logger=False,
                        strategy=FSDP2Strategy() if devices > 1 else "auto",
                        enable_progress_bar=False, enable_model_summary=False,
                        check_val_every_n_epoch=2, num_sanity_val_steps=0,
                        callbacks=[Record(), ModelCheckpoint("ckpt", save_last=True, save_top_k=0,
                                                             every_n_train_steps=1)])
    rank, out = trainer.global_rank, {}
    try:
        trainer.fit(stage, datamodule=dm, ckpt_path=None if ckpt == "none" else ckpt)
        out["val"] = {k: float(v) for k, v in trainer.callback_metrics.items()
                      if k.startswith("val/")}
        out["predicted"] = [k for b in trainer.predict(stage, datamodule=dm) for k in b["keys"]
                            if not b.get("padding")]
        stage.save_model("export")  # every rank gathers, rank 0 writes
    except Killed:
        pass
    out["steps"] = Record.steps
    json.dump(out, open(f"{sys.argv[7]}_rank{rank}.json", "w"))
    close_process_group()
""")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_context_parallel_fit_resumes_exactly(tmp_path):
    """Stage 3 (LMME, long_speech LoRA) on long FLAC/MP3 recordings under CP 2 (two gloo
    processes, one data-parallel replica): killed mid-epoch and resumed from its last
    checkpoint, it sees the one-process run's batches and losses, step for step; both CP
    ranks see the same batches; validation counts each sample once; prediction (whole
    sequences, samples shared over both ranks) answers each sample once; the export works."""
    data = write_long_speech_dataset(tmp_path)
    weights = write_weights(tmp_path)
    script = tmp_path / "cp_fit.py"  # Lightning relaunches sys.argv: a file, not -c
    script.write_text(_FIT)

    def run(name, devices, cp, kill_at=-1, ckpt="none"):
        args = [sys.executable, str(script), str(devices), str(cp), str(kill_at), ckpt,
                json.dumps({k: str(v) for k, v in data.items()}), json.dumps(weights), name]
        proc = subprocess.run(args, cwd=tmp_path / name, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return [json.loads((tmp_path / name / f"{name}_rank{r}.json").read_text())
                for r in range(devices)]

    for name in ("one", "cp"):
        (tmp_path / name).mkdir()
    (one,) = run("one", 1, 1)
    assert len(one["steps"]) == 6  # 6 samples, batches of 2, 2 epochs
    killed = run("cp", 2, 2, kill_at=4)  # mid-epoch 1
    resumed = run("cp", 2, 2, ckpt=str(tmp_path / "cp" / "ckpt" / "last.ckpt"))
    ranks = [k["steps"] + r["steps"] for k, r in zip(killed, resumed)]
    assert ranks[0] == ranks[1]  # the CP group trains on the same batches, with one loss
    assert [keys for keys, _ in ranks[0]] == [keys for keys, _ in one["steps"]]
    torch.testing.assert_close(torch.tensor([loss for _, loss in ranks[0]]),
                               torch.tensor([loss for _, loss in one["steps"]]),
                               rtol=1e-4, atol=1e-5)
    for r in resumed:
        assert r["val"]["val/samples"] == 6  # the group's copies are counted once
        torch.testing.assert_close(r["val"]["val/loss"], one["val"]["val/loss"], rtol=1e-4,
                                   atol=1e-5)
    predicted = resumed[0]["predicted"] + resumed[1]["predicted"]
    assert sorted(predicted) == sorted(one["predicted"]) == [f"l{i}" for i in range(6)]
    assert (tmp_path / "cp" / "export" / "adapter_long_speech" / "adapter_config.json").is_file()


def test_context_parallel_settings_are_one_line_before_anything_starts(tmp_path, monkeypatch,
                                                                        capsys):
    from test_cli import _fit_error

    stage3 = str(Path(__file__).resolve().parents[1] / "configs/tiny/stage3_long_speech.yaml")
    cp2 = ["--config", stage3, "--model.init_args.context_parallel=2"]
    err = _fit_error(cp2, tmp_path, monkeypatch, capsys)
    assert ("--model.init_args.context_parallel 2 needs --trainer.strategy "
            "lyra_pl.training.parallelize.FSDP2Strategy") in err
    fsdp2 = "--trainer.strategy=lyra_pl.training.parallelize.FSDP2Strategy"
    err = _fit_error([*cp2, fsdp2, "--trainer.devices=3"], tmp_path, monkeypatch, capsys)
    assert "context_parallel 2 does not divide the 3 ranks of the job" in err
    err = _fit_error([*cp2, fsdp2, "--trainer.devices=2", "--trainer.num_nodes=2",
                      "--model.init_args.context_parallel=4"], tmp_path, monkeypatch, capsys)
    assert "does not divide the 2 ranks of a node: a group would span two nodes" in err
    from lyra_pl.training.stages import LongSpeechStage, SpeechGenStage

    with pytest.raises(ValueError, match="speech generator on whole sequences"):
        SpeechGenStage(context_parallel=2)
    with pytest.raises(ValueError, match="compile=True"):
        LongSpeechStage(context_parallel=2, compile=True)
