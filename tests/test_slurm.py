"""The benchmark on a real SLURM cluster (tools/slurm_one_node.sh starts one on this machine; .ci/run does): a day,
its nights and the plots; a job preempted in the middle of its run, requeued, and ending as the run never stopped;
a failed day and its cancelled nights; a refused submission's one line. Skipped where no SLURM answers."""

import os
import shutil
import subprocess
import sys
import time

import pytest

from benchmark import run as runner
from conftest import SIZE_FLAGS
from test_benchmark import bash
from test_end_to_end import scalars
from test_resume import same_run


def no_cluster():
    """Why these tests cannot run here, or None when a SLURM controller answers with an idle node."""
    if shutil.which("sbatch") is None:
        return "no sbatch on PATH (bash tools/slurm_one_node.sh starts a one-node SLURM)"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "no SLURM controller answers sinfo within 20 s"
    if states.returncode or not states.stdout.split():
        return f"no SLURM controller answers: {(states.stderr.strip().splitlines() or ['no node'])[-1]}"
    return None


WHY = no_cluster()
# Skipped where no SLURM answers; with REQUIRE_SLURM=1 (.ci/run, which starts one) they fail instead.
pytestmark = pytest.mark.skipif(WHY is not None and os.environ.get("REQUIRE_SLURM") != "1", reason=str(WHY))


@pytest.fixture(autouse=True)
def cluster():
    if WHY is not None:
        pytest.fail(f"REQUIRE_SLURM=1 but {WHY}")
TINY = dict(BACKEND="slurm", PRESET="tiny", ENVS="coinrun", SEEDS="1")


def job_ids(stdout):
    """The job ids the runner printed, {name: id}."""
    return {line.split(maxsplit=1)[1]: line.split()[0] for line in stdout.strip().splitlines()}


def wait_for(ids, timeout=600):
    """Wait until none of the jobs is pending or running; their states, {id: state}."""
    deadline = time.time() + timeout
    while subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(ids)], capture_output=True,
                         text=True).stdout.split():
        assert time.time() < deadline, subprocess.run(["squeue"], capture_output=True, text=True).stdout
        time.sleep(2)
    return {i: state(i) for i in ids}


def state(job_id):
    fields = dict(f.split("=", 1) for f in subprocess.run(["scontrol", "show", "job", job_id], capture_output=True,
                                                          text=True).stdout.split() if "=" in f)
    return fields.get("JobState"), fields.get("Reason"), int(fields.get("Restarts", 0))


def test_a_day_its_nights_and_the_plots_then_the_same_command_skips_them(tmp_path):
    out = tmp_path / "out"
    start = time.time()
    result = bash("fig3", out, **TINY)
    assert result.returncode == 0, result.stderr
    ids = job_ids(result.stdout)
    assert list(ids) == ["coinrun/day/seed1", "coinrun/dreamer_random/seed1", "coinrun/dreamer_collected/seed1",
                         "plots (after every run)"]
    states = wait_for(ids.values())
    assert all(s[0] == "COMPLETED" for s in states.values()), states
    print(f"fig3 at PRESET=tiny on SLURM: {time.time() - start:.0f} s")  # docs/benchmark.md
    for method in ("day", "dreamer_random", "dreamer_collected"):
        assert (out / "coinrun" / method / "seed1" / runner.DONE).exists()
        assert len(scalars(out / "coinrun" / method / "seed1")["charts/test_return"]) >= 2
    assert (out / "figures" / "fig3.png").exists()
    again = bash("fig3", out, **TINY)
    assert again.returncode == 0 and "(3 finished, 0 to run)" in again.stderr
    assert list(job_ids(again.stdout)) == ["plots (after every run)"]
    wait_for(job_ids(again.stdout).values())


