"""The benchmark runner behind benchmark/fig3.sh, fig4.sh, fig5.sh and all.sh.

It expands (games x seeds x methods) into runs: one day per (game, seed) (`--night-epochs 0 --save-day`),
then each method's night from that day's checkpoint. Every run has a stable directory,
OUT/{game}/{method}/seed{S} (the day under method `day`), holding its TensorBoard events, its log
(log.txt) and, once it has exited with 0, a DONE marker. Every run is started with --resume: running the
same command again skips finished runs and continues unfinished ones from their last checkpoint, so an
interrupted benchmark goes on where it stopped (delete a run's directory to redo it from scratch). A day
that is (re)run makes its nights run again too (a night already finished just says so). `--figures control`
runs the perfect-model control (benchmark/control.py: the night's rule on the real game) beside the Dreamer
baseline's night; it is no figure of the paper, and starts over when run again (minutes at the CPU sizes).

Settings come from the environment (the interface of the shell scripts) or the flags below:

  ENVS     ProcGen games, default "coinrun caveflyer chaser plunder"
  SEEDS    whole numbers, 0 <= seed < 2^31, default "1 2 3 4 5" (a game or seed given twice runs once)
  PRESET   paper (default: every size the paper's) | cpu (the CPU-sized protocol) | cpu-matched (the CPU
           sizes with the paper's ratios of replayed to real frames and of dreamed to real samples) | cpu-narrow
           (cpu-matched on 8 training levels, the paper's real steps per level; seed S's from level 1000 x S) |
           cpu-overfit (cpu-narrow on 4 levels, where the day overfits: the second study's) | tiny (tests)
  WORKERS  local runs at once; default WORKERS_PER_GPU (default 4) per visible GPU, at most one per CPU
           core, or one per 2 CPU cores without a GPU. Runs on one GPU share it (it is idle most of the time).
  OUT      where runs (OUT/{game}/{method}/seed{S}) and figures (OUT/figures) go, default runs/benchmark
  SMOOTH   the figures' trailing moving average over SMOOTH evaluations of each seed (default 1: none)
  DRY_RUN=1       print every command, one per line, and run nothing
  BACKEND  local (default) or slurm (submitit: one job per run, each night after its day with afterok, so that
           a failed day cancels its nights; then a job that draws the figures). A job preempted or out of time is
           told to checkpoint (SIGUSR1, then waited for), requeued, and goes on from there. Its resources:
           SLURM_PARTITION   the partition (default: the cluster's default)
           SLURM_GPUS        GPUs per job (default 1 at PRESET=paper, 0 at the others, whose runs use the CPU)
           SLURM_CPUS        CPUs per job (default 8 at PRESET=paper, 1 at the others: their runs use one thread)
           SLURM_MEM_GB      memory per job in GB (default 32 at PRESET=paper, 8 at the others)
           SLURM_TIME_MIN    time limit per job in minutes (default 240)
           SLURM_ACCOUNT, SLURM_QOS, SLURM_CONSTRAINT   sbatch's --account, --qos, --constraint (default: none)
           SLURM_EXTRA       any further sbatch options, e.g. "--reservation=r1 --exclusive" (default: none)
           The runs' arguments are checked (parsed by their scripts) before the first sbatch; a submission that
           sbatch refuses is reported in one line and the jobs submitted before it are cancelled.
  KEEP_REPLAY=1   keep each day's replay/ (the real frames; ~12 GB at the paper's size). By default
           it is deleted once every night that reads it (dreamer_collected and offline) has finished.

Anything after `--` (the shell scripts pass their own arguments there) is added to every script's command,
day and nights alike, e.g. `bash benchmark/fig3.sh --penalty 0` (or `bash benchmark/fig3.sh -- --penalty 0`).

A failed run is reported at the end and makes the exit status non-zero; the others go on, and the nights
of a failed day are skipped (and reported). A run stopped by SIGTERM or SIGUSR1 checkpoints and exits with 75:
reported as stopped, it goes on at the next start. At the end the figures are drawn (benchmark/plot.py).

Every setting is checked before anything starts: a bad one is refused in one line (exit 2). The runner itself,
stopped by Ctrl-C (SIGINT) or SIGTERM (a time limit), starts no more runs, passes SIGTERM on to those under way
(each checkpoints at the end of its epoch and exits 75; a second signal stops them at once), waits for them,
reports, and exits with 128 + the signal's number; the same command goes on from there.
"""

