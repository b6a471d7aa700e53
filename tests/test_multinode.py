"""Stage 2 on two "nodes" through `lyra-pl fit`: two `torchrun --nnodes 2 --node_rank {0,1}
--nproc_per_node 1` launches on 127.0.0.1 (one CPU process each, gloo, hybrid sharding: a
("replicate", "shard") mesh of 2 x 1), against one process with the same global batch
(`lyra-pl fit` inside the test's own process, unsharded, while the nodes run).

The data makes the runs comparable by construction: two training samples, one per shard, that
ask the same spoken question (same clip, same transcript) about two different images and have
one-token answers. On two ranks each rank trains on one of them per step (each step is an
epoch: batch size 1 per rank); the single process trains on both in one batch of 2 (no
padding: equal lengths). The ranks' losses differ (different images), so their mean equals
the single-process loss at every step only if the gradients are averaged across the nodes.
Both runs load the same weights (a base model and a stage-1-style export with a saved
``speech`` adapter), so nothing depends on how a sharded model draws its initialization.

Per-rank losses come from a small callback the test puts on ``PYTHONPATH`` (``train/loss`` in
MLflow is rank 0's only); the 2-node run's MLflow run (one, from rank 0, in a new sqlite store
both ranks open at once) is checked against rank 0's losses."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
PAIR = ("joint_train_564", "joint_train_317")  # q_color0_en-gb.wav; "purple" / "red"
STEPS = 3
TIMEOUT = 420

_CALLBACK = '''
import json, os
import lightning as L


class RankLosses(L.Callback):
    """Writes this rank's training loss per step to <out>/rank<global rank>.json."""

    def __init__(self, out: str):
        self.out = out
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module):
        os.makedirs(self.out, exist_ok=True)
        with open(os.path.join(self.out, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"losses": self.losses, "world_size": trainer.world_size,
                       "node_rank": trainer.node_rank, "num_nodes": trainer.num_nodes}, f)
