"""The `lyra-pl` entry point: its version, and a one-line error for an unknown command."""
import pytest

from lyra_pl import __version__, cli


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"lyra-pl {__version__}"


def test_unknown_command_says_so(capsys):
    assert cli.main(["fitt", "--config", "x.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown command 'fitt'" in err[0] and "fit" in err[0]
    assert cli.main(["data", "conv"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'data conv'" in err and "data convert" in err
    assert cli.main(["--help"]) == 0 and "usage: lyra-pl" in capsys.readouterr().out


# ----------------------------------------------------------------------------- early errors
def _fit_error(args, tmp_path, monkeypatch, capsys) -> str:
    """`lyra-pl fit ARGS` in a directory: exit 2, one line, no MLflow run, nothing written."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    before = sorted(tmp_path.rglob("*"))
    assert cli.main(["fit", *args]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    assert not (tmp_path / "mlflow.db").exists() and sorted(tmp_path.rglob("*")) == before
    return lines[0]


def test_missing_stage_exports_are_one_line_before_anything_starts(tmp_path, monkeypatch,
                                                                   capsys):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    stage2 = str(root / "configs/tiny/stage2_joint_sft.yaml")
    err = _fit_error(["--config", stage2], tmp_path, monkeypatch, capsys)
    assert "--model.init_args.qwen2vl: runs/tiny/stage0_base_vlm/export/qwen2vl does not " \
           "exist" in err and "lyra-pl pipeline --preset tiny --stages 0" in err
    (tmp_path / "q").mkdir()
    err = _fit_error(["--config", stage2, f"--model.init_args.qwen2vl={tmp_path / 'q'}",
                      f"--model.init_args.whisper={tmp_path / 'q'}"], tmp_path, monkeypatch,
                     capsys)
    assert "--model.init_args.init_from: runs/tiny/stage1_speech_align/export" in err
    assert "--stages 0,1" in err

    # A config path relative to the repository works from any directory, like data paths.
    err = _fit_error(["--config", "configs/tiny/stage1_speech_align.yaml"], tmp_path,
                     monkeypatch, capsys)
    assert "--model.init_args.qwen2vl: runs/tiny/stage0_base_vlm" in err

    stage0 = str(root / "configs/tiny/stage0_base_vlm.yaml")
    err = _fit_error(["--config", stage0, "--data.train=nowhere/train",
                      "--data.train_source=null"], tmp_path, monkeypatch, capsys)
    assert "--data.train: nowhere/train holds no converted dataset" in err
    err = _fit_error(["--config", stage0, "--data.tokenizer=no/tok"], tmp_path, monkeypatch,
                     capsys)
    assert "--data.tokenizer: no/tok is not a tokenizer directory" in err
    err = _fit_error(["--config", stage0, "--ckpt_path=old/last.ckpt"], tmp_path, monkeypatch,
                     capsys)
    assert "--ckpt_path: old/last.ckpt does not exist" in err


def test_a_config_typo_is_one_line_naming_the_closest_key(tmp_path, capsys):
    from pathlib import Path

    stage0 = str(Path(__file__).resolve().parents[1] / "configs/tiny/stage0_base_vlm.yaml")
    cases = {
        "--model.init_args.lrr=1": "--model.init_args.lrr: no such stage argument; did you "
                                   "mean --model.init_args.lr?",
        "--model.init_args.lora_rr=3": "did you mean --model.init_args.lora_r?",
        "--trainer.max_stepz=1": "--trainer.max_stepz: no such option; did you mean "
                                 "--trainer.max_steps?",
        "--data.batch_sise=3": "did you mean --data.batch_size?",
        "--model.init_args.lr=abc": "--model.init_args.lr: expected a float, got 'abc'",
    }
    for arg, words in cases.items():
        with pytest.raises(SystemExit) as exit:  # the parser's exit, status 2
            cli.main(["fit", "--config", stage0, arg])
        assert exit.value.code == 2
        err = [line for line in capsys.readouterr().err.splitlines()
               if line.startswith("error:")]
        assert len(err) == 1 and words in err[0], (arg, err)
    # In the YAML file too.
    typo = tmp_path / "typo.yaml"
    text = Path(stage0).read_text()
    typo.write_text(text.replace("    preset: tiny\n", "    preset: tiny\n    lrr: 1\n"))
    with pytest.raises(SystemExit):
        cli.main(["fit", "--config", str(typo)])
    assert "did you mean --model.init_args.lr?" in capsys.readouterr().err


def test_a_run_says_where_it_writes_and_what_it_reads(tmp_path, monkeypatch, caplog):
    import logging
    from pathlib import Path

    from lyra_pl.training.cli import LyraCLI, print_run_summary

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    root = Path(__file__).resolve().parents[1]
    built = LyraCLI(["--config", str(root / "configs/tiny/stage0_base_vlm.yaml"),
                     "--trainer.default_root_dir=runs/x"], run=False)
    with caplog.at_level(logging.INFO):
        print_run_summary(built.trainer, built.datamodule)
    text = caplog.text
    assert f"run folder   {tmp_path.resolve() / 'runs/x'}" in text
    assert f"checkpoints  {tmp_path.resolve() / 'runs/x/checkpoints'}" in text
    assert f"MLflow       sqlite:///{tmp_path / 'mlflow.db'}  experiment 'lyra_pl-tiny', run " \
        in text
    assert "data train   " in text and ("samples)" in text or "converted from" in text)


def test_a_new_run_is_refused_in_an_earlier_runs_folder(tmp_path, monkeypatch, capsys):
    """Before, a second run in the folder wrote last-v1.ckpt beside the first run's last.ckpt
    and the next `--ckpt_path last` restored the other run."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    stage0 = str(root / "configs/tiny/stage0_base_vlm.yaml")
    (tmp_path / "runs/x/checkpoints").mkdir(parents=True)
    (tmp_path / "runs/x/checkpoints/last.ckpt").write_bytes(b"")
    err = _fit_error(["--config", stage0, "--trainer.default_root_dir=runs/x"], tmp_path,
                     monkeypatch, capsys)
    assert "runs/x already holds an earlier run's checkpoints (last.ckpt, ...): resume it " \
           "with --ckpt_path last, start over in it with --overwrite" in err

    from lyra_pl.training.preflight import check_run

    config = {"trainer": {"default_root_dir": str(tmp_path / "runs/x")}}
    check_run({**config, "ckpt_path": "last"}, "fit")  # resuming it: fine
    check_run({**config, "overwrite": True}, "fit")  # starting over: fine
    check_run(config, "validate")  # not a new training run


def test_short_runs_log_their_first_and_last_step_and_the_bar_ends_at_max_steps(
        tmp_path, monkeypatch):
    """Issue 12: with the configs' log_every_n_steps of 5 a 3-step run logged no metric, and
    the progress bar's total (its ETA) was the whole epoch's, not max_steps'. Now a 7-step run
    over epochs of 4 batches logs steps 0, 4 and 6 (the first, Lightning's own and the last),
    and the bar counts 4, then 3 of the second epoch's 4 batches."""
    import json
    from pathlib import Path

    import lightning as L
    from mlflow.tracking import MlflowClient

    from lyra_pl.data.convert import convert
    from lyra_pl.training.callbacks import EdgeStepLogs, StepProgressBar
    from lyra_pl.training.cli import LyraCLI

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    samples = json.loads((root / "data/tiny/stage0_vlm.train.json").read_text())[:8]
    (tmp_path / "train.json").write_text(json.dumps(samples))
    convert(tmp_path / "train.json", tmp_path / "shards", media_root=root / "data/tiny")
    built = LyraCLI(["--config", str(root / "configs/tiny/stage0_base_vlm.yaml"),
                     f"--data.train={tmp_path / 'shards'}", "--data.train_source=null",
                     "--data.val=null", "--data.val_source=null", "--data.batch_size=2",
                     "--trainer.limit_val_batches=0", "--trainer.max_steps=7",
                     "--trainer.default_root_dir=run"], run=False)
    trainer = built.trainer
    assert trainer.log_every_n_steps == 5  # the config's
    assert isinstance(trainer.progress_bar_callback, StepProgressBar)
    assert sum(isinstance(c, EdgeStepLogs) for c in trainer.callbacks) == 1

    class Totals(L.Callback):  # each epoch's length, and the bar's total at its first batch
        seen = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0:
                bar = trainer.progress_bar_callback.train_progress_bar
                self.seen.append((trainer.num_training_batches, bar.total))

    trainer.callbacks.append(Totals())
    trainer.fit(built.model, built.datamodule)
    assert Totals.seen == [(4, 4), (4, 3)]
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("lyra_pl-tiny").experiment_id])[0]
    for key in ("train/loss", "train/lr", "train/tokens"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 4, 6], key
