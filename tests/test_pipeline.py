"""The main job end to end on the tiny preset, shortened to a few steps per stage: the CLI
pipeline (corpus shards converted on first use, stages 0-4 each from the previous export, the
stage-2 evaluation), MLflow runs with params, metrics and artifacts, and stage 2 through
`lyra-pl fit --trainer.devices 2` (FSDP2 over two gloo processes) with a distributed
checkpoint that `--ckpt_path last` resumes."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def lyra_pl(args: list[str], cwd: Path, timeout: int = 600, nproc: int = 1) -> str:
    """`lyra-pl ARGS` in ``cwd``; with ``nproc`` > 1 under torchrun (standalone)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run([sys.executable, *(torchrun if nproc > 1 else []), "-m", "lyra_pl.cli",
                           *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory) -> tuple[Path, str]:
    cwd = tmp_path_factory.mktemp("pipeline")
    out = lyra_pl(["pipeline", "--preset", "tiny", "--trainer.max_steps=3", "--trainer.log_every_n_steps=1",
                   "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2",
                   "--trainer.enable_progress_bar=false"], cwd)
    return cwd, out


def test_pipeline_runs_every_stage_and_the_eval(pipeline_run):
    cwd, out = pipeline_run
    runs = cwd / "runs" / "tiny"
    for stage in ("stage0_base_vlm", "stage1_speech_align", "stage2_joint_sft",
                  "stage3_long_speech", "stage4_speech_gen"):
        assert (runs / stage / "export" / "config.json").is_file(), stage
        assert (runs / stage / "checkpoints" / "last.ckpt").exists(), stage
    base = runs / "stage0_base_vlm" / "export"
    assert (base / "qwen2vl" / "model.safetensors").is_file()
    assert (base / "whisper" / "model.safetensors").is_file()
    assert (runs / "stage2_joint_sft" / "export" / "adapter_speech").is_dir()
    assert (runs / "stage2_joint_sft" / "export" / "adapter_sound").is_dir()  # sound SFT
    assert (runs / "stage3_long_speech" / "export" / "adapter_long_speech").is_dir()
    summary = json.loads((runs / "stage2_joint_sft" / "eval" / "accuracy.json").read_text())
    assert summary["overall"]["n"] == 102  # every held-out stage-2 sample, none dropped
    assert {"speech: all", "text: all", "sound: all"} <= set(summary["groups"])
    assert "trainable vs frozen parameters" in out and "<- trains" in out


def test_mlflow_records_params_metrics_and_artifacts(pipeline_run):
    import mlflow

    cwd, _ = pipeline_run
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lyra_pl-tiny")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])
            if "train/loss" in r.data.metrics}
    assert set(runs) == {"stage0_base_vlm", "stage1_speech_align", "stage2_joint_sft",
                         "stage3_long_speech", "stage4_speech_gen"}
    s2 = runs["stage2_joint_sft"]
    assert s2.data.params["model.init_args.lr"] == "0.002"  # every config value is a param
    assert s2.data.params["data.batch_size"] == "8"
    assert {"train/ce", "train/lcmr", "train/lr", "train/tokens_per_s", "val/loss"} \
        <= set(s2.data.metrics)
    assert "train/kept_ratio_block0" in runs["stage3_long_speech"].data.metrics
    assert "train/generator" in runs["stage4_speech_gen"].data.metrics
    artifacts = [a.path for a in client.list_artifacts(s2.info.run_id)]
    assert "config.yaml" in artifacts
    plots = [a.path for a in client.list_artifacts(s2.info.run_id, "plots")]
    assert "plots/train_loss.png" in plots
    evals = [r for r in client.search_runs([exp.experiment_id]) if "eval/accuracy" in r.data.metrics]
    assert len(evals) == 1 and "eval/speech_accuracy" in evals[0].data.metrics


_CHECKPOINTS = """
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: ckpt, save_last: true, save_top_k: 0, every_n_train_steps: 2}
    - class_path: lyra_pl.training.callbacks.ExportModel
"""