'''


def make_inputs(root: Path) -> dict[str, str]:
    """Weights both runs load, and the two-sample dataset (two shards of one sample)."""
    from lyra_pl.data.convert import convert
    from lyra_pl.model import LyraConfig, LyraModel, lora
    from lyra_pl.model.loading import save_parts, save_qwen2vl, save_whisper

    torch.manual_seed(0)
    model = LyraModel(LyraConfig.from_preset("tiny"))
    lora.add_adapter(model.llm, "speech", lora.LoraSpec(4, 8, 0.0))  # no dropout: no RNG
    with torch.no_grad():
        for n, p in model.llm.named_parameters():
            if ".lora_B." in n:  # not a no-op: the adapter's A gets gradients from step 1
                p.normal_(0, 0.02)
    save_qwen2vl(model, root / "qwen2vl")
    save_whisper(model, root / "whisper")
    save_parts(model, root / "export")
    lora.save_adapter(model.llm, "speech", root / "export" / "adapter_speech")
    train = json.loads((ROOT / "data/tiny/stage2_joint.train.json").read_text())
    pair = [s for s in train if s["id"] in PAIR]
    assert len(pair) == 2 and pair[0]["speech"] == pair[1]["speech"]
    (root / "pair.json").write_text(json.dumps(pair))
    convert(root / "pair.json", root / "shards", media_root=ROOT / "data/tiny",
            samples_per_shard=1)
    return {"qwen2vl": str(root / "qwen2vl"), "whisper": str(root / "whisper"),
            "init_from": str(root / "export"), "train": str(root / "shards")}


def fit_args(inputs: dict[str, str], run: Path, batch_size: int) -> list[str]:
    return [
        "fit", "--config", str(ROOT / "configs/tiny/stage2_joint_sft.yaml"),
        f"--model.init_args.qwen2vl={inputs['qwen2vl']}",
        f"--model.init_args.whisper={inputs['whisper']}",
        f"--model.init_args.init_from={inputs['init_from']}",
        "--model.init_args.lr=1e-2", "--model.init_args.warmup_ratio=0",
        f"--data.train={inputs['train']}", "--data.train_source=null",
        # no validation or prediction data: nothing converted into the repository's data/
        "--data.val=null", "--data.val_source=null", "--data.predict=null",
        "--data.predict_source=null",
        f"--data.batch_size={batch_size}", "--data.num_workers=0",
        "--trainer.limit_val_batches=0", f"--trainer.max_steps={STEPS}",
        "--trainer.max_epochs=-1",  # one sample a rank: the config's epochs would end it first
        "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={run}",
        "--trainer.callbacks+=multinode_losses.RankLosses",
        f"--trainer.callbacks.out={run / 'losses'}",
    ]


def start(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    # A session of its own: on failure the launcher and its workers go down together.
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_all(procs: dict[str, tuple[subprocess.Popen, Path]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    try:
        for name, (proc, log) in procs.items():
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{name} still running after {timeout} s:\n"
                                     + log.read_text()[-4000:]) from None
        failed = [n for n, (p, _) in procs.items() if p.returncode != 0]
        assert not failed, "\n\n".join(
            f"{n} exited {procs[n][0].returncode}:\n{procs[n][1].read_text()[-5000:]}"
            for n in failed)
    finally:
        kill(procs)


def kill(procs: dict[str, tuple[subprocess.Popen, Path]]) -> None:
    for proc, _ in procs.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def one_process(args: list[str], tmp_path: Path) -> None:
    """The reference: `lyra-pl fit` in this process (the Trainer's default strategy on one CPU,
    no sharding), while the two nodes run; the environment is restored afterwards."""
    from lyra_pl.training.cli import main

    saved, path = dict(os.environ), list(sys.path)
    sys.path.insert(0, str(tmp_path))  # the loss callback's module
    try:
        assert main(args) == 0
    finally:
        os.environ.clear()
        os.environ.update(saved)
        sys.path[:] = path
        sys.modules.pop("multinode_losses", None)


def mlflow_runs(db: Path, experiment: str) -> list[dict]:
    """The runs of ``experiment`` in an MLflow sqlite store, with their params and
    ``train/loss`` history, read with sqlite3 (importing mlflow and opening its store here
    would take longer than the check)."""
    import sqlite3

    with sqlite3.connect(db) as con:
        ids = [r for (r,) in con.execute(
            "SELECT run_uuid FROM runs JOIN experiments USING (experiment_id) "
            "WHERE experiments.name = ?", (experiment,))]
        return [{"params": dict(con.execute("SELECT key, value FROM params WHERE run_uuid = ?",
                                            (run,))),
                 "loss": [v for v, in con.execute(
                     "SELECT value FROM metrics WHERE run_uuid = ? AND key = 'train/loss' "
                     "ORDER BY step", (run,))]}
                for run in ids]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # jsonargparse's, in-process CLI
def test_two_nodes_hybrid_sharding_match_one_process(tmp_path):
    inputs = make_inputs(tmp_path / "inputs")
    (tmp_path / "multinode_losses.py").write_text(_CALLBACK)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PYTHONPATH": os.pathsep.join(
               [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])}
    port = free_port()
    two, one = tmp_path / "two_nodes", tmp_path / "one_process"
    procs = {}
    try:
        for node in (0, 1):
            launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                      f"--node_rank={node}", "--nproc_per_node=1", "--rdzv-backend=static",
                      f"--rdzv-endpoint=127.0.0.1:{port}"]
            args = [*fit_args(inputs, two, batch_size=1), "--trainer.num_nodes=2",
                    "--trainer.devices=1", "--model.init_args.hybrid_shard=true",
                    "--trainer.logger.init_args.plots=false"]
            log = tmp_path / f"node{node}.log"
            procs[f"node {node}"] = (start([*launch, "-m", "lyra_pl.cli", *args], log, env,
                                           tmp_path), log)
        one_process([*fit_args(inputs, one, batch_size=2), "--trainer.strategy=auto",
                     "--trainer.logger=false"], tmp_path)
    except BaseException:
        kill(procs)
        raise
    wait_all(procs, TIMEOUT)

    ranks = [json.loads((two / "losses" / f"rank{r}.json").read_text()) for r in (0, 1)]
    ref = json.loads((one / "losses" / "rank0.json").read_text())
    for r, rank in enumerate(ranks):  # --node_rank r holds global rank r (one process a node)
        assert (rank["world_size"], rank["num_nodes"], rank["node_rank"]) == (2, 2, r), rank
        assert len(rank["losses"]) == STEPS
    assert ref["world_size"] == 1 and len(ref["losses"]) == STEPS
    # hybrid sharding: the shard dimension is the node (one process), so each rank holds
    # every sharded parameter (replicated across nodes); full sharding would split them
    for node in (0, 1):
        log = (tmp_path / f"node{node}.log").read_text()
        shares = re.findall(r"\[rank (\d)\] holds [\d,]+ of [\d,]+ sharded parameter values "
                            r"\(([\d.]+)%\)", log)
        assert shares == [(str(node), "100.0")], log[-3000:]
    a, b = (torch.tensor(r["losses"]) for r in ranks)
    assert (a - b).abs().min() > 1e-3  # different samples on the two nodes
    torch.testing.assert_close((a + b) / 2, torch.tensor(ref["losses"]), rtol=1e-4, atol=1e-5)

    runs = mlflow_runs(tmp_path / "mlflow.db", "lyra_pl-tiny")  # one run, from global rank 0
    assert len(runs) == 1 and runs[0]["params"]["trainer.num_nodes"] == "2"
    torch.testing.assert_close(torch.tensor(runs[0]["loss"]), a, rtol=1e-6, atol=1e-6)