import argparse
import contextlib
import fcntl
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

ROOT = Path(__file__).resolve().parent.parent


class Method(NamedTuple):
    script: str
    flags: tuple
    reads_replay: bool  # the night trains on the day's real frames (the day's replay/)
    label: str


METHODS = {
    "dreamer_random": Method("dreamer_ppo.py", ("--init-states", "random"), False, "Dreamer (random init.)"),
    "dreamer_collected": Method("dreamer_ppo.py", ("--init-states", "collected"), True, "Dreamer (collected init.)"),
    "rnd": Method("dreamer_ppo_random.py", (), False, "RndDreamer"),
    "deepdream": Method("dreamer_ppo_deepdream.py", (), False, "DeepDreamer"),
    "valdiv": Method("dreamer_ppo_valdiv.py", (), False, "ValDreamer"),
    "full": Method("dreamer_ppo_full.py", (), False, "FullDreamer"),
    "offline": Method("dreamer_ppo_offline.py", (), True, "Offline"),
    # not a method of the paper: the night's rule on the real game, as if the world model were perfect
    "control": Method("benchmark/control.py", (), False, "Perfect model (control)"),
}
DAY = "day"  # the method name of a day run
FIGURES = {
    "fig3": ("dreamer_random", "dreamer_collected"),
    "fig4": ("dreamer_random", "rnd", "deepdream", "valdiv", "offline"),
    "fig5": ("rnd", "deepdream", "valdiv", "full"),
    "control": ("dreamer_random", "control"),  # the Dreamer baseline's night beside the same night on the real game
}

# The paper's ratios at the cpu preset's networks: each real frame replayed about 10 times (B_w L U_w / T_d =
# 16 x 16 x 40 / 1000), as many dreamed samples by night as real ones by day, and the paper's PPO minibatches
# (T_d / U_a = 200 real samples by day, B_a H = 192 dreamed by night).
MATCHED = ("--day-epochs", "40", "--wm-updates", "40", "--day-steps", "1000", "--wm-batch-size", "16", "--seq-len", "16",
           "--agent-updates", "5", "--categoricals", "16", "--classes", "16", "--rnn-units", "256", "--cnn-depth", "16",
           "--mlp-units", "256", "--penalty", "0")
# Size flags, identical for a day and its nights (a night refuses a day of other sizes), and the night epochs.
PRESETS = {
    "paper": ((), None),
    "cpu": (("--day-epochs", "40", "--wm-updates", "20", "--day-steps", "5000", "--wm-batch-size", "16",
             "--seq-len", "16", "--categoricals", "16", "--classes", "16", "--rnn-units", "256", "--cnn-depth", "16",
             "--mlp-units", "256", "--penalty", "0"), "40"),
    "cpu-matched": (MATCHED, "40"),
    # cpu-matched on a narrow slice of the levels: the paper's real steps per training level (1M / 200 = 5,000),
    # N = E_d T_d / 5,000 = 8 levels, each seed its own (from level 1000 x seed: `seed_flags`), so that the day overfits
    # them as the paper's agent overfits its 200; the tests still play every level.
    "cpu-narrow": (MATCHED + ("--num-levels", "8"), "40"),
    # The study's: cpu-narrow on 4 levels (10,000 real steps each), the first setting at which the pilot's days
    # overfit their training levels (at 8 they hardly did; docs/study.md, "Where the day overfits").
    "cpu-overfit": (MATCHED + ("--num-levels", "4"), "40"),
    "tiny": (("--wm-updates", "2", "--day-steps", "100", "--wm-batch-size", "4", "--seq-len", "8",
              "--agent-updates", "2", "--agent-batch-size", "4", "--horizon", "5", "--test-repetitions", "1",
              "--seed-episodes", "1", "--categoricals", "4", "--classes", "4", "--rnn-units", "32", "--cnn-depth",
              "4", "--mlp-units", "32", "--bins", "31", "--burn-in", "3", "--final-episodes", "2",
              "--no-bf16", "--day-epochs", "2"), "2"),
}
# ProcGen's games: dreamer_ppo.PROCGEN_GAMES, written out because importing a script imports torch and procgen
GAMES = ("bigfish", "bossfight", "caveflyer", "chaser", "climber", "coinrun", "dodgeball", "fruitbot", "heist",
         "jumper", "leaper", "maze", "miner", "ninja", "plunder", "starpilot")
