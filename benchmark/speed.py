"""The per-phase speed of one script, measured the same way every time (issue 11): behind benchmark/speed.sh.

It runs SCRIPT for EPOCHS day epochs then EPOCHS night epochs, at every default size unless flags say otherwise
(every argument is passed to the script), RUNS copies of it at once (seeds 1..RUNS, sharing the machine and its
GPU), into OUT, and prints from the runs' time/* TensorBoard scalars the median seconds per epoch of each part of
each phase (over every run), then:

- seconds per world-model update (charts/wm_update_seconds),
- real steps per second by day, over the acting alone (environment stepping, filtering, the policy),
- steps per second by night over the dreaming and the transformation (the Offline night: over encoding its
  real sequences),
- the evaluation's own seconds (with --eval-overlap, the default, it runs alongside the next epoch: the table's
  evaluation rows are then what the epochs waited for it), and the peak GPU memory on CUDA (time/peak_gpu_mem_gb),
- the wall-clock seconds of a day epoch and of a night epoch (between the ends of consecutive epochs, so the first
  epoch of each phase, with its warm-up, is left out) and the aggregate epochs per second of the RUNS runs,
- the paper's protocol projected from them: one game and seed (200 day and 200 night epochs, Table 2), and
  Figures 3-5 (4 games x 5 seeds: 20 days and 140 nights, every night as fast as this script's) in GPU-hours
  with RUNS runs sharing each GPU,
- with nvidia-smi on the PATH, the GPU's utilisation sampled every 0.2 s: its median over the day epochs and
  over the night epochs (between the first and the last epoch end of each phase).

Settings from the environment: SCRIPT (default dreamer_ppo.py), EPOCHS (default 3), RUNS (default 1), OUT
(default runs/speed; the runs go to OUT/{script}/seed{S}, emptied first). Each run's log is its log.txt. Medians
over few epochs: use EPOCHS of 5 or more for the wall-clock rows, which need two epochs of each phase.

    bash benchmark/speed.sh                                                 # full size (a GPU job)
    for k in 1 2 4 8; do RUNS=$k EPOCHS=6 bash benchmark/speed.sh; done     # runs per GPU (WORKERS_PER_GPU)
    SCRIPT=dreamer_ppo_deepdream.py EPOCHS=2 bash benchmark/speed.sh --wm-batch-size 16 --seq-len 16
"""

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

if __package__ in (None, ""):  # run as a script: the repository root on the path, for `benchmark.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmark.plot import read_run  # noqa: E402
from benchmark.run import LOG, ROOT, Run, execute  # noqa: E402

PHASES = {"day": ("world_model", "acting", "ppo", "evaluation", "diagnostics"),
          "night": ("dreaming", "transformation", "sequences", "ppo", "evaluation")}
PROTOCOL_EPOCHS = 200  # E_d = E_n (Table 2): the epochs of one game and seed, by day and by night
FIGURE_RUNS = dict(day=20, night=140)  # Figures 3-5 (benchmark/all.sh): 4 games x 5 seeds, a day and 7 nights each


def phase_steps(scalars):
    """The steps of the day's epochs and of the night's (those that logged time/world_model, and the others)."""
    steps = scalars["time/evaluation"][0]
    day_steps = scalars["time/world_model"][0] if "time/world_model" in scalars else []
    day = np.isin(steps, day_steps)
    return steps[day], steps[~day]


def median_at(scalars, tag, steps):
    """The median of `tag` over the epochs ending at `steps` (NaN where it has none)."""
    if tag not in scalars or not len(steps):
        return float("nan")
    tag_steps, values = scalars[tag]
    return float(np.median(values[np.isin(tag_steps, steps)]))


def per_epoch_steps(steps, before):
    """Steps per epoch of a phase: its x-axis advances by one epoch's steps (`before`: the step it starts from)."""
    return float(np.median(np.diff(np.concatenate([[before], steps])))) if len(steps) else float("nan")


def merged(runs):
    """The scalars of several runs of the same epochs as one: each tag's steps and values over every run."""
    return {tag: tuple(np.concatenate(x) for x in zip(*(r[tag] for r in runs if tag in r))) for tag in runs[0]}


def table(runs):
    """The report's lines on the per-part times and rates from the runs' scalars (medians over every run)."""
    day_steps, night_steps = phase_steps(runs[0])
    scalars = merged(runs)
    lines = [f"{'phase':<7}{'part':<16}{'median s/epoch':>15}  "
             f"(epochs: {len(day_steps)} day, {len(night_steps)} night; {len(runs)} run{'s' * (len(runs) > 1)})"]
    for phase, steps in (("day", day_steps), ("night", night_steps)):
        for part in PHASES[phase]:
            if f"time/{part}" in scalars and len(steps):
                lines.append(f"{phase:<7}{part:<16}{median_at(scalars, f'time/{part}', steps):>15.3f}")
    lines.append(f"seconds per world-model update: {median_at(scalars, 'charts/wm_update_seconds', day_steps):.3f}")
    real = per_epoch_steps(day_steps, 0)
    lines.append(f"real steps/s by day (acting): {real / median_at(scalars, 'time/acting', day_steps):.0f}")
    night = per_epoch_steps(night_steps, day_steps[-1] if len(day_steps) else 0)
    if "time/dreaming" in scalars:
        dreaming = [median_at(scalars, f"time/{part}", night_steps) for part in ("dreaming", "transformation")]
        lines.append(f"dreamed steps/s by night (dreaming and transformation): {night / sum(dreaming):.0f}")
    elif "time/sequences" in scalars:
        lines.append(f"real sequence steps/s by night (encoding): "
                     f"{night / median_at(scalars, 'time/sequences', night_steps):.0f}")
    own = "time/evaluation_background" if "time/evaluation_background" in scalars else "time/evaluation"
    lines.append(f"evaluation seconds: day {median_at(scalars, own, day_steps):.2f}, "
                 f"night {median_at(scalars, own, night_steps):.2f} ("
                 + ("in the background; the evaluation rows above are the epochs' waits" if "background" in own else
                    "in the foreground") + ")")
    if "time/peak_gpu_mem_gb" in scalars:
        lines.append(f"peak GPU memory: {scalars['time/peak_gpu_mem_gb'][1].max():.2f} GiB")
    return lines


