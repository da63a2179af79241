"""Bad input, day checkpoints, and whole runs of the script at tiny sizes (TensorBoard curves, day.pt, a
night-only run from a day checkpoint)."""

import hashlib
import os
import random
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import dreamer_ppo
from dreamer_ppo import (ReplayDataset, ReturnScale, atomic_save, check_args, claim_run_dir, load_steps, read_checkpoint,
                         random_initial_states, restore, run_state, save_new_steps, stateful)
from conftest import SIZE_FLAGS, crafted_dataset, finish, make_models, make_optimizers, random_batch, run_script, \
    tiny_args


def load_checkpoint(path, args):
    """A night's read of a day.pt, with the arguments as the night resolves them."""
    return read_checkpoint(path, dreamer_ppo.resolved(args), "--day-checkpoint")


# %% bad input
@pytest.mark.parametrize("changes, flag, words", [
    (dict(wm_batch_size=0), "--wm-batch-size", ["positive", "0"]),
    (dict(rnn_units=-4), "--rnn-units", ["positive", "-4"]),
    (dict(day_steps=102, num_envs=4), "--day-steps", ["multiple", "--num-envs", "102"]),
    (dict(seq_len=1), "--seq-len", ["2"]),
    (dict(reward_seq_fraction=1.5), "--reward-seq-fraction", ["[0, 1]"]),
    (dict(night_epochs=-1), "--night-epochs", ["-1"]),
    (dict(dream_images_every=-1), "--dream-images-every", ["-1"]),
    (dict(video_every=0), "--video-every", ["positive", "0"]),
    (dict(day_checkpoint="nowhere/day.pt"), "--day-checkpoint", ["nowhere/day.pt"]),
    (dict(resume=True), "--resume", ["--run-dir"]),
    (dict(checkpoint_every=-1), "--checkpoint-every", ["-1"]),
    (dict(final_episodes=-2), "--final-episodes", ["0 or more", "-2"]),
])
def test_check_args_refuses_bad_input(changes, flag, words):
    with pytest.raises(SystemExit) as e:
        check_args(tiny_args(**changes))
    message = str(e.value)
    assert flag in message
    for word in words:
        assert word in message


def test_check_args_accepts_tiny_sizes(tmp_path):
    check_args(tiny_args())
    check_args(tiny_args(night_epochs=0, reward_seq_fraction=0.0, seq_len=2))
    (tmp_path / "day.pt").write_bytes(b"")
    check_args(tiny_args(day_checkpoint=str(tmp_path / "day.pt")))


@pytest.mark.parametrize("flags, words", [
    (["--init-states", "foo"], ["--init-states", "random", "collected"]),
    (["--env-id", "pong"], ["--env-id", "coinrun", "starpilot"]),
    (["--wm-batch-size", "0"], ["--wm-batch-size"]),
    (["--seed", "-1"], ["--seed", "[0, 2^31)"]),
    (["--seq-len", "5000"], ["--seq-len", "--day-steps / --num-envs = 1000"]),
])
def test_script_fails_fast_on_bad_flags(tmp_path, flags, words):
    """tyro's refusals and the script's own: one line, exit 2, nothing written."""
    code, out, err = finish(run_script(flags, tmp_path), timeout=120)
    assert code == 2
    for word in words:
        assert word in err
    assert not (tmp_path / "runs").exists()


# %% day checkpoints
def trained_state(args, seed):
    """Tiny models, optimizers with a step taken, a return scale with an update, and a dataset."""
    wm, agent = make_models(args, seed)
    wm_opt, agent_opt = make_optimizers(wm, agent, args)
    loss, _, _ = wm.loss(random_batch(2, 3, seed=seed), args)
    loss.backward()
    wm_opt.step()
    agent.value(torch.randn(5, wm.feat_dim)).pow(2).mean().add(agent.actor(torch.randn(5, wm.feat_dim)).mean()) \
        .backward()
    agent_opt.step()
    scale = ReturnScale(args.return_scale_decay)
    scale.update(torch.arange(101.0) * (seed + 1))
    return wm, agent, wm_opt, agent_opt, scale


