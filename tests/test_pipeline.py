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
    assert (runs / "stage3_long_speech" / "export" / "adapter_long_speech").is_dir()
    summary = json.loads((runs / "stage2_joint_sft" / "eval" / "accuracy.json").read_text())
    assert summary["overall"]["n"] == 96  # every held-out stage-2 sample, none dropped
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
    assert records["sound_caption"]["scores"]["all"]["n"] == 6  # the set has 6
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