def epoch_ends(path, day_steps):
    """{phase: wall-clock times} at which a run's epochs ended (its time/evaluation scalars, one per epoch; the day's
    at `day_steps`). read_run keeps no wall-clock times: the events are read again for them."""
    events = EventAccumulator(str(path), size_guidance={"scalars": 0})
    events.Reload()
    ends = [(e.step in day_steps, e.wall_time) for e in events.Scalars("time/evaluation")]
    return {phase: np.array([t for day, t in ends if day == (phase == "day")]) for phase in ("day", "night")}


def wall_clock(ends, gpu_use, runs):
    """The report's lines on the epochs' wall-clock seconds, the projections, and the GPU's utilisation: `ends` is
    each run's epoch_ends, `gpu_use` the utilisation samples [(time, percent)] (None without nvidia-smi)."""
    seconds = {phase: np.median(np.concatenate([np.diff(e[phase]) for e in ends]) if len(ends[0][phase]) > 1
                                else np.nan) for phase in ("day", "night")}
    day, night = seconds["day"], seconds["night"]
    lines = [f"wall-clock seconds per epoch: day {day:.2f}, night {night:.2f} (median between consecutive epoch "
             f"ends; {runs} at once)",
             f"aggregate epochs per second: day {runs / day:.3f}, night {runs / night:.3f}",
             f"projected, one game and seed ({PROTOCOL_EPOCHS} day and {PROTOCOL_EPOCHS} night epochs): "
             f"{PROTOCOL_EPOCHS * (day + night) / 60:.1f} min",
             f"projected, Figures 3-5 ({FIGURE_RUNS['day']} days, {FIGURE_RUNS['night']} nights as fast as this "
             f"script's) with {runs} run{'s' * (runs > 1)} per GPU: "
             f"{PROTOCOL_EPOCHS * (FIGURE_RUNS['day'] * day + FIGURE_RUNS['night'] * night) / runs / 3600:.1f} "
             f"GPU-hours"]
    if gpu_use is None:
        return lines + ["GPU utilisation: not measured (no nvidia-smi)"]
    use = []
    for phase in ("day", "night"):
        during = []
        if all(len(e[phase]) for e in ends):
            start, end = min(e[phase][0] for e in ends), max(e[phase][-1] for e in ends)
            during = [percent for t, percent in gpu_use if start <= t <= end]
        use.append(f"{phase} {np.median(during):.0f}% ({len(during)} samples)" if during else f"{phase} -")
    return lines + [f"GPU utilisation (nvidia-smi, median over the epochs after the first): {', '.join(use)}"]


class GpuUse:
    """nvidia-smi's GPU utilisation sampled every 0.2 s into `path` while the runs go (nothing without nvidia-smi).
    `samples()`: [(time, percent)]."""

    def __init__(self, path):
        self.path, self.proc = path, None

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            with open(self.path, "w") as f:
                self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,utilization.gpu",
                                              "--format=csv,noheader,nounits", "-lms", "200"], stdout=f,
                                             stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()

    def samples(self):
        if self.proc is None:
            return None
        rows = [line.split(", ") for line in self.path.read_text().splitlines()]
        return [(datetime.strptime(t, "%Y/%m/%d %H:%M:%S.%f").timestamp(), float(u)) for t, u in rows
                if u.strip().isdigit()]


def main(argv):
    script = os.environ.get("SCRIPT", "dreamer_ppo.py")
    epochs = os.environ.get("EPOCHS", "3")
    runs = os.environ.get("RUNS", "1")
    if not runs.isdigit() or int(runs) < 1:
        print(f"RUNS={runs!r}: the number of runs at once must be a whole number, 1 or more", file=sys.stderr)
        return 2
    out = Path(os.environ.get("OUT", "runs/speed")).resolve() / Path(script).stem
    todo = [Run("speed", Path(script).stem, seed, (sys.executable, str(ROOT / script), "--day-epochs", epochs,
                                                   "--night-epochs", epochs, "--seed", str(seed), *argv,
                                                   "--run-dir", str(out / f"seed{seed}")), out / f"seed{seed}")
            for seed in range(1, int(runs) + 1)]
    shutil.rmtree(out, ignore_errors=True)  # a new measurement each time
    out.mkdir(parents=True)
    with GpuUse(out / "gpu_use.csv") as gpu, ThreadPoolExecutor(len(todo)) as pool:
        codes = list(pool.map(lambda run: execute(run, out, keep_replay=True), todo))
    for run, code in zip(todo, codes):
        if code:
            print(f"{script} exited with {code}: see {run.dir / LOG}", file=sys.stderr)
            return code
    print(f"{script}, {epochs} day and {epochs} night epochs, {runs} at once: {' '.join(argv) or 'every default size'}")
    scalars = [read_run(run.dir, tags=None) for run in todo]
    print("\n".join(table(scalars)))
    ends = [epoch_ends(run.dir, set(phase_steps(s)[0])) for run, s in zip(todo, scalars)]
    print("\n".join(wall_clock(ends, gpu.samples(), len(todo))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
