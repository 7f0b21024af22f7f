"""The project's SLURM script, ``scripts/slurm/unipair.sbatch``, on a real SLURM.

Fast tests check what the script hands to ``sbatch`` and ``srun`` (stand-ins on the PATH that record
their arguments). Slow tests submit it to a private one-node cluster (``scripts/slurm/local_cluster.sh``:
its own slurm.conf, munge key, ports, state and logs in a temporary folder; stopped afterwards), with
1 node x 2 tasks, CPU, gloo DDP and the tiny models on the Hateful Memes fixture:

1. the job completes, both processes run under Lightning's ``SLURMEnvironment`` with world size 2,
   and the validation metrics and final weights equal a 2-process run of the same config outside SLURM;
2. ``scancel --signal=USR1`` mid-training, while process 1 is held inside a step and process 0 waits
   in the gradient all-reduce (Lightning's own handler deadlocks or crashes there): both processes
   stop after that batch, save ``last.ckpt``, the job requeues itself, and the requeued run resumes to
   bitwise the same weights and validation metrics as the uninterrupted job;
3. ``test`` and ``robustness`` run as a second job on the first job's checkpoint.

``make test-slurm`` installs slurm-wlm when absent and runs them. Without SLURM's daemons the slow
tests are skipped, unless ``UNIPAIR_REQUIRE_SLURM=1`` (set by ``make test-slurm``): then they fail.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from lightning.pytorch import Callback

from lightning_modules.callbacks import ResumeState
from tests.fixtures_data import make_hateful_memes
from tests.test_resume import _assert_equal, _trained_state

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm" / "unipair.sbatch"
CLUSTER = REPO / "scripts" / "slurm" / "local_cluster.sh"
DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol", "scancel")
STEPS_PER_EPOCH = 3  # 24 train samples, 2 processes x batch 4
JOB_TIMEOUT_S = 900


class RecordRun(Callback):
    """Each process writes what its Trainer saw (cluster environment, rank, world size) when it is set
    up, and rank 0 the test metrics: ``<folder>/<job>-<restart>-<stage>-rank<r>.json`` and
    ``<folder>/<job>-test-metrics.json`` (job: ``SLURM_JOB_ID`` or ``local``)."""

    def __init__(self, folder: str = ".") -> None:
        self.folder = Path(folder)

    def _job(self) -> str:
        return os.environ.get("SLURM_JOB_ID", "local")

    def setup(self, trainer, pl_module, stage: str) -> None:
        record = {
            "environment": type(trainer.strategy.cluster_environment).__name__,
            "global_rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
        }
        restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        name = f"{self._job()}-{restart}-{trainer.state.fn.value}-rank{trainer.global_rank}.json"
        (self.folder / name).write_text(json.dumps(record))

    def on_test_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
            (self.folder / f"{self._job()}-test-metrics.json").write_text(json.dumps(metrics))


class HoldRankOneUntilSignalled(Callback):
    """Before the batch after step ``step``, process 1 writes ``marker`` and waits (up to 5 min) for a stop
    signal, while process 0 goes on into the batch and waits in the gradient all-reduce: the signal
    reaches the two processes at different points of a step, as it does on a cluster."""

    def __init__(self, step: int = 0, marker: str = "") -> None:
        self.step, self.marker = step, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step or trainer.global_rank != 1:
            return
        resume = next(c for c in trainer.callbacks if isinstance(c, ResumeState))
        Path(self.marker).write_text(str(os.getpid()))
        deadline = time.monotonic() + 300
        while not resume.signalled and time.monotonic() < deadline:
            time.sleep(0.05)


# ------------------------------------------------------------------------------------ fast tests


def _stand_ins(tmp_path: Path) -> Path:
    """``sbatch`` and ``srun`` that append their arguments (one JSON list per call) to calls.jsonl."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sbatch", "srun"):
        stub = bin_dir / name
        stub.write_text(
            "#!/bin/bash\n"
            f"{sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))' {name} \"$@\" "
            f">> {tmp_path}/calls.jsonl\n"
        )
        stub.chmod(0o755)
    return bin_dir


