"""Tests of benchmark/: the runner's matrix, skip logic, failures, replay deletion and SLURM submission (on fake
scripts), the plotter on synthetic TensorBoard events of known means, and the whole pipeline at tiny sizes."""

import csv
import fcntl
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import dreamer_ppo
from benchmark import plot, random_score
from benchmark import run as runner
from conftest import SIZE_FLAGS

ROOT = Path(runner.__file__).resolve().parent.parent
# each night's script and --init-states (the contract, written out independently of the runner's table)
NIGHTS = {"dreamer_random": ("dreamer_ppo.py", "random"), "dreamer_collected": ("dreamer_ppo.py", "collected"),
          "rnd": ("dreamer_ppo_random.py", None), "deepdream": ("dreamer_ppo_deepdream.py", None),
          "valdiv": ("dreamer_ppo_valdiv.py", None), "full": ("dreamer_ppo_full.py", None),
          "offline": ("dreamer_ppo_offline.py", None)}
ALL = list(NIGHTS)
SCRIPTS = {"fig3": ["dreamer_random", "dreamer_collected"],
           "fig4": ["dreamer_random", "rnd", "deepdream", "valdiv", "offline"],
           "fig5": ["rnd", "deepdream", "valdiv", "full"], "all": ALL}


def environment(**variables):
    """os.environ without the benchmark's settings, with `variables`."""
    env = {k: v for k, v in os.environ.items() if k not in ("ENVS", "SEEDS", "PRESET", "WORKERS", "BACKEND", "SMOOTH")}
    return dict(env, **variables)


