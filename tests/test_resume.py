"""Runs that survive: a run killed at any moment and resumed ends as the run never killed, SIGTERM checkpoints and
exits 75, a damaged checkpoint is refused in one line, a non-finite loss stops the run naming its term, and a
run directory without room is refused before the work."""

import dataclasses
import importlib
import random
import re
import signal
import shutil
from collections import namedtuple

import pytest
import torch

import dreamer_ppo
from conftest import SIZE_FLAGS, VARIANTS, RecordingRun, finish, make_models, make_optimizers, run_script, tiny_args
from test_end_to_end import scalars

DAY_EPOCHS, NIGHT_EPOCHS = 4, 3
RUN = [*SIZE_FLAGS, "--day-epochs", str(DAY_EPOCHS), "--night-epochs", str(NIGHT_EPOCHS), "--checkpoint-every", "2"]
TIMED = ("charts/SPS", "charts/wm_update_seconds")  # wall-clock measures (and time/*), the only scalars that may differ


def timed(tag):
    return tag in TIMED or tag.startswith("time/")


def run_until(flags, cwd, line_start=None, send=signal.SIGKILL):
    """Start the script; once it prints a line starting with `line_start`, send it `send` (None: let it finish).
    Returns (exit status, stdout, stderr)."""
    proc = run_script(flags, cwd)
    out = []
    for line in proc.stdout:
        out.append(line)
        if line_start and line.startswith(line_start):
            proc.send_signal(send)
            break
    code, rest, err = finish(proc)
    return code, "".join(out) + rest, err


def same_run(a, b):
    """Two run directories hold the same final weights and the same curves (each point once, in order)."""
    final = [torch.load(d / "checkpoint.pt", weights_only=False) for d in (a, b)]
    for key in ("world_model", "agent"):
        for name, value in final[0][key].items():
            assert torch.allclose(final[1][key][name], value, rtol=0, atol=1e-6), f"{key}.{name}"
    assert final[0]["position"] == final[1]["position"]
    curves = [scalars(d) for d in (a, b)]
    assert {t for t in curves[0] if not timed(t)} == {t for t in curves[1] if not timed(t)}
    for tag, points in curves[1].items():
        steps = [s for s, _ in points]
        assert steps == sorted(set(steps)), f"{tag}: a repeated or out-of-order point"
    for tag, points in curves[0].items():
        if not timed(tag):
            assert [s for s, _ in curves[1][tag]] == [s for s, _ in points], tag
            assert [v for _, v in curves[1][tag]] == pytest.approx([v for _, v in points]), tag
    return curves[0]


def test_a_run_killed_by_day_and_by_night_ends_as_the_run_never_killed(tmp_path):
    """SIGKILL at a random day epoch and again at a random night epoch (whatever the run is doing just after that
    epoch's line: its checkpoint, the next epoch's updates), --resume each time: the same weights, the same test
    returns, every curve point once. The run never killed evaluates alongside training (--eval-overlap, the
    default), the killed one in the foreground, so that its epoch's line comes before its checkpoint: the same
    curves either way."""
    whole = tmp_path / "whole"
    code, _, err = run_until([*RUN, "--run-dir", str(whole)], tmp_path)
    assert code == 0, err[-3000:]
    killed = tmp_path / "killed"
    # a runner can always pass --resume: the first start too
    flags = [*RUN, "--run-dir", str(killed), "--resume", "--no-eval-overlap"]
    pick = random.Random(12)
    day_epoch, night_epoch = pick.randint(1, DAY_EPOCHS - 1), pick.randint(1, NIGHT_EPOCHS - 1)
    code, out, _ = run_until(flags, tmp_path, f"[day {day_epoch}/")
    assert code == -signal.SIGKILL and "resumed" not in out
    code, out, _ = run_until(flags, tmp_path, f"[night {night_epoch}/")
    assert code == -signal.SIGKILL
    # the last checkpoint (every 2 epochs) before the kill, 0 for none: the killed epoch's own if written in time
    last = day_epoch - day_epoch % 2
    found = re.search(r"resumed from the checkpoint of day epoch (\d+) \(step ([\d,]+)", out)
    assert (int(found[1]) if found else 0) in ({last, last - 2} if day_epoch % 2 == 0 else {last}), out
    assert not found or found[2] == f"{int(found[1]) * 100:,}"
    code, out, err = run_until(flags, tmp_path)
    assert code == 0, err[-3000:]
    assert "resumed from the checkpoint of " in out
    curves = same_run(whole, killed)
    assert len(curves["charts/test_return"]) == DAY_EPOCHS + NIGHT_EPOCHS
    # only the final checkpoint stays; the real data were kept for a resume only (no --save-day)
    assert sorted(f.name for f in killed.iterdir() if not f.name.startswith("events")) == ["checkpoint.pt"]
    # resuming a finished run does nothing
    code, out, err = run_until(flags, tmp_path)
    assert code == 0 and "finished" in out and "[night" not in out
    after, before = scalars(killed), scalars(whole)
    assert {t: v for t, v in after.items() if not timed(t)} == {t: v for t, v in before.items() if not timed(t)}