def _script(tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full_env = {
        **clean,
        "PATH": f"{_stand_ins(tmp_path)}:{clean['PATH']}",
        "VENV": str(tmp_path / "no-venv"),
        **env,
    }
    result = subprocess.run(
        [str(SCRIPT)], cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=60
    )
    calls_file = tmp_path / "calls.jsonl"
    calls = [json.loads(line) for line in calls_file.read_text().splitlines()] if calls_file.exists() else []
    return result, calls


def test_outside_an_allocation_the_script_submits_itself_sized_by_the_variables(tmp_path):
    result, calls = _script(
        tmp_path,
        {
            "NODES": "3",
            "TASKS_PER_NODE": "2",
            "PARTITION": "short",
            "RUN_DIR": "out",
            "SBATCH_ARGS": "--account=lab --qos=low",
        },
    )
    assert result.returncode == 0, result.stderr
    expected = (
        "sbatch --job-name=unipair --nodes=3 --ntasks-per-node=2 --cpus-per-task=8 --mem=0 "
        "--time=24:00:00 --export=ALL --output=out/slurm/%x-%j.out --gpus-per-node=2 --partition=short "
        f"--account=lab --qos=low {SCRIPT}"
    )
    assert calls == [expected.split()]
    assert (tmp_path / "out" / "slurm").is_dir()  # SLURM does not create the output folder
    (tmp_path / "cpu").mkdir()
    _, calls = _script(tmp_path / "cpu", {"GPUS_PER_NODE": "0"})
    assert not any(arg.startswith(("--gpus", "--partition")) for arg in calls[0])


def _in_job(tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    job = {
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_NTASKS": "8",
        "SLURM_CPUS_PER_TASK": "6",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_SUBMIT_DIR": str(tmp_path),
    }
    return _script(tmp_path, {**job, **env})


def test_in_a_job_fit_runs_on_every_task_and_resumes_from_its_own_last_checkpoint(tmp_path):
    result, calls = _in_job(
        tmp_path, {"CONFIGS": "a.yaml b.yaml", "DATA_ROOT": "/data/x", "EXTRA_ARGS": "--seed_everything 4"}
    )
    assert result.returncode == 0, result.stderr
    expected = (
        "srun unipair fit --config a.yaml --config b.yaml --data.root /data/x --trainer.num_nodes 2 "
        "--trainer.devices 4 --trainer.logger.init_args.save_dir runs "
        "--trainer.logger.init_args.version slurm-77 --trainer.default_root_dir runs/slurm/77 "
        "--data.num_workers 6 --ckpt_path last --seed_everything 4"
    )
    assert calls == [expected.split()]
    assert "unipair job 77 (restart 0) on n[1-2]: 2 node(s) x 4 task(s), subcommands: fit" in result.stdout


def test_in_a_job_evaluation_subcommands_run_in_order_robustness_on_one_task(tmp_path):
    result, calls = _in_job(
        tmp_path,
        {
            "SUBCOMMAND": "test robustness",
            "CONFIGS": "run/config.yaml",
            "EXTRA_ARGS": "--ckpt_path run/last.ckpt",
            "NUM_WORKERS": "0",
        },
    )
    assert result.returncode == 0, result.stderr
    test, robustness = calls
    assert test[:3] == ["srun", "unipair", "test"] and "last" not in test
    assert test[test.index("--trainer.devices") + 1] == "4" and test[-2:] == ["--ckpt_path", "run/last.ckpt"]
    assert robustness[:5] == ["srun", "--nodes=1", "--ntasks=1", "unipair", "robustness"]
    assert robustness[robustness.index("--trainer.num_nodes") + 1] == "1"
    assert robustness[robustness.index("--trainer.devices") + 1] == "1"
    assert robustness[robustness.index("--data.num_workers") + 1] == "0"


def test_an_unknown_subcommand_stops_the_job_naming_it(tmp_path):
    result, calls = _in_job(tmp_path, {"SUBCOMMAND": "fit tset"})
    assert result.returncode == 2 and calls[0][2] == "fit" and len(calls) == 1
    assert (
        "SUBCOMMAND: unknown subcommand tset (expected fit, validate, test, predict, robustness)"
        in result.stderr
    )


# ----------------------------------------------------------------------- slow: a real SLURM cluster


def _slurm_installed() -> bool:
    return all(shutil.which(name) for name in DAEMONS)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A private one-node SLURM cluster; yields the environment that reaches it (SLURM_CONF)."""
    if not _slurm_installed():
        message = (
            "SLURM is not installed: run `make test-slurm` (or `scripts/slurm/local_cluster.sh install`)"
        )
        if os.environ.get("UNIPAIR_REQUIRE_SLURM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    folder = tmp_path_factory.mktemp("cluster")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    subprocess.run([str(CLUSTER), "start", str(folder)], check=True, env=clean, timeout=120)
    try:
        yield {**clean, "SLURM_CONF": str(folder / "slurm.conf")}
    finally:
        subprocess.run([str(CLUSTER), "stop", str(folder)], env=clean, timeout=120)


def _experiment_config(folder: Path, root: Path, name: str, extra_callbacks: list[dict]) -> Path:
    """The run's settings on top of hateful_memes.yaml + tiny.yaml + cpu.yaml (2 processes: ddp)."""
    config = {
        "seed_everything": 3,
        "trainer": {
            "strategy": "ddp",
            "max_epochs": 3,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(folder / "runs"), "name": name},
            },
            "callbacks": [
                {
                    "class_path": "tests.test_resume.RecordValMetrics",
                    "init_args": {"path": str(folder / f"{name}.jsonl")},
                },
                {"class_path": "tests.test_slurm.RecordRun", "init_args": {"folder": str(folder)}},
                *extra_callbacks,
            ],
        },
        "model": {"init_args": {"head_dropout": 0.1}},
        "data": {
            "init_args": {
                "root": str(root),
                "batch_size": 4,
                "num_workers": 0,
                "train_augment": True,
                "missing_table_dir": str(folder / f"tables-{name}"),
                "train_missing": {"missing_rate": 0.5, "missing_type": "both", "dynamic": True},
                "val_missing": {"missing_rate": 0.6, "missing_type": "both"},
                "test_missing": {"missing_rate": 0.6, "missing_type": "both"},
            }
        },
    }
    path = folder / f"{name}-{len(extra_callbacks)}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _configs(experiment: Path) -> list[str]:
    return [
        "configs/data/hateful_memes.yaml",
        "configs/model/encoders/tiny.yaml",
        "configs/trainer/cpu.yaml",
        str(experiment),
    ]


