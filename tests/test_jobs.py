"""The cluster scripts in jobs/ and the submitit launcher config, checked without SLURM.

The sbatch scripts run under plain bash with fake SLURM variables and a fake ``scontrol``/``srun`` on PATH:
``DRY_RUN=1`` makes them print the command a node would run, and a fake ``srun`` lets the requeue trap be
exercised with real signals.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
SBATCH = JOBS / "slurm" / "tokenize.sbatch"
SBATCH_ARRAY = JOBS / "slurm" / "tokenize_array.sbatch"
SUBMITIT_YAML = ROOT / "conf" / "hydra" / "launcher" / "submitit_slurm.yaml"
SCRIPTS = sorted([*JOBS.rglob("*.sbatch"), *JOBS.rglob("*.sh")])
OVERRIDES = ["dataset.path=/data", "output.dir=/out"]
HOSTS = ["gpu-node-07", "gpu-node-08"]


def _write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def slurm_env(tmp_path: Path) -> dict[str, str]:
    """Environment of a batch script on node 1 of a 2 x 8 GPU job, with a fake ``scontrol`` on PATH.

    The fake ``scontrol`` prints the job's hostnames and records every other call in ``scontrol.log``.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_exe(
        bin_dir / "scontrol",
        "#!/bin/sh\n"
        f'if [ "$1 $2" = "show hostnames" ]; then printf "%s\\n" {" ".join(HOSTS)}; exit 0; fi\n'
        f'echo "$*" >> "{tmp_path}/scontrol.log"\n',
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "DRY_RUN"))}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        SLURM_JOB_NODELIST="gpu-node-[07-08]",
        SLURM_NNODES="2",
        SLURM_NODEID="1",
        SLURM_GPUS_ON_NODE="8",
        SLURM_JOB_ID="123",
        SLURM_ARRAY_JOB_ID="120",
        SLURM_ARRAY_TASK_ID="3",
    )
    return env


