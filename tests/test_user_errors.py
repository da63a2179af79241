"""What a new user meets first: the install claim, the README's quick start, bad flags refused before any work
with the flag and what is allowed, `--help`, the progress line's time left, and Ctrl-C."""

import dataclasses
import importlib
import importlib.util
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tomllib
from types import SimpleNamespace

import pytest
import torch
import tyro
from packaging.specifiers import SpecifierSet
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import dreamer_ppo
from conftest import SCRIPT, SIZE_FLAGS, TINY, RecordingRun, finish, run_script, tiny_args

ROOT = SCRIPT.parent
SCRIPTS = sorted(p.name for p in ROOT.glob("dreamer_ppo*.py"))


def quick_start():
    """The README's Quick start section."""
    readme = (ROOT / "README.md").read_text()
    return readme[readme.index("## Quick start"): readme.index("\n## ", readme.index("## Quick start") + 1)]


# %% install
def test_requires_python_admits_the_versions_procgen_has_wheels_for():
    # procgen-mirror 0.10.7 has wheels for CPython 3.11 and 3.12 only (pip download --python-version 3.X
    # --only-binary=:all: finds none for 3.9, 3.10, 3.13, 3.14, and there is no source distribution).
    spec = SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    assert [minor for minor in range(6, 20) if f"3.{minor}.0" in spec] == [11, 12]
    assert platform.python_version() in spec  # the interpreter running the tests is one the claim admits
    text = quick_start()
    assert "Python 3.11 or 3.12" in text and "3.10" not in text


def test_quick_start_follows_the_readmes_own_advice():
    text = quick_start()
    # a user who copies the code block on a CPU-only machine installs CPU torch before the project pulls torch in
    block = text[text.index("```bash"): text.index("```", text.index("```bash") + 1)]
    cpu_torch = block.find("\npip install torch --index-url https://download.pytorch.org/whl/cpu\n")
    assert 0 < cpu_torch < block.index("pip install -e .")
    command = re.search(r"OMP_NUM_THREADS=1 python dreamer_ppo\.py (.*?)\n\n", text.replace("\\\n", " "), re.S)
    assert command, "the quick start runs dreamer_ppo.py with OMP_NUM_THREADS=1"
    flags = command.group(1).split()
    assert flags[flags.index("--penalty") + 1] == "0"
    dreamer_ppo.check_args(tyro.cli(dreamer_ppo.Args, args=flags))
    assert "OMP_NUM_THREADS=1 python -m pytest" in text


# %% bad input
def script_args(module, **changes):
    """module.Args at tiny sizes, with `changes` on top."""
    return dataclasses.replace(importlib.import_module(module).Args(), **{**TINY, **changes})


@pytest.mark.parametrize("module, changes, flag, words", [
    ("dreamer_ppo", dict(night_lr=-1.0), "--night-lr", ["(0, inf)", "-1.0"]),
    ("dreamer_ppo", dict(day_lr=0.0), "--day-lr", ["(0, inf)", "0.0"]),
    ("dreamer_ppo", dict(penalty=10.0), "--penalty", ["(-inf, 0]", "10.0"]),
    ("dreamer_ppo", dict(reward_scale=0.0), "--reward-scale", ["(0, inf)"]),
    ("dreamer_ppo", dict(unimix=2.0), "--unimix", ["[0, 1)", "2.0"]),
    ("dreamer_ppo", dict(unimix=1.0), "--unimix", ["[0, 1)"]),
    ("dreamer_ppo", dict(bins=1), "--bins", ["2 or more", "1"]),
    ("dreamer_ppo", dict(seed=-1), "--seed", ["[0, 2^31)", "-1"]),
    ("dreamer_ppo", dict(seed=2**31), "--seed", ["[0, 2^31)"]),
    ("dreamer_ppo", dict(clip_coef=1.5), "--clip-coef", ["(0, 1)"]),
    ("dreamer_ppo", dict(day_gamma=float("nan")), "--day-gamma", ["(0, 1]", "nan"]),
    ("dreamer_ppo", dict(gae_lambda=1.5), "--gae-lambda", ["[0, 1]"]),
    ("dreamer_ppo", dict(seq_len=5000), "--seq-len", ["--day-steps / --num-envs = 25", "5000"]),
    ("dreamer_ppo", dict(wm_batch_size=5000), "--wm-batch-size", ["--seq-len", "40000", "--day-steps"]),
    ("dreamer_ppo", dict(save_day=True, day_checkpoint=__file__), "--save-day", ["--day-checkpoint"]),
    ("dreamer_ppo", dict(exp_name="mine/first"), "--exp-name", ["'/'", "'mine/first'"]),
    ("dreamer_ppo_offline", dict(init_states="collected"), "--init-states", ["no dreams", "'collected'"]),
    ("dreamer_ppo_offline", dict(horizon=25, burn_in=25), "--horizon", ["--burn-in + H + 1 = 51", "--day-epochs 2",
                                                          "gives each environment 50"]),
])
def test_check_args_refuses_bad_input(module, changes, flag, words):
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).check_args(script_args(module, **changes))
    message = str(e.value)
    assert message.startswith(f"error: {flag}: ")
    for word in words:
        assert word in message


