"""`lyra-pl fit|validate|predict --config configs/<preset>/<stage>.yaml` (LightningCLI) and
`lyra-pl pipeline --preset tiny` (the four stages in order, then the stage-2 evaluation).

The stage classes and :class:`~lyra_pl.data.datamodule.LyraDataModule` are the config schema:
``model: {class_path: lyra_pl.training.stages.JointSFTStage, init_args: {...}}``, ``data:``
the data module's arguments, ``trainer:`` Lightning's. YAML goes through omegaconf, so values
may interpolate others (``${trainer.default_root_dir}``).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from lyra_pl.data.datamodule import REPO_ROOT, LyraDataModule
from lyra_pl.training.stages import LyraStage
from lyra_pl.training.tracking import TrackConfig

STAGE_FILES = {1: "stage1_speech_align", 2: "stage2_joint_sft", 3: "stage3_long_speech",
               4: "stage4_speech_gen"}


class LyraCLI(LightningCLI):
    """LightningCLI over the four stages and the shard data module."""

    def __init__(self, args: list[str] | None = None, run: bool = True):
        super().__init__(
            LyraStage, LyraDataModule, subclass_mode_model=True,
            save_config_callback=TrackConfig, save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "omegaconf"}, auto_configure_optimizers=False,
            args=args, run=run)


def config_path(preset: str, stage: int) -> Path:
    """``configs/<preset>/<stage file>.yaml`` (from the working directory, else the repo)."""
    rel = Path("configs") / preset / f"{STAGE_FILES[stage]}.yaml"
    path = rel if rel.is_file() else REPO_ROOT / rel
    if not path.is_file():
        raise FileNotFoundError(f"no config {rel} (presets: "
                                f"{sorted(p.name for p in (REPO_ROOT / 'configs').iterdir())})")
    return path


def pipeline(argv: list[str]) -> int:
    """Runs the stages in order, each starting from the previous one's export, then scores
    stage 2 on its held-out spoken questions. Extra arguments go to every stage's CLI."""
    parser = argparse.ArgumentParser(prog="lyra-pl pipeline", description=pipeline.__doc__)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--root", default=None,
                        help="output directory (default runs/<preset>); stage N writes "
                             "<root>/<stage name>/{checkpoints,export}")
    parser.add_argument("--stages", default="1,2,3,4", help="comma-separated, in order")
    parser.add_argument("--no-eval", action="store_true", help="skip the stage-2 evaluation")
    args, extra = parser.parse_known_args(argv)
    root = Path(args.root or f"runs/{args.preset}")
    stages = [int(s) for s in args.stages.split(",")]
    previous: Path | None = None
    timings = []
    for stage in stages:
        out = root / STAGE_FILES[stage]
        cli_args = ["fit", "--config", str(config_path(args.preset, stage)),
                    f"--trainer.default_root_dir={out}"]
        if previous is not None:
            cli_args.append(f"--model.init_args.init_from={previous}")
        t0 = time.perf_counter()
        print(f"\n=== stage {stage}: {STAGE_FILES[stage]} -> {out}", flush=True)
        LyraCLI(cli_args + extra)
        timings.append((STAGE_FILES[stage], time.perf_counter() - t0))
        previous = out / "export"
        if stage == 2 and not args.no_eval:
            t0 = time.perf_counter()
            print(f"\n=== stage 2 evaluation: held-out questions -> {out / 'eval'}", flush=True)
            LyraCLI(["predict", "--config", str(config_path(args.preset, 2)),
                     f"--trainer.default_root_dir={out}",
                     f"--model.init_args.init_from={previous}"] + extra)
            timings.append(("stage2 evaluation", time.perf_counter() - t0))
    print("\n" + "\n".join(f"{name:<24}{sec:8.1f} s" for name, sec in timings))
    print(f"{'total':<24}{sum(s for _, s in timings):8.1f} s")
    return 0


def main(argv: list[str]) -> int:
    LyraCLI(argv)
    return 0
