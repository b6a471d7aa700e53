"""docs/data.md runs as written: every ```bash block, in order, with ``bash -e`` in one empty
directory, on the example release its first block writes. Then the folders the shipped
mini/base/pro configs read hold converted shards, the strictness example reported its skips,
the parts were merged, and the LibriSpeech tree its (not run) eval command names reads as ASR
data."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "data.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def blocks(lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(DOC.read_text()) if kind == lang]


def test_every_block_says_whether_it_runs():
    """bash: run by this test; text / yaml: shown only. An unlabelled block would be neither."""
    kinds = [kind for kind, _ in FENCE.findall(DOC.read_text())]
    assert kinds and set(kinds) <= {"bash", "text", "yaml"}, kinds
    assert blocks("bash")[0].strip() == "lyra-pl data example --out release"


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("docs_data")
    bin_dir = tmp_path_factory.mktemp("bin")
    # `python` is this interpreter; `lyra-pl` the installed entry point, else the module.
    shims = {"python": f'exec {sys.executable} "$@"'}
    if shutil.which("lyra-pl") is None:
        shims["lyra-pl"] = f'exec {sys.executable} -m lyra_pl.cli "$@"'
    for name, line in shims.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{line}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    for i, block in enumerate(blocks("bash")):
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (f"docs/data.md bash block {i} failed ({done.returncode})"
                                      f":\n{block}\n--- stdout\n{done.stdout}\n--- stderr\n"
                                      f"{done.stderr}")
    return cwd


def _config_folders() -> set[str]:
    folders = set()
    for preset in ("mini", "base", "pro"):
        for config in sorted((REPO / "configs" / preset).glob("stage*.yaml")):
            data = yaml.safe_load(config.read_text())["data"]
            folders |= {data["train"], data["val"]}
    return folders


def test_stage_folders_of_the_configs_are_converted(ran):
    folders = _config_folders()
    assert len(folders) == 8, folders  # train and val of four stages, shared by the presets
    for folder in folders:
        d = ran / folder
        manifest = json.loads((d / "manifest.json").read_text())
        report = json.loads((d / "report.json").read_text())
        assert report["converted"] > 0 and report["converted"] == report["total"], folder
        assert report["skipped"] == [] and report["ok"], folder
        assert sum(s["nsamples"] for s in manifest["shards"]) == report["converted"]
        assert all((d / s["url"]).is_file() for s in manifest["shards"])
    stage2 = json.loads((ran / "data/lyra/shards/stage2_joint/train/report.json").read_text())
    assert stage2["resampled"], "the example's 22.05 / 44.1 / 48 kHz clips were resampled"


def test_strictness_example_reports_every_skip(ran):
    report = json.loads((ran / "strict" / "report.json").read_text())
    assert report["converted"] == 1 and not report["ok"]
    reasons = {e["id"]: e["reason"] for e in report["skipped"]}
    assert "'images' looks like media" in reasons["typo"]
    assert "file not found" in reasons["missing"]
    assert not (ran / "strict" / "manifest.json").exists()


def test_parts_merged(ran):
    manifest = json.loads((ran / "parts_demo" / "manifest.json").read_text())
    assert [s["nsamples"] for s in manifest["shards"]] == [2, 2, 1]


def test_eval_tree_reads_as_asr_data(ran):
    from lyra_pl.eval.tasks import get_task

    [command] = [line for block in blocks("text") for line in block.splitlines()
                 if line.startswith("lyra-pl eval --task asr")]
    data = ran / command.split("--data ")[1].split()[0]
    samples = get_task("asr").samples(data)
    assert len(samples) == 4 and all((data / s["speech"]).is_file() for s in samples)