@pytest.mark.parametrize("module, changes", [
    ("dreamer_ppo", dict(penalty=0.0, reward_scale=0.5, unimix=0.0, bins=2, seed=0, clip_coef=0.5, day_gamma=1.0)),
    ("dreamer_ppo", dict(seq_len=25, wm_batch_size=4)),  # 25 steps per environment and epoch; 100 frames
    ("dreamer_ppo", dict(seq_len=10, wm_batch_size=10)),
    ("dreamer_ppo_offline", dict(horizon=24, burn_in=25)),  # 50 steps per environment by day: 25 + 24 + 1
    ("dreamer_ppo_offline", dict(horizon=50, day_checkpoint=__file__)),  # the checkpoint's day: checked at night
])
def test_check_args_accepts_the_edges(module, changes):
    importlib.import_module(module).check_args(script_args(module, **changes))


@pytest.mark.parametrize("module", ["dreamer_ppo", "dreamer_ppo_offline"])
def test_check_args_accepts_the_paper_protocol(module):
    importlib.import_module(module).check_args(importlib.import_module(module).Args())


@pytest.mark.parametrize("installed, refusal", [(False, 'pip install -e ".[wandb]"'), (True, None)])
def test_track_needs_wandb(monkeypatch, installed, refusal):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if installed else None) if name == "wandb" else find_spec(name, *a))
    if refusal is None:
        dreamer_ppo.check_args(tiny_args(track=True))
        return
    with pytest.raises(SystemExit) as e:
        dreamer_ppo.check_args(tiny_args(track=True))
    assert str(e.value).startswith("error: --track: ") and refusal in str(e.value)


@pytest.mark.parametrize("missing", ["av", "imageio"])
def test_capture_video_needs_its_encoder(monkeypatch, missing):
    dreamer_ppo.check_args(tiny_args(capture_video=True))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else find_spec(name, *a))
    dreamer_ppo.check_args(tiny_args())  # off, it needs nothing
    with pytest.raises(SystemExit) as e:
        dreamer_ppo.check_args(tiny_args(capture_video=True))
    assert str(e.value) == ("error: --capture-video: needs PyAV and imageio, which are not installed: "
                            'pip install -e ".[video]"')