def save_day(path, state, args, dataset=None, step=0, test_return=0.0):
    """What the end of a day writes with --save-day: day.pt from `state` (models, optimizers, P), the replay
    beside it."""
    if dataset is not None:
        save_new_steps(dataset, path.parent / "replay")
    pos = dreamer_ppo.Position("day", args.day_epochs, step, test_return)
    atomic_save(run_state(stateful(*state), dreamer_ppo.resolved(args), pos, 0 if dataset is None else dataset.size),
                path)


def outputs(wm, agent, args):
    """What the models compute on a fixed input."""
    g = torch.Generator().manual_seed(42)
    s = torch.randn(6, wm.feat_dim, generator=g)
    h = torch.randn(6, args.rnn_units, generator=g)
    with torch.no_grad():
        return dict(value=agent.value(s), logits=agent.actor(s), prior=wm.prior(h))


def test_checkpoint_round_trip(tmp_path):
    args = tiny_args()
    path = tmp_path / "day.pt"
    wm, agent, wm_opt, agent_opt, scale = trained_state(args, seed=0)
    dataset = crafted_dataset(num_envs=args.num_envs, steps=30, capacity=30)
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    save_day(path, (wm, agent, wm_opt, agent_opt, scale), args, dataset, step=345, test_return=2.5)
    expected_rng = (torch.rand(3), np.random.rand(3), random.random())
    expected = outputs(wm, agent, args)

    wm2, agent2, wm_opt2, agent_opt2, scale2 = trained_state(args, seed=1)
    dataset2 = ReplayDataset(args.num_envs, 5)
    before = outputs(wm2, agent2, args)
    assert not torch.allclose(before["logits"], expected["logits"])
    assert not torch.allclose(before["prior"], expected["prior"])
    assert scale2.value != scale.value
    torch.manual_seed(0)  # another RNG state than at saving
    ckpt = load_checkpoint(str(path), args)
    restore(ckpt, stateful(wm2, agent2, wm_opt2, agent_opt2, scale2), dataset2, path.parent / "replay")
    after_rng = (torch.rand(3), np.random.rand(3), random.random())

    assert ckpt["position"] == dict(phase="day", epoch=args.day_epochs, step=345, test_return=2.5, day_final=None)
    assert torch.equal(after_rng[0], expected_rng[0])
    assert np.array_equal(after_rng[1], expected_rng[1]) and after_rng[2] == expected_rng[2]
    after = outputs(wm2, agent2, args)
    for key in expected:
        assert torch.equal(after[key], expected[key]), key
    assert scale2.value == scale.value
    assert dataset2.size == dataset.size == 30
    for key, value in dataset.steps().items():
        assert np.array_equal(dataset2.steps()[key], value), key
    for a, b in ((wm_opt, wm_opt2), (agent_opt, agent_opt2)):
        sa, sb = a.state_dict()["state"], b.state_dict()["state"]
        assert sa.keys() == sb.keys() and len(sa) > 0
        for k in sa:
            assert torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"])
    # the restored world model dreams as the saved one
    torch.manual_seed(3)
    h1, _ = random_initial_states(wm, 4)
    torch.manual_seed(3)
    h2, _ = random_initial_states(wm2, 4)
    assert torch.equal(h1, h2)


