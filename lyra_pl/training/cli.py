"""`lyra-pl fit|validate|predict --config configs/<preset>/<stage>.yaml` (LightningCLI) and
`lyra-pl pipeline --preset tiny` (the four stages in order, then the stage-2 evaluation).

The stage classes and :class:`~lyra_pl.data.datamodule.LyraDataModule` are the config schema:
``model: {class_path: lyra_pl.training.stages.JointSFTStage, init_args: {...}}``, ``data:``
the data module's arguments, ``trainer:`` Lightning's. YAML goes through omegaconf, so values
may interpolate others; but every output of a run (checkpoints, config, MLflow files, export,
eval) derives from ``trainer.default_root_dir`` when the trainer is built
(:func:`bind_run_folder`), not by interpolation, which is resolved when the YAML is read,
before ``--trainer.default_root_dir`` on the command line overrides it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lyra_pl.data.datamodule import REPO_ROOT, LyraDataModule
from lyra_pl.training.stages import LyraStage
from lyra_pl.training import known_warnings
from lyra_pl.training.callbacks import EdgeStepLogs, StepProgressBar
from lyra_pl.training.preflight import RunInputError, check_run
from lyra_pl.training.tracking import LyraMLFlowLogger, TrackConfig

STAGE_FILES = {0: "stage0_base_vlm", 1: "stage1_speech_align", 2: "stage2_joint_sft", 3: "stage3_long_speech",
               4: "stage4_speech_gen"}


class LyraArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors are one line: a misspelled option names the closest
    valid one, instead of the whole usage with the message buried in a Union explanation."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        sys.stderr.write(f"error: {short_error(message, self)}\n")
        self.exit(2)


def short_error(message: str, parser) -> str:
    """One line for a jsonargparse error: the offending option, and the closest valid one."""
    import difflib
    import inspect
    import re

    from lyra_pl.training.stages import STAGES

    m = re.search(r"[Oo]ption '([^']+)' is not accepted|Key \"([^\"]+)\" is not expected", message)
    if m and 'Parser key "model"' in message:  # an unknown argument of the stage class
        key = m.group(1) or m.group(2)
        known = sorted({n for cls in STAGES.values() for c in cls.__mro__
                        if "__init__" in vars(c)
                        for n in inspect.signature(c.__init__).parameters if n != "self"})
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"; did you mean --model.init_args.{close[0]}?" if close else ""
        return f"--model.init_args.{key}: no such stage argument{hint} (--help lists them)"
    m = re.search(r"[Uu]nrecognized arguments: (.*)", message)
    if m:
        known = _options(parser)
        given = [t.split("=", 1)[0] for t in m.group(1).split() if t.startswith("--")]
        arg = next((t for t in given if t not in known), given[0] if given else m.group(1))
        close = difflib.get_close_matches(arg, sorted(known), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"{arg}: no such option{hint} (--help lists them)"
    keys = re.findall(r'Parser key "([^"]+)":', message)
    m = re.search(r"Expected (a|an) <class '(\w+)'>\. Got value: (\S+)", message)
    if keys and m:  # a value of the wrong type
        key = keys[-1]
        option = f"--model.init_args.{key}" if keys[0] == "model" and key != "model" else \
            f"--{key}"
        return f"{option}: expected {m.group(1)} {m.group(2)}, got {m.group(3)!r}"
    return " ".join(message.split())


def _options(parser) -> set[str]:
    """Every option string of a parser and of its subcommands' parsers."""
    found = {o for o in parser._option_string_actions if o.startswith("--")}
    action = getattr(parser, "_subcommands_action", None)
    for sub in (action._name_parser_map.values() if action is not None else ()):
        found |= _options(sub)
    return found