# %% --help and the terminal
def script_output(script, *argv):
    proc = subprocess.run([sys.executable, str(ROOT / script), *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"})
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_says_what_the_script_is_and_what_each_game_gets(script):
    code, out, err = script_output(script, "--help")
    assert code == 0, err
    assert "unmaintained" not in out + err  # gym's banner
    doc = importlib.import_module(script[:-3]).__doc__
    first_line = " ".join(doc.split("\n\n")[0].split()[:8])
    assert first_line in " ".join(out.split()[:40]), out[:500]  # after tyro's usage line
    penalty = out[out.index("--penalty"): out.index("--reward-scale")]
    scale = out[out.index("--reward-scale"): out.index("--seed-episodes")]
    assert "-10 on coinrun and caveflyer, 0 on the other games" in penalty and "None" not in penalty
    assert "25 on chaser, 1 on the other games" in scale and "None" not in scale
    assert "--env-id {" + ",".join(dreamer_ppo.PROCGEN_GAMES) + "}" in out
    if script == "dreamer_ppo_offline.py":
        assert "ignores --dream-images-every and refuses --init-states collected" in " ".join(out.split())


def test_gym_banner_is_silenced_but_not_other_warnings():
    # procgen 0.10.7 leaves a file open at import: with ResourceWarnings shown, that warning must still appear.
    proc = subprocess.run([sys.executable, "-W", "always::ResourceWarning", "-c", "import dreamer_ppo"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ResourceWarning" in proc.stderr and "procgen" in proc.stderr
    assert "unmaintained" not in proc.stderr


@pytest.mark.parametrize("env_id, penalty, logged", [
    ("coinrun", None, ("|penalty|-10.0|", "|reward_scale|1.0|")),
    ("chaser", None, ("|penalty|0.0|", "|reward_scale|25.0|")),
    ("coinrun", 0.0, ("|penalty|0.0|", "|reward_scale|1.0|")),
])
def test_hyperparameters_log_the_resolved_shaping(monkeypatch, tmp_path, env_id, penalty, logged):
    monkeypatch.chdir(tmp_path)
    log = RecordingRun("runs/run", dreamer_ppo.resolved(tiny_args(env_id=env_id, penalty=penalty)))
    log.writer.close()
    acc = EventAccumulator(str(tmp_path / "runs" / "run"), size_guidance={"tensors": 0})
    acc.Reload()
    text = acc.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode()
    for row in logged:
        assert row in text


def test_time_left_is_estimated_per_phase(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    clock = iter([0.0, 100.0, 130.0, 160.0, 178.0, 184.0, 190.0])  # start, 3 day epochs, 3 night epochs
    monkeypatch.setattr(dreamer_ppo, "time", SimpleNamespace(time=lambda: next(clock)))
    log = RecordingRun("run", tiny_args(day_epochs=3, night_epochs=3))
    for phase, epoch in (("day", 1), ("day", 2), ("day", 3), ("night", 1), ("night", 2), ("night", 3)):
        log.progress(phase, epoch, 0, "")
    log.writer.close()
    lines = [line.split(" | ")[1] for line in capsys.readouterr().out.splitlines()]
    assert lines == [
        "1.7 min, about 3.3 min left in the day, then 3 night epochs (not timed yet)",  # 2 x 100 s
        "2.2 min, about 0.5 min left in the day, then 3 night epochs (not timed yet)",  # the first epoch left out
        "2.7 min, about 0.0 min left in the day, then 3 night epochs (not timed yet)",
        "3.0 min, about 0.6 min left",  # 2 x 18 s: the night's own epochs, not the day's
        "3.1 min, about 0.1 min left",
        "3.2 min, about 0.0 min left",
    ]


def test_a_day_checkpoint_directory_is_refused_naming_its_day_pt(tmp_path):
    (tmp_path / "day.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        dreamer_ppo.check_args(tiny_args(day_checkpoint=str(tmp_path)))
    assert str(e.value).startswith("error: --day-checkpoint: ") and repr(str(tmp_path / "day.pt")) in str(e.value)


def test_hyperparameters_log_what_the_run_uses(monkeypatch, tmp_path):
    # not the flags as typed: --cuda on a CPU-only machine runs on the CPU, --run-dir None writes to a folder
    monkeypatch.chdir(tmp_path)
    RecordingRun("runs/run", tiny_args(cuda=True)).writer.close()
    acc = EventAccumulator(str(tmp_path / "runs" / "run"), size_guidance={"tensors": 0})
    acc.Reload()
    text = acc.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode()
    for row in ("|cuda|False|", "|device|cpu|", "|run_dir|runs/run|", "|precision|fp32|"):
        assert row in text


@pytest.mark.parametrize("latest, argv, words", [
    (None, ["dreamer_ppo.py"], "interrupted: no checkpoint saved yet; the TensorBoard events so far are in runs/run"),
    ("day epoch 3/4", ["dreamer_ppo.py", "--penalty", "0"], "interrupted: the checkpoint of day epoch 3/4 is "
     "runs/run/checkpoint.pt; continue with: python dreamer_ppo.py --penalty 0 --resume --run-dir runs/run"),
    ("day epoch 3/4", ["dreamer_ppo.py", "--run-dir=runs/run"], "interrupted: the checkpoint of day epoch 3/4 is "
     "runs/run/checkpoint.pt; continue with: python dreamer_ppo.py --run-dir=runs/run --resume"),
])
def test_interrupted_says_what_was_saved_and_the_command_that_continues(monkeypatch, tmp_path, latest, argv, words):
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(tmp_path)
    run = RecordingRun("runs/run", tiny_args())
    run.latest = latest  # as the run's last checkpoint sets it
    assert run.interrupted() == words


@pytest.mark.parametrize("flags, wait_for, saved", [
    (["--day-epochs", "50"], "[day 1/50]", "no checkpoint saved yet"),
    (["--day-epochs", "1", "--night-epochs", "50", "--save-day"], "day checkpoint: ", "the checkpoint of day epoch 1/1"),
])
def test_ctrl_c_ends_with_one_line_and_code_130(tmp_path, flags, wait_for, saved):
    proc = run_script([*flags, *SIZE_FLAGS], tmp_path)
    for line in proc.stdout:
        if line.startswith(wait_for):
            break
    else:
        pytest.fail(f"the run ended before {wait_for!r}: {finish(proc)}")
    proc.send_signal(signal.SIGINT)
    code, _, err = finish(proc, timeout=120)
    assert code == 130
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted") and saved in last, err[-2000:]
    if "--save-day" in flags:
        assert (tmp_path / last.split(" is ")[1].split(";")[0]).is_file() and "--resume --run-dir runs/" in last
        # the command given continues the run: the checkpoint accepts its flags
        argv = shlex.split(last.split("continue with: ")[1])
        assert argv[:2] == ["python", str(SCRIPT)]
        args = tyro.cli(dreamer_ppo.Args, args=argv[2:])
        dreamer_ppo.check_args(args)
        ckpt = dreamer_ppo.read_checkpoint(str(tmp_path / args.run_dir / "checkpoint.pt"), dreamer_ppo.resolved(args),
                                           "--resume")
        assert ckpt["position"]["phase"] == "day"