def test_checkpoint_stores_frames_as_raw_bytes(tmp_path):
    # Pickled numpy bytes at torch.save's protocol 2 take about 1.5 times their size: at full scale that is
    # 6 GB more on disk and in memory. Frames must cost about their own size.
    args = tiny_args()
    dataset = ReplayDataset(args.num_envs, 200)
    dataset.data["obs"][:] = np.random.default_rng(0).integers(0, 256, dataset.data["obs"].shape, dtype=np.uint8)
    dataset.size = 200
    save_day(tmp_path / "day.pt", trained_state(args, seed=0), args, dataset)
    frames = dataset.data["obs"].nbytes
    assert frames < (tmp_path / "replay" / "0000000000.pt").stat().st_size < 1.05 * frames + 2**20
    # the frames live beside day.pt, so a night that does not need them never reads them
    assert (tmp_path / "day.pt").stat().st_size < 0.2 * frames
    assert sorted(str(f.relative_to(tmp_path)) for f in tmp_path.rglob("*")) == [  # no temporary file left
        "day.pt", "replay", "replay/0000000000.pt"]


@pytest.mark.parametrize("changes, flag", [
    (dict(categoricals=8), "--categoricals"),
    (dict(final_episodes=3), "--final-episodes 2 (here 3)"),  # the day's and the night's finals would not pair
    (dict(num_levels=8), "--num-levels 200 (here 8)"),
    (dict(start_level=8), "--start-level 0 (here 8)"),
    (dict(seed=2), "--seed 1 (here 2)"),
    (dict(rnn_units=64), "--rnn-units"),
    (dict(env_id="starpilot"), "--env-id"),
    (dict(num_envs=5, day_steps=100), "--num-envs"),
    (dict(penalty=0.0), "--penalty -10.0 (here 0.0)"),  # the day's replay holds rewards shaped with -10
    (dict(reward_scale=2.0), "--reward-scale 1.0 (here 2.0)"),
])
def test_load_checkpoint_refuses_other_settings(tmp_path, changes, flag):
    args = tiny_args()
    path = tmp_path / "day.pt"
    save_day(path, trained_state(args, seed=0), args, crafted_dataset(steps=10), step=1)
    with pytest.raises(SystemExit) as e:
        load_checkpoint(str(path), tiny_args(**changes))
    message = str(e.value)
    assert "--day-checkpoint" in message and flag in message
    # a checkpoint with the same sizes and shaping loads (other flags may differ; a flag that gives the value the
    # day resolved is the same shaping)
    assert load_checkpoint(str(path), tiny_args(night_epochs=7, horizon=3, penalty=-10.0))["position"]["step"] == 1