def _job_env(cluster_env: dict[str, str], **variables: str) -> dict[str, str]:
    return {
        **cluster_env,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "NODES": "1",
        "TASKS_PER_NODE": "2",
        "GPUS_PER_NODE": "0",
        "CPUS_PER_TASK": "1",
        "MEM": "0",
        "TIME": "30:00",
        "NUM_WORKERS": "0",
        **variables,
    }


def _submit(env: dict[str, str]) -> str:
    """Submit with the script itself, as the README says; returns the job id."""
    result = subprocess.run(
        [str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=True
    )
    match = re.search(r"Submitted batch job (\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return match.group(1)


def _job(env: dict[str, str], job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _log(run_dir: Path, job_id: str) -> str:
    path = run_dir / "slurm" / f"unipair-{job_id}.out"
    return path.read_text() if path.exists() else f"(no log {path})"


def _wait(env: dict[str, str], run_dir: Path, job_id: str) -> dict[str, str]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        job = _job(env, job_id)
        if job.get("JobState") in (
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
        ):
            assert job["JobState"] == "COMPLETED", (job, _log(run_dir, job_id)[-5000:])
            return job
        time.sleep(1)
    subprocess.run(["scancel", job_id], env=env)
    raise AssertionError(
        f"job {job_id} still running after {JOB_TIMEOUT_S} s:\n{_log(run_dir, job_id)[-5000:]}"
    )


def _records(path: Path) -> dict[int, dict]:
    return {r["epoch"]: r for r in map(json.loads, path.read_text().splitlines())}


def _environments(folder: Path, job: str, restart: int = 0, stage: str = "fit") -> list[dict]:
    return [json.loads((folder / f"{job}-{restart}-{stage}-rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def reference_job(cluster, tmp_path_factory):
    """An uninterrupted fit under SLURM: (folder, data root, job id, its run folder)."""
    folder = tmp_path_factory.mktemp("slurm")
    root = make_hateful_memes(folder, n_train=24, n_dev=9, n_test=7)
    experiment = _experiment_config(folder, root, "reference", [])
    env = _job_env(cluster, CONFIGS=" ".join(_configs(experiment)), RUN_DIR=str(folder / "runs"))
    job_id = _submit(env)
    _wait(cluster, folder / "runs", job_id)
    return folder, root, job_id, folder / "runs" / "reference" / f"slurm-{job_id}"


@pytest.mark.slow
def test_a_job_runs_ddp_under_slurm_like_a_local_two_process_run(cluster, reference_job):
    folder, root, job_id, run = reference_job
    log = _log(folder / "runs", job_id)
    assert "1 node(s) x 2 task(s), subcommands: fit" in log
    for rank, record in enumerate(_environments(folder, job_id)):
        assert record == {
            "environment": "SLURMEnvironment",
            "global_rank": rank,
            "world_size": 2,
            "num_nodes": 1,
        }

    # The same config, 2 processes launched by Lightning outside SLURM.
    experiment = _experiment_config(folder, root, "local", [])
    command = [
        sys.executable,
        str(REPO / "cli.py"),
        "fit",
        *[a for c in _configs(experiment) for a in ("--config", c)],
        "--trainer.devices",
        "2",
        "--trainer.logger.init_args.version",
        "local",
    ]
    env = {k: v for k, v in _job_env(cluster).items() if k != "SLURM_CONF"}
    with open(folder / "local.log", "w") as out:
        result = subprocess.run(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=JOB_TIMEOUT_S
        )
    assert result.returncode == 0, (folder / "local.log").read_text()[-4000:]
    for rank, record in enumerate(_environments(folder, "local")):
        assert record == {
            "environment": "LightningEnvironment",
            "global_rank": rank,
            "world_size": 2,
            "num_nodes": 1,
        }

    slurm, local = _records(folder / "reference.jsonl"), _records(folder / "local.jsonl")
    assert sorted(slurm) == sorted(local) == [0, 1, 2]
    assert slurm[2]["step"] == 3 * STEPS_PER_EPOCH and "val/auroc" in slurm[2]["metrics"]
    for epoch in slurm:
        assert slurm[epoch] == local[epoch], epoch
    _assert_equal(
        _trained_state(run / "checkpoints" / "last.ckpt"),
        _trained_state(folder / "runs" / "local" / "local" / "checkpoints" / "last.ckpt"),
    )


@pytest.mark.slow
def test_usr1_mid_training_requeues_the_job_and_it_resumes_to_the_uninterrupted_result(
    cluster, reference_job
):
    folder, root, reference_id, reference_run = reference_job
    marker = folder / "paused.marker"
    hold = [
        {
            "class_path": "tests.test_slurm.HoldRankOneUntilSignalled",
            "init_args": {"step": STEPS_PER_EPOCH, "marker": str(marker)},
        }
    ]
    experiment = _experiment_config(folder, root, "interrupted", hold)
    env = _job_env(cluster, CONFIGS=" ".join(_configs(experiment)), RUN_DIR=str(folder / "runs"))
    job_id = _submit(env)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not marker.exists():
        assert time.monotonic() < deadline and _job(cluster, job_id).get("JobState") in (
            "PENDING",
            "RUNNING",
        ), (_job(cluster, job_id), _log(folder / "runs", job_id)[-5000:])
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", job_id], env=cluster, check=True)  # what a preemption sends
    while (job := _job(cluster, job_id)).get("Restarts") != "1" or job.get("JobState") != "PENDING":
        assert time.monotonic() < deadline and job.get("JobState") in ("RUNNING", "COMPLETING"), (
            job,
            _log(folder / "runs", job_id)[-5000:],
        )
        time.sleep(0.5)
    # SLURM holds a requeued job for about two minutes (Reason=BeginTime); start it now instead.
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=cluster, check=True)
    job = _wait(cluster, folder / "runs", job_id)
    log = _log(folder / "runs", job_id)

    assert job["Restarts"] == "1", log[-5000:]
    # Both processes finish the held batch (the first of epoch 1), then stop together.
    assert f"Stopped by SIGTERM after global step {STEPS_PER_EPOCH + 1}" in log
    assert f"ResumeState: requeued SLURM job {job_id}" in log
    run = folder / "runs" / "interrupted" / f"slurm-{job_id}"
    assert f"Restoring states from the checkpoint path at {run / 'checkpoints' / 'last.ckpt'}" in log
    for restart in (0, 1):
        assert [r["environment"] for r in _environments(folder, job_id, restart)] == ["SLURMEnvironment"] * 2

    expected, got = _records(folder / "reference.jsonl"), _records(folder / "interrupted.jsonl")
    assert sorted(got) == [0, 1, 2]
    for epoch in expected:
        assert got[epoch] == expected[epoch], epoch
    _assert_equal(
        _trained_state(run / "checkpoints" / "last.ckpt"),
        _trained_state(reference_run / "checkpoints" / "last.ckpt"),
    )


@pytest.mark.slow
def test_test_and_robustness_run_as_a_second_job_on_the_first_jobs_checkpoint(cluster, reference_job):
    folder, _, reference_id, run = reference_job
    checkpoint = run / "checkpoints" / "last.ckpt"
    env = _job_env(
        cluster,
        SUBCOMMAND="test robustness",
        CONFIGS=str(run / "config.yaml"),
        RUN_DIR=str(folder / "runs"),
        EXTRA_ARGS=f"--ckpt_path {checkpoint}",
    )
    job_id = _submit(env)
    _wait(cluster, folder / "runs", job_id)
    log = _log(folder / "runs", job_id)
    assert "subcommands: test robustness" in log
    for rank, record in enumerate(_environments(folder, job_id, stage="test")):
        assert record == {
            "environment": "SLURMEnvironment",
            "global_rank": rank,
            "world_size": 2,
            "num_nodes": 1,
        }
    test_metrics = json.loads((folder / f"{job_id}-test-metrics.json").read_text())
    counts = [
        test_metrics[f"test/{case}/num_samples"] for case in ("complete", "text_missing", "image_missing")
    ]
    assert sum(counts) == 7  # every test sample once over the two processes

    rows = [
        r
        for r in json.loads((run / "robustness" / "robustness.json").read_text())["rows"]
        if r["metric"] == "auroc"
    ]
    assert len(rows) == 11 * 3  # eta 0, 0.1, ..., 1 x text, image, both
    at_test_setting = next(
        r for r in rows if r["missing_type"] == "both" and math.isclose(r["missing_rate"], 0.6)
    )
    assert at_test_setting["n"] == 7
    assert math.isclose(at_test_setting["value"], test_metrics["test/auroc"], rel_tol=1e-5, abs_tol=1e-6)
    assert (
        folder / "runs" / "reference" / f"slurm-{job_id}"
    ).is_dir()  # its own folder: job 1's config is kept
    assert (
        yaml.safe_load((run / "config.yaml").read_text())["trainer"]["logger"]["init_args"]["version"]
        == f"slurm-{reference_id}"
    )