def test_a_run_killed_after_the_next_epochs_diagnostics_logs_each_point_once(tmp_path):
    """With the evaluation overlapped (the default), day epoch 3's line comes during epoch 4, after the last
    checkpoint (epoch 2) and after what the run logs between epochs (the open-loop diagnostic): killed there and
    resumed, the run logs every point once, as the run never killed."""
    flags = [*SIZE_FLAGS, "--day-epochs", "4", "--night-epochs", "0", "--checkpoint-every", "2"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    code, _, err = run_until([*flags, "--run-dir", str(whole)], tmp_path)
    assert code == 0, err[-3000:]
    code, _, _ = run_until([*flags, "--run-dir", str(killed), "--resume"], tmp_path, "[day 3/")
    assert code == -signal.SIGKILL
    code, out, err = run_until([*flags, "--run-dir", str(killed), "--resume"], tmp_path)
    assert code == 0 and "resumed from the checkpoint of day epoch 2 " in out, err[-3000:]
    same_run(whole, killed)


def test_sigterm_checkpoints_and_exits_75_then_the_night_resumes(tmp_path):
    """A night from a day checkpoint (collected initial states: it reads the day's replay) stopped by SIGTERM at a
    night epoch checkpoints at the end of the epoch it is in and exits with 75; resumed, it ends as the night never
    stopped."""
    code, out, err = run_until([*RUN, "--night-epochs", "0", "--save-day", "--run-dir", str(tmp_path / "day")],
                               tmp_path)
    assert code == 0, err[-3000:]
    assert (tmp_path / "day" / "replay").is_dir()  # kept with --save-day, for the nights
    assert "no night" in out and "0 night epochs" not in out
    night = [*RUN, "--day-checkpoint", str(tmp_path / "day" / "day.pt"), "--init-states", "collected",
             "--checkpoint-every", "0"]
    code, _, err = run_until([*night, "--run-dir", str(tmp_path / "whole")], tmp_path)
    assert code == 0, err[-3000:]
    stopped = [*night, "--run-dir", str(tmp_path / "stopped"), "--resume"]
    code, out, err = run_until(stopped, tmp_path, "[night 1/", send=signal.SIGTERM)
    assert code == dreamer_ppo.PREEMPTED and "SIGTERM" in err and "--resume" in err
    epoch = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=False)["position"]["epoch"]
    assert epoch in (1, 2) and f"[night {epoch + 1}/" not in out  # it stopped at the end of the epoch it was in
    assert f"the run stops at the end of night epoch {epoch}/{NIGHT_EPOCHS}" in err  # the epoch named
    code, out, err = run_until(stopped, tmp_path)
    assert code == 0 and f"resumed from the checkpoint of night epoch {epoch}" in out, err[-3000:]
    same_run(tmp_path / "whole", tmp_path / "stopped")


Run = namedtuple("Run", "args wm agent wm_opt agent_opt scale dataset checkpoint")


def tiny_run(run_dir, **changes):
    args = tiny_args(**{**dict(run_dir=str(run_dir), resume=True, checkpoint_every=1), **changes})
    wm, agent = make_models(args)
    wm_opt, agent_opt = make_optimizers(wm, agent, args)
    scale, dataset = dreamer_ppo.ReturnScale(args.return_scale_decay), dreamer_ppo.ReplayDataset(args.num_envs, 10)
    run_dir.mkdir(exist_ok=True)
    run = RecordingRun(run_dir, args, dreamer_ppo.stateful(wm, agent, wm_opt, agent_opt, scale), dataset)

    def checkpoint(phase, epoch, step, test_return):
        """The end of `phase` epoch `epoch` at `step`, whose evaluation returned `test_return`."""
        run.pos = dreamer_ppo.Position(phase, epoch, step, test_return)
        run.checkpoint()

    return Run(args, wm, agent, wm_opt, agent_opt, scale, dataset, checkpoint)


def latest(run_dir, args):
    return dreamer_ppo.read_checkpoint(str(run_dir / "checkpoint.pt"), args, "--resume")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_resume_refuses_a_damaged_checkpoint_in_one_line(tmp_path, damage):
    run = tiny_run(tmp_path)
    run.checkpoint("night", 1, 40, 1.0)
    run.checkpoint("night", 2, 80, 2.0)
    assert latest(tmp_path, run.args)["position"] == dict(phase="night", epoch=2, step=80, test_return=2.0,
                                                          day_final=None)
    path = tmp_path / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00" * len(data))
    with pytest.raises(SystemExit) as e:
        latest(tmp_path, run.args)
    message = str(e.value)
    assert message.startswith("error: --resume: ") and str(path) in message and "remove it" in message
    assert "\n" not in message


@pytest.mark.parametrize("name", ("", *(f"_{v}" for v in VARIANTS), "_offline"))
def test_the_checkpoint_flag_lists_name_real_flags(name):
    # A misspelt name in DAY_FIXED, RESUMABLE or DAY_ONLY would leave its flag unchecked (or unlisted) silently; a
    # flag a resumed run may change is not one a night must share with its day.
    module = importlib.import_module(f"dreamer_ppo{name}")
    names = {f.name for f in dataclasses.fields(module.Args)}
    assert set(module.DAY_FIXED) | set(module.RESUMABLE) | set(module.DAY_ONLY) <= names
    assert not set(module.RESUMABLE) & (set(module.DAY_FIXED) | set(module.DAY_ONLY))