def test_load_checkpoint_refuses_other_files(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint")
    with pytest.raises(SystemExit) as e:
        load_checkpoint(str(path), tiny_args())
    message = str(e.value)
    assert message.startswith("error: --day-checkpoint: ") and "notes.pt" in message and "--save-day" in message
    assert "\n" not in message and "MARK" not in message and "load key" not in message


# The model each checkpoint format holds: its modules (LayerNorm's epsilon included) and its tensors' shapes, at
# tiny sizes. A change of either, without a new format, would load an older checkpoint into another model.
MODELS = {2: "0588abe728cd3b95", 3: "1b0aab299a8a480a", 4: "1b0aab299a8a480a", 5: "1b0aab299a8a480a"}


def test_the_checkpoint_format_names_the_model():
    wm, agent = make_models(tiny_args())
    description = [repr(wm), repr(agent)] + [f"{k} {tuple(v.shape)} {v.dtype}" for m in (wm, agent)
                                              for k, v in m.state_dict().items()]
    digest = hashlib.sha256("\n".join(description).encode()).hexdigest()[:16]
    assert MODELS.get(dreamer_ppo.CHECKPOINT_FORMAT) == digest, (
        f"the model is not format {dreamer_ppo.CHECKPOINT_FORMAT}'s: raise CHECKPOINT_FORMAT and record {digest} here")


@pytest.mark.parametrize("change, words", [
    (dict(position=dict(phase="night", epoch=1, step=9, test_return=0.0, day_final=None)),
     ["during a night", "day.pt"]),
    (dict(format=dreamer_ppo.CHECKPOINT_FORMAT - 1), ["older version", "--save-day"]),
])
def test_load_checkpoint_refuses_a_night_or_an_old_checkpoint(tmp_path, change, words):
    args = tiny_args()
    save_day(tmp_path / "day.pt", trained_state(args, seed=0), args)
    atomic_save({**torch.load(tmp_path / "day.pt", weights_only=False), **change}, tmp_path / "other.pt")
    with pytest.raises(SystemExit) as e:
        load_checkpoint(str(tmp_path / "other.pt"), args)
    assert "--day-checkpoint" in str(e.value) and all(word in str(e.value) for word in words)


# %% whole runs
def flag(name):
    return int(SIZE_FLAGS[SIZE_FLAGS.index(name) + 1])


INIT_STATES = ("random", "collected")
DAY_EPOCHS, NIGHT_EPOCHS = 2, 2
AGENT_BATCH, AGENT_UPDATES, HORIZON = flag("--agent-batch-size"), flag("--agent-updates"), flag("--horizon")
DAY_STEPS = flag("--day-steps")


def read_events(run_dir):
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def scalars(run_dir):
    acc = read_events(run_dir)
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def single_run_dir(cwd):
    runs = list((Path(cwd) / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module")
def day_runs(tmp_path_factory):
    """Day + night runs, one per kind of initial dream state, side by side (one core each), saving the day."""
    procs = {}
    for init in INIT_STATES:
        cwd = tmp_path_factory.mktemp(f"run_{init}")
        procs[init] = (cwd, run_script(["--init-states", init, "--day-epochs", str(DAY_EPOCHS), "--night-epochs",
                                        str(NIGHT_EPOCHS), "--save-day", *SIZE_FLAGS], cwd))
    results = {}
    for init, (cwd, proc) in procs.items():
        code, out, err = finish(proc)
        assert code == 0, f"{init} run failed:\n{out[-3000:]}\n{err[-3000:]}"
        run_dir = single_run_dir(cwd)
        results[init] = dict(run_dir=run_dir, out=out, scalars=scalars(run_dir),
                             images=read_events(run_dir).Tags()["images"])
    return results


@pytest.mark.parametrize("init", INIT_STATES)
def test_day_and_night_run(day_runs, init):
    run = day_runs[init]
    tags = run["scalars"]
    test_return = tags["charts/test_return"]
    steps = [s for s, _ in test_return]
    assert len(steps) == DAY_EPOCHS + NIGHT_EPOCHS
    assert all(a < b for a, b in zip(steps, steps[1:]))
    day_end = steps[DAY_EPOCHS - 1]
    # real steps over all environments by day, the seed episodes' not counted: the day ends at E_d T_d
    assert steps[:DAY_EPOCHS] == [DAY_STEPS * k for k in range(1, DAY_EPOCHS + 1)]
    assert [s for s, _ in tags["charts/train_levels_return"]] == steps
    dreamed = AGENT_BATCH * AGENT_UPDATES * HORIZON
    assert steps[DAY_EPOCHS:] == [day_end + dreamed * k for k in range(1, NIGHT_EPOCHS + 1)]
    assert all(np.isfinite(v) and v >= 0 for _, v in test_return)  # coinrun scores are 0 or 10
    for tag in ("world_model/loss", "world_model/image_loss", "losses/value_loss", "losses/policy_loss",
                "dream/reward_mean", "dream/transformed_frac"):
        assert tag in tags, tag
    assert "charts/train_return" in tags or "charts/SPS" in tags
    assert [s for s, _ in tags["world_model/loss"]] == steps[:DAY_EPOCHS]
    assert [s for s, _ in tags["dream/reward_mean"]] == steps[DAY_EPOCHS:]
    assert all(v == 0 for _, v in tags["dream/transformed_frac"])  # the baseline does not transform
    assert [s for s, _ in tags["losses/value_loss"]] == steps
    assert "dream/before_after" in run["images"]  # decoded dreams at the first night epoch (Figure 2)
    # the final evaluation at each phase's end; the open-loop prediction before each day epoch's updates (on the
    # model of the step before); the dreams' imagined return each night epoch
    for tag in ("final/test_return", "final/test_return_se", "final/train_levels_return"):
        assert [s for s, _ in tags[tag]] == [day_end, steps[-1]], tag
    assert [s for s, _ in tags["openloop/image_mse"]] == [0] + steps[:DAY_EPOCHS - 1]
    assert "openloop/truth_prediction_error" in run["images"]
    assert [s for s, _ in tags["dream/return_mean"]] == steps[DAY_EPOCHS:]
    # a run at other sizes than the paper's names them and prints the full protocol's command
    line = next(line for line in run["out"].splitlines() if line.startswith("not the paper's protocol"))
    changed = line[line.index("(") + 1: line.index(" changed)")].split()
    assert {"--day-epochs", "--categoricals", "--horizon"} <= set(changed) and "--seed" not in changed
    assert "the full run is every default, `python dreamer_ppo.py --env-id coinrun --seed 1`" in line

    ckpt = torch.load(run["run_dir"] / "day.pt", weights_only=False)
    assert {"world_model", "agent", "args", "rng"} <= set(ckpt) and "dataset" not in ckpt
    assert ckpt["args"]["init_states"] == init and ckpt["args"]["categoricals"] == 4
    assert ckpt["position"]["step"] == day_end
    assert ckpt["position"]["test_return"] == pytest.approx(test_return[DAY_EPOCHS - 1][1])
    # the replay beside it holds the seed episodes and every day step of the 5 environments, a chunk per day epoch
    replay = ReplayDataset(5, 1)
    load_steps(replay, run["run_dir"] / "replay", ckpt["replay_size"])
    seed_steps = int(next(line for line in run["out"].splitlines() if "seed episodes" in line).split()[0].replace(",", ""))
    assert seed_steps > 0 and replay.size * 5 == seed_steps + day_end
    assert len(list((run["run_dir"] / "replay").iterdir())) == DAY_EPOCHS


def test_night_only_from_a_day_checkpoint(day_runs, tmp_path):
    day = day_runs["random"]
    day_end, day_return = day["scalars"]["charts/test_return"][DAY_EPOCHS - 1]
    # the night starts from the day of the random run and dreams from collected states of its dataset
    code, out, err = finish(run_script(["--day-checkpoint", str(day["run_dir"] / "day.pt"), "--init-states",
                                        "collected", "--night-epochs", "1", *SIZE_FLAGS], tmp_path))
    assert code == 0, f"{out[-3000:]}\n{err[-3000:]}"
    tags = scalars(single_run_dir(tmp_path))
    test_return = tags["charts/test_return"]
    assert [s for s, _ in test_return] == [day_end, day_end + AGENT_BATCH * AGENT_UPDATES * HORIZON]
    assert test_return[0][1] == pytest.approx(day_return)
    assert not any(tag.startswith("world_model/") for tag in tags)  # no day in this run
    assert "dream/reward_mean" in tags
    assert not (single_run_dir(tmp_path) / "day.pt").exists()  # no --save-day
    # its first lines quote the day's final evaluation (what the night's final is compared with), and name only the
    # night's flags that differ from the paper's protocol (not the day's, which a night does not read)
    day_final = {tag: day["scalars"][f"final/{tag}"][0][1] for tag in ("test_return", "test_return_se",
                                                                      "train_levels_return", "train_levels_return_se")}
    assert (f"the day ended at step {day_end:,}; its final evaluation: test {day_final['test_return']:.2f} ± "
            f"{day_final['test_return_se']:.2f}, train levels {day_final['train_levels_return']:.2f} ± "
            f"{day_final['train_levels_return_se']:.2f}") in out
    line = next(line for line in out.splitlines() if line.startswith("not the paper's protocol"))
    changed = set(line[line.index("(") + 1: line.index(" changed)")].split())
    assert {"--horizon", "--night-epochs", "--init-states"} <= changed
    assert not changed & {"--day-epochs", "--day-steps", "--wm-updates", "--categoricals", "--rnn-units"}


def test_night_reads_the_replay_only_when_it_needs_real_data(day_runs, tmp_path):
    """A night from random initial states runs without the day's replay/; one from collected states refuses at once,
    naming the missing file."""
    day_dir = tmp_path / "day"
    day_dir.mkdir()
    (day_dir / "day.pt").write_bytes((day_runs["random"]["run_dir"] / "day.pt").read_bytes())
    code, out, err = finish(run_script(["--day-checkpoint", str(day_dir / "day.pt"), "--night-epochs", "1",
                                        "--run-dir", "night", *SIZE_FLAGS], tmp_path))
    assert code == 0, f"{out[-3000:]}\n{err[-3000:]}"
    assert len(scalars(tmp_path / "night")["charts/test_return"]) == 2
    code, out, err = finish(run_script(["--day-checkpoint", str(day_dir / "day.pt"), "--init-states", "collected",
                                        "--night-epochs", "1", "--run-dir", "collected", *SIZE_FLAGS], tmp_path))
    assert code != 0 and "--day-checkpoint" in err and str(day_dir / "replay") in err and "missing" in err
    assert not (tmp_path / "collected").exists()


# %% run directories
def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "time", lambda: 1234.5)
    first, _ = claim_run_dir(tiny_args())
    second, _ = claim_run_dir(tiny_args())
    collected, _ = claim_run_dir(tiny_args(init_states="collected"))
    assert first == "runs/coinrun__dreamer_ppo__1__1234"
    assert second == "runs/coinrun__dreamer_ppo__1__1234_2"
    assert collected == "runs/coinrun__dreamer_ppo_collected__1__1234"


@pytest.mark.parametrize("setup, words", [
    (lambda d: HELD.append(claim_run_dir(tiny_args(run_dir=str(d)))), ["in use", f"process {os.getpid()}"]),
    (lambda d: (d / "events.out.tfevents.1.host").write_bytes(b""), ["already holds", "events"]),
])
def test_a_run_directory_in_use_or_holding_events_is_refused(tmp_path, setup, words):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    setup(run_dir)
    with pytest.raises(SystemExit) as e:
        claim_run_dir(tiny_args(run_dir=str(run_dir)))
    assert "--run-dir" in str(e.value) and str(run_dir) in str(e.value)
    for word in words:
        assert word in str(e.value)


HELD = []  # the run directories this process holds (their locks are released when the file is closed)


def test_a_stale_lock_is_taken_over(tmp_path):
    (tmp_path / ".lock").write_text(f"{socket.gethostname()} 999999999")  # a run that died: its lock file stays
    path, lock = claim_run_dir(tiny_args(run_dir=str(tmp_path)))
    assert path == str(tmp_path) and open(lock.name).read() == str(os.getpid())
    lock.close()  # the process ends: the directory is free again
    claim_run_dir(tiny_args(run_dir=str(tmp_path)))[1].close()


@pytest.mark.parametrize("run_dir", ["file/run", "file"])
def test_a_run_directory_that_is_a_file_fails_the_script_at_once(tmp_path, run_dir):
    (tmp_path / "file").write_text("")
    code, out, err = finish(run_script(["--run-dir", str(tmp_path / run_dir), *SIZE_FLAGS], tmp_path), 120)
    assert code == 2 and err == f"error: --run-dir: cannot make the run's directory {str(tmp_path / run_dir)!r} (a file " \
                               f"is in the way); choose another --run-dir\n"
    assert "day 1/" not in out


def test_a_checkpoint_interrupted_while_writing_leaves_no_file(tmp_path, monkeypatch):
    """Ctrl-C (or a full disk) in the middle of torch.save: neither the checkpoint nor a half-written temporary
    file is left, so an interrupted run never looks as if it had saved its day."""
    def interrupted_save(obj, path):
        Path(path).write_bytes(b"PK\x03\x04 half of a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save(dict(a=1), tmp_path / "day.pt")
    assert list(tmp_path.iterdir()) == []
