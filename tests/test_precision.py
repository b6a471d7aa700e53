"""One owner of a run's precision (lyra_pl/training/precision.py): every inconsistent pair of the
Trainer's ``precision`` and the stage's FSDP2 ``param_dtype`` / ``reduce_dtype`` is an error
naming both, before anything starts; the consistent ones pass."""
from __future__ import annotations

import pytest
import torch

from lyra_pl.training import precision
from lyra_pl.training.precision import uses_fsdp2

FSDP2 = {"class_path": "lyra_pl.training.parallelize.FSDP2Strategy"}


@pytest.mark.parametrize("trainer, param, reduce, fsdp2", [
    ("32-true", "bfloat16", "float32", True),        # torchtitan's pair under FSDP2
    ("32-true", None, None, True),                   # fp32 throughout
    ("bf16-mixed", None, None, True),                # Lightning's autocast owns it
    ("bf16-true", None, "float32", True),            # bf16 weights, fp32 gradient reduction
    ("bf16-mixed", None, None, False),               # one process: only the Trainer's flag
    (32, None, None, False),
    ("32-true", torch.bfloat16, torch.float32, True),
])
def test_consistent_pairs_pass(trainer, param, reduce, fsdp2):
    precision.check(trainer, param, reduce, fsdp2)


@pytest.mark.parametrize("trainer, param, reduce, fsdp2, named", [
    ("bf16-mixed", "bfloat16", "float32", True,
     ["trainer.precision=bf16-mixed", "param_dtype=bfloat16"]),
    ("bf16-true", "bfloat16", None, True, ["trainer.precision=bf16-true", "param_dtype=bfloat16"]),
    ("16-mixed", torch.float16, None, True, ["trainer.precision=16-mixed", "param_dtype=float16"]),
    ("32-true", "bfloat16", "float32", False, ["param_dtype=bfloat16", "trainer.strategy"]),
    ("bf16-mixed", None, "float32", False, ["reduce_dtype=float32", "trainer.strategy"]),
])
def test_inconsistent_pairs_are_one_line_errors_naming_both(trainer, param, reduce, fsdp2, named):
    with pytest.raises(ValueError) as e:
        precision.check(trainer, param, reduce, fsdp2)
    message = str(e.value)
    assert "\n" not in message
    for part in named:
        assert part in message, message


@pytest.mark.parametrize("strategy, expected", [
    (FSDP2, True),
    ({"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}, True),
    ({"class_path": "lightning.pytorch.strategies.DDPStrategy"}, False),
    ("auto", False),
    ("ddp", False),
    (None, False),
])
def test_which_strategies_are_fsdp2(strategy, expected):
    assert uses_fsdp2(strategy) is expected


def test_the_cli_refuses_an_inconsistent_pair_before_anything_starts(tmp_path, monkeypatch,
                                                                      capsys):
    """From the parsed config, before any distributed set-up, model build or MLflow run."""
    from pathlib import Path

    from lyra_pl.training.cli import main

    stage2 = Path(__file__).resolve().parents[1] / "configs/tiny/stage2_joint_sft.yaml"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert main(["fit", "--config", str(stage2), "--trainer.precision=bf16-mixed",
                 "--model.init_args.param_dtype=bfloat16"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "trainer.precision=bf16-mixed" in errors[0] \
        and "param_dtype=bfloat16" in errors[0], errors
    assert not (tmp_path / "mlflow.db").exists()


def test_a_stage_set_up_in_python_is_checked_when_it_builds_its_model(tmp_path):
    """No CLI, no preflight: the stage's own configure_model refuses the pair, before building."""
    import lightning as L

    from lyra_pl.training.stages import SpeechAlignStage

    stage = SpeechAlignStage(preset="tiny", param_dtype="bfloat16")
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", logger=False,
                        enable_checkpointing=False, default_root_dir=tmp_path)
    stage.trainer = trainer
    with pytest.raises(ValueError, match="param_dtype=bfloat16.*does not use FSDP2"):
        stage.configure_model()
    assert stage.model is None
    # the defaults (no FSDP2 dtypes) build
    ok = SpeechAlignStage(preset="tiny")
    ok.trainer = trainer
    ok.configure_model()
    assert ok.model is not None
