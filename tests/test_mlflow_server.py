"""`lyra-pl fit` logging to a real MLflow tracking server, as on a cluster whose nodes share one:
the test starts `mlflow server` on 127.0.0.1 (sqlite backend, artifacts proxied by the server
into a directory of its own), runs tiny stage 0 for four steps with
``MLFLOW_TRACKING_URI=http://127.0.0.1:<port>``, and reads the run back through the server's
REST API with urllib only: the experiment by name, the run, its params, the metric history,
the artifact listing and the artifacts themselves (the resolved config, a metric plot)."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 180  # seconds; measured 15-25 s on the 2-core development VM
STEPS = 4


@dataclass
class Server:
    url: str
    artifacts: Path
    log: Path

    def get(self, route: str, **query) -> dict:
        return self._json(urllib.request.Request(f"{self.url}{route}?"
                                                 f"{urllib.parse.urlencode(query)}"))

    def post(self, route: str, body: dict) -> dict:
        return self._json(urllib.request.Request(
            f"{self.url}{route}", data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json"}))

    def download(self, route: str, **query) -> bytes:
        url = f"{self.url}{route}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        return self._open(urllib.request.Request(url))

    def _json(self, request: urllib.request.Request) -> dict:
        return json.loads(self._open(request))

    def _open(self, request: urllib.request.Request) -> bytes:
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{request.get_method()} {request.full_url}: HTTP {e.code} "
                                 f"{e.read()[:2000]!r}") from None


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> float:
    """Seconds until ``GET /health`` answers OK; fails with the server's log if it exits or
    does not answer within ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-5000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200 and response.read().strip() == b"OK":
                    return time.monotonic() - t0
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    pytest.fail(f"mlflow server not healthy after {timeout} s:\n{log.read_text()[-5000:]}")


def stop(proc: subprocess.Popen) -> None:
    """The server and its uvicorn worker (one process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    else:  # the worker may outlive a server process that died
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_server")
    port, log = free_port(), root / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # The server's GenAI job runner (huey consumers, several processes) is not needed here.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        cwd=root, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log, STARTUP_TIMEOUT)
        yield Server(url, root / "artifacts", log)
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def logged_run(server, tmp_path_factory) -> dict:
    """Tiny stage 0, four steps of two samples, logged to the server; returns the run as the
    REST API's ``runs/search`` gives it."""
    from lyra_pl.data.convert import convert

    cwd = tmp_path_factory.mktemp("stage0")
    samples = json.loads((ROOT / "data/tiny/stage0_vlm.train.json").read_text())[:8]
    (cwd / "train.json").write_text(json.dumps(samples))
    convert(cwd / "train.json", cwd / "shards", media_root=ROOT / "data/tiny")
    args = ["fit", "--config", str(ROOT / "configs/tiny/stage0_base_vlm.yaml"),
            f"--data.train={cwd / 'shards'}", "--data.train_source=null", "--data.val=null",
            "--data.val_source=null", "--data.batch_size=2", "--data.num_workers=0",
            "--trainer.limit_val_batches=0", f"--trainer.max_steps={STEPS}",
            "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
            "--trainer.default_root_dir=run"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.url}
    proc = subprocess.run([sys.executable, "-m", "lyra_pl.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:] + "\n--- server log:\n" + \
        server.log.read_text()[-3000:]
    assert f"MLflow       {server.url}" in out  # the run summary names the server
    # nothing went to a local store: the default would be ./mlflow.db
    assert not (cwd / "mlflow.db").exists() and not (cwd / "mlruns").exists()

    exp = server.get("/api/2.0/mlflow/experiments/get-by-name",
                     experiment_name="lyra_pl-tiny")["experiment"]
    assert exp["artifact_location"].startswith("mlflow-artifacts:")  # served by the server
    runs = server.post("/api/2.0/mlflow/runs/search",
                       {"experiment_ids": [exp["experiment_id"]]})["runs"]
    assert len(runs) == 1, runs
    return runs[0]


def test_run_and_params_through_the_rest_api(logged_run):
    info, data = logged_run["info"], logged_run["data"]
    assert info["run_name"] == "stage0_base_vlm" and info["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in data["params"]}
    assert params["model.class_path"] == "lyra_pl.training.stages.BaseVLMStage"
    assert params["model.init_args.lr"] == "0.001"  # the config's 1.0e-3
    assert params["data.batch_size"] == "2"  # the command line's override
    assert params["trainer.max_steps"] == str(STEPS)


def test_metric_history_through_the_rest_api(server, logged_run):
    run_id = logged_run["info"]["run_id"]
    for key in ("train/loss", "train/lr"):
        history = server.get("/api/2.0/mlflow/metrics/get-history", run_id=run_id,
                             metric_key=key)["metrics"]
        assert sorted(m["step"] for m in history) == list(range(STEPS)), (key, history)
        assert all(math.isfinite(m["value"]) and m["value"] >= 0 for m in history), history
        if key == "train/loss":
            assert min(m["value"] for m in history) > 0
        else:  # one warmup step from 0 to the config's lr, then the cosine decay
            assert max(m["value"] for m in history) == pytest.approx(1e-3, rel=1e-6)
    latest = {m["key"]: m for m in logged_run["data"]["metrics"]}
    assert latest["train/loss"]["step"] == STEPS - 1
    assert {"train/ce", "train/tokens", "train/tokens_per_s"} <= set(latest)


def test_artifacts_through_the_rest_api(server, logged_run):
    info = logged_run["info"]
    listed = server.get("/api/2.0/mlflow/artifacts/list", run_id=info["run_id"])["files"]
    assert {"config.yaml", "plots"} <= {f["path"] for f in listed}
    plots = server.get("/api/2.0/mlflow/artifacts/list", run_id=info["run_id"],
                       path="plots")["files"]
    assert "plots/train_loss.png" in {f["path"] for f in plots}

    # the artifact proxy route, from the run's artifact URI (mlflow-artifacts:/<exp>/<run>/...)
    base = "/api/2.0/mlflow-artifacts/artifacts" + urllib.parse.urlparse(info["artifact_uri"]).path
    text = server.download(f"{base}/config.yaml").decode()
    config = yaml.safe_load(text)
    assert config["model"]["class_path"] == "lyra_pl.training.stages.BaseVLMStage"
    assert config["trainer"]["logger"]["init_args"]["run_name"] == "stage0_base_vlm"
    assert config["trainer"]["max_steps"] == STEPS and config["data"]["batch_size"] == 2
    # the UI's download route gives the same file
    assert server.download("/get-artifact", path="config.yaml",
                           run_uuid=info["run_id"]).decode() == text
    assert server.download(f"{base}/plots/train_loss.png")[:8] == b"\x89PNG\r\n\x1a\n"
    # stored by the server, under its --artifacts-destination
    stored = server.artifacts / info["experiment_id"] / info["run_id"] / "artifacts"
    assert (stored / "config.yaml").read_text() == text
