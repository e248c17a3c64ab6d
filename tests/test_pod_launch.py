"""The command lines the pod launchers build: launch/tpu_pod.sh (dry run) and launch/slurm_gpu.sbatch (with a
stand-in ``srun`` on PATH that records its arguments)."""
import os
import shlex
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_POD = os.path.join(REPO, "launch", "tpu_pod.sh")
SBATCH = os.path.join(REPO, "launch", "slurm_gpu.sbatch")


def dry_run(*args: str) -> list[list[str]]:
  out = subprocess.run(["bash", TPU_POD, *args], capture_output=True, text=True, timeout=60, check=True)
  return [shlex.split(line) for line in out.stdout.splitlines()]


def remote_command(argv: list[str]) -> list[str]:
  """The --command of a gcloud ssh line, split as the worker's shell would."""
  [cmd] = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  return shlex.split(cmd)


def test_runs_entrypoint_on_every_worker():
  [line] = dry_run("--tpu", "my-tpu", "--zone", "us-west4-a", "--project", "proj", "--dry_run", "--",
                   "launch/pretrain.py", "--gin_file=configs/x.gin", "--gin_param=Opt.lr = 'a b'")
  assert line[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
  assert "--zone=us-west4-a" in line and "--project=proj" in line and "--worker=all" in line
  remote = remote_command(line)
  assert remote[:6] == ["cd", "nanbeige-jax", "&&", ".", ".venv/bin/activate", "&&"]
  assert remote[6:] == ["python", "launch/pretrain.py", "--gin_file=configs/x.gin", "--gin_param=Opt.lr = 'a b'"]


def test_env_copy_and_setup_steps():
  lines = dry_run("--tpu", "t", "--zone", "z", "--remote_dir", "work dir", "--env", "XLA_FLAGS=--a=1 --b",
                  "--env", "LIBTPU_INIT_ARGS=--x", "--copy", "--setup", "--dry_run", "--", "launch/train.py")
  archive, scp, unpack, setup, run = lines
  assert archive[:3] == ["git", "-C", REPO] and "archive" in archive
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
  assert scp[6] == "t:nanbeige-jax-src.tar.gz" and "--project" not in " ".join(scp)
  assert remote_command(unpack) == ["mkdir", "-p", "work dir", "&&", "tar", "-xzf", "nanbeige-jax-src.tar.gz",
                                    "-C", "work dir"]
  setup_cmd = remote_command(setup)
  assert setup_cmd[:2] == ["cd", "work dir"] and "pip" in setup_cmd and ".[tpu]" in setup_cmd
  remote = remote_command(run)
  assert ["export", "XLA_FLAGS=--a=1 --b"] == remote[6:8]
  assert ["export", "LIBTPU_INIT_ARGS=--x"] == remote[9:11]
  assert remote[-2:] == ["python", "launch/train.py"]


@pytest.mark.parametrize("args,message", [
    (["--zone", "z", "--", "x.py"], "--tpu NAME is required"),
    (["--tpu", "t", "--", "x.py"], "--zone ZONE is required"),
    (["--tpu", "t", "--zone", "z"], "no entrypoint given"),
    (["--tpu", "t", "--zone", "z", "--env", "1BAD=x", "--", "x.py"], "--env expects KEY=VALUE"),
    (["--tpu", "t", "--zone", "z", "--worker", "0", "--", "x.py"], "unknown option '--worker'"),
])
def test_bad_arguments(args, message):
  out = subprocess.run(["bash", TPU_POD, *args, "--dry_run"], capture_output=True, text=True, timeout=60)
  assert out.returncode == 2 and message in out.stderr


def test_slurm_script_runs_one_srun_step(tmp_path):
  fake_bin = tmp_path / "bin"
  fake_bin.mkdir()
  record = tmp_path / "srun_args"
  (fake_bin / "srun").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {shlex.quote(str(record))}\n')
  (fake_bin / "srun").chmod(0o755)
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "activate").write_text("export NANBEIGE_TEST_VENV_ACTIVE=1\n")
  env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}", NANBEIGE_REPO_DIR=REPO, NANBEIGE_VENV=str(venv))
  out = subprocess.run(["bash", SBATCH, "launch/pretrain.py", "--gin_param=A.b = 1"], capture_output=True,
                       text=True, timeout=60, env=env)
  assert out.returncode == 0, out.stderr
  args = record.read_text().splitlines()
  assert args == ["--kill-on-bad-exit=1", "--cpu-bind=none", "python", "launch/pretrain.py", "--gin_param=A.b = 1"]
  usage = subprocess.run(["bash", SBATCH], capture_output=True, text=True, timeout=60, env=env)
  assert usage.returncode == 2 and "usage" in usage.stderr


def test_slurm_directives_keep_one_task_per_gpu():
  text = open(SBATCH).read()
  directives = dict(line[len("#SBATCH --"):].split("=", 1) for line in text.splitlines()
                    if line.startswith("#SBATCH --") and "=" in line)
  assert directives["ntasks-per-node"] == directives["gpus-per-node"]
