"""Every YAML in configs/ parses through the CLI and instantiates its stage, data module,
callbacks, logger, strategy and Trainer."""
from __future__ import annotations

from pathlib import Path

import pytest

from lyra_pl.data.datamodule import LyraDataModule
from lyra_pl.training.cli import STAGE_FILES, LyraCLI
from lyra_pl.training.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*/*.yaml"))


def test_every_preset_has_the_four_stage_files():
    presets = {p.parent.name for p in CONFIGS}
    assert {"tiny", "mini", "base", "pro"} <= presets
    four = {STAGE_FILES[k] for k in (1, 2, 3, 4)}
    for preset in presets:
        names = {p.stem for p in (ROOT / "configs" / preset).glob("*.yaml")}
        # stage 0 (a base VLM trained from scratch) only where no pretrained Qwen2-VL exists
        assert names == (four | {STAGE_FILES[0]} if preset == "tiny" else four), preset


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_parses_and_instantiates(path, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    # The whole file is parsed and validated as written; only where the Trainer runs is
    # overridden, so the GPU configs build their Trainer on this CPU machine.
    cli = LyraCLI(args=["--config", str(path), "--trainer.accelerator=cpu", "--trainer.devices=1",
                        "--trainer.num_nodes=1"], run=False)
    cfg, objs = cli.config, cli
    stage_no = next(k for k, v in STAGE_FILES.items() if v == path.stem)
    assert type(objs.model) is STAGES[stage_no]
    assert objs.model.preset == path.parent.name
    assert isinstance(objs.datamodule, LyraDataModule)
    assert objs.datamodule.paths["train"] and objs.datamodule.paths["val"]
    assert cfg.trainer.max_epochs >= 1
    if stage_no == 2:  # sound is trained in stage 2, on the mix's sound samples
        assert objs.model.sound and "sound_projector" in objs.model.trainable_parts
    if path.parent.name != "tiny":  # official hyperparameters (docs/method.md)
        lr = {1: 1e-3, 2: 2e-4, 3: 1e-4, 4: 2e-4}[stage_no]
        assert objs.model.lr == lr
        gbs = {1: 256, 2: 128, 3: 32, 4: 32}[stage_no]
        world = 8 * (4 if path.parent.name == 'pro' else 1)  # as written in the file
        replicas = world // objs.model.context_parallel  # a CP group shares its batches
        assert objs.datamodule.batch_size * cfg.trainer.accumulate_grad_batches * replicas == gbs
        if stage_no == 3 and path.parent.name in ("base", "pro"):  # 131,072-token samples
            assert objs.model.context_parallel == {"base": 2, "pro": 8}[path.parent.name]
        assert objs.model.warmup_ratio == (0.09 if stage_no == 4 else 0.03)


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.parent.name in ("tiny", "base")],
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_output_follows_the_run_folder(path, tmp_path, monkeypatch):
    """`--trainer.default_root_dir` on the command line moves checkpoints and the MLflow
    logger's files (the resolved config) with it: before, `${trainer.default_root_dir}` in
    the YAML was resolved when the file was read, so they stayed in the YAML's folder and
    `--ckpt_path last` found another run's checkpoint there."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    cli = LyraCLI(args=["--config", str(path), "--trainer.accelerator=cpu", "--trainer.devices=1",
                        "--trainer.num_nodes=1", "--trainer.default_root_dir=runs/dev3"],
                  run=False)
    root = (tmp_path / "runs" / "dev3").resolve()
    assert [Path(cb.dirpath) for cb in cli.trainer.checkpoint_callbacks] == [root / "checkpoints"]
    assert Path(cli.trainer.logger.save_dir).resolve() == root
    assert Path(cli.trainer.log_dir).resolve() == root  # where TrackConfig writes config.yaml
    # What Lightning's ckpt_path="last" looks at: this run's folder only.
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "last.ckpt").write_bytes(b"")
    from lightning.pytorch.trainer.states import TrainerFn

    found = cli.trainer._checkpoint_connector._parse_ckpt_path(
        TrainerFn.FITTING, "last", model_provided=True, model_connected=False)
    assert Path(found) == root / "checkpoints" / "last.ckpt"


def test_tiny_stage2_predict_fits_every_held_out_answer():
    """The pipeline's stage-2 evaluation generates at most ``max_new_tokens``: every held-out
    answer and its <|im_end|> must fit, or the longest ones (the sound captions) never match."""
    import json

    import yaml
    from transformers import AutoTokenizer

    cfg = yaml.safe_load((ROOT / "configs/tiny/stage2_joint_sft.yaml").read_text())
    tok = AutoTokenizer.from_pretrained(str(ROOT / cfg["data"]["tokenizer"]))
    samples = json.loads((ROOT / cfg["data"]["predict_source"]).read_text())
    need = max(len(tok(s["conversations"][-1]["value"] + "<|im_end|>",
                       add_special_tokens=False)["input_ids"]) for s in samples)
    assert cfg["model"]["init_args"]["max_new_tokens"] >= need


def test_cpu_run_leaves_its_data_workers_a_core(tmp_path, monkeypatch):
    """On CPU the intra-op threads take the cores the DataLoader workers leave (at least one);
    OMP_NUM_THREADS, when set, wins."""
    import os

    import torch

    from lyra_pl.training.cli import cpu_threads

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.chdir(tmp_path)
    before = torch.get_num_threads()
    try:
        cli = LyraCLI(args=["--config", str(ROOT / "configs/tiny/stage0_base_vlm.yaml"),
                            "--data.num_workers=1"], run=False)
        assert torch.get_num_threads() == max(1, len(os.sched_getaffinity(0)) - 1)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(before)
        assert cpu_threads(cli.trainer, cli.datamodule) == before
    finally:
        torch.set_num_threads(before)
