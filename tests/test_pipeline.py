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


def lyra_pl(args: list[str], cwd: Path, timeout: int = 600) -> str:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    proc = subprocess.run([sys.executable, "-m", "lyra_pl.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
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