class LyraCLI(LightningCLI):
    """LightningCLI over the four stages and the shard data module."""

    def __init__(self, args: list[str] | None = None, run: bool = True):
        self.check_inputs = run  # run=False only builds the objects (tests, tools): no checks
        super().__init__(
            LyraStage, LyraDataModule, subclass_mode_model=True,
            save_config_callback=TrackConfig, save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "omegaconf"}, parser_class=LyraArgumentParser,
            auto_configure_optimizers=False,
            args=args, run=run)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--overwrite", action="store_true",
                            help="start a new run in a run folder that holds an earlier run's "
                                 "checkpoints (default: refused; --ckpt_path last resumes it)")

    def before_instantiate_classes(self) -> None:
        """Every input the run needs is checked before anything is built (no process group,
        no MLflow run): a missing one is one line, not a late traceback."""
        if self.check_inputs:
            config = self.config[self.subcommand] if self.subcommand else self.config
            check_run(config.as_dict(), self.subcommand)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        cpu_threads(self.trainer, self.datamodule)

    def before_fit(self) -> None:
        if self.config["fit"].get("overwrite") and self.config["fit"].get("ckpt_path") is None:
            remove_checkpoints(self.trainer)
        print_run_summary(self.trainer, self.datamodule)

    def instantiate_trainer(self, **kwargs):
        """The configured Trainer, with the run's reporting callbacks added (the step-bounded
        progress bar unless the config turns the bar off or brings its own), bound to its
        run folder."""
        from lightning.pytorch.callbacks import ProgressBar

        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        callbacks += [*kwargs.pop("callbacks", []), EdgeStepLogs()]
        if (config.get("enable_progress_bar") is not False
                and not any(isinstance(c, ProgressBar) for c in callbacks)):
            callbacks.append(StepProgressBar())
        return bind_run_folder(super().instantiate_trainer(callbacks=callbacks, **kwargs))


def cpu_threads(trainer, datamodule) -> int:
    """On CPU, gives torch's intra-op pool the cores that this process's DataLoader workers
    and the other processes of this node leave free (at least one), unless OMP_NUM_THREADS
    says otherwise (torchrun sets it to 1 for several processes per node). torch's default,
    every core, oversubscribes them, and its threads spin-wait at barriers for a core the
    worker holds: on the shared 2-core development VM (other jobs running), a tiny stage-0
    step took 0.84 s (median) with 2 threads and one worker, 0.11 s with 1. Returns the
    thread count."""
    import os

    import torch
    from lightning.pytorch.accelerators import CPUAccelerator

    if isinstance(trainer.accelerator, CPUAccelerator) and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            os.cpu_count() or 1
        per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, per_process - getattr(datamodule, "num_workers", 0)))
    return torch.get_num_threads()