BACKENDS = ("local", "slurm")
SEED_LIMIT = 2**31  # the scripts' seeds: 0 <= seed < 2^31
REPLAY = "replay"  # a day's real frames, beside its day.pt
LOCK = ".runner.lock"
PREEMPTED = 75  # a script's exit status after SIGTERM or SIGUSR1 and its checkpoint
SLURM_STOP_WAIT = 60  # seconds a preempted SLURM job gives its run to checkpoint (submitit signals 90 s ahead)
DONE = "DONE"
LOG = "log.txt"


LEVELS_APART = 1000  # at cpu-narrow and cpu-overfit, seed S trains on the levels from LEVELS_APART x S


def seed_flags(preset, seed):
    """The flags a preset sets from the seed: at cpu-narrow and cpu-overfit, the seed's own training levels."""
    return ("--start-level", str(LEVELS_APART * seed)) if preset in ("cpu-narrow", "cpu-overfit") else ()


def methods_of(figures):
    """The nights the figures need, each once, in the order of METHODS."""
    return [m for m in METHODS if any(m in FIGURES[f] for f in figures)]


def run_dir(out, game, method, seed):
    return Path(out) / game / method / f"seed{seed}"


@dataclass(frozen=True)
class Run:
    game: str
    method: str
    seed: int
    cmd: tuple
    dir: Path
    day: Optional["Run"] = None  # a night's day

    @property
    def name(self):
        return f"{self.game}/{self.method}/seed{self.seed}"

    @property
    def done(self):
        return (self.dir / DONE).exists()


def expand(games, seeds, methods, preset, extra, out):
    """Every run, days first (one per game and seed), then each day's nights in the order of `methods`."""
    sizes, night_epochs = PRESETS[preset]
    night_flags = ("--night-epochs", night_epochs) if night_epochs else ()
    python = sys.executable
    days = {(g, s): Run(g, DAY, s, (python, str(ROOT / "dreamer_ppo.py"), "--env-id", g, "--seed", str(s), *sizes,
                                    *seed_flags(preset, s), *extra, "--night-epochs", "0", "--save-day", "--run-dir",
                                    str(run_dir(out, g, DAY, s)), "--resume"), run_dir(out, g, DAY, s))
            for g in games for s in seeds}
    nights = [Run(g, m, s, (python, str(ROOT / METHODS[m].script), "--env-id", g, "--seed", str(s), *sizes,
                            *seed_flags(preset, s), *night_flags, *METHODS[m].flags, *extra, "--day-checkpoint",
                            str(days[g, s].dir / "day.pt"),
                            "--run-dir", str(run_dir(out, g, m, s)), "--resume"), run_dir(out, g, m, s), days[g, s])
              for g in games for s in seeds for m in methods]
    return [*days.values(), *nights]


def pending(runs):
    """The runs to (re)do: unfinished ones, and the nights of a day that is to be redone."""
    return [r for r in runs if not r.done or (r.day is not None and not r.day.done)]


def drop_replay_if_unneeded(out, game, seed):
    """Delete the day's real frames once every night that reads them has finished."""
    if all((run_dir(out, game, m, seed) / DONE).exists() for m, method in METHODS.items() if method.reads_replay):
        shutil.rmtree(run_dir(out, game, DAY, seed) / REPLAY, ignore_errors=True)