def test_resume_refuses_other_flags_and_allows_bookkeeping(tmp_path):
    run = tiny_run(tmp_path)
    run.checkpoint("day", 2, 200, 0.0)  # the end of the day
    assert latest(tmp_path, tiny_args(run_dir=str(tmp_path), resume=True, checkpoint_every=5, cuda=True)) is not None
    with pytest.raises(SystemExit) as e:
        latest(tmp_path, tiny_args(run_dir=str(tmp_path), resume=True, horizon=7))
    assert "--resume" in str(e.value) and "--horizon 5 (here 7)" in str(e.value)


def test_checkpoints_every_k_epochs_and_day_pt_at_the_end_of_the_day(tmp_path):
    run = tiny_run(tmp_path, checkpoint_every=2, save_day=True, day_epochs=3)
    written = []
    for epoch in (1, 2, 3):
        run.checkpoint("day", epoch, 100 * epoch, 0.0)
        written.append(latest(tmp_path, run.args)["position"]["epoch"] if (tmp_path / "checkpoint.pt").exists()
                       else None)
        assert (tmp_path / "day.pt").exists() == (epoch == 3)
    assert written == [None, 2, 3]  # epoch 1: none (every 2); the end of the day: one
    assert torch.load(tmp_path / "day.pt", weights_only=False)["position"]["epoch"] == 3
    left = sorted(f.name for f in tmp_path.iterdir() if "tfevents" not in f.name)
    assert left == ["checkpoint.pt", "day.pt"]  # no temporary file left


@pytest.mark.parametrize("module, term, others", [("decoder", "image", ["reward", "cont"]),
                                                  ("critic", "value", ["entropy"])])
def test_a_non_finite_loss_stops_the_run_naming_its_term(tmp_path, monkeypatch, module, term, others):
    """A NaN from the decoder (the image term) or from the critic (the value term) once the first day epoch's
    checkpoint is written: the run stops in the second epoch naming the term, before an update from it, and the
    first epoch's checkpoint stays."""
    init = {"decoder": dreamer_ppo.WorldModel, "critic": dreamer_ppo.Agent}[module]
    original = init.__init__

    def with_nan(self, *args):
        original(self, *args)
        getattr(self, module).register_forward_hook(
            lambda m, i, out: out * float("nan") if (tmp_path / "run" / "checkpoint.pt").exists() else None)

    monkeypatch.setattr(init, "__init__", with_nan)
    monkeypatch.chdir(tmp_path)
    args = tiny_args(run_dir="run", day_epochs=3, night_epochs=0, checkpoint_every=1, num_envs=5)
    with pytest.raises(SystemExit) as e:
        dreamer_ppo.main(args)
    message = str(e.value)
    assert f"{term} (nan)" in message and "day epoch 2" in message and "last checkpoint is kept" in message
    assert not any(f"{other} (" in message for other in others)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["position"]["epoch"] == 1


def test_a_run_directory_without_room_is_refused_before_the_work(tmp_path, monkeypatch):
    args = tiny_args(day_epochs=200, day_steps=5000)
    wm, agent = make_models(args)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10 * 2**30))
    with pytest.raises(SystemExit) as e:  # 1M real steps of 12.3 KB: 11.5 GiB
        dreamer_ppo.check_disk(str(tmp_path), args, wm, agent, day_to_run=True)
    assert "--run-dir" in str(e.value) and "10.00 GiB free" in str(e.value) and "real data 11.46 GiB" in str(e.value)
    dreamer_ppo.check_disk(str(tmp_path), args, wm, agent, day_to_run=False)  # a night writes checkpoints only


@pytest.mark.parametrize("pos, in_epoch, named", [
    (dreamer_ppo.Position("day", 2), True, "day epoch 2/3"),  # in an epoch: that epoch
    (dreamer_ppo.Position("day", 2), False, "day epoch 3/3"),  # between epochs (its checkpoint done): the next
    (dreamer_ppo.Position("day", 3), False, "night epoch 1/2"),  # the day done, the night not begun
    (dreamer_ppo.Position(), False, "day epoch 1/3"),  # the seed episodes
])
def test_a_stop_signal_names_the_epoch_at_whose_end_the_run_stops(tmp_path, capsys, pos, in_epoch, named):
    run = RecordingRun(tmp_path, tiny_args(day_epochs=3, night_epochs=2), pos=pos)
    run.in_epoch = in_epoch
    before = signal.getsignal(signal.SIGUSR1)
    try:
        run.on_stop_signal(signal.SIGUSR1, None)
    finally:
        signal.signal(signal.SIGUSR1, before)
    assert capsys.readouterr().err == f"SIGUSR1: the run stops at the end of {named}, with a checkpoint\n"
    assert run.signal == "SIGUSR1"
