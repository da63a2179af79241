"""Whole runs of the variant scripts at tiny sizes, from scratch and from a day checkpoint written by
dreamer_ppo.py: the night transforms dreams, logs it, and logs decoded states before/after (Figure 2)."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import SIZE_FLAGS, VARIANTS, finish, run_script, run_variant
from test_end_to_end import scalars, single_run_dir

NIGHT_EPOCHS = 2
NIGHT_FLAGS = ["--day-epochs", "1", "--night-epochs", str(NIGHT_EPOCHS), "--dream-images-every", "1", *SIZE_FLAGS]
STARTS = ("scratch", "checkpoint")


def run_all(jobs, parallel=2):
    """Run (key, start) jobs, `parallel` at a time (one core each); {key: cwd} of the finished runs."""
    running, done = [], {}
    jobs = list(jobs)
    while jobs or running:
        while jobs and len(running) < parallel:
            key, start = jobs.pop(0)
            running.append((key, *start()))
        key, cwd, proc = running.pop(0)
        code, out, err = finish(proc)
        assert code == 0, f"{key} failed:\n{out[-3000:]}\n{err[-3000:]}"
        done[key] = cwd
    return done


@pytest.fixture(scope="module")
def variant_runs(tmp_path_factory):
    """Every variant from scratch (beside the day of dreamer_ppo.py that saves the checkpoint), then every
    variant's night from that checkpoint."""
    def start(script, flags):
        cwd = tmp_path_factory.mktemp(script)
        return lambda: (cwd, run_script(flags, cwd) if script == "dreamer_ppo" else run_variant(script, flags, cwd))

    day = tmp_path_factory.mktemp("day")
    first = run_all([("day", lambda: (day, run_script(["--save-day", "--day-epochs", "1", "--night-epochs", "0",
                                                        *SIZE_FLAGS], day)))]
                    + [((name, "scratch"), start(name, NIGHT_FLAGS)) for name in VARIANTS])
    checkpoint = str(single_run_dir(first.pop("day")) / "day.pt")
    second = run_all([((name, "checkpoint"), start(name, ["--day-checkpoint", checkpoint, *NIGHT_FLAGS]))
                      for name in VARIANTS])
    runs = {}
    for key, cwd in {**first, **second}.items():
        run_dir = single_run_dir(cwd)
        images = EventAccumulator(str(run_dir), size_guidance={"images": 0})
        images.Reload()
        runs[key] = dict(scalars=scalars(run_dir), images=images.Tags()["images"])
    return runs


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("name", VARIANTS)
def test_variant_runs_a_night_of_transformed_dreams(variant_runs, name, start):
    run = variant_runs[name, start]
    tags = run["scalars"]
    steps = [s for s, _ in tags["charts/test_return"]]
    assert len(steps) == 1 + NIGHT_EPOCHS  # the day's (its last epoch, or the checkpoint's), then the night's
    day_end = steps[0]
    assert day_end > 0 and all(s > day_end for s in steps[1:])
    assert ("world_model/loss" in tags) == (start == "scratch")
    frac = [v for _, v in tags["dream/transformed_frac"]]
    moves = [v for _, v in tags["dream/value_move"]]
    assert len(frac) == len(moves) == NIGHT_EPOCHS
    assert any(v > 0 for v in frac) and all(0 <= v < 1 for v in frac)
    assert all(v >= 0 for v in moves)
    assert "dream/before_after" in run["images"]
    print(f"{name} from {start}: transformed_frac {frac}, value_move {moves}")


@pytest.mark.parametrize("name", VARIANTS)
def test_a_night_from_the_checkpoint_is_the_night_after_the_same_day(variant_runs, name):
    """The day is the same in every script and the checkpoint keeps the RNG states: dreamer_ppo.py's day.pt
    starts the very night the variant dreams after its own day."""
    scratch, resumed = variant_runs[name, "scratch"]["scalars"], variant_runs[name, "checkpoint"]["scalars"]
    for tag in ("charts/test_return", "dream/transformed_frac", "dream/value_move", "dream/reward_mean"):
        assert resumed[tag] == scratch[tag][-len(resumed[tag]):], tag