def execute(run, out, keep_replay, env=None, check=False, started=None, ignore=()):
    """Run one script (it goes on from its checkpoint, if any), its output appended to log.txt; DONE on exit 0.
    Returns the exit code (raises on failure with check=True, so that a SLURM job fails and cancels its nights).
    `started` is called with the script's process; the script ignores the signals in `ignore`."""
    run.dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ if env is None else env)
    env.setdefault("OMP_NUM_THREADS", "1")  # torch's thread pools thrash when runs share cores
    env.setdefault("MKL_NUM_THREADS", "1")
    start = time.time()
    with open(run.dir / LOG, "a") as log:
        log.write(shlex.join(run.cmd) + "\n")
        log.flush()
        ignored = (lambda: [signal.signal(s, signal.SIG_IGN) for s in ignore]) if ignore else None
        proc = subprocess.Popen(run.cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=ignored)
        if started is not None:
            started(proc)
        code = proc.wait()
    if code == 0:
        (run.dir / DONE).write_text(json.dumps(dict(cmd=list(run.cmd), seconds=round(time.time() - start, 1),
                                                    finished=time.strftime("%Y-%m-%d %H:%M:%S"))) + "\n")
        if not keep_replay:
            drop_replay_if_unneeded(out, run.game, run.seed)
    elif check:
        raise RuntimeError(f"{run.name} exited with {code}: see {run.dir / LOG}")
    return code