def bash(script, out, *args, **variables):
    """Run benchmark/{script}.sh with the interface's variables; returns the CompletedProcess."""
    env = environment(OUT=str(out), PYTHON=sys.executable, **variables)
    return subprocess.run(["bash", str(ROOT / "benchmark" / f"{script}.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=600)


def dry_run(script, out, *args, **env):
    """The commands a dry run prints (the last is the plot's), split into argument lists."""
    result = bash(script, out, *args, DRY_RUN="1", **env)
    assert result.returncode == 0, result.stderr
    return [line.split() for line in result.stdout.strip().splitlines()]


def flag(cmd, name):
    return cmd[cmd.index(name) + 1]


# %% the matrix, printed by a dry run
@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_days_then_their_nights(script, tmp_path):
    cmds = dry_run(script, tmp_path, "--penalty", "0", ENVS="coinrun", SEEDS="1 2", PRESET="tiny")
    runs, plot_cmd = cmds[:-1], cmds[-1]
    methods = SCRIPTS[script]
    assert len(runs) == 2 + 2 * len(methods)
    days, nights = runs[:2], runs[2:]
    assert [flag(c, "--seed") for c in days] == ["1", "2"]
    for day in days:
        assert Path(day[1]).name == "dreamer_ppo.py" and day[-6:-3] == ["--night-epochs", "0", "--save-day"]
        assert flag(day, "--run-dir") == str(tmp_path / "coinrun" / "day" / f"seed{flag(day, '--seed')}")
    seen = []
    for night in nights:
        seed = flag(night, "--seed")
        method = Path(flag(night, "--run-dir")).parent.name
        seen.append((method, seed))
        assert flag(night, "--run-dir") == str(tmp_path / "coinrun" / method / f"seed{seed}")
        assert flag(night, "--day-checkpoint") == str(tmp_path / "coinrun" / "day" / f"seed{seed}" / "day.pt")
        script, init_states = NIGHTS[method]
        assert Path(night[1]).name == script and flag(night, "--night-epochs") == "2"
        assert (flag(night, "--init-states") if init_states else "--init-states" not in night) == (init_states or True)
        assert "--save-day" not in night and night[-5] == "--day-checkpoint"
    assert sorted(seen) == sorted((m, s) for m in methods for s in ("1", "2"))
    assert all(cmd[-1] == "--resume" for cmd in runs)  # an unfinished run goes on from its checkpoint
    for cmd in runs:  # the same tiny sizes by day and by night, then the extra flags, then the runner's own
        assert " ".join(SIZE_FLAGS) in " ".join(cmd) and flag(cmd, "--day-epochs") == "2"
        assert cmd.index("--bins") < cmd.index("--penalty") < len(cmd) - 5 and flag(cmd, "--env-id") == "coinrun"
    assert Path(plot_cmd[1]).name == "plot.py" and flag(plot_cmd, "--out") == str(tmp_path)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing ran


def test_dry_run_defaults_are_the_papers(tmp_path):
    """all.sh at the defaults: 4 games x 5 seeds, 20 days and 140 nights, no size flag."""
    cmds = dry_run("all", tmp_path)[:-1]
    assert len(cmds) == 160 and sum("--save-day" in c for c in cmds) == 20
    assert {flag(c, "--env-id") for c in cmds} == {"coinrun", "caveflyer", "chaser", "plunder"}
    assert cmds[0][2:] == ["--env-id", "coinrun", "--seed", "1", "--night-epochs", "0", "--save-day", "--run-dir",
                           str(tmp_path / "coinrun" / "day" / "seed1"), "--resume"]
    collected = next(c for c in cmds if "collected" in c)
    assert collected[2:7] == ["--env-id", "coinrun", "--seed", "1", "--init-states"]


def test_dry_run_cpu_preset(tmp_path):
    cmds = dry_run("fig3", tmp_path, ENVS="chaser", SEEDS="7", PRESET="cpu", SMOOTH="4")
    day, night = cmds[:2]
    assert flag(cmds[-1], "--smooth") == "4"  # the figures' moving average, passed to plot.py
    assert flag(day, "--day-epochs") == flag(night, "--day-epochs") == "40" and flag(night, "--night-epochs") == "40"
    assert flag(day, "--rnn-units") == flag(night, "--rnn-units") == "256" and flag(night, "--penalty") == "0"


@pytest.mark.parametrize("preset, levels", [("cpu-narrow", "8"), ("cpu-overfit", "4")])
def test_dry_run_narrow_presets_give_each_seed_its_levels(tmp_path, preset, levels):
    # cpu-matched's sizes on N training levels, seed S's from level 1000 S, the same for a day and its nights
    cmds = dry_run("fig4", tmp_path, ENVS="coinrun", SEEDS="3 12", PRESET=preset)[:-1]
    matched = dry_run("fig4", tmp_path / "matched", ENVS="coinrun", SEEDS="3", PRESET="cpu-matched")[0]
    assert len(cmds) == 12
    for cmd in cmds:
        seed = int(flag(cmd, "--seed"))
        assert flag(cmd, "--num-levels") == levels and flag(cmd, "--start-level") == str(1000 * seed)
        assert all(flag(cmd, f) == flag(matched, f) for f in ("--day-epochs", "--day-steps", "--wm-updates",
                                                              "--rnn-units", "--penalty"))
    assert "--start-level" not in matched and "--num-levels" not in matched


# %% settings, refused before anything is written
@pytest.mark.parametrize("variables, allowed", [
    (dict(SEEDS="abc"), "'abc' is not a seed; seeds are whole numbers, 0 <= seed < 2^31"),
    (dict(SEEDS="1 -1"), "'-1' is not a seed"), (dict(SEEDS="2147483648"), "0 <= seed < 2^31"),
    (dict(SEEDS=""), "at least one seed"), (dict(PRESET="huge"), "one of paper, cpu, cpu-matched, cpu-narrow, cpu-overfit, tiny"),
    (dict(SEEDS="1 2147483", PRESET="cpu-narrow"), "at most 2147482 at PRESET=cpu-narrow"),
    (dict(WORKERS="-2"), "a whole number, 1 or more"), (dict(WORKERS="0"), "a whole number, 1 or more"),
    (dict(WORKERS_PER_GPU="four"), "1 or more"), (dict(SMOOTH="0"), "1 or more"),
    (dict(BACKEND="aws"), "one of local, slurm"), (dict(SLURM_TIME_MIN="4h", BACKEND="slurm"), "1 or more"),
    (dict(SLURM_GPUS="-1", BACKEND="slurm"), "a whole number, 0 or more"),
    (dict(SLURM_EXTRA="--exclusive reservation=r1", BACKEND="slurm"), "'reservation=r1' is not an sbatch option"),
    (dict(ENVS="notagame"), "'notagame' is not a ProcGen game; the games (in lower case) are bigfish, "),
    (dict(ENVS="CoinRun", DRY_RUN="1"), "'CoinRun' is not a ProcGen game"), (dict(ENVS=" "), "at least one"),
    (dict(DRY_RUN="yes"), "1 (on), or 0 or empty (off)"), (dict(KEEP_REPLAY="true"), "1 (on)")])
def test_bad_settings_refused_in_one_line_before_anything(tmp_path, variables, allowed):
    """The first variable is the bad one: refused in one line naming it, its value and what is allowed; exit 2."""
    out = tmp_path / "out"
    result = bash("all", out, **variables)
    name, value = next(iter(variables.items()))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [result.stderr.strip()]  # one line, no traceback
    assert result.stderr.startswith(f"{name}={value!r}: ") and allowed in result.stderr
    assert not out.exists()


def test_an_out_that_cannot_be_made_is_refused_in_one_line(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "benchmark" / "fig3.sh")], capture_output=True, text=True,
                            env=environment(OUT="/proc/forbidden", PYTHON=sys.executable))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "OUT='/proc/forbidden': a directory that can be made and written: No such file or directory\n"


def test_the_scripts_arguments_after_a_second_double_dash(tmp_path):
    """`bash fig3.sh -- --day-epochs 12` (the `--` that run.py wants) passes the same arguments as without it."""
    assert dry_run("fig3", tmp_path, "--", "--day-epochs", "12") == dry_run("fig3", tmp_path, "--day-epochs", "12")
    assert all(flag(cmd, "--day-epochs") == "12" and "--" not in cmd for cmd in dry_run("fig3", tmp_path,
                                                                                         "--day-epochs", "12")[:-1])


def test_the_runs_arguments_are_checked_before_anything_is_submitted(tmp_path):
    """Each script parses its runs' arguments (and the day checks them as at its start) before the first sbatch."""
    for args, words in ((["--bogus", "1"], "Unrecognized options: --bogus, 1"),
                        (["--", "--seq-len", "1000"], "error: --seq-len: must be at most --day-steps / --num-envs")):
        result = bash("fig3", tmp_path / "out", *args, BACKEND="slurm", PRESET="tiny", ENVS="coinrun", SEEDS="1")
        assert result.returncode == 2 and result.stdout == "", result.stderr
        refusal = result.stderr.splitlines()[1:]
        assert len(refusal) == 1 and refusal[0].startswith(f"the runs' arguments {' '.join(args[-2:])!r}: refused "
                                                            "before anything was submitted: ") and words in refusal[0]
        assert not (tmp_path / "out").exists()


def test_bad_flag_refused_by_its_name(fake, capsys):
    with pytest.raises(SystemExit) as stop:
        runner.main(["--figures", "fig3", "--seeds", "1", "x", "--out", str(fake.out)])
    assert stop.value.code == 2 and capsys.readouterr().err == "--seeds='1 x': 'x' is not a seed; seeds are whole " \
                                                                "numbers, 0 <= seed < 2^31\n"
    assert not fake.out.exists()


def test_a_file_as_out_refused(tmp_path):
    (tmp_path / "out").write_text("")
    result = bash("fig3", tmp_path / "out")
    assert result.returncode == 2 and result.stderr == f"OUT={str(tmp_path / 'out')!r}: a directory (this is a file)\n"


def test_games_given_twice_run_once(tmp_path):
    result = bash("fig3", tmp_path, ENVS="coinrun,coinrun chaser", SEEDS="1,1 2", DRY_RUN="1")
    assert result.returncode == 0
    assert "ENVS='coinrun,coinrun chaser': coinrun given more than once, run once" in result.stderr
    assert "SEEDS='1,1 2': 1 given more than once, run once" in result.stderr
    cmds = [line.split() for line in result.stdout.strip().splitlines()]
    assert len(cmds) == 2 * 2 * 3 + 1 and cmds[-1][cmds[-1].index("--seeds") + 1:][:3] == ["1", "2", "--figures"]


def test_the_runners_games_are_procgens():
    assert runner.GAMES == dreamer_ppo.PROCGEN_GAMES


def test_dry_run_into_a_pipe_closed_early(tmp_path):
    """`| head`: the reader goes after one line of about 3,000 (more than a pipe holds); no traceback."""
    env = environment(OUT=str(tmp_path), PYTHON=sys.executable, DRY_RUN="1", SEEDS=" ".join(map(str, range(100))))
    result = subprocess.run(["bash", "-c", f"bash {ROOT / 'benchmark' / 'all.sh'} | head -n 1; echo ${{PIPESTATUS[0]}}"],
                            env=env, capture_output=True, text=True, timeout=60)
    first, status = result.stdout.splitlines()
    assert "dreamer_ppo.py --env-id coinrun --seed 0 " in first and status == "0"
    assert "Traceback" not in result.stderr and "Error" not in result.stderr


# %% running, on fake scripts
FAKE_SCRIPT = textwrap.dedent("""\
    import os, sys
    from pathlib import Path
    a = sys.argv
    d = Path(a[a.index("--run-dir") + 1])
    if d.exists() and any(f.name.startswith("events.out") for f in d.iterdir()) and "--resume" not in a:
        sys.exit("refused: " + str(d) + " holds events")
    d.mkdir(parents=True, exist_ok=True)
    (d / "events.out.tfevents.fake").write_text("")
    with open(Path(__file__).parent / "calls.txt", "a") as calls:
        calls.write(str(d) + "\\n")
    if "--save-day" in a:
        (d / "day.pt").write_text("weights")
        (d / "replay").mkdir(exist_ok=True)
        (d / "replay" / "0000000000.pt").write_text("frames")
    else:
        day = Path(a[a.index("--day-checkpoint") + 1])
        assert day.exists(), day
        if "collected" in a or "offline" in a[0]:
            assert (day.parent / "replay").exists(), "the replay was deleted too early"
    for code, name in ((1, "FAIL"), (75, "STOP")):  # a failure; a stop by SIGTERM after a checkpoint
        if os.environ.get(name) and os.environ[name] in str(d):
            sys.exit(code)
    if os.environ.get("SLEEP") and os.environ["SLEEP"] in str(d):  # a long epoch, stopped as the scripts stop
        import signal, time
        def stop(signum, frame):
            (d / "stopped").write_text(signal.Signals(signum).name)
            sys.exit({signal.SIGTERM: 75, signal.SIGINT: 130}[signum])
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        (d / "ready").write_text(str(os.getpid()))
        time.sleep(60)
        sys.exit("not stopped")
""")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """runner.ROOT with fake scripts (they log their run dir to calls.txt) and a fake plot.py; returns a function
    running runner.main and returning (exit code, the run dirs it ran, stdout)."""
    root = tmp_path / "root"
    (root / "benchmark").mkdir(parents=True)
    for script in {m.script for m in runner.METHODS.values()}:
        (root / script).write_text(FAKE_SCRIPT)
    (root / "benchmark" / "plot.py").write_text("from pathlib import Path\nPath(__file__).with_name('plotted').touch()\n")
    shutil.copy(runner.__file__, root / "benchmark" / "run.py")  # for a runner in its own process, on these scripts
    monkeypatch.setattr(runner, "ROOT", root)
    for name in ("ENVS", "SEEDS", "PRESET", "WORKERS", "DRY_RUN", "BACKEND", "KEEP_REPLAY", "FAIL", "STOP", "SLEEP",
                 "SMOOTH"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "out"

    def main(*figures, seeds=("1", "2"), **env):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        (root / "calls.txt").unlink(missing_ok=True)
        code = runner.main(["--figures", *figures, "--envs", "coinrun", "--seeds", *seeds, "--workers", "2",
                            "--out", str(out)])
        for k in env:
            monkeypatch.delenv(k)
        calls = (root / "calls.txt").read_text().split() if (root / "calls.txt").exists() else []
        return code, sorted(str(Path(c).relative_to(out)) for c in calls)

    main.out, main.root = out, root
    return main


def names(methods, seeds):
    return sorted(f"coinrun/{m}/seed{s}" for m in methods for s in seeds)


def test_failed_day_skips_its_nights_and_a_rerun_finishes(fake, capsys):
    code, ran = fake("fig3", "fig4", "fig5", FAIL="day/seed2")
    assert code == 1 and ran == sorted(names(["day", *ALL], ["1"]) + ["coinrun/day/seed2"])
    report = capsys.readouterr().out
    assert "FAILED coinrun/day/seed2: exit 1" in report and report.count("skipped: its day coinrun/day/seed2 did not finish") == 7
    assert (fake.root / "benchmark" / "plotted").exists()  # the plots are drawn anyway
    day1 = fake.out / "coinrun" / "day" / "seed1"
    assert (day1 / "day.pt").exists() and not (day1 / "replay").exists()  # its data nights are done
    assert not (fake.out / "coinrun" / "day" / "seed2" / "DONE").exists()

    code, ran = fake("fig3", "fig4", "fig5")  # the same command again: only what is unfinished
    assert code == 0 and ran == names(["day", *ALL], ["2"])
    assert all((fake.out / r / "DONE").exists() for r in names(["day", *ALL], ["1", "2"]))
    assert json.loads((day1 / "DONE").read_text())["cmd"][2:4] == ["--env-id", "coinrun"]

    assert fake("fig3", "fig4", "fig5") == (0, [])  # everything finished: nothing runs

    with open(fake.out / runner.LOCK, "w") as held:  # as if another runner were using OUT
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(SystemExit, match="another benchmark runner"):
            fake("fig3")


def test_unfinished_runs_go_on_in_their_directory(fake, capsys):
    """An unfinished run is started again in its directory with --resume (the script goes on from its checkpoint);
    a run stopped by a signal (exit 75) is reported as stopped, and goes on at the next start."""
    fake("fig5")
    night = fake.out / "coinrun" / "rnd" / "seed1"
    (night / "DONE").unlink()  # as if interrupted: events and a checkpoint there, no marker
    (night / "checkpoint.pt").write_text("")
    code, ran = fake("fig5")
    assert code == 0 and ran == ["coinrun/rnd/seed1"] and (night / "checkpoint.pt").exists() and (night / "DONE").exists()
    assert (night / "log.txt").read_text().count("--resume") == 2  # the log of each start, one after the other

    (fake.out / "coinrun" / "day" / "seed2" / "DONE").unlink()  # a day run again: its nights run again
    code, ran = fake("fig5", STOP="day/seed2")
    assert code == 1 and ran == ["coinrun/day/seed2"]
    report = capsys.readouterr().out
    assert "STOPPED coinrun/day/seed2: by a signal, with its checkpoint; run the benchmark again" in report
    code, ran = fake("fig5")
    assert code == 0 and ran == names(["day", "rnd", "deepdream", "valdiv", "full"], ["2"])


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "Ctrl-C"])
def test_a_stopped_runner_stops_its_runs_reports_and_goes_on_next_time(fake, how):
    """SIGTERM or SIGINT to the runner alone (a time limit, kill), or SIGINT to its process group (Ctrl-C in a
    terminal): no run starts, the day under way gets SIGTERM and exits 75 (with Ctrl-C it may have exited 130
    first), the runner waits for it, reports, removes its lock and exits 128 + the signal; the next start goes on."""
    cmd = [sys.executable, str(fake.root / "benchmark" / "run.py"), "--figures", "fig3", "--envs", "coinrun",
           "--seeds", "1", "--out", str(fake.out)]
    proc = subprocess.Popen(cmd, env=environment(SLEEP="day/seed1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    day = fake.out / "coinrun" / "day" / "seed1"
    for _ in range(300):
        if (day / "ready").exists() and (day / "ready").read_text():
            break
        proc.poll() is None or pytest.fail(proc.communicate()[1])
        subprocess.run(["sleep", "0.1"])
    pid = int((day / "ready").read_text())
    signum = signal.SIGTERM if how == "SIGTERM" else signal.SIGINT
    (os.killpg if how == "Ctrl-C" else os.kill)(proc.pid, signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in out + err and (day / "stopped").read_text() in ("SIGTERM", "SIGINT")
    if how != "Ctrl-C":
        assert (day / "stopped").read_text() == "SIGTERM"
        assert "STOPPED coinrun/day/seed1: by a signal, with its checkpoint; run the benchmark again" in out
    assert "STOPPED coinrun/day/seed1: " in out
    assert out.strip().splitlines()[-1] == (f"STOPPED by {signal.Signals(signum).name}: 1 runs stopped, 2 not started, "
                                            "the figures not drawn; the same command goes on from there")
    with pytest.raises(ProcessLookupError):  # the runner waited for it
        os.kill(pid, 0)
    assert not (fake.out / runner.LOCK).exists() and not (day / runner.DONE).exists()

    done = subprocess.run(cmd, env=environment(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "3 runs finished" in done.stdout
    assert (day / runner.LOG).read_text().count("--resume") == 2 and (fake.root / "benchmark" / "plotted").exists()


def test_replay_kept_until_its_last_data_night(fake):
    """fig5 reads no replay, so it stays for fig3's collected night and fig4's offline night; it goes once both
    are done (unless KEEP_REPLAY=1)."""
    replay = fake.out / "coinrun" / "day" / "seed1" / "replay"
    fake("fig5", seeds=("1",))
    assert replay.exists()
    fake("fig3", seeds=("1",))
    assert replay.exists()  # the offline night still needs it
    code, ran = fake("fig4", seeds=("1",), KEEP_REPLAY="1")
    assert ran == ["coinrun/offline/seed1"] and replay.exists()
    (fake.out / "coinrun" / "offline" / "seed1" / "DONE").unlink()
    assert fake("fig4", seeds=("1",)) == (0, ["coinrun/offline/seed1"]) and not replay.exists()


@pytest.fixture
def submitit_stand_in(monkeypatch):
    """A stand-in for submitit whose executor records each submission (name, parameters) and whose sbatch refuses
    the submission numbered `refuse_at` (from 1); the runs' arguments are not checked (the scripts are fakes)."""
    submitted, cancelled = [], []

    class Job:
        def __init__(self, job_id):
            self.job_id = job_id

    class Executor:
        refuse_at = None

        def __init__(self, folder, cluster):
            assert cluster == "slurm"
            self.params = {}

        def update_parameters(self, **params):
            self.params.update(params)

        def submit(self, fn, *args, **kwargs):
            if len(submitted) + 1 == Executor.refuse_at:
                print("sbatch: error: Invalid account or account/partition combination specified", file=sys.stderr)
                raise RuntimeError("sbatch: error: Invalid account or account/partition combination specified")
            submitted.append((fn.run.name if isinstance(fn, runner.SlurmRun) else "plots", dict(self.params)))
            return Job(str(100 + len(submitted)))

    monkeypatch.setitem(sys.modules, "submitit", type(sys)("submitit"))
    sys.modules["submitit"].AutoExecutor = Executor
    monkeypatch.setattr(runner, "check_arguments", lambda todo, extra: None)
    real_run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda cmd, *a, **k: cancelled.extend(cmd[1:]) if cmd[0] == "scancel"
                        else real_run(cmd, *a, **k))
    return Executor, submitted, cancelled


def test_slurm_submits_nights_after_their_day(fake, submitit_stand_in, monkeypatch):
    _, submitted, _ = submitit_stand_in
    assert fake("fig3", BACKEND="slurm", SLURM_PARTITION="gpu") == (0, [])
    jobs = {name: (str(101 + i), params) for i, (name, params) in enumerate(submitted)}
    assert list(jobs)[:2] == ["coinrun/day/seed1", "coinrun/day/seed2"] and len(jobs) == 2 + 4 + 1
    for name, (_, params) in jobs.items():
        deps = params["slurm_additional_parameters"].get("dependency")
        if "/day/" in name:  # PRESET=paper: a GPU, 8 CPUs and 32 GB per job
            assert deps is None and params["slurm_partition"] == "gpu"
            assert (params["gpus_per_node"], params["cpus_per_task"], params["mem_gb"]) == (1, 8, 32)
        elif name != "plots":
            assert deps == "afterok:" + jobs[f"coinrun/day/seed{name[-1]}"][0]
    assert jobs["plots"][1]["slurm_additional_parameters"]["dependency"] == "afterany:" + ":".join(
        job_id for name, (job_id, _) in jobs.items() if name != "plots")

    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(SystemExit, match="pip install"):
        fake("fig3", BACKEND="slurm")


def test_slurm_resources_fit_the_preset_and_take_a_sites_options(fake, submitit_stand_in):
    """The CPU presets' runs use one thread and no GPU; account, QOS, constraint and any sbatch option pass on."""
    _, submitted, _ = submitit_stand_in
    assert fake("fig3", BACKEND="slurm", PRESET="tiny", SLURM_ACCOUNT="lab", SLURM_QOS="low",
                SLURM_CONSTRAINT="avx512", SLURM_EXTRA="--reservation=r1 --exclusive") == (0, [])
    day = dict(submitted)["coinrun/day/seed1"]
    assert (day["gpus_per_node"], day["cpus_per_task"], day["mem_gb"]) == (0, 1, 8)
    assert (day["slurm_account"], day["slurm_qos"], day["slurm_constraint"]) == ("lab", "low", "avx512")
    assert day["slurm_additional_parameters"] == dict(reservation="r1", exclusive=True)
    night = dict(submitted)["coinrun/dreamer_random/seed1"]
    assert night["slurm_additional_parameters"]["reservation"] == "r1" and "dependency" in night[
        "slurm_additional_parameters"]
    submitted.clear()
    assert fake("fig3", BACKEND="slurm", PRESET="tiny", SLURM_GPUS="2", SLURM_CPUS="4") == (0, [])
    assert (dict(submitted)["coinrun/day/seed1"]["gpus_per_node"], dict(submitted)["plots"]["gpus_per_node"]) == (2, 0)


def test_a_refused_submission_in_one_line_and_the_jobs_before_it_cancelled(fake, submitit_stand_in, capsys):
    executor, submitted, cancelled = submitit_stand_in
    executor.refuse_at = 3  # the first night
    with pytest.raises(SystemExit) as stop:
        fake("fig3", BACKEND="slurm", SLURM_ACCOUNT="nolab")
    assert stop.value.code == 1 and cancelled == ["101", "102"]
    err = capsys.readouterr().err.splitlines()
    assert err[1:] == ["sbatch refused the job of coinrun/dreamer_random/seed1 (check SLURM_ACCOUNT and the other "
                       "SLURM_* settings): sbatch: Invalid account or account/partition combination specified; the 2 "
                       "jobs submitted before it cancelled (101 102)"]


def test_a_preempted_slurm_job_has_its_run_checkpoint_then_requeues_it(monkeypatch, tmp_path):
    """submitit calls checkpoint() before a preemption or the time limit: the script gets SIGUSR1 (it checkpoints
    at the end of its epoch and exits 75) and the same run is submitted again (it goes on with --resume)."""
    submitit = type(sys)("submitit")
    submitit.helpers = type(sys)("submitit.helpers")
    submitit.helpers.DelayedSubmission = lambda fn, *args: ("requeued", fn, args)
    monkeypatch.setitem(sys.modules, "submitit", submitit)
    run = runner.Run("coinrun", "rnd", 1, ("python", "dreamer_ppo_random.py", "--resume"), tmp_path)
    job = runner.SlurmRun(run, str(tmp_path), False)
    job.proc = subprocess.Popen([sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGUSR1, "
                                 "lambda *a: sys.exit(75)); print('ready', flush=True); time.sleep(60)"],
                                stdout=subprocess.PIPE, text=True)
    assert job.proc.stdout.readline() == "ready\n"  # its handler is in place
    kind, again, args = job.checkpoint()
    assert runner.exited(job.proc) and job.proc.wait(timeout=1) == runner.PREEMPTED  # waited for, not reaped
    assert kind == "requeued" and args == ()
    assert isinstance(again, runner.SlurmRun) and again.run == run and again.proc is None
    assert pickle.loads(pickle.dumps(job)).proc is None  # a job is pickled without its process


# %% the plotter, on synthetic events
DAY_END = 15 * 1000
FINAL_CHANGE = {1: 0.5, 2: 1.5, 3: 4.0}  # night - day of the final evaluation on test levels, per seed


def write_run(path, test, train=None, first=None, step0=0, every=1000, final=None, extra=None):
    """Events of one finished run: test (and train) returns at step0 + every * (1, 2, ...), `first` at step0, the
    final evaluation {key of plot.FINAL: value} at the last step, and `extra` {tag: values} at the test's steps."""
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(path))
    if first is not None:
        writer.add_scalar(plot.TEST, first, step0)
    for k, value in enumerate(test, 1):
        writer.add_scalar(plot.TEST, value, step0 + every * k)
        if train is not None:
            writer.add_scalar(plot.TRAIN, train[k - 1], step0 + every * k)
        for tag, values in (extra or {}).items():
            writer.add_scalar(tag, values[k - 1], step0 + every * k)
    for key, value in (final or {}).items():
        writer.add_scalar(plot.FINAL[key], value, step0 + every * len(test))
    writer.close()
    (path / runner.DONE).write_text("{}")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """coinrun, seeds 1-3. Day: 5 epochs of 100 then 10 of d = seed (train levels: d + 1). Every night: its first
    point is the day's last (not a night epoch), then 5 epochs of n = 2 * seed (train levels: n + 0.5); the offline
    night lacks seed 3, valdiv's seed 2 is unfinished (no DONE marker), FullDreamer has none. The final evaluation:
    the day's 10 + seed (standard error 0.1; train levels 20 + seed), each night's the day's + FINAL_CHANGE[seed]
    (standard error 0.2; train levels + 1), except the offline night of seed 1 (a run older than it). Diagnostics:
    the day's open-loop metrics k * seed * epoch (k = 1, ..., 5 for OPENLOOP's five), every dreaming
    night's dream return 1, ..., 5 (the offline night has none); the approximate KL and clip fraction of the day's
    updates 0.01 * seed and 0.1 * seed (the first 5 epochs: 1), of every night's 0.001 * seed and 0.01 * seed."""
    out = tmp_path_factory.mktemp("synthetic")
    for s in (1, 2, 3):
        day = [100.0] * 5 + [float(s)] * 10
        write_run(runner.run_dir(out, "coinrun", runner.DAY, s), day, [v + 1 for v in day],
                  final=dict(test=10.0 + s, test_se=0.1, train=20.0 + s, train_se=0.1),
                  extra={**{f"openloop/{name}": [k * s * e for e in range(1, 16)]
                            for k, name in enumerate(plot.OPENLOOP, 1)},
                         **{tag: [1.0] * 5 + [x * s] * 10 for tag, x in zip(plot.POLICY_MOVES, (0.01, 0.1))}})
        for m in ("dreamer_random", "dreamer_collected", "rnd", "deepdream", "valdiv", "offline"):
            if (m, s) == ("offline", 3):
                continue
            night = [2.0 * s] * 5
            final = dict(test=10.0 + s + FINAL_CHANGE[s], test_se=0.2, train=21.0 + s, train_se=0.2)
            write_run(runner.run_dir(out, "coinrun", m, s), night, [v + 0.5 for v in night], first=float(s),
                      step0=DAY_END, every=400, final=None if (m, s) == ("offline", 1) else final,
                      extra={**({} if m == "offline" else {plot.DREAM_RETURN: [1.0, 2.0, 3.0, 4.0, 5.0]}),
                             **{tag: [x * s] * 5 for tag, x in zip(plot.POLICY_MOVES, (0.001, 0.01))}})
    (runner.run_dir(out, "coinrun", "valdiv", 2) / runner.DONE).unlink()
    (out / "random_scores.json").write_text(json.dumps({"coinrun": {"episodes": 100, "score": 2.5}}))
    assert plot.main(["--out", str(out), "--envs", "coinrun", "--seeds", "1", "2", "3", "--reps", "200", "--csv",
                      str(out / "docs" / "final.csv")]) == 0
    return out


def synthetic_data(out, methods=tuple(runner.METHODS)):
    """plot.load's data of the synthetic runs, and the day's end."""
    return plot.load(out, ["coinrun"], [1, 2, 3], methods), {"coinrun": DAY_END}


def row(table, label, which=0):
    """The cells after the label of the `which`-th row named `label` (0: the game's table, -1: the aggregate)."""
    return [line for line in table.splitlines() if line.startswith(f"| {label} |")][which].split(" | ")[1:]


def test_table_means_and_cis(synthetic):
    table = (synthetic / "figures" / "results.md").read_text()
    t = stats.t.ppf(0.975, 2) / np.sqrt(3)  # sd of (1, 2, 3) is 1
    assert "## coinrun (random policy: 2.50; day ends at step 15,000)" in table
    day, night, change = f"2.00 ± {t:.2f}", f"4.00 ± {2 * t:.2f}", f"2.00 ± {t:.2f}"
    assert row(table, "RndDreamer") == ["3/3", day, night, change, "1.00 ± 0.00", "0.50 ± 0.00 |"]
    t2 = stats.t.ppf(0.975, 1) * np.std([1, 2], ddof=1) / np.sqrt(2)
    assert row(table, "Offline") == ["2/3 (missing: 3)", f"1.50 ± {t2:.2f}", f"3.00 ± {2 * t2:.2f}",
                                     f"1.50 ± {t2:.2f}", "1.00 ± 0.00", "0.50 ± 0.00 |"]
    assert row(table, "ValDreamer")[0] == "2/3 (missing: 2)"  # unfinished: not counted
    assert row(table, "FullDreamer") == ["0/3 (missing: 1, 2, 3)"] + ["missing"] * 4 + ["missing |"]
    # the aggregate: normalized by coinrun's (5, 10); the IQM of 3 values is their mean
    assert row(table, "day (shared)")[:2] == ["3", "-0.600"]
    assert row(table, "Dreamer (random init.)", -1)[:2] == ["3", "-0.200"]
    assert row(table, "FullDreamer", -1) == ["0", "missing", "missing |"]


def test_final_evaluation_paired_by_seed(synthetic):
    table = (synthetic / "figures" / "results.md").read_text()
    section = table[table.index("## Final evaluation (the same levels for the day and its nights)"):
                    table.index("## Diagnostics")]
    rows = {cells[0]: cells[1:] for cells in (line.split(" | ")[1:] for line in section.splitlines()
                                              if line.startswith("| coinrun | "))}
    t = stats.t.ppf(0.975, 2) / np.sqrt(3)  # sd of (11, 12, 13) is 1
    night = t * np.sqrt(((11.5 - 14) ** 2 + (13.5 - 14) ** 2 + (17 - 14) ** 2) / 2)  # 10 + seed + FINAL_CHANGE
    change = t * np.sqrt(((0.5 - 2) ** 2 + (1.5 - 2) ** 2 + (4 - 2) ** 2) / 2)
    # the seeds a change of 1 needs with the spread of (0.5, 1.5, 4): sd 1.80, (t_0.975 + t_0.8; 27) sd / sqrt(28) <= 1
    needed = plot.seeds_needed([0.5, 1.5, 4.0])
    sd = np.std([0.5, 1.5, 4.0], ddof=1)
    assert needed == 28 and all((stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * sd / np.sqrt(n) > 1
                                for n in range(2, 28))
    # the gap (train - test): the day's 10 on every seed, the night's 11 - FINAL_CHANGE[seed]
    assert rows["RndDreamer"] == ["3", f"12.00 ± {t:.2f}", f"14.00 ± {night:.2f}", f"2.00 ± {change:.2f}",
                                  f"22.00 ± {t:.2f}", f"23.00 ± {t:.2f}", "1.00 ± 0.00",
                                  "10.00 ± 0.00", f"9.00 ± {change:.2f}", f"-1.00 ± {change:.2f}", "28 |"]
    # seed 1 without a final evaluation, seed 3 without a night: seed 2 alone
    assert rows["Offline"] == ["1", "12.00", "13.50", "1.50", "22.00", "23.00", "1.00", "10.00", "9.50", "-0.50",
                               "missing |"]
    assert rows["FullDreamer"] == ["0"] + ["missing"] * 9 + ["missing |"]


def test_diagnostics_tables(synthetic):
    table = (synthetic / "figures" / "results.md").read_text()
    section, moves = table[table.index("## Diagnostics"):].split("How far each PPO update moves the policy")
    rows = [line.split(" | ")[1:] for line in section.splitlines() if line.startswith("| coinrun | ")]
    day = next(c[1:] for c in rows if c[0] == "3")  # | game | seeds | ...
    cells = {tuple(c[:2]): c[2:] for c in rows if not c[0].isdigit()}  # | game | method | seeds | ...
    # the day: the mean of the last 10 of 15 epochs of k * seed * epoch is k * seed * 10.5; over the seeds 1, 2, 3
    t = stats.t.ppf(0.975, 2) / np.sqrt(3)
    assert day == [f"{k * 21:.2f} ± {k * 10.5 * t:.2f}" for k in (1, 2, 3, 4)] + [f"{5 * 21:.2f} ± {5 * 10.5 * t:.2f} |"]
    # each dreaming night: dream return 1..5 (first and last 10 epochs: all 5), real test return 2 * seed
    assert cells["RndDreamer", "3"] == ["3.00 ± 0.00", "3.00 ± 0.00", f"4.00 ± {2 * t:.2f}", f"4.00 ± {2 * t:.2f} |"]
    assert ("Offline", "2") not in cells and not any(key[0] == "Offline" for key in cells)
    # how far the updates move the policy: the day's last 10 epochs (0.01 * seed, 0.1 * seed) beside the night's
    moved = {c[0]: c[1:] for c in (line.split(" | ")[1:] for line in moves.splitlines()
                                   if line.startswith("| coinrun | "))}
    assert moved["RndDreamer"] == ["3", f"0.0200 ± {0.01 * t:.4f}", f"0.0020 ± {0.001 * t:.4f}",
                                   f"0.2000 ± {0.1 * t:.4f}", f"0.0200 ± {0.01 * t:.4f} |"]
    t2 = stats.t.ppf(0.975, 1) * np.std([1, 2], ddof=1) / np.sqrt(2)
    assert moved["Offline"] == ["2", f"0.0150 ± {0.01 * t2:.4f}", f"0.0015 ± {0.001 * t2:.4f}",
                                f"0.1500 ± {0.1 * t2:.4f}", f"0.0150 ± {0.01 * t2:.4f} |"]
    assert "FullDreamer" not in moved


def test_claims_judged_on_paired_changes(synthetic):
    """Each claim's comparisons paired by seed on the final test returns, and the verdict from their interval."""
    table = (synthetic / "figures" / "results.md").read_text()
    section = table[table.index("## The paper's claims"):table.index("## Diagnostics")]
    rows = {cells[1]: cells[2:] for cells in (line.split(" | ")[1:] for line in section.splitlines()
                                              if line.startswith("| coinrun | "))}
    t = stats.t.ppf(0.975, 2) / np.sqrt(3)
    change = t * np.std([0.5, 1.5, 4.0], ddof=1)  # every night ends FINAL_CHANGE[seed] above its day
    # | seeds | change | p (Holm) | verdict (Holm) | verdict (uncorrected) |
    assert rows["RndDreamer − day"][:2] == ["3", f"2.00 ± {change:.2f}"]
    assert rows["RndDreamer − day"][3:] == ["cannot tell", "cannot tell |"]
    assert float(rows["RndDreamer − day"][2].split(";")[0]) >= stats.ttest_1samp([0.5, 1.5, 4.0], 0).pvalue
    # the nights of a seed end equal: a change of exactly 0 on every seed is no evidence either way
    assert rows["ValDreamer − Dreamer (random init.)"] == ["2", "0.00 ± 0.00", "1.000", "cannot tell", "cannot tell |"]
    assert rows["Offline − day"] == ["1", "1.50", "-", "cannot tell (one seed)", "cannot tell (one seed) |"]
    assert rows["FullDreamer − day"] == ["0", "missing", "-", "missing", "missing |"]
    # seed 1's Offline has no final evaluation, seed 2's ValDreamer is unfinished, seed 3 has no Offline night
    assert rows["the three dreamers' mean − Offline"] == ["0", "missing", "-", "missing", "missing |"]


def test_claims_compare_a_mean_of_nights_with_another_night():
    """The dreamers' mean is taken per seed over RndDreamer, DeepDreamer and ValDreamer, then paired with Offline."""
    night = dict(rnd=1.0, deepdream=2.0, valdiv=6.0, offline=0.5)  # + seed: the dreamers' mean - Offline is 2.5
    rows = [dict(game="coinrun", method=m, seed=s, day_final=0.0, night_final=v + s)
            for s in (1, 2) for m, v in night.items()]
    rows = [dict(r, num_levels=200) for r in rows]
    lines = {cells[0]: cells[1:] for cells in (line.split(" | ")[2:] for line in plot.claims_table(rows)
                                               if line.startswith("| coinrun | "))}
    assert lines["the three dreamers' mean − Offline"] == ["2", "2.50 ± 0.00", "0.000", "held", "held |"]
    assert lines["RndDreamer − day"][:2] == [
        "2", f"2.50 ± {stats.t.ppf(0.975, 1) * np.std([2, 3], ddof=1) / np.sqrt(2):.2f}"]
    assert lines["RndDreamer − day"][3:] == ["cannot tell", "cannot tell |"]


def test_holm_corrects_for_the_games_comparisons():
    # Holm's step-down: the smallest of m p-values times m, the next times m - 1, ..., never below the one before
    assert plot.holm([0.01, 0.04, 0.03, np.nan]) == pytest.approx([0.03, 0.06, 0.06, np.nan], nan_ok=True)
    # a change held at 95% alone (p = 0.017) but not among the game's many comparisons
    night = dict(rnd=[0.7, 0.6, 0.5], deepdream=[1.0, -1.0, 0.0], valdiv=[1.0, -1.0, 0.0])
    rows = [dict(game="coinrun", method=m, seed=s, day_final=0.0, night_final=v[s - 1], num_levels=8)
            for m, v in night.items() for s in (1, 2, 3)]
    lines = {cells[1]: cells[2:] for cells in (line.split(" | ")[1:] for line in plot.claims_table(rows)
                                               if line.startswith("| coinrun, 8 levels | "))}
    # the game's six tests: each night against 0 and against a gain of 1; RndDreamer's are the two smallest
    p0, p1 = stats.ttest_1samp([0.7, 0.6, 0.5], 0).pvalue, stats.ttest_1samp([0.7, 0.6, 0.5], 1).pvalue
    assert p0 < p1 < 0.05 < 6 * p0
    assert lines["RndDreamer − day"][2:] == [f"{6 * p0:.3f}; {5 * p1:.3f} against 1", "cannot tell", "held |"]


def test_verdict_from_the_interval():
    assert plot.verdict([0.8, 1.0, 1.2]) == "held"  # mean 1, CI 1 ± 0.50
    assert plot.verdict([-0.8, -1.0, -1.2], gain=1.0) == "not held (a loss)"
    assert plot.verdict([0.1, -0.1, 0.0], gain=1.0) == "not held (no gain of 1)"  # CI 0 ± 0.25: below 1
    assert plot.verdict([0.1, -0.1, 0.0]) == "cannot tell"
    assert plot.verdict([2.0, -2.0, 0.5], gain=1.0) == "cannot tell"
    assert plot.verdict([3.0]) == "cannot tell (one seed)" and plot.verdict([]) == "missing"


def test_final_csv(synthetic):
    """One row per (game, method, seed) of the nights; an empty field where a value is missing."""
    text = (synthetic / "figures" / "final.csv").read_text()
    assert (synthetic / "docs" / "final.csv").read_text() == text
    rows = list(csv.DictReader(text.splitlines()))
    assert list(rows[0]) == ["game", "method", "seed", "day_final", "day_final_se", "night_final", "night_final_se",
                             "day_train_final", "day_train_final_se", "night_train_final", "night_train_final_se",
                             "day_last10", "night_last10", "num_levels"]
    assert [(r["method"], r["seed"]) for r in rows] == [(m, str(s)) for m in runner.methods_of(plot.PAPER_FIGURES)
                                                        for s in (1, 2, 3)]
    by = {(r["method"], int(r["seed"])): r for r in rows}
    assert by["rnd", 2] == dict(game="coinrun", method="rnd", seed="2", day_final="12", day_final_se="0.1",
                                night_final="13.5", night_final_se="0.2", day_train_final="22",
                                day_train_final_se="0.1", night_train_final="23", night_train_final_se="0.2",
                                day_last10="2", night_last10="4", num_levels="200")
    assert by["offline", 1]["night_final"] == by["offline", 1]["night_train_final_se"] == ""  # an older run
    assert by["offline", 1]["day_final"] == "11" and by["offline", 1]["night_last10"] == "2"
    assert by["offline", 3]["night_last10"] == by["valdiv", 2]["night_final"] == "" != by["valdiv", 2]["day_final"]
    assert all(r["night_final"] == "" for r in rows if r["method"] == "full")


def test_statistics_redone_from_the_csv_alone(synthetic, tmp_path, capsys):
    """--from-csv: the final table and the claims from final.csv files, as from the runs; a later file's row wins."""
    results = (synthetic / "figures" / "results.md").read_text()
    from_runs = results[results.index("| game | method | seeds | test: day final"):results.index("## Diagnostics")]
    capsys.readouterr()
    assert plot.main(["--from-csv", str(synthetic / "figures" / "final.csv")]) == 0
    assert from_runs in capsys.readouterr().out
    rows = list(csv.DictReader((synthetic / "figures" / "final.csv").read_text().splitlines()))
    later = tmp_path / "later.csv"  # seed 3's RndDreamer night ends 10 points higher
    plot.write_csv([{**next(r for r in rows if (r["method"], r["seed"]) == ("rnd", "3")), "night_final": "27"}], later)
    assert plot.main(["--from-csv", str(synthetic / "figures" / "final.csv"), str(later), "--csv",
                      str(tmp_path / "merged.csv")]) == 0
    t = stats.t.ppf(0.975, 2) / np.sqrt(3)
    assert f"| RndDreamer − day | 3 | 5.33 ± {t * np.std([0.5, 1.5, 14.0], ddof=1):.2f} |" in \
        capsys.readouterr().out
    merged = list(csv.DictReader((tmp_path / "merged.csv").read_text().splitlines()))
    assert len(merged) == len(rows) and [r["night_final"] for r in merged if (r["method"], r["seed"]) == ("rnd", "3")] \
        == ["27"]
    (tmp_path / "bad.csv").write_text("game,seed\ncoinrun,1\n")
    with pytest.raises(SystemExit, match="bad.csv: not a final.csv of benchmark/plot.py"):
        plot.main(["--from-csv", str(tmp_path / "bad.csv")])


def test_a_seed_whose_nights_have_two_days_is_refused(synthetic, tmp_path):
    # a later file that redoes one night of seed 3 from another day (its day redone on another CPU, say) would pair
    # the other nights of seed 3 with a day they did not start from
    rows = list(csv.DictReader((synthetic / "figures" / "final.csv").read_text().splitlines()))
    later = tmp_path / "later.csv"
    plot.write_csv([{**next(r for r in rows if (r["method"], r["seed"]) == ("rnd", "3")), "day_train_final": "21.5"}],
                   later)
    with pytest.raises(SystemExit, match=r"coinrun seed 3 \(200 levels\) has nights of two different days: "
                                         r"day_train_final 23 in dreamer_random's row .*final.csv\), 21.5 in rnd's "
                                         r"\(.*later.csv\)"):
        plot.main(["--from-csv", str(synthetic / "figures" / "final.csv"), str(later)])
    plot.write_csv([{**r, "day_train_final": "21.5"} for r in rows if r["seed"] == "3"], later)  # the whole seed redone
    merged = plot.read_csv_rows([synthetic / "figures" / "final.csv", later])
    assert {r["day_train_final"] for r in merged if r["seed"] == 3} == {21.5}


def test_final_table_says_when_no_run_has_it():
    rows = [dict(game="coinrun", method="rnd", seed=1, **{c: np.nan for c in plot.CSV_COLUMNS[3:]})]
    assert plot.final_table(rows)[0] == "No run has the final evaluation (the `final/*` scalars: these runs are " \
                                        "older than it)."


def two_regimes():
    """coinrun on 200 levels (2 seeds) and on 8 (3 seeds), ValDreamer's rows before RndDreamer's: the final
    evaluation, night - day = method's offset + seed / 10 on test levels, the training levels 1 point above."""
    offset = dict(valdiv=-1.0, rnd=0.5)
    return [dict(game="coinrun", method=m, seed=s, num_levels=n, day_final=5.0, night_final=5.0 + o + s / 10,
                 day_train_final=6.0, night_train_final=6.0 + o + s / 10 + (n == 8), day_final_se=0.1,
                 night_final_se=0.1, day_train_final_se=0.1, night_train_final_se=0.1, day_last10=np.nan,
                 night_last10=np.nan)
            for n, seeds in ((200, (1, 2)), (8, (1, 2, 3))) for m, o in offset.items() for s in seeds]


def test_regimes_apart_and_methods_in_one_order(tmp_path, capsys):
    # the same game on other training levels is another block of every table, named with its levels; each lists
    # the methods in METHODS' order whatever the rows' order; the CSV keeps the levels, and an older CSV without
    # them reads as the paper's 200
    table = plot.final_table(two_regimes())
    blocks = [line.split(" | ")[:2] for line in table if line.startswith("| coinrun")]
    assert blocks == [["| coinrun", "RndDreamer"], ["| coinrun", "ValDreamer"], ["| coinrun, 8 levels", "RndDreamer"],
                      ["| coinrun, 8 levels", "ValDreamer"]]
    gap = [line.split(" | ")[9:12] for line in table if line.startswith("| coinrun, 8 levels | RndDreamer")][0]
    assert gap == ["1.00 ± 0.00", "2.00 ± 0.00", "1.00 ± 0.00"]  # the night widens the gap on 8 levels
    plot.write_csv(two_regimes(), tmp_path / "new.csv")
    old = tmp_path / "old.csv"
    old.write_text("\n".join(",".join(line.split(",")[:-1]) for line in (tmp_path / "new.csv").read_text().splitlines()
                             if not line.endswith(",8")) + "\n")
    assert "num_levels" not in old.read_text()
    rows = plot.read_csv_rows([tmp_path / "new.csv", old])
    assert len(rows) == 10 and sorted({r["num_levels"] for r in rows}) == [8, 200]
    assert plot.main(["--from-csv", str(old), str(tmp_path / "new.csv"), "--paired", str(tmp_path / "paired")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Read from {old}, {tmp_path / 'new.csv'}.")
    assert "| coinrun, 8 levels | The nights raise" in out and (tmp_path / "paired.png").exists()


def test_paired_changes_drawn_per_seed_with_their_mean():
    fig = plot.draw_paired(two_regimes())
    test_8 = fig.axes[1]  # top row: test return; one column per regime (200, then 8 levels)
    assert test_8.get_title() == "coinrun, 8 levels" and len(fig.axes) == 4
    dots = {tuple(np.round(line.get_xdata(), 6)) for line in test_8.get_lines() if line.get_marker() == "o"}
    assert dots == {(0.6, 0.7, 0.8), (-0.9, -0.8, -0.7)}  # each seed's night - day
    bars = [c for c in test_8.containers]  # errorbar: the mean, its 95% CI
    assert sorted(round(float(b.lines[0].get_xdata()[0]), 6) for b in bars) == [-0.8, 0.7]
    half = stats.t.ppf(0.975, 2) * 0.1 / np.sqrt(3)
    segment = bars[0].lines[2][0].get_segments()[0]
    assert abs(segment[1][0] - segment[0][0]) == pytest.approx(2 * half)
    assert plot.draw_paired([dict(r, night_final=np.nan, night_train_final=np.nan) for r in two_regimes()]) is None


def test_the_runs_levels_come_from_the_days_command(tmp_path):
    day = runner.run_dir(tmp_path, "coinrun", runner.DAY, 4)
    day.mkdir(parents=True)
    (day / runner.DONE).write_text(json.dumps(dict(cmd=["python", "dreamer_ppo.py", "--num-levels", "200",
                                                        "--num-levels", "8"])))
    assert plot.levels_of(tmp_path, "coinrun", 4) == 8  # the last given wins, as for the script
    (day / runner.DONE).write_text("{}")  # a marker without the command: the paper's
    assert plot.levels_of(tmp_path, "coinrun", 4) == plot.levels_of(tmp_path, "coinrun", 5) == 200


def test_the_csv_has_no_row_for_a_seed_whose_day_has_not_finished(tmp_path):
    """Its N is unknown: a row with the paper's 200 would replace that regime's real row when CSVs are merged."""
    day = runner.run_dir(tmp_path, "coinrun", runner.DAY, 4)
    day.mkdir(parents=True)
    (day / runner.DONE).write_text(json.dumps(dict(cmd=["python", "dreamer_ppo.py", "--num-levels", "4"])))
    final = {tag: (np.array([100]), np.array([v])) for tag, v in zip(plot.FINAL.values(), range(1, 10))}
    data = {("coinrun", runner.DAY): {4: final}, ("coinrun", "rnd"): {4: final, 5: final}}
    rows = plot.final_rows(data, ["coinrun"], [4, 5], ["rnd"], {"coinrun": 100}, tmp_path)
    assert [(r["seed"], r["num_levels"]) for r in rows] == [(4, 4)]
    assert rows[0]["day_final"] == rows[0]["night_final"] == final[plot.FINAL["test"]][1][0]


def lines_of(fig):
    """{label: Line2D} of the figure's first panel."""
    return {line.get_label(): line for line in fig.axes[0].get_lines()}


@pytest.mark.parametrize("name, equal", [("fig3", ["dreamer_random", "dreamer_collected"]),
                                         ("fig4", ["dreamer_random", "rnd", "deepdream"])])
def test_methods_with_equal_curves_all_show(synthetic, name, equal):
    """Each method its own (marker, dash) and marker size; the legend in the paper's order."""
    data, ends = synthetic_data(synthetic)
    fig = plot.draw_figure(name, data, ["coinrun"], ends, {"coinrun": 2.5}, 1)
    methods = runner.FIGURES[name]
    labels = [runner.METHODS[m].label for m in methods]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["day (shared)", *labels, "random policy"]
    lines = lines_of(fig)
    assert all(list(lines[runner.METHODS[m].label].get_ydata()) == list(lines[labels[0]].get_ydata()) for m in equal)
    looks = [(lines[label].get_marker(), lines[label].get_linestyle(), lines[label].get_markersize()) for label in labels]
    assert len({look[:2] for look in looks}) == len({look[2] for look in looks}) == len(labels)
    assert all(marker not in ("", "None") for marker, _, _ in looks)
    plot.plt.close(fig)


def test_night_lines_start_at_the_days_end(synthetic):
    """The gap figure's night lines, train and test levels alike, start at the day's end (a night logs no train-levels
    return there: the day's is taken)."""
    data, ends = synthetic_data(synthetic)
    lines = lines_of(plot.draw_gap(data, ["coinrun"], ends, "rnd", 1))
    for kind, day_last in (("train levels", 3.0), ("test", 2.0)):  # the mean over seeds of d + 1 and of d
        assert lines[f"{kind}, night"].get_xdata()[0] == DAY_END == lines[f"{kind}, day"].get_xdata()[-1]
        assert lines[f"{kind}, night"].get_ydata()[0] == pytest.approx(day_last)
    plot.plt.close("all")


def test_smoothing_and_the_band_said_in_the_title(synthetic):
    assert list(plot.smoothed(np.array([1.0, 2, 3, 4]), 2)) == [1, 1.5, 2.5, 3.5]
    assert list(plot.smoothed(np.array([1.0, 5, 3]), 1)) == [1, 5, 3]
    data, ends = synthetic_data(synthetic)
    fig = plot.draw_figure("fig5", data, ["coinrun"], ends, {"coinrun": 2.5}, 3)
    day = lines_of(fig)["day (shared)"].get_ydata()
    assert day[5] == pytest.approx((100 + 100 + 2) / 3)  # the first epoch of d = seed, after two of 100
    title = fig.get_suptitle()
    assert "band: 95% CI of the mean (Student's t over seeds)" in title and "trailing mean over 3 evaluations" in title
    assert "trailing" not in plot.draw_figure("fig5", data, ["coinrun"], ends, {"coinrun": 2.5}, 1).get_suptitle()
    plot.plt.close("all")


def test_aggregate_ticks_apart_and_one_seed_said_so():
    """Every method, each from -0.8 to -0.6 (matplotlib's default ticks there, every 0.025, overlapped)."""
    result = {m: (-0.7, -0.8, -0.6, 1 if m == runner.DAY else 2) for m in (runner.DAY, *runner.METHODS)}
    fig = plot.draw_aggregate(result, ["coinrun"])
    fig.canvas.draw()
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()][:3] == ["day (1 seed)", "Dreamer (random init.) (2 seeds)",
                                                                 "Dreamer (collected init.) (2 seeds)"]
    boxes = sorted((t.get_window_extent() for t in ax.get_xticklabels() if t.get_visible() and t.get_text()),
                   key=lambda box: box.x0)
    assert len(boxes) >= 3 and all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:]))
    plot.plt.close(fig)


def test_plot_with_nothing_finished_says_so_in_one_line(tmp_path, capsys):
    write_run(runner.run_dir(tmp_path, "coinrun", runner.DAY, 1), [1.0])
    (runner.run_dir(tmp_path, "coinrun", runner.DAY, 1) / runner.DONE).unlink()  # as after `--gamma 0.5`
    assert plot.main(["--out", str(tmp_path), "--envs", "coinrun", "--seeds", "1", "2"]) == 1
    err = capsys.readouterr().err
    assert err == f"nothing to plot: no run in {tmp_path} has finished (games coinrun, seeds 1 2)\n"
    assert not (tmp_path / "figures").exists()
    assert not plot.draw_gap({("coinrun", runner.DAY): {}, ("coinrun", "rnd"): {}}, ["coinrun"], {"coinrun": 0},
                             "rnd", 1).legends  # no line, no legend (it raised)


def test_plot_draws_what_there_is_and_names_what_is_missing(tmp_path, capsys):
    write_run(runner.run_dir(tmp_path, "coinrun", runner.DAY, 1), [1.0, 2.0], [3.0, 4.0])
    (tmp_path / "random_scores.json").write_text(json.dumps({"coinrun": {"episodes": 100, "score": 2.5}}))
    assert plot.main(["--out", str(tmp_path), "--envs", "coinrun", "--seeds", "1", "2", "--figures", "fig3",
                      "--reps", "50"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == ("not finished, left out: coinrun: day (shared) (seed 2); "
                                                       "Dreamer (random init.) (seeds 1, 2); Dreamer (collected init.) "
                                                       "(seeds 1, 2)")
    assert all((tmp_path / "figures" / name).exists() for name in ("fig3.png", "gap.png", "aggregate.png", "final.csv"))
    table = (tmp_path / "figures" / "results.md").read_text()
    assert row(table, "Dreamer (random init.)")[0] == "0/2 (missing: 1, 2)"
    assert "No run has the final evaluation" in table


def test_figures_written(synthetic):
    for name in ("fig3", "fig4", "fig5", "gap", "aggregate"):
        for ext in ("png", "pdf"):
            assert (synthetic / "figures" / f"{name}.{ext}").stat().st_size > 1000


def test_random_scores_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(random_score, "random_policy_score", lambda game, episodes: 1.5)
    assert random_score.cached_random_scores(tmp_path, ["coinrun"], 10) == {"coinrun": 1.5}
    monkeypatch.setattr(random_score, "random_policy_score", lambda game, episodes: pytest.fail("not cached"))
    assert random_score.cached_random_scores(tmp_path, ["coinrun"], 10) == {"coinrun": 1.5}


def test_random_policy_score_on_coinrun():
    score = random_score.random_policy_score("coinrun", episodes=20)
    assert 0 < score < 10 and score in {10 * k / 20 for k in range(21)}  # 10 or nothing, once per episode


# %% the whole pipeline
def test_all_at_tiny_size(tmp_path):
    """all.sh on one game and two seeds with two workers: 2 days and 14 nights (2 environments instead of 5, a
    flag passed through to every script), the figures and the table."""
    result = bash("all", tmp_path, "--num-envs", "2", ENVS="coinrun", SEEDS="1 2", PRESET="tiny", WORKERS="2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "16 runs finished, 0 skipped" in result.stdout
    assert all(json.loads((tmp_path / name / runner.DONE).read_text())["cmd"].count("--num-envs") == 1
               for name in names(["day", *ALL], ["1", "2"]))
    for s in (1, 2):
        day = runner.run_dir(tmp_path, "coinrun", runner.DAY, s)
        assert (day / "day.pt").exists() and not (day / runner.REPLAY).exists()
    for name in ("fig3", "fig4", "fig5", "gap", "aggregate"):
        assert (tmp_path / "figures" / f"{name}.png").exists()
    table = (tmp_path / "figures" / "results.md").read_text()
    for method in map(runner.METHODS.get, runner.methods_of(plot.PAPER_FIGURES)):
        assert row(table, method.label)[0] == "2/2" and "missing" not in row(table, method.label)[1]


# %% speed.sh
@pytest.mark.parametrize("script, night_parts", [("dreamer_ppo.py", ["dreaming", "transformation"]),
                                                 ("dreamer_ppo_offline.py", ["sequences"])])
def test_speed_table_at_tiny_size(tmp_path, script, night_parts):
    """speed.sh runs two day and two night epochs of the script and prints every part of each phase from the
    run's time/* scalars, and the rates derived from them (not their values: timings)."""
    result = bash("speed", tmp_path, *SIZE_FLAGS, "--no-eval-train-levels", SCRIPT=script, EPOCHS="2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "(epochs: 2 day, 2 night; 1 run)" in lines[1]
    parts = [("day", p) for p in ("world_model", "acting", "ppo", "evaluation", "diagnostics")]
    parts += [("night", p) for p in (*night_parts, "ppo", "evaluation")]
    rows = [line.split() for line in lines[2:2 + len(parts)]]
    assert [tuple(r[:2]) for r in rows] == parts
    assert all(float(r[2]) >= 0 for r in rows)
    rates = {line.split(":")[0]: line.split(":")[1].split() for line in lines[2 + len(parts):]}
    assert float(rates["seconds per world-model update"][0]) > 0
    assert float(rates["real steps/s by day (acting)"][0]) > 0
    night_rate = ("dreamed steps/s by night (dreaming and transformation)" if "dreaming" in night_parts
                  else "real sequence steps/s by night (encoding)")
    assert float(rates[night_rate][0]) > 0
    assert rates["evaluation seconds"][0] == "day" and rates["evaluation seconds"][2] == "night"
    assert "peak GPU memory" not in rates  # on the CPU
    # the run's last line adds up each part of each phase
    summary = (tmp_path / Path(script).stem / "seed1" / runner.LOG).read_text().strip().splitlines()[-1]
    assert summary.startswith("time by phase (s): day: world_model ")
    assert all(f" {p} " in summary for _, p in parts)


def test_speed_runs_at_once_wall_clock_projections_and_gpu_use(tmp_path):
    """RUNS=2: two runs of the script at once (seeds 1 and 2); the report adds the epochs' wall-clock seconds, the
    aggregate epochs per second and the projections derived from them, and the median of nvidia-smi's utilisation
    over the epochs (a fake nvidia-smi here, always at 37%)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text('#!/usr/bin/env bash\nwhile true; do date +"%Y/%m/%d %H:%M:%S.%3N, 37"; '
                                     'sleep 0.1; done\n')
    (fake / "nvidia-smi").chmod(0o755)
    result = bash("speed", tmp_path / "out", *SIZE_FLAGS, "--no-eval-train-levels", EPOCHS="2", RUNS="2",
                  PATH=f"{fake}:{os.environ['PATH']}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("dreamer_ppo.py, 2 day and 2 night epochs, 2 at once") and "2 runs)" in lines[1]
    for seed in (1, 2):
        assert f"--seed {seed} " in (tmp_path / "out" / "dreamer_ppo" / f"seed{seed}" / runner.LOG).read_text()
    report = dict(line.split(": ", 1) for line in lines[2:] if ": " in line)
    words = report["wall-clock seconds per epoch"].replace(",", "").split()
    day, night = float(words[1]), float(words[3])
    assert day > 0 and night > 0
    words = report["aggregate epochs per second"].replace(",", "").split()
    assert float(words[1]) == pytest.approx(2 / day, rel=0.01, abs=0.001)
    assert float(words[3]) == pytest.approx(2 / night, rel=0.01, abs=0.001)
    minutes = float(report["projected, one game and seed (200 day and 200 night epochs)"].split()[0])
    assert minutes == pytest.approx(200 * (day + night) / 60, rel=0.01, abs=0.1)
    hours = float(report["projected, Figures 3-5 (20 days, 140 nights as fast as this script's) with 2 runs per "
                         "GPU"].split()[0])
    assert hours == pytest.approx(200 * (20 * day + 140 * night) / 2 / 3600, rel=0.01, abs=0.1)
    use = report["GPU utilisation (nvidia-smi, median over the epochs after the first)"].replace(",", "").split()
    assert use[:2] == ["day", "37%"] and use[4:6] == ["night", "37%"] and int(use[2][1:]) > 0


def test_speed_refuses_runs_that_are_not_a_count(tmp_path):
    result = bash("speed", tmp_path, RUNS="two")
    assert result.returncode == 2 and "RUNS='two'" in result.stderr and "1 or more" in result.stderr
    assert not (tmp_path / "dreamer_ppo").exists()