def test_stage2_cli_on_two_processes_shards_and_resumes(pipeline_run):
    cwd, _ = pipeline_run
    (cwd / "ckpt.yaml").write_text(_CHECKPOINTS)
    runs = cwd / "runs" / "tiny"
    args = ["fit", "--config", str(ROOT / "configs/tiny/stage2_joint_sft.yaml"),
            "--config", "ckpt.yaml", "--trainer.devices=2", "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false", "--trainer.default_root_dir=runs/dp",
            f"--model.init_args.init_from={runs / 'stage1_speech_align' / 'export'}"]
    out = lyra_pl(args + ["--trainer.max_steps=4"], cwd)
    shares = re.findall(r"\[rank (\d)\] holds [\d,]+ of [\d,]+ sharded parameter values "
                        r"\(([\d.]+)%\)", out)
    assert sorted(r for r, _ in shares) == ["0", "1"], out[-3000:]
    assert all(45 < float(p) < 55 for _, p in shares), shares
    last = cwd / "ckpt" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2

    out = lyra_pl(args + ["--trainer.max_steps=6", "--ckpt_path=last"], cwd)
    assert "Restoring states from the checkpoint" in out or "Restored all states" in out
    meta = torch.load(last / "meta.pt", weights_only=False)
    assert meta["global_step"] == 6

    # The distributed checkpoint of step 6 as a stage export: only the trained tensors read,
    # equal to what the run exported at its end (after the same step 6).
    from safetensors.torch import load_file

    lyra_pl(["export", "--ckpt", str(last), "--out", "from_ckpt", "--format", "lyra"], cwd)
    ended = cwd / "runs" / "dp" / "export"
    files = ["speech_projector.safetensors", "sound_projector.safetensors",
             "speech_generator.safetensors", "adapter_speech/adapter_model.safetensors",
             "adapter_sound/adapter_model.safetensors"]
    for name in files:
        got, want = load_file(cwd / "from_ckpt" / name), load_file(ended / name)
        assert sorted(got) == sorted(want), name
        for key in want:
            assert torch.equal(got[key], want[key]), (name, key)
    assert json.loads((cwd / "from_ckpt" / "run.json").read_text())["global_step"] == 6


def test_export_hf_loads_in_transformers_with_the_adapter_merged(pipeline_run, tmp_path):
    """`lyra-pl export --format hf --merge speech` on the stage-2 run: transformers loads the
    Qwen2-VL folder, and its text and text+image logits are ours with the speech adapter on;
    the sound adapter loads as a peft adapter; the card lists the three stages and their final
    metrics from MLflow."""
    from PIL import Image
    from peft import PeftModel
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration
    from transformers import Qwen2VLImageProcessorPil

    from lyra_pl.eval.cli import build_module
    from lyra_pl.model.inputs import LyraInputs

    cwd, _ = pipeline_run
    out = tmp_path / "hf"
    lyra_pl(["export", "--ckpt", "runs/tiny/stage2_joint_sft", "--out", str(out),
             "--merge", "speech"], cwd)
    hf = Qwen2VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    module, _ = build_module(cwd / "runs/tiny/stage2_joint_sft/export", None, None, 4)
    module.configure_model()
    model = module.model.eval()
    image = Image.new("RGB", (56, 56), (200, 40, 40))
    enc = Qwen2VLImageProcessorPil.from_pretrained(out)(images=[image], return_tensors="pt")
    grid = enc["image_grid_thw"]
    img = model.config.image_token_id
    ids = [5, 17, img, 30, 31, 32, 40]
    n = int(grid.prod()) // 4  # tokens after the 2 x 2 merge
    seq = ids[:2] + [img] * n + ids[3:]
    types = [0, 0] + [1] * n + [0] * (len(ids) - 3)
    with torch.no_grad():
        ours = model(LyraInputs(torch.tensor([ids]), pixel_values=enc["pixel_values"],
                                image_grid_thw=grid), adapters=["speech"],
                     return_logits=True).logits[0]
        theirs = hf(input_ids=torch.tensor([seq]), mm_token_type_ids=torch.tensor([types]),
                    pixel_values=enc["pixel_values"], image_grid_thw=grid).logits[0]
        text = torch.tensor([[5, 17, 30, 31, 32, 40]])
        ours_text = model(LyraInputs(text), adapters=["speech"], return_logits=True).logits
        theirs_text = hf(input_ids=text).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_text, theirs_text, rtol=1e-5, atol=1e-5)
    assert (ours_text - model(LyraInputs(text), adapters=[], return_logits=True).logits
            ).abs().max() > 1e-3  # the merge is not a no-op

    AutoTokenizer.from_pretrained(out)
    peft_model = PeftModel.from_pretrained(hf, out / "adapters" / "sound")
    assert "sound" in str(peft_model.peft_config) or peft_model.peft_config
    described = json.loads((out / "lyra.json").read_text())
    assert described["qwen2vl"]["merged_adapter"] == "speech"
    for part in ("speech_projector", "sound_projector", "speech_generator"):
        assert (out / described[part]["path"]).is_file()
    assert (out / "lyra" / "audio_encoder" / "config.json").is_file()
    card = (out / "README.md").read_text()
    order = [card.index(s) for s in ("BaseVLMStage", "SpeechAlignStage", "JointSFTStage")]
    assert order == sorted(order)
    assert "| train/loss |" in card and "| val/loss |" in card


