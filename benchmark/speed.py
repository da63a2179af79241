"""The per-phase speed of one script, measured the same way every time (issue 11): behind benchmark/speed.sh.

It runs SCRIPT for EPOCHS day epochs then EPOCHS night epochs, at every default size unless flags say otherwise
(every argument is passed to the script), into OUT, and prints from the run's time/* TensorBoard scalars the
median seconds per epoch of each part of each phase, then:

- seconds per world-model update (charts/wm_update_seconds),
- real steps per second by day, over the acting alone (environment stepping, filtering, the policy),
- steps per second by night over the dreaming and the transformation (the Offline night: over encoding its
  real sequences),
- the evaluation's own seconds (with --eval-overlap, the default, it runs alongside the next epoch: the table's
  evaluation rows are then what the epochs waited for it), and the peak GPU memory on CUDA (time/peak_gpu_mem_gb).

Settings from the environment: SCRIPT (default dreamer_ppo.py), EPOCHS (default 3), OUT (default runs/speed;
the run goes to OUT/{script}, emptied first). The run's log is OUT/{script}/log.txt. Medians over few epochs:
the first epoch of each phase carries the warm-up.

    bash benchmark/speed.sh                                                 # full size (a GPU job)
    SCRIPT=dreamer_ppo_deepdream.py EPOCHS=2 bash benchmark/speed.sh --wm-batch-size 16 --seq-len 16
"""

import os
import shutil
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: the repository root on the path, for `benchmark.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmark.plot import read_run  # noqa: E402
from benchmark.run import LOG, ROOT, Run, execute  # noqa: E402

PHASES = {"day": ("world_model", "acting", "ppo", "evaluation"),
          "night": ("dreaming", "transformation", "sequences", "ppo", "evaluation")}


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


def table(scalars):
    """The report's lines from a run's scalars."""
    day_steps, night_steps = phase_steps(scalars)
    lines = [f"{'phase':<7}{'part':<16}{'median s/epoch':>15}  "
             f"(epochs: {len(day_steps)} day, {len(night_steps)} night)"]
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


def main(argv):
    script = os.environ.get("SCRIPT", "dreamer_ppo.py")
    epochs = os.environ.get("EPOCHS", "3")
    out = Path(os.environ.get("OUT", "runs/speed")).resolve() / Path(script).stem
    cmd = (sys.executable, str(ROOT / script), "--day-epochs", epochs, "--night-epochs", epochs, *argv,
           "--run-dir", str(out))
    run = Run("speed", Path(script).stem, 0, cmd, out)
    shutil.rmtree(out, ignore_errors=True)  # a new measurement each time
    code = execute(run, out.parent, keep_replay=True)
    if code:
        print(f"{script} exited with {code}: see {out / LOG}", file=sys.stderr)
        return code
    print(f"{script}, {epochs} day and {epochs} night epochs: {' '.join(argv) or 'every default size'}")
    print("\n".join(table(read_run(out, tags=None))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