def bind_run_folder(trainer):
    """Gives the outputs a config leaves unset this run's folder, ``trainer.default_root_dir``
    as finally set: checkpoints in ``<root>/checkpoints`` (so ``--ckpt_path last`` resumes
    this run, never another one's), the MLflow logger's local files (the resolved config) in
    ``<root>``. The export and eval callbacks read it themselves at the end of the run."""
    import os

    root = Path(trainer.default_root_dir)
    for callback in trainer.checkpoint_callbacks:
        if callback.dirpath is None:
            callback.dirpath = os.path.realpath(root / "checkpoints")
    for logger in trainer.loggers:
        if isinstance(logger, LyraMLFlowLogger) and logger.local_dir is None:
            logger.local_dir = str(root)
    return trainer


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
    stage 2 on its held-out questions. Extra arguments go to every stage's CLI. The tiny
    preset begins with stage 0, its stand-in for a pretrained Qwen2-VL, whose export the
    later stages load as their ``qwen2vl`` and ``whisper`` checkpoints."""
    parser = argparse.ArgumentParser(prog="lyra-pl pipeline", description=pipeline.__doc__)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--root", default=None,
                        help="output directory (default runs/<preset>); a stage writes "
                             "<root>/<stage name>/{checkpoints,export,eval}")
    parser.add_argument("--stages", default=None,
                        help="comma-separated, in order (default: 0,1,2,3,4 where the preset "
                             "has a stage-0 config, else 1,2,3,4)")
    parser.add_argument("--no-eval", action="store_true", help="skip the stage-2 evaluation")
    parser.add_argument("--overwrite", action="store_true",
                        help="run again over an earlier pipeline run in the same --root")
    args, extra = parser.parse_known_args(argv)
    known_warnings.silence()
    root = Path(args.root or f"runs/{args.preset}")
    if args.stages:
        stages = [int(s) for s in args.stages.split(",")]
    else:
        stages = [s for s in STAGE_FILES if s or _has_config(args.preset, s)]
    base = root / STAGE_FILES[0] / "export"
    previous: Path | None = None
    timings = []

    def run(subcommand: str, stage: int, out: Path, init_from: Path | None) -> None:
        cli_args = [subcommand, "--config", str(config_path(args.preset, stage)),
                    f"--trainer.default_root_dir={out}"]
        if args.overwrite and subcommand == "fit":
            cli_args.append("--overwrite")
        if init_from is not None:
            cli_args.append(f"--model.init_args.init_from={init_from}")
        if stage > 0 and 0 in stages:  # this run's own base model, not the config's default
            cli_args += [f"--model.init_args.qwen2vl={base / 'qwen2vl'}",
                         f"--model.init_args.whisper={base / 'whisper'}"]
        t0, c0 = time.perf_counter(), cpu_seconds()
        LyraCLI(cli_args + extra)
        timings.append((f"{STAGE_FILES[stage]} {subcommand}", time.perf_counter() - t0,
                        cpu_seconds() - c0))

    try:
        for stage in stages:
            out = root / STAGE_FILES[stage]
            print(f"\n=== stage {stage}: {STAGE_FILES[stage]} -> {out}", flush=True)
            run("fit", stage, out, previous if stage > 1 else None)
            if stage >= 1:
                previous = out / "export"
            if stage == 2 and not args.no_eval:
                print(f"\n=== stage 2 evaluation: held-out questions -> {out / 'eval'}",
                      flush=True)
                run("predict", stage, out, previous)
    except RunInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # CPU time (this process and its finished DataLoader workers) beside the wall time: on a
    # shared machine the wall time says as much about the neighbours as about the pipeline.
    print(f"\n{'':<32}{'wall':>10}{'CPU':>10}")
    total = ("total", sum(t[1] for t in timings), sum(t[2] for t in timings))
    for name, wall, cpu in [*timings, total]:
        print(f"{name:<32}{wall:8.1f} s{cpu:8.1f} s")
    return 0


def cpu_seconds() -> float:
    """CPU seconds used so far by this process and its waited-for children."""
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def _has_config(preset: str, stage: int) -> bool:
    try:
        config_path(preset, stage)
        return True
    except FileNotFoundError:
        return False


def remove_checkpoints(trainer) -> None:
    """``--overwrite``: the earlier run's checkpoints go (files, or folders of distributed
    checkpoints), so this run's ``last.ckpt`` is not versioned beside them. Rank 0 only, before
    any process group exists (no other rank reads them: nothing resumes)."""
    import os
    import shutil

    if int(os.environ.get("RANK", "0")) != 0:
        return
    for callback in trainer.checkpoint_callbacks:
        for path in Path(callback.dirpath).glob("*.ckpt") if callback.dirpath else ():
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def print_run_summary(trainer, datamodule) -> None:
    """Where this run writes and what it reads, once, before the Trainer starts."""
    from lightning.pytorch.utilities import rank_zero_info

    lines = [f"run folder   {Path(trainer.default_root_dir).resolve()}"]
    lines += [f"checkpoints  {cb.dirpath}" for cb in trainer.checkpoint_callbacks]
    for logger in trainer.loggers:
        if isinstance(logger, LyraMLFlowLogger):
            lines.append(f"MLflow       {logger.tracking_uri}  experiment "
                         f"{logger.experiment_name!r}, run {logger.run_id}")
    for split, path in getattr(datamodule, "paths", {}).items():
        if path is not None:
            lines.append(f"data {split:<7} {_dataset_line(path, datamodule.sources[split])}")
    rank_zero_info("\n".join(lines))


def _dataset_line(path: str, source: str | None) -> str:
    from lyra_pl.data.datamodule import resolve_path
    from lyra_pl.data.shards import read_manifest

    where = resolve_path(path)
    try:
        shards = read_manifest(where)
    except (OSError, ValueError):
        return f"{where} (converted from {resolve_path(source)} first)" if source else str(where)
    return f"{where} ({len(shards)} shards, {sum(n for _, n in shards)} samples)"


def resolve_configs(argv: list[str]) -> list[str]:
    """``--config FILE`` / ``-c FILE`` / ``--config=FILE`` resolved like data paths: from the
    working directory when it is there, else from the repository (``configs/...``)."""
    from lyra_pl.data.datamodule import resolve_path

    out, take = [], False
    for arg in argv:
        if take:
            arg, take = str(resolve_path(arg)), False
        elif arg in ("--config", "-c"):
            take = True
        elif arg.startswith("--config="):
            arg = "--config=" + str(resolve_path(arg.split("=", 1)[1]))
        out.append(arg)
    return out


def main(argv: list[str]) -> int:
    known_warnings.silence()
    try:
        LyraCLI(resolve_configs(argv))
    except RunInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
