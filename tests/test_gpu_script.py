"""`.ci/gpu`, the stages run on a lent GPU machine: its usage, that every command of every stage
exists (a --dry-run lists them), and that what the stages import loads on that machine's Python,
which lacks mlflow, webdataset, omegaconf and PyAV. All on CPU, nothing built or run on a GPU."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "gpu"
STAGES = "abcd"
# Not installed on the GPU machines (shared/PLATFORM.md; .devices' KINDS.md package list).
ABSENT_ON_GPU_MACHINE = ("mlflow", "webdataset", "omegaconf", "av")
# What stages a-d import: the ops (pytest, the benchmarks), the bench CLI and its subcommands,
# and the training path that `bench train` runs.
STAGE_MODULES = ("lyra_pl", "lyra_pl.ops", "lyra_pl.bench.__main__", "lyra_pl.bench.kernels",
                 "lyra_pl.bench.peers", "lyra_pl.bench.prefill", "lyra_pl.bench.train",
                 "lyra_pl.training.stages", "lyra_pl.training.parallelize")

# Runs in a fresh interpreter: the absent packages cannot be imported (a meta-path finder refuses
# them and every submodule) and look absent to availability probes (`importlib.util.find_spec`
# returns None for a name whose sys.modules entry is None, as for a package that is not
# installed: transformers and lightning probe that way). Then the modules are imported and
# `python -m lyra_pl.bench ... --help` is run for each command; the results go back as JSON.
BLOCKED_RUN = r"""
import contextlib, importlib, importlib.abc, io, json, sys, traceback

job = json.load(sys.stdin)
absent = tuple(job["absent"])


class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in absent:
            raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU machine)",
                                      name=name)
        return None


sys.meta_path.insert(0, Absent())
for name in absent:
    sys.modules[name] = None

report = {"imports": {}, "helps": [], "loaded": []}
for module in job["modules"]:
    try:
        importlib.import_module(module)
        report["imports"][module] = None
    except BaseException:
        report["imports"][module] = traceback.format_exc()
for argv in job["helps"]:
    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
        try:
            from lyra_pl.bench.__main__ import main

            main(argv)
            code = "returned without printing the help"
        except SystemExit as e:
            code = e.code
        except BaseException:
            code = traceback.format_exc()
    report["helps"].append({"argv": argv, "code": code, "text": text.getvalue()})
report["loaded"] = sorted(m for m, v in sys.modules.items()
                          if v is not None and m.partition(".")[0] in absent)
print(json.dumps(report))
"""


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60)


def dry_run(stage: str) -> list[tuple[str, list[str]]]:
    """(step name, argv) of each step of a stage, as `.ci/gpu --dry-run` prints them."""
    proc = run_script("--dry-run", stage, OUT="gpu_out_dry")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = [(m[1], shlex.split(m[2])) for m in
             re.finditer(rf"^\[{stage}\] ([\w-]+): (.*)$", proc.stdout, re.MULTILINE)]
    assert steps, proc.stdout
    return steps


def program(argv: list[str]) -> list[str]:
    """argv without a leading `env VAR=value ...`."""
    if argv[0] == "env":
        argv = argv[1:]
        while argv and re.match(r"^\w+=", argv[0]):
            argv = argv[1:]
    return argv


@pytest.fixture(scope="module")
def stage_steps() -> dict[str, list[tuple[str, list[str]]]]:
    return {stage: dry_run(stage) for stage in STAGES}


@pytest.fixture(scope="module")
def blocked(stage_steps) -> dict:
    """The blocked interpreter's report: the stage modules' imports and the `--help` of every
    `python3 -m lyra_pl.bench` command of the stages (and of each subcommand alone)."""
    helps = [[sub, "--help"] for sub in ("kernels", "prefill", "train")]
    for steps in stage_steps.values():
        for _, argv in steps:
            argv = program(argv)
            if argv[1:3] == ["-m", "lyra_pl.bench"]:
                helps.append(argv[3:] + ["--help"])
    job = {"absent": ABSENT_ON_GPU_MACHINE, "modules": STAGE_MODULES, "helps": helps}
    proc = subprocess.run([sys.executable, "-c", BLOCKED_RUN], input=json.dumps(job), cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [[], ["e"], ["--dry-run"], ["--dry-run", "x"]])
def test_usage_without_a_stage(args):
    proc = run_script(*args)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: bash .ci/gpu [--dry-run] STAGE")
    for stage in STAGES:
        assert re.search(rf"^  {stage}  \S", proc.stderr, re.MULTILINE), proc.stderr


def test_stage_imports_load_without_the_packages_the_gpu_machine_lacks(blocked):
    failed = {m: tb for m, tb in blocked["imports"].items() if tb is not None}
    assert not failed, "\n".join(f"{m}:\n{tb}" for m, tb in failed.items())
    assert set(blocked["imports"]) == set(STAGE_MODULES)
    assert blocked["loaded"] == []


def test_stage_commands_exist(stage_steps, blocked):
    cmake_lists = (ROOT / "CMakeLists.txt").read_text()
    bench = 0
    for stage, steps in stage_steps.items():
        for name, argv in steps:
            where = f"stage {stage}, step {name}: {shlex.join(argv)}"
            argv = program(argv)
            assert shutil.which(argv[0]) or argv[0] == "python3", where
            if argv[0] == "bash":  # a small script: it parses, and cmake's -D variables exist
                assert argv[1] == "-c", where
                assert subprocess.run(["bash", "-n", "-c", argv[2]]).returncode == 0, where
                for var in re.findall(r"-D(\w+)=", argv[2]):
                    assert var in cmake_lists, f"{where}: CMakeLists.txt has no {var}"
                continue
            assert argv[0] == "python3" and argv[1] == "-m", where
            module, args = argv[2], argv[3:]
            if module == "pip":
                assert args[0] == "install" and args[args.index("-e") + 1] == ".", where
                assert "--no-build-isolation" in args and "--no-deps" in args, where
                assert (ROOT / "setup.py").is_file(), where
            elif module == "pytest":
                paths = [a for a in args if a.startswith("tests")]
                assert paths and all((ROOT / p).exists() for p in paths), where
                assert "-k" in args, where
            else:
                assert module == "lyra_pl.bench", where
                bench += 1
    assert bench == 3  # kernels, prefill, train

    for run in blocked["helps"]:
        where = "python -m lyra_pl.bench " + shlex.join(run["argv"])
        assert run["code"] == 0, f"{where}:\n{run['code']}\n{run['text']}"
        for arg in run["argv"]:
            if arg.startswith("--"):
                assert arg in run["text"], f"{where}: {arg} is not an option of the subcommand"


def test_setup_stops_on_a_toolkit_folder_without_headers(tmp_path):
    """Stage a's build with a wrong CUDA_HOME: one line, before torch is even imported.
    (No 'cuda' in the test's name: stage a's `pytest -k cuda` selects the GPU tests.)"""
    env = {**os.environ, "CUDA_HOME": str(tmp_path), "LYRA_CUDA": "1"}
    proc = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"error: CUDA_HOME={tmp_path} has no include/cuda_runtime.h; point it at the CUDA "
        "toolkit folder (the one with bin/nvcc and include/)"]
