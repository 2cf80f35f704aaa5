"""Multi-worker training (MultiWorkerMirroredStrategy) with the same step and loop: two worker
processes on loopback, one logical CPU each, through `python cli.py train`.

The cluster tests start real processes (TF_CONFIG must be set before a process creates its
strategy, and a process holds one strategy's gRPC server), so they cost ~50 s each on 2 cores.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from typer.testing import CliRunner

import cli
from trainer import loop, strategy as strategy_lib
from trainer.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 240
COMMON = ["--set", "batch_size=16", "--set", "steps_per_call=2", "--set", "checkpoint_every_steps=2", "--gpus", "0"]


# --- TF_CONFIG from --worker-hosts / --task-index (pure) -------------------------------------------

def test_tf_config_json_is_the_cluster_spec_of_one_worker():
    spec = json.loads(strategy_lib.tf_config_json("node0:2222, node1:2222", 1))
    assert spec == {"cluster": {"worker": ["node0:2222", "node1:2222"]}, "task": {"type": "worker", "index": 1}}
    assert json.loads(strategy_lib.tf_config_json(["a:1"], 0))["task"]["index"] == 0


@pytest.mark.parametrize("hosts, index, message", [
    ("node0:2222,node1:2222", 2, "--task-index 2 must be between 0 and 1"),
    ("node0:2222,node1:2222", -1, "--task-index -1"),
    ("node0,node1:2222", 0, "'node0' is not host:port"),
    ("node0:http,node1:2222", 0, "is not host:port"),
    ("node0:2222,,node1:2222", 0, "must list host:port pairs"),
    ("node0:2222,node0:2222", 0, "twice"),
])
def test_tf_config_json_rejects_bad_flags(hosts, index, message):
    with pytest.raises(strategy_lib.StrategyError, match=message):
        strategy_lib.tf_config_json(hosts, index)


def test_set_worker_cluster_sets_tf_config_and_refuses_a_second_spec():
    environ: dict[str, str] = {}
    strategy_lib.set_worker_cluster(None, None, environ)
    assert environ == {}
    strategy_lib.set_worker_cluster("h0:1,h1:2", 0, environ)
    assert json.loads(environ["TF_CONFIG"])["task"] == {"type": "worker", "index": 0}
    with pytest.raises(strategy_lib.StrategyError, match="TF_CONFIG is already set"):
        strategy_lib.set_worker_cluster("h0:1,h1:2", 1, environ)
    with pytest.raises(strategy_lib.StrategyError, match="go together"):
        strategy_lib.set_worker_cluster("h0:1,h1:2", None, {})


@pytest.mark.parametrize("arguments, env, message", [
    (["--worker-hosts", "h0:1,h1:2", "--task-index", "0"],
     {"TF_CONFIG": '{"cluster": {"worker": ["h0:1"]}, "task": {"type": "worker", "index": 0}}'}, "TF_CONFIG is already set"),
    (["--worker-hosts", "h0:1,h1:2"], {}, "go together"),
    (["--worker-hosts", "h0:1,h1:2", "--task-index", "5"], {}, "--task-index 5 must be between 0 and 1"),
])
def test_cli_worker_flags_errors_exit_2(tmp_path, monkeypatch, arguments, env, message):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    result = CliRunner().invoke(cli.app, ["train", "--run-dir", str(tmp_path / "run"), *arguments], env=env)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()
    assert os.environ.get("TF_CONFIG") is None  # a refused flag never leaks into the process


def test_cli_train_help_lists_the_worker_flags():
    output = CliRunner().invoke(cli.app, ["train", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"}).output
    assert "--worker-hosts" in output and "--task-index" in output


# --- two real workers on loopback --------------------------------------------------------------------

def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _worker_env(tf_config: str | None = None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "TF_CONFIG"}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    if tf_config:
        env["TF_CONFIG"] = tf_config
    return env


class Job:
    """The worker processes of one cluster, their logs, and a joint deadline."""

    def __init__(self, log_dir: Path, commands: list[tuple[list[str], dict[str, str]]]):
        self.logs = [log_dir / f"worker-{index}.log" for index in range(len(commands))]
        self.processes = []
        for (arguments, env), log in zip(commands, self.logs):
            with open(log, "w") as out:
                self.processes.append(subprocess.Popen([sys.executable, "cli.py", "train", *arguments], cwd=REPO,
                                                       env=env, stdout=out, stderr=subprocess.STDOUT))

    def output(self, index: int) -> str:
        return self.logs[index].read_text()

    def tails(self) -> str:
        return "\n".join(f"--- worker {index} ---\n{self.output(index)[-3000:]}" for index in range(len(self.logs)))

    def wait(self, timeout: float = JOB_TIMEOUT_S) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [process.wait(timeout=max(deadline - time.monotonic(), 1)) for process in self.processes]
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the workers did not finish within {timeout} s\n{self.tails()}")

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def _two_workers(tmp_path: Path, run_dirs: list[Path], data_dir: str, max_steps: int, log_name: str,
                 tf_config_env_for_worker_1: bool = False) -> Job:
    hosts = ",".join(f"127.0.0.1:{port}" for port in _free_ports(2))
    commands = []
    for index, run_dir in enumerate(run_dirs):
        arguments = ["--set", f"max_steps={max_steps}", *COMMON, "--data-dir", data_dir, "--run-dir", str(run_dir)]
        if index == 1 and tf_config_env_for_worker_1:  # the same cluster, given the TF_CONFIG way
            commands.append((arguments, _worker_env(strategy_lib.tf_config_json(hosts, 1))))
        else:
            commands.append(([*arguments, "--worker-hosts", hosts, "--task-index", str(index)], _worker_env()))
    log_dir = tmp_path / log_name
    log_dir.mkdir()
    return Job(log_dir, commands)


def _variables(checkpoint_prefix: str) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(checkpoint_prefix)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def _files(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


@pytest.mark.slow
def test_two_workers_train_in_sync_and_the_chief_checkpoint_resumes_on_one_machine(tmp_path, mnist_data_dir,
                                                                                     monkeypatch):
    # Separate run dirs (no shared file system), so each worker's writes can be told apart:
    # the chief writes the run; worker 1 only its own copy of each checkpoint save.
    chief_dir, worker_dir = tmp_path / "chief-run", tmp_path / "worker-1-run"
    job = _two_workers(tmp_path, [chief_dir, worker_dir], mnist_data_dir, max_steps=4, log_name="logs",
                       tf_config_env_for_worker_1=True)
    assert job.wait() == [0, 0], job.tails()

    chief_out, worker_out = job.output(0), job.output(1)
    assert ("Strategy: MultiWorkerMirroredStrategy with 2 replica(s)" in chief_out
            and "2 worker(s), this is worker 0 (chief)" in chief_out), chief_out
    assert "2 worker(s), this is worker 1" in worker_out and "(chief)" not in worker_out, worker_out
    assert "Done: step 4" in chief_out and "Done: step 4" in worker_out

    assert {"config.json", "checkpoints/ckpt-4.index", "checkpoints/ckpt-2.index", "samples/step_0000004.png",
            "logs"} <= _files(chief_dir)
    assert not (chief_dir / ".worker-1-checkpoints").exists()
    assert {path.split("/")[0] for path in _files(worker_dir)} == {".worker-1-checkpoints"}

    chief_variables = _variables(str(chief_dir / "checkpoints" / "ckpt-4"))
    worker_variables = _variables(str(worker_dir / ".worker-1-checkpoints" / "ckpt-4"))
    assert chief_variables.keys() == worker_variables.keys()
    # Keras 3 checkpoints the generator's weights under its optimizer's `_trainable_variables`, its
    # BatchNorm statistics under `generator/`.
    generator_names = [name for name in chief_variables
                       if name.startswith(("generator/", "generator_optimizer/_trainable_variables/"))]
    assert len(generator_names) == 16, generator_names
    for name, value in chief_variables.items():
        np.testing.assert_array_equal(value, worker_variables[name], err_msg=name)
    assert int(chief_variables["step/.ATTRIBUTES/VARIABLE_VALUE"]) == 4
    earlier = _variables(str(chief_dir / "checkpoints" / "ckpt-2"))  # and they did train
    assert any(not np.array_equal(earlier[name], chief_variables[name]) for name in generator_names)

    # The chief's run continues on one machine, without TF_CONFIG, from step 4.
    monkeypatch.delenv("TF_CONFIG", raising=False)
    lines: list[str] = []
    config = TrainConfig.load(str(chief_dir))
    config = TrainConfig(**{**config.__dict__, "max_steps": 6, "gpus": 0, "cpu_replicas": None})
    result = loop.train(config, report=lines.append, progress=False)
    assert any(line.startswith("Resumed from step 4") for line in lines), lines
    assert result.step == 6 and result.checkpoint.endswith("ckpt-6")

    # Now the chief's run (step 6) and worker 1's own copy (step 4) disagree: both workers refuse.
    stale = _two_workers(tmp_path, [chief_dir, worker_dir], mnist_data_dir, max_steps=8, log_name="stale")
    assert stale.wait() == [2, 2], stale.tails()
    for index in (0, 1):
        assert "the workers resumed from different steps (6, 4 per replica)" in stale.output(index), stale.tails()
    assert tf.train.latest_checkpoint(str(chief_dir / "checkpoints")).endswith("ckpt-6")


@pytest.mark.slow
def test_a_killed_worker_and_a_restarted_job_resume_from_the_last_chief_checkpoint(tmp_path, mnist_data_dir):
    run_dir = tmp_path / "run"  # shared by both workers, as on a shared file system
    max_steps = 12
    job = _two_workers(tmp_path, [run_dir, run_dir], mnist_data_dir, max_steps, log_name="first")
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (run_dir / "checkpoints" / "ckpt-2.index").exists():
        if time.monotonic() > deadline or any(process.poll() is not None for process in job.processes):
            job.kill()
            pytest.fail(f"no first checkpoint\n{job.tails()}")
        time.sleep(0.1)
    job.processes[1].send_signal(signal.SIGKILL)
    job.processes[1].wait()
    # The chief notices its peer is gone (a failed collective or heartbeat) or hangs in the next
    # collective; either way the whole job is restarted, as a cluster manager would.
    try:
        chief_rc = job.processes[0].wait(timeout=60)
    except subprocess.TimeoutExpired:
        chief_rc = None
        job.kill()
    assert chief_rc != 0, f"the chief finished without its peer\n{job.tails()}"
    assert tf.train.latest_checkpoint(str(run_dir / "checkpoints")) is not None
    saved = int(tf.train.latest_checkpoint(str(run_dir / "checkpoints")).rsplit("-", 1)[1])
    assert 2 <= saved < max_steps, job.tails()

    restarted = _two_workers(tmp_path, [run_dir, run_dir], mnist_data_dir, max_steps, log_name="second")
    assert restarted.wait() == [0, 0], restarted.tails()
    for index in (0, 1):
        output = restarted.output(index)
        assert f"Resumed from step {saved} ({run_dir / 'checkpoints' / f'ckpt-{saved}'})" in output, output
        assert f"Done: step {max_steps}" in output, output
    final = _variables(str(run_dir / "checkpoints" / f"ckpt-{max_steps}"))
    assert int(final["step/.ATTRIBUTES/VARIABLE_VALUE"]) == max_steps
    worker_copy = _variables(str(run_dir / ".worker-1-checkpoints" / f"ckpt-{max_steps}"))
    for name, value in final.items():
        np.testing.assert_array_equal(value, worker_copy[name], err_msg=name)