def test_eval_every_task_on_the_final_export(pipeline_run):
    """`lyra-pl eval --task all` on the stage-4 export: every task scored from the tiny
    corpus's sets (base weights found through base.json), results as table, JSON and MLflow."""
    import mlflow

    cwd, _ = pipeline_run
    export = cwd / "runs" / "tiny" / "stage4_speech_gen" / "export"
    assert json.loads((export / "base.json").read_text())["qwen2vl"].endswith(
        "stage0_base_vlm/export/qwen2vl")
    out = lyra_pl(["eval", "--task", "all", "--ckpt", str(export), "--limit", "8",
                   "--out", "runs/eval"], cwd)
    assert "vqa_accuracy" in out and "gap S+I - T+I" in out
    records = {r["task"]: r for r in json.loads((cwd / "runs/eval/summary.json").read_text())}
    assert set(records) == {"asr", "textvqa", "docvqa", "videomme", "sound_caption"}
    assert records["asr"]["scores"]["all"]["n"] == 8
    assert records["asr"]["spelling_map"] is None  # the tiny Whisper has no normalizer.json
    assert {"all", "T+I", "S+I", "gap S+I - T+I"} <= set(records["textvqa"]["scores"])
    assert records["sound_caption"]["scores"]["all"]["n"] == 8  # the set has 12
    for task in records:
        lines = (cwd / "runs/eval" / task / "predictions.jsonl").read_text().splitlines()
        assert len(lines) == records[task]["scores"]["all"]["n"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lyra_pl-eval")
    run = [r for r in client.search_runs([exp.experiment_id])
           if r.info.run_name == "eval stage4_speech_gen"][0]
    assert "eval/textvqa/speech_instruction/vqa_accuracy" in run.data.metrics
    assert "eval/asr/all/wer" in run.data.metrics
    assert {"eval/summary.json", "eval/summary.txt"} <= {
        a.path for a in client.list_artifacts(run.info.run_id, "eval")}


def test_eval_asr_on_a_librispeech_flac_tree(pipeline_run):
    """`lyra-pl eval --task asr --data TREE` on a LibriSpeech-layout tree of FLAC files (the
    tiny set's clips re-encoded here as LibriSpeech ships them): every utterance scored."""
    from lyra_pl.data import encode, media

    cwd, _ = pipeline_run
    src = ROOT / "data/tiny/eval/librispeech"
    tree = cwd / "LibriSpeech" / "test-clean"
    trans = sorted(src.rglob("*.trans.txt"))[:1]
    n = 0
    for t in trans:
        chapter = tree / t.parent.relative_to(src)
        chapter.mkdir(parents=True)
        lines = t.read_text().splitlines()[:4]
        (chapter / t.name).write_text("\n".join(lines) + "\n")
        for line in lines:
            utt = line.split(" ", 1)[0]
            x, info = media.load_audio(t.parent / f"{utt}.wav")
            encode.write_audio(chapter / f"{utt}.flac", x, media.SAMPLE_RATE)
            n += 1
    export = cwd / "runs" / "tiny" / "stage4_speech_gen" / "export"
    lyra_pl(["eval", "--task", "asr", "--data", str(tree), "--ckpt", str(export),
             "--out", "runs/eval_flac"], cwd)
    record = json.loads((cwd / "runs/eval_flac/asr/results.json").read_text())
    assert record["scores"]["all"]["n"] == n == 4 and 0 <= record["scores"]["all"]["wer"]


def test_eval_under_torchrun_matches_one_process(pipeline_run):
    """`torchrun --nproc_per_node 2 -m lyra_pl.cli eval`: two processes, a model copy each,
    deal out the batches; rank 0 writes what one process with the same batch size writes."""
    cwd, _ = pipeline_run
    export = cwd / "runs" / "tiny" / "stage4_speech_gen" / "export"
    args = ["eval", "--task", "docvqa", "--ckpt", str(export), "--limit", "7", "--batch-size",
            "2", "--no-mlflow"]  # 7 samples: batches of 2, 2, 2, 1, two rounds of two
    lyra_pl(args + ["--out", "runs/eval_one"], cwd)
    lyra_pl(args + ["--out", "runs/eval_two"], cwd, nproc=2)
    rows, records = {}, {}
    for n in ("one", "two"):
        d = cwd / "runs" / f"eval_{n}" / "docvqa"
        rows[n] = [json.loads(line) for line in (d / "predictions.jsonl").open()]
        records[n] = json.loads((d / "results.json").read_text())
    assert len(rows["one"]) == 7
    assert [(r["key"], r["variant"], r["prediction"]) for r in rows["two"]] == [
        (r["key"], r["variant"], r["prediction"]) for r in rows["one"]]
    assert records["two"]["scores"] == records["one"]["scores"]
    assert (records["one"]["processes"], records["two"]["processes"]) == (1, 2)


def test_needle_heatmap_for_the_tiny_model(pipeline_run):
    import mlflow

    cwd, _ = pipeline_run
    export = cwd / "runs" / "tiny" / "stage3_long_speech" / "export"
    out = lyra_pl(["needle", "--ckpt", str(export), "--num-needles", "2", "--lengths", "10",
                   "40", "--depths", "0", "0.5", "1", "--out", "runs/needle"], cwd)
    assert "accuracy (rows: haystack length" in out
    d = cwd / "runs" / "needle"
    for png in ("needle_heatmap.png", "kept_tokens.png"):
        assert (d / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((d / "needle.json").read_text())
    assert len(record["accuracy"]) == 2 and len(record["accuracy"][0]) == 3
    assert len(record["answers"]) == 2 * 3 * 2
    kept = record["kept_map"]["speech_tokens"]
    assert len(kept) == 1 + len(record["kept_map"]["pruned_after_layers"]) >= 2
    assert kept == sorted(kept, reverse=True) and kept[-1] < kept[0]  # LMME pruned speech
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lyra_pl-eval")
    run = [r for r in client.search_runs([exp.experiment_id])
           if r.info.run_name == "needle stage3_long_speech"][0]
    assert "needle/accuracy_40s" in run.data.metrics
    assert "eval/needle_heatmap.png" in {a.path for a in client.list_artifacts(run.info.run_id,
                                                                             "eval")}


# ----------------------------------------------------------------------------- lyra-pl chat
# The tiny pipeline trains each stage for 3 steps: greedy answers are an immediate <|im_end|>
# (empty). Sampling hot gives tokens to stream, which is what these checks need.
SAMPLING = ["--temperature", "2", "--seed", "0", "--max-new-tokens", "8"]
SPOKEN = ROOT / "data/tiny/media/speech/q_shape1_en-us-f3.wav"  # a real spoken question


@pytest.fixture(scope="module")
def chat_media(tmp_path_factory) -> Path:
    """A PNG, and the spoken question encoded here as MP3 (44.1 kHz) and WAV (22.05 kHz)."""
    from PIL import Image

    from lyra_pl.data import encode, media

    d = tmp_path_factory.mktemp("chat_media")
    Image.new("RGB", (64, 48), "red").save(d / "red.png")
    for name, rate in (("q.mp3", 44100), ("q.wav", 22050)):
        x, _ = media.load_audio(SPOKEN, rate=rate)
        encode.write_audio(d / name, x, rate)
    return d


def chat(args: list[str], capsys) -> tuple[int, str, str]:
    """`lyra-pl chat ARGS` in this process (the model loads in a second; a subprocess would
    spend ten more importing torch and Lightning): (exit code, stdout, stderr)."""
    from lyra_pl import cli

    capsys.readouterr()
    rc = cli.main(["chat", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def write_vocoder(d: Path, n_units: int = 1000) -> Path:
    """A randomly initialized CodeHiFiGAN vocoder directory: no trained unit vocoder exists
    offline, so this checks units -> waveform -> file, not how the speech sounds."""
    from lyra_pl.model.vocoder import UnitVocoder

    cfg = {"upsample_rates": [5, 4, 2], "upsample_kernel_sizes": [11, 8, 4],
           "upsample_initial_channel": 16, "resblock_kernel_sizes": [3],
           "resblock_dilation_sizes": [[1, 3, 5]], "num_embeddings": n_units,
           "embedding_dim": 8, "model_in_dim": 8, "sampling_rate": 16000}
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    torch.save({"generator": UnitVocoder(cfg).generator.state_dict()}, d / "g_00000001")
    return d


def test_chat_one_shot_streams_answers_about_an_image_mp3_and_wav(pipeline_run, chat_media,
                                                                  capsys, tmp_path):
    """One-shot on the stage-2 export with an image and the spoken question as MP3 and WAV;
    then on the stage-4 export with --speech-out."""
    cwd, _ = pipeline_run
    runs = cwd / "runs" / "tiny"
    rc, out, err = chat(["--export", str(runs / "stage2_joint_sft" / "export"),
                         "--image", str(chat_media / "red.png"), "--audio",
                         str(chat_media / "q.mp3"), str(chat_media / "q.wav"),
                         "--prompt", "Which shape is this?", *SAMPLING], capsys)
    assert rc == 0, err
    assert out.strip() and out.endswith("\n") and out.count("\n") == 1, out

    wav = tmp_path / "answer.wav"
    rc, out, err = chat(["--export", str(runs / "stage4_speech_gen" / "export"),
                         "--audio", str(chat_media / "q.wav"), "--prompt", "", "--speech-out",
                         str(wav), "--vocoder", str(write_vocoder(tmp_path / "voc")),
                         *SAMPLING], capsys)
    assert out.strip(), err
    if rc == 0:  # a speech generator trained for 3 steps may give only CTC blanks
        from lyra_pl.data import media

        x, _ = media.load_audio(wav)
        assert len(x) > 0 and f"wrote {wav}" in err
    else:
        assert rc == 1 and "gave no units" in err and not wav.exists(), err


def test_chat_interactive_session_on_a_terminal(pipeline_run, chat_media):
    """Two turns through a pseudo-terminal, the second attaching speech with /audio (the
    first turn's image and answer stay in the prompt), then /quit."""
    import select

    cwd, _ = pipeline_run
    export = cwd / "runs" / "tiny" / "stage2_joint_sft" / "export"
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "lyra_pl.cli", "chat", "--export",
                             str(export), "--image", str(chat_media / "red.png"), *SAMPLING],
                            cwd=cwd, stdin=slave, stdout=slave, stderr=subprocess.PIPE,
                            env={**os.environ, "TERM": "dumb"})
    os.close(slave)
    seen = b""

    def until_prompt(timeout: float = 300) -> str:
        """What the terminal shows up to the next "> " prompt (the echoed line dropped)."""
        nonlocal seen
        start = len(seen)
        while not seen[start:].endswith(b"> "):
            ready, _, _ = select.select([master], [], [], timeout)
            chunk = os.read(master, 4096) if ready else b""
            assert chunk, f"no prompt; the terminal showed {seen[-2000:]!r}"
            seen += chunk
        shown = seen[start:-2].decode(errors="replace").replace("\r", "")
        return shown.split("\n", 1)[1] if "\n" in shown else ""

    def send(line: str) -> str:
        os.write(master, line.encode() + b"\n")
        return until_prompt()

    try:
        until_prompt()
        first = send("Which shape is this?")
        assert send(f"/audio {chat_media / 'q.mp3'}") == ""  # attached (said on stderr)
        second = send("And now?")
        os.write(master, b"/quit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(master)
    err = proc.stderr.read().decode()
    assert "/quit" in err and "(attached audio" in err, err
    assert first.strip() and second.strip(), seen


def test_chat_interactive_ends_at_end_of_input(pipeline_run, capsys, monkeypatch):
    import io

    cwd, _ = pipeline_run
    monkeypatch.setattr(sys, "stdin", io.StringIO("What color is the sky?\n/nope\n"))
    rc, out, err = chat(["--export", str(cwd / "runs/tiny/stage2_joint_sft/export"),
                         *SAMPLING], capsys)
    assert rc == 0 and out.strip() and out.count("\n") == 1, (out, err)
    assert "unknown command /nope" in err


def test_chat_jsonl_answers_good_lines_and_names_the_bad_one(pipeline_run, chat_media, capsys,
                                                             tmp_path):
    cwd, _ = pipeline_run
    requests = chat_media / "requests.jsonl"  # media paths relative to the file
    requests.write_text("\n".join(json.dumps(r) for r in [
        {"id": "shape", "prompt": "Which shape is this?", "image": "red.png"},
        {"id": "bad", "prompt": "Hi", "audio": "missing.wav"},
        {"id": "spoken", "image": ["red.png"], "audio": "q.mp3"},
    ]) + "\n")
    answers = tmp_path / "answers.jsonl"
    rc, _, err = chat(["--export", str(cwd / "runs/tiny/stage3_long_speech/export"),
                       "--jsonl", str(requests), "--out", str(answers), "--lmme", "2,0.5",
                       *SAMPLING], capsys)
    assert rc == 1, err  # a line failed
    assert f"{requests}:2: audio missing.wav: file not found" in err.splitlines()
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["shape", "bad", "spoken"]
    assert rows[1] == {"id": "bad", "line": 2, "error": "audio missing.wav: file not found"}
    assert all(isinstance(rows[i]["answer"], str) for i in (0, 2))
    assert "answered 2 of 3 request(s); 1 failed" in err


def _fake_export(tmp_path: Path, stage: str = "JointSFTStage") -> Path:
    """A folder that passes the checks made before the model loads."""
    export = tmp_path / "run" / "export"
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    (export / "speech_generator.safetensors").write_bytes(b"")
    (export.parent / "config.yaml").write_text(
        f"model:\n  class_path: lyra_pl.training.stages.{stage}\n")
    return export


@pytest.mark.parametrize("case", ["missing export", "missing image", "image not an image",
                                  "audio not audio", "missing jsonl", "speech-out from stage 2",
                                  "speech-out without vocoder", "missing vocoder"])
def test_chat_errors_are_one_line_and_exit_2(case, tmp_path, capsys):
    """Found before the model loads: no pipeline needed."""
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "notes.mp3").write_text("not audio")
    missing = str(tmp_path / "nowhere")
    stage2, stage4 = str(_fake_export(tmp_path / "2")), str(_fake_export(tmp_path / "4",
                                                                          "SpeechGenStage"))
    args, named = {
        "missing export": (["--export", missing, "--prompt", "hi"], missing),
        "missing image": (["--export", missing, "--image", "gone.png", "--prompt", "hi"],
                          "--image gone.png: file not found"),
        "image not an image": (["--export", missing, "--image", str(tmp_path / "notes.png"),
                                "--prompt", "hi"], "notes.png: not a decodable image"),
        "audio not audio": (["--export", missing, "--audio", str(tmp_path / "notes.mp3"),
                             "--prompt", "hi"], "notes.mp3: not a decodable media file"),
        "missing jsonl": (["--export", missing, "--jsonl", "gone.jsonl"], "gone.jsonl"),
        "speech-out from stage 2": (["--export", stage2, "--prompt", "hi", "--speech-out",
                                     "a.wav", "--vocoder", missing], "written by JointSFTStage"),
        "speech-out without vocoder": (["--export", stage4, "--prompt", "hi", "--speech-out",
                                        "a.wav"], "needs --vocoder"),
        "missing vocoder": (["--export", stage4, "--prompt", "hi", "--speech-out", "a.wav",
                             "--vocoder", missing], f"--vocoder {missing}"),
    }[case]
    rc, out, err = chat(args, capsys)
    assert rc == 2 and out == "", err
    assert len(err.splitlines()) == 1 and named in err and err.startswith("lyra-pl chat: "), err


def test_chat_streams_each_token_and_speaks_units(tmp_path):
    """The streaming callback writes the answer piece by piece as ``generate`` reports
    tokens, whole characters only; the vocoder path turns units into a 16 kHz file."""
    from lyra_pl.chat_engine import TextStream, parse_lmme, write_speech
    from lyra_pl.data import media
    from lyra_pl.data.decode import load_tokenizer
    from lyra_pl.model.vocoder import UnitVocoder

    tok = load_tokenizer(ROOT / "data/tiny/tokenizer")
    ids = tok("The sky is blue, é!", add_special_tokens=False)["input_ids"] + [505]
    pieces: list[str] = []

    class Out:
        write = pieces.append

        def flush(self):
            pass

    stream = TextStream(tok, Out())
    for i in ids:
        stream([i, None])  # a second, finished sample is ignored
    stream.finish()
    assert "".join(pieces) == "The sky is blue, é!\n" and len(pieces) > 4
    assert not any("\ufffd" in p for p in pieces)

    vocoder = UnitVocoder.from_pretrained(write_vocoder(tmp_path / "voc"))
    write_speech(str(tmp_path / "a.wav"), vocoder, [3, 7, 7, 999])
    x, info = media.load_audio(tmp_path / "a.wav")
    assert len(x) == 4 * vocoder.hop_length and info.source_rate == 16000
    assert parse_lmme("4,0.7") == {"lmme_blocks": 4, "lmme_keep_ratio": 0.7}


@pytest.mark.skipif(os.environ.get("LYRA_FULL_PIPELINE") != "1",
                    reason="the full tiny pipeline takes ~10 minutes on 2 cores: "
                           "LYRA_FULL_PIPELINE=1 runs it")
def test_full_pipeline_answers_sound_above_chance(tmp_path):
    """The whole `lyra-pl pipeline --preset tiny`, as the README runs it: stage 2 trains the
    sound projector and adapter, and the held-out sound clips are named above chance and above
    always giving the most frequent caption."""
    lyra_pl(["pipeline", "--preset", "tiny", "--trainer.enable_progress_bar=false"], tmp_path,
            timeout=1800)
    summary = json.loads((tmp_path / "runs/tiny/stage2_joint_sft/eval/accuracy.json").read_text())
    sound = summary["groups"]["sound: all"]
    assert sound["n"] == 12
    assert sound["accuracy"] > max(sound["chance"], sound["majority"]), sound