def disk_usage(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def visible_gpus():
    try:
        import torch
        return list(range(torch.cuda.device_count()))
    except ImportError:
        return []


def default_workers(gpus, per_gpu):
    cpus = os.cpu_count() or 1
    return min(per_gpu * len(gpus), cpus) if gpus else max(1, cpus // 2)


def reads_replay(run):
    return run.method in METHODS and METHODS[run.method].reads_replay


def say(line):
    """print, flushed; once stdout's reader has gone (`| head`) the rest goes to /dev/null and the runs go on."""
    try:
        print(line, flush=True)
    except BrokenPipeError:  # Python's advice (library/signal, "Note on SIGPIPE")
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class Stop:
    """The runner's own stop. On SIGINT (Ctrl-C) or SIGTERM (a time limit, `timeout`, kill) no run starts any more
    and those under way get SIGTERM: each checkpoints at the end of its epoch and exits 75 (a second signal stops
    them at once). The runner then waits for them, so that none is left running without it."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal, self.procs = None, []

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        again = self.signal is not None
        self.signal = self.signal or signal.Signals(signum).name
        note = ("again: the runs stop at once, from their last checkpoint" if again else
                "no run starts; those under way are told to stop at the end of their epoch, with a checkpoint "
                "(again: at once)")
        try:  # not print: the signal may have come in the middle of one
            os.write(sys.stderr.fileno(), f"{signal.Signals(signum).name}: {note}\n".encode())
        except OSError:
            pass
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def started(self, proc):
        self.procs.append(proc)
        if self.signal is not None:  # the signal came while it was being started
            proc.send_signal(signal.SIGTERM)

    def stopped(self, code):
        """Whether a run's exit code says it was stopped (it goes on from its checkpoint at the next start)."""
        return code == PREEMPTED or (self.signal is not None and code in (130, -signal.SIGTERM, -signal.SIGINT))


def run_local(todo, out, workers, keep_replay, stop):
    """A pool of `workers` runs at once, slot i on GPU i mod (visible GPUs). A night starts once its day is
    done; ready nights go before days (those that read the replay first), which keeps few replays on disk at
    once; none starts once the runner is stopped. Returns ({run: exit code, or why it did not run}, the peak disk
    use of `out` seen at each run's end)."""
    gpus = visible_gpus()
    results, running, free_slots, queue = {}, {}, list(range(workers)), list(todo)
    peak = disk_usage(out)
    with ThreadPoolExecutor(workers) as pool:
        while queue or running:
            if stop.signal is not None:
                results.update((r, f"not started: the runner was stopped by {stop.signal}") for r in queue)
                queue.clear()
            for run in [r for r in queue if r.day is not None and results.get(r.day, 0) != 0]:
                queue.remove(run)
                results[run] = f"skipped: its day {run.day.name} did not finish"
            ready = sorted((r for r in queue if r.day is None or r.day.done), key=lambda r: (r.day is None,
                                                                                            not reads_replay(r)))
            for run, slot in zip(ready, list(free_slots)):
                queue.remove(run)
                free_slots.remove(slot)
                env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": str(gpus[slot % len(gpus)])} if gpus else {}))
                say(f"start  {run.name}")
                running[pool.submit(execute, run, out, keep_replay, env, started=stop.started)] = run, slot
            if not running:  # a day exited with 0 without its DONE marker: its nights cannot start
                results.update((r, f"skipped: its day {r.day.name} is not finished") for r in queue)
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                run, slot = running.pop(future)
                free_slots.append(slot)
                results[run] = future.result()
                peak = max(peak, disk_usage(out))
                status = "done" if results[run] == 0 else "STOPPED" if stop.stopped(results[run]) else "FAILED"
                say(f"{status:7} {run.name}")
    return results, peak


def exited(proc):
    """Whether the process has exited, without reaping it: Popen.poll and Popen.wait see nothing while the job's
    main thread, interrupted by the signal whose handler asks, holds the process's wait lock."""
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


class SlurmRun:
    """One run as a submitit job. When SLURM is about to preempt the job or its time is up, it signals the job's
    step (SIGTERM on preemption, then submitit's SIGUSR2), and submitit calls `checkpoint`: the script is told
    (SIGUSR1) to checkpoint at the end of its epoch, waited for, and the job is requeued with the same command,
    which goes on from that checkpoint (--resume). The script ignores SIGUSR2, which is submitit's (its default
    action would end the script before its checkpoint)."""

    def __init__(self, run, out, keep_replay):
        self.run, self.out, self.keep_replay, self.proc = run, out, keep_replay, None

    def __call__(self):
        return execute(self.run, self.out, self.keep_replay, check=True, started=lambda p: setattr(self, "proc", p),
                       ignore=(signal.SIGUSR2,))

    def checkpoint(self, *args, **kwargs):
        import submitit

        if self.proc is not None and not exited(self.proc):
            self.proc.send_signal(signal.SIGUSR1)
            deadline = time.time() + SLURM_STOP_WAIT  # else the last checkpoint stays; the run redoes what followed
            while not exited(self.proc) and time.time() < deadline:
                time.sleep(0.2)
        return submitit.helpers.DelayedSubmission(SlurmRun(self.run, self.out, self.keep_replay))

    def __getstate__(self):  # the process stays with this job; a requeued job starts its own
        return dict(self.__dict__, proc=None)


# A word in sbatch's refusal -> the setting that most likely asked for it
SBATCH_WORDS = (("gres", "SLURM_GPUS"), ("gpu", "SLURM_GPUS"), ("account", "SLURM_ACCOUNT"), ("qos", "SLURM_QOS"),
                ("feature", "SLURM_CONSTRAINT"), ("constraint", "SLURM_CONSTRAINT"), ("partition", "SLURM_PARTITION"),
                ("memory", "SLURM_MEM_GB"), ("time limit", "SLURM_TIME_MIN"), ("cpu", "SLURM_CPUS"),
                ("processor", "SLURM_CPUS"))


def slurm_parameters(args):
    """submitit's parameters from the SLURM_* settings."""
    params = dict(timeout_min=args.slurm_time_min, gpus_per_node=args.slurm_gpus, cpus_per_task=args.slurm_cpus,
                  mem_gb=args.slurm_mem_gb)
    for variable, key in (("SLURM_PARTITION", "slurm_partition"), ("SLURM_ACCOUNT", "slurm_account"),
                          ("SLURM_QOS", "slurm_qos"), ("SLURM_CONSTRAINT", "slurm_constraint")):
        if os.environ.get(variable, "").strip():
            params[key] = os.environ[variable].strip()
    return params


def read_sbatch_options(label, text):
    """SLURM_EXTRA: sbatch options (--name=value or --flag), as submitit's additional parameters."""
    options = {}
    for word in shlex.split(text):
        name, _, value = word.partition("=")
        if not (name.startswith("--") and len(name) > 2):
            refuse(label, text, f"{word!r} is not an sbatch option; options are --name=value or --flag, e.g. "
                                "--reservation=r1 --exclusive")
        options[name[2:].replace("-", "_")] = value if value else True
    return options


def check_arguments(todo, extra):
    """Each script parses its runs' arguments, and a day's are checked as the day would at its start (a night's
    check would look for its day's checkpoint): a mistake costs a second, not a queue wait. Refused in one line
    with the script's words; exit 2."""
    commands = {run.cmd[1]: (list(run.cmd[2:]), run.day is None) for run in reversed(todo)}  # a day's, if any
    code = ("import importlib, json, sys, tyro\n"
            "for script, (argv, day) in json.loads(sys.argv[1]).items():\n"
            "    module = importlib.import_module(script)\n"
            "    args = tyro.cli(module.Args, args=argv, prog=script)\n"
            "    day and module.check_args(args)\n")
    modules = {str(Path(s).relative_to(ROOT).with_suffix("")).replace(os.sep, "."): a for s, a in commands.items()}
    result = subprocess.run([sys.executable, "-c", code, json.dumps(modules)], cwd=ROOT, capture_output=True,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200"))
    if result.returncode:
        words = " ".join(w for w in result.stderr.replace("│", " ").split() if w.strip("─╭╮╰╯│ "))
        print(f"the runs' arguments {shlex.join(extra)!r}: refused before anything was submitted: {words}",
              file=sys.stderr)
        raise SystemExit(2)


def run_slurm(todo, args, plot_cmd):
    """One SLURM job per run through submitit, each night after its day (afterok), and the plots after all.
    A submission that sbatch refuses: one line naming the setting and sbatch's words, and the jobs submitted
    before it cancelled; exit 1."""
    out, keep_replay = args.out, args.keep_replay
    try:
        import submitit
    except ImportError:
        sys.exit("BACKEND=slurm needs submitit: pip install -e '.[benchmark]'")
    if todo:
        check_arguments(todo, args.extra)
    # the jobs (which start in this environment) unpickle their runs from this module, benchmark.run
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    executor = submitit.AutoExecutor(folder=Path(out) / "slurm" / "%j", cluster="slurm")
    executor.update_parameters(**slurm_parameters(args))
    jobs = {}

    def submit(name, fn, *fn_args, after=None, **params):
        executor.update_parameters(name=name, slurm_additional_parameters=dict(
            args.slurm_extra, **(dict(dependency=after, kill_on_invalid_dep="yes") if after else {})), **params)
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's refusal, then raises it
                return executor.submit(fn, *fn_args)
        except Exception as error:  # submitit's FailedJobError, or sbatch missing
            said = [line.strip() for line in str(error).splitlines() if "error" in line.lower()] or [str(error)]
            words = "sbatch: " + "; ".join(line.removeprefix("sbatch: error: ") for line in said)
            setting = next((v for w, v in SBATCH_WORDS if w in words.lower()), "SLURM_EXTRA")
            cancelled = [j.job_id for j in jobs.values()]
            if cancelled:
                subprocess.run(["scancel", *cancelled], capture_output=True)
            print(f"sbatch refused the job of {name} (check {setting} and the other SLURM_* settings): {words}"
                  + (f"; the {len(cancelled)} jobs submitted before it cancelled ({' '.join(cancelled)})" if cancelled
                     else ""), file=sys.stderr)
            raise SystemExit(1)

    for run in todo:  # days come first
        after = "afterok:" + jobs[run.day].job_id if run.day in jobs else None
        jobs[run] = submit(run.name, SlurmRun(run, out, keep_replay), after=after)
        print(f"{jobs[run].job_id}  {run.name}", flush=True)
    job = submit("plots", subprocess.run, plot_cmd, after="afterany:" + ":".join(j.job_id for j in jobs.values())
                 if jobs else None, gpus_per_node=0, timeout_min=60)
    print(f"{job.job_id}  plots (after every run)", flush=True)
    return jobs


def refuse(label, text, allowed):
    """A bad setting: one line naming it, its value and what is allowed; exit 2 before anything is written."""
    print(f"{label}={text!r}: {allowed}", file=sys.stderr)
    raise SystemExit(2)


def distinct(label, text, items):
    """`items` each once, in their order, saying which were given more than once."""
    twice = sorted({i for i in items if items.count(i) > 1}, key=items.index)
    if twice:
        print(f"{label}={text!r}: {', '.join(map(str, twice))} given more than once, run once", file=sys.stderr)
    return list(dict.fromkeys(items))


def read_games(label, text):
    games = text.replace(",", " ").split()
    for game in games:
        if game not in GAMES:
            refuse(label, text, f"{game!r} is not a ProcGen game; the games (in lower case) are {', '.join(GAMES)}")
    return distinct(label, text, games) if games else refuse(label, text, "at least one ProcGen game")


def read_seeds(label, text):
    seeds = text.replace(",", " ").split()
    for seed in seeds:
        if not (seed.isascii() and seed.isdigit() and int(seed) < SEED_LIMIT):
            refuse(label, text, f"{seed!r} is not a seed; seeds are whole numbers, 0 <= seed < 2^31")
    return distinct(label, text, [int(s) for s in seeds]) if seeds else refuse(label, text, "at least one seed")


def one_of(choices):
    def read(label, text):
        return text if text in choices else refuse(label, text, f"one of {', '.join(choices)}")
    return read


def read_count(label, text):
    ok = text.isascii() and text.isdigit() and int(text) >= 1
    return int(text) if ok else refuse(label, text, "a whole number, 1 or more")


def read_whole(label, text):
    return int(text) if text.isascii() and text.isdigit() else refuse(label, text, "a whole number, 0 or more")


def read_switch(label, text):
    return text == "1" if text in ("", "0", "1") else refuse(label, text, "1 (on), or 0 or empty (off)")


def read_out(label, text):
    """A directory, or one that can be made (made and removed again here, so that nothing starts before)."""
    path = Path(text).resolve()
    if path.exists() and not path.is_dir():
        refuse(label, text, "a directory (this is a file)")
    made = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        for p in made:  # the deepest first
            p.rmdir()
    except OSError as error:
        refuse(label, text, f"a directory that can be made and written: {error.strerror}")
    return str(path)


# name: (its variable, the default, the reader of its text). The flag of the same name, if given, wins.
SETTINGS = dict(envs=("ENVS", "coinrun caveflyer chaser plunder", read_games), seeds=("SEEDS", "1 2 3 4 5", read_seeds),
                preset=("PRESET", "paper", one_of(PRESETS)), workers=("WORKERS", "", read_count),
                workers_per_gpu=("WORKERS_PER_GPU", "4", read_count), smooth=("SMOOTH", "1", read_count),
                out=("OUT", "runs/benchmark", read_out), dry_run=("DRY_RUN", "", read_switch),
                backend=("BACKEND", "local", one_of(BACKENDS)), keep_replay=("KEEP_REPLAY", "", read_switch),
                slurm_time_min=("SLURM_TIME_MIN", "240", read_count),
                slurm_mem_gb=("SLURM_MEM_GB", {"paper": "32"}, read_count),
                slurm_cpus=("SLURM_CPUS", {"paper": "8"}, read_count),
                slurm_gpus=("SLURM_GPUS", {"paper": "1"}, read_whole),
                slurm_extra=("SLURM_EXTRA", "", read_sbatch_options))
# A default of the form {"paper": d}: d at PRESET=paper, else this, for the CPU presets (their runs use one thread)
PRESET_DEFAULTS = dict(slurm_cpus="1", slurm_gpus="0", slurm_mem_gb="8")


def read_settings(args, names):
    """Set args.NAME for each setting from its flag, else its variable, else its default (at args.preset), checked
    in one place (argparse applies no type to a default taken from a variable); WORKERS empty means the default."""
    for name in names:
        variable, default, read = SETTINGS[name]
        if isinstance(default, dict):
            default = default.get(args.preset, PRESET_DEFAULTS[name])
        given = getattr(args, name, None)
        if given is not None:
            label, text = "--" + name.replace("_", "-"), " ".join(given) if isinstance(given, list) else str(given)
        else:
            label, text = variable, os.environ.get(variable, default)
        setattr(args, name, None if name == "workers" and text == "" else read(label, text))
    return args


def parse(argv):
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    extra = extra[1:] if extra[:1] == ["--"] else extra  # `bash fig3.sh -- --day-epochs 12`: the scripts pass "--" too
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--figures", nargs="+", choices=FIGURES, required=True, help="the figures whose runs to make")
    p.add_argument("--envs", nargs="+", help="instead of ENVS")
    p.add_argument("--seeds", nargs="+", help="instead of SEEDS")
    p.add_argument("--preset", help="instead of PRESET")
    p.add_argument("--workers", help="instead of WORKERS")
    p.add_argument("--smooth", help="instead of SMOOTH")
    p.add_argument("--out", help="instead of OUT")
    p.add_argument("--dry-run", action="store_const", const="1", help="DRY_RUN=1")
    p.add_argument("--backend", help="instead of BACKEND")
    p.add_argument("--keep-replay", action="store_const", const="1", help="KEEP_REPLAY=1")
    args = read_settings(p.parse_args(argv), ("envs", "seeds", "preset", "workers", "workers_per_gpu", "smooth",
                                               "out", "dry_run", "backend", "keep_replay"))
    if args.backend == "slurm":
        read_settings(args, ("slurm_time_min", "slurm_mem_gb", "slurm_cpus", "slurm_gpus", "slurm_extra"))
    highest = SEED_LIMIT // LEVELS_APART - 1  # ProcGen's levels stop at 2^31
    if seed_flags(args.preset, 0) and max(args.seeds) > highest:
        refuse("SEEDS", " ".join(map(str, args.seeds)), f"at most {highest} at PRESET={args.preset}, whose seed S "
                                                         f"trains on the levels from {LEVELS_APART} x S")
    args.extra = tuple(extra)
    return args


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    methods = methods_of(args.figures)
    runs = expand(args.envs, args.seeds, methods, args.preset, args.extra, args.out)
    todo = pending(runs)
    plot_cmd = [sys.executable, str(ROOT / "benchmark" / "plot.py"), "--out", args.out, "--envs", *args.envs,
                "--seeds", *map(str, args.seeds), "--figures", *args.figures, "--smooth", str(args.smooth)]
    print(f"# {len(runs)} runs ({len(runs) - len(todo)} finished, {len(todo)} to run), preset {args.preset}, "
          f"out {args.out}", file=sys.stderr, flush=True)
    if args.dry_run:
        say("\n".join(shlex.join(r.cmd) for r in todo) + ("\n" if todo else "") + shlex.join(plot_cmd))
        return 0
    if args.backend == "slurm":
        run_slurm(todo, args, plot_cmd)
        return 0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    lock_path = Path(args.out) / LOCK
    with open(lock_path, "w") as lock:
        try:  # a second runner on the same OUT would empty the directories of runs under way
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(lock_path).st_ino != os.fstat(lock.fileno()).st_ino:  # removed by a runner that just ended
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            sys.exit(f"another benchmark runner is using {args.out}; wait for it or choose another OUT")
        try:
            return local(args, runs, plot_cmd)
        finally:
            lock_path.unlink()  # while still holding it


def local(args, runs, plot_cmd):
    """Run what is unfinished here, draw the figures, report; the exit status (128 + the signal's if stopped)."""
    todo = pending(runs)
    start = time.time()
    with Stop() as stop:
        workers = args.workers or default_workers(visible_gpus(), args.workers_per_gpu)  # visible_gpus imports torch
        results, peak = run_local(todo, args.out, workers, args.keep_replay, stop)
        plotted = None
        if stop.signal is None:
            plot = subprocess.Popen(plot_cmd, cwd=ROOT)
            stop.started(plot)
            plotted = plot.wait()
    failed = {r: c for r, c in results.items() if c != 0}
    stopped = [r for r, c in failed.items() if stop.stopped(c)]
    not_started = [r for r, c in failed.items() if isinstance(c, str) and c.startswith("not started")]
    say(f"\n{len(results) - len(failed)} runs finished, {len(runs) - len(todo)} skipped (finished before), "
        f"{len(failed)} failed, stopped or skipped; {workers} workers, {time.time() - start:.0f} s; peak disk of "
        f"{args.out} (at each run's end) {peak / 2**30:.2f} GiB, now {disk_usage(args.out) / 2**30:.2f} GiB")
    for run, code in failed.items():
        if code == PREEMPTED:
            say(f"STOPPED {run.name}: by a signal, with its checkpoint; run the benchmark again to continue it")
        elif run in stopped:
            say(f"STOPPED {run.name}: at once (exit {code}); run the benchmark again to continue it from its last "
                "checkpoint")
        elif run not in not_started:
            say(f"FAILED {run.name}: " + (code if isinstance(code, str) else f"exit {code}, see {run.dir / LOG}"))
    if stop.signal is not None:
        say(f"STOPPED by {stop.signal}: {len(stopped)} runs stopped, {len(not_started)} not started, the figures not "
            "drawn; the same command goes on from there")
        return 128 + signal.Signals[stop.signal]
    return 1 if failed or plotted else 0


if __name__ == "__main__":  # as benchmark.run, whose objects a SLURM job unpickles by reference (not __main__'s)
    sys.path.insert(0, str(ROOT))
    from benchmark import run as runner

    sys.exit(runner.main())