def test_a_preempted_job_checkpoints_is_requeued_and_ends_as_the_run_never_stopped(tmp_path):
    """A day of 6 tiny epochs (checkpoints only at its end, or when signalled) preempted the way submitit's own
    hook does (scancel --signal SIGTERM, then USR2) at its second epoch: its script checkpoints at the end of its
    epoch, the job is requeued and goes on from that checkpoint, to the same weights and curves as the same day
    run without a stop (here, outside SLURM, meanwhile)."""
    import submitit

    flags = ("--day-epochs", "6", "--checkpoint-every", "0")
    stopped, = runner.expand(["coinrun"], [1], [], "tiny", flags, str(tmp_path / "stopped"))
    whole, = runner.expand(["coinrun"], [1], [], "tiny", flags, str(tmp_path / "whole"))
    executor = submitit.AutoExecutor(folder=tmp_path / "slurm" / "%j", cluster="slurm")
    executor.update_parameters(timeout_min=30, cpus_per_task=1, mem_gb=4, name="preempted")
    job = executor.submit(runner.SlurmRun(stopped, str(tmp_path / "stopped"), False))
    reference = subprocess.Popen([sys.executable, "-c", "import sys; from benchmark import run; "
                                  f"sys.exit(run.execute(run.expand(['coinrun'], [1], [], 'tiny', {flags!r}, "
                                  f"{str(tmp_path / 'whole')!r})[0], {str(tmp_path / 'whole')!r}, False))"],
                                 cwd=runner.ROOT)
    log = stopped.dir / runner.LOG
    deadline = time.time() + 300
    while not (log.exists() and "[day 2/" in log.read_text()):
        assert time.time() < deadline and state(job.job_id)[0] in ("PENDING", "RUNNING"), state(job.job_id)
        time.sleep(0.5)
    job._interrupt()  # SIGTERM, then USR2: a preemption as submitit's own tests make one
    states = wait_for([job.job_id])
    assert reference.wait(timeout=600) == 0
    text = log.read_text()
    assert states[job.job_id][0] == "COMPLETED" and states[job.job_id][2] == 1, (states, text[-3000:])
    # the epoch it announced on the signal (the one after the epoch in training, whose evaluation overlaps it) ...
    epoch = int(text.split("the run stops at the end of day epoch ")[1].split("/")[0])
    assert 2 <= epoch < 6, text[-3000:]
    # ... is where it went on from (with --checkpoint-every 0 no other checkpoint was written before the end)
    assert f"resumed from the checkpoint of day epoch {epoch} " in text, text[-3000:]
    same_run(whole.dir, stopped.dir)
    assert len(scalars(stopped.dir)["charts/test_return"]) == 6


def test_a_failed_day_cancels_its_nights(tmp_path):
    out = tmp_path / "out"
    (out / "coinrun" / "day").mkdir(parents=True)
    (out / "coinrun" / "day" / "seed1").write_text("a file where the day's directory goes")
    result = bash("fig3", out, **TINY)
    assert result.returncode == 0, result.stderr
    ids = job_ids(result.stdout)
    states = wait_for(ids.values())
    assert states[ids["coinrun/day/seed1"]][0] == "FAILED"
    for night in ("coinrun/dreamer_random/seed1", "coinrun/dreamer_collected/seed1"):
        assert states[ids[night]][:2] == ("CANCELLED", "DependencyNeverSatisfied"), states
        assert not (out / "coinrun" / night.split("/")[1]).exists()  # never started


@pytest.mark.parametrize("variables, setting, words", [
    (dict(SLURM_PARTITION="nosuch"), "SLURM_PARTITION", "invalid partition specified: nosuch"),
    (dict(SLURM_GPUS="1"), "SLURM_GPUS", "Invalid generic resource (gres) specification")])
def test_a_refused_submission_in_one_line_naming_the_setting(tmp_path, variables, setting, words):
    result = bash("fig3", tmp_path / "out", **TINY, **variables)
    assert result.returncode == 1 and result.stdout == "", result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert len(result.stderr.strip().splitlines()) == 2  # the runner's header, then the refusal
    assert message.startswith("sbatch refused the job of coinrun/day/seed1 ") and setting in message
    assert words in message