def _dry_run(script: Path, env: dict[str, str], cwd: Path) -> str:
    result = subprocess.run(
        ["bash", str(script), *OVERRIDES],
        env={**env, "DRY_RUN": "1"},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_scripts_found():
    assert SBATCH in SCRIPTS and SBATCH_ARRAY in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_bash_syntax(script: Path):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck(script: Path):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    result = subprocess.run(["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_multinode_dry_run_prints_the_launch_command(slurm_env, tmp_path):
    out = _dry_run(SBATCH, slurm_env, tmp_path)
    expected = (
        "accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank 1"
        f" --main_process_ip {HOSTS[0]} --main_process_port 20123 --rdzv_backend c10d"
        " -m pipeline.tokenize dataset.path=/data output.dir=/out"
    )
    assert out == expected + "\n"


def test_multinode_dry_run_counts_gpus_with_nvidia_smi(slurm_env, tmp_path):
    """Without SLURM_GPUS_ON_NODE the GPU count comes from ``nvidia-smi --list-gpus``."""
    del slurm_env["SLURM_GPUS_ON_NODE"]
    fake = "".join(f"echo 'GPU {i}: NVIDIA H100 (UUID: GPU-{i})'\n" for i in range(4))
    _write_exe(tmp_path / "bin" / "nvidia-smi", "#!/bin/sh\n" + fake)
    out = _dry_run(SBATCH, {**slurm_env, "SLURM_NODEID": "0"}, tmp_path)
    assert " --num_processes 8 --machine_rank 0 " in out


def test_array_dry_run_prints_the_launch_command(slurm_env, tmp_path):
    out = _dry_run(SBATCH_ARRAY, slurm_env, tmp_path)
    assert out == "python -m pipeline.tokenize dataset.path=/data output.dir=/out\n"  # one rank: no launcher


def test_array_tasks_run_the_same_command(slurm_env, tmp_path):
    """Units are shared through claims: the task index must not change what a task runs."""
    outs = {_dry_run(SBATCH_ARRAY, {**slurm_env, "SLURM_ARRAY_TASK_ID": str(i)}, tmp_path) for i in (0, 3, 15)}
    assert len(outs) == 1


def _start_with_fake_srun(script: Path, env: dict[str, str], tmp_path: Path, exit_code: int | None):
    """Run ``script`` with a fake ``srun`` that records SIGTERM, then exits (after 0.5 s) with ``exit_code``.

    ``exit_code=None``: the fake srun runs until it is signalled. Returns the process once srun has started.
    """
    started, log = tmp_path / "srun.started", tmp_path / "srun.log"
    body = f"sleep 0.5\nexit {exit_code}\n" if exit_code is not None else "while :; do sleep 0.05; done\n"
    _write_exe(
        tmp_path / "bin" / "srun",
        f"#!/bin/sh\ntrap 'echo TERM >> \"{log}\"; exit 143' TERM\n"
        f'echo "$*" > "{started}"\n' + body,
    )
    proc = subprocess.Popen(["bash", str(script), *OVERRIDES], env=env, cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not started.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "fake srun never started"
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize(
    ("script", "requeue_id"), [(SBATCH, "123"), (SBATCH_ARRAY, "120_3")], ids=["multinode", "array"]
)
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_signal_stops_the_ranks_then_requeues(slurm_env, tmp_path, script, requeue_id, sig):
    proc = _start_with_fake_srun(script, slurm_env, tmp_path, exit_code=None)
    assert "pipeline.tokenize" in (tmp_path / "srun.started").read_text()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert (tmp_path / "srun.log").read_text() == "TERM\n"  # the ranks get TERM, whatever the job got
    assert (tmp_path / "scontrol.log").read_text() == f"requeue {requeue_id}\n"


@pytest.mark.parametrize("script", [SBATCH, SBATCH_ARRAY], ids=["multinode", "array"])
def test_a_failed_requeue_fails_the_job(slurm_env, tmp_path, script):
    """Stopped for preemption and not requeued: the job must not end COMPLETED (nobody would resume it)."""
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.write_text(scontrol.read_text() + 'case "$1" in requeue) exit 1;; esac\n')
    proc = _start_with_fake_srun(script, slurm_env, tmp_path, exit_code=None)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 1 and "resubmit the same command" in err, err


@pytest.mark.parametrize("script", [SBATCH, SBATCH_ARRAY], ids=["multinode", "array"])
@pytest.mark.parametrize("code", [0, 3])
def test_normal_exit_is_passed_on_without_requeue(slurm_env, tmp_path, script, code):
    proc = _start_with_fake_srun(script, slurm_env, tmp_path, exit_code=code)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == code, err
    assert not (tmp_path / "scontrol.log").exists()
    assert not (tmp_path / "srun.log").exists()


def test_submitit_launcher_config():
    cfg = yaml.safe_load(SUBMITIT_YAML.read_text())
    assert cfg["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    # Keys of hydra-submitit-launcher 1.2 (BaseQueueConf + SlurmQueueConf): an unknown key would reach
    # submitit's update_parameters and fail only at submission.
    known = {
        "_target_", "submitit_folder", "timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node",
        "mem_gb", "nodes", "name", "stderr_to_stdout", "partition", "qos", "comment", "constraint", "exclude",
        "gres", "cpus_per_gpu", "gpus_per_task", "mem_per_gpu", "mem_per_cpu", "account", "signal_delay_s",
        "max_num_timeout", "additional_parameters", "array_parallelism", "setup",
    }  # fmt: skip
    assert set(cfg) == known
    assert cfg["nodes"] == 1 and cfg["tasks_per_node"] == 1 and cfg["gpus_per_node"] == 1
    assert cfg["partition"] is None and cfg["additional_parameters"] == {}
    assert cfg["max_num_timeout"] > 0, "a job that hits its time limit must be requeued"
    assert SUBMITIT_YAML.read_text().startswith("# @package hydra.launcher\n")
