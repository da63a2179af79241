"""Algorithm 1's loops in-process: what the day feeds the world model and the agent, and what an evaluation
scores."""

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import dreamer_ppo
from conftest import CPU, NUM_ACTIONS, RecordingRun, make_models, make_optimizers, tiny_args


class StampedEnv:
    """A ProcgenEnv stand-in (same interface, auto-resetting, reset() does not restart an episode): every frame
    carries its running number in pixels [0, 0, 0:2] and `tag` in pixel [0, 0, 2]; episodes last `length` steps."""

    def __init__(self, num_envs, length, tag):
        self.num_envs, self.length, self.tag, self.t = num_envs, length, tag, 0
        self.action_space = SimpleNamespace(n=NUM_ACTIONS)
        self.env = SimpleNamespace(get_state=lambda: None)  # what a checkpoint keeps of ProcGen's own state

    def observe(self):
        frame = np.zeros((self.num_envs, 64, 64, 3), np.uint8)
        frame[:, 0, 0] = (self.t % 256, self.t // 256, self.tag)
        return {"rgb": frame}

    def reset(self):
        return self.observe()

    def step(self, action):
        assert action.shape == (self.num_envs,)
        self.t += 1
        done = np.full(self.num_envs, self.t % self.length == 0)
        return self.observe(), np.zeros(self.num_envs, np.float32), done, [{}] * self.num_envs

    def close(self):
        pass


class ActionRewardEnv(StampedEnv):
    """A StampedEnv whose reward is the action taken: a score that follows the sampled actions."""

    def step(self, action):
        obs, _, done, info = super().step(action)
        return obs, action.astype(np.float32), done, info


def frame_number(obs):
    return int(obs[0, 0, 0, 0]) + 256 * int(obs[0, 0, 0, 1])


class RecordingLog:
    def __init__(self):
        self.points = []

    def scalars(self, family, values, step):
        self.points += [(f"{family}/{k}", step, v) for k, v in values.items()]


def test_day_filters_every_real_frame_once(monkeypatch, tmp_path):
    # The agent acts on the posterior state of each frame: h_t = f(h_{t-1}, z_{t-1}, a_{t-1}) once per frame. A
    # frame filtered twice advances h with the same action twice.
    args = tiny_args(num_envs=2, day_epochs=3, day_steps=8, seed_episodes=1, seq_len=8, wm_updates=1,
                     wm_batch_size=2, agent_updates=2, test_repetitions=1)
    wm, agent = make_models(args)
    wm_opt, agent_opt = make_optimizers(wm, agent, args)
    envs = StampedEnv(2, length=5, tag=0)
    monkeypatch.setattr(dreamer_ppo, "make_env", lambda *a, **k: StampedEnv(2, length=3, tag=1))  # evaluations
    filtered = []
    filter_step = wm.filter_step

    def recording_filter_step(h, z, prev_action, obs, is_first, generator=None):
        if int(obs[0, 0, 0, 2]) == 0:  # a training frame (evaluation uses the test env)
            filtered.append(frame_number(obs))
        return filter_step(h, z, prev_action, obs, is_first, generator)

    monkeypatch.setattr(wm, "filter_step", recording_filter_step)
    dataset = dreamer_ppo.ReplayDataset(args.num_envs, 100)
    scale = dreamer_ppo.ReturnScale(0.99)
    log = RecordingRun(tmp_path, args, dreamer_ppo.stateful(wm, agent, wm_opt, agent_opt, scale), dataset, envs)
    dreamer_ppo.day(args, wm, agent, wm_opt, agent_opt, scale, dataset, envs, CPU, log)
    # seed episodes: 8 steps (one 5-step episode, then enough for a sequence of 8), frames 0..7, unfiltered;
    # then 3 epochs of 8 / 2 = 4 steps: the agent acts on frames 8..19, each filtered once (frame 20, after
    # the last step, may or may not be)
    assert dataset.size == 8 + 3 * 4
    assert (dataset.steps()["obs"][0, :, 0, 0, 0] == np.arange(20)).all()
    # the x-axis counts real steps of both environments, 8 per epoch, the 16 of the seed episodes left out
    assert [s for tag, s, _ in log.points if tag == "charts/test_return"] == [8, 16, 24]
    assert log.pos.step == 24
    assert set(range(8, 20)) <= set(filtered) <= set(range(8, 21))
    assert filtered == sorted(set(filtered)), f"frames filtered (a repeat is a frame filtered twice): {filtered}"


def test_a_day_resumed_at_its_end_runs_no_epoch(tmp_path):
    # A run resumed from the checkpoint of the day's last epoch (its nights still to run) runs no day epoch: the day
    # ends where the checkpoint says, with its test return, and logs nothing.
    args = tiny_args(num_envs=2, day_epochs=2)
    wm, agent = make_models(args)
    wm_opt, agent_opt = make_optimizers(wm, agent, args)
    acting = dict(obs=StampedEnv(2, 3, 0).observe()["rgb"], is_first=np.zeros(2, bool), score=np.zeros(2),
                  h=wm.initial(2), z=torch.zeros(2, wm.C, wm.J))
    pos = dreamer_ppo.Position("day", epoch=2, step=200, test_return=3.5)
    run = RecordingRun(tmp_path, args, pos=pos, acting=acting)
    dreamer_ppo.day(args, wm, agent, wm_opt, agent_opt, dreamer_ppo.ReturnScale(0.99), None,
                    StampedEnv(2, length=3, tag=0), CPU, run)
    assert run.pos == dreamer_ppo.Position("day", epoch=2, step=200, test_return=3.5) and run.points == []


class EpisodeProbe:
    """Wraps a real ProcGen test environment and counts, per environment, the episodes that began and ended
    while wrapped."""

    def __init__(self, envs):
        self.envs, self.num_envs, self.closed = envs, envs.num_envs, False
        self.in_call = envs.env.observe()[2].copy()  # gym3's `first`: at an episode's first frame
        self.whole = np.zeros(self.num_envs, int)

    def reset(self):
        return self.envs.reset()

    def step(self, action):
        obs, reward, done, info = self.envs.step(action)
        self.whole += done & self.in_call
        self.in_call |= done
        return obs, reward, done, info

    def close(self):
        self.envs.close()
        self.closed = True


def test_evaluation_scores_whole_episodes_of_the_current_policy(monkeypatch):
    # Each evaluation reports the mean score of num_envs x test_repetitions whole episodes, one in each of that
    # many fresh environments, on the full level distribution (test_return) and on the N training levels
    # (train_levels_return), played in one batch. ProcGen ignores a manual reset mid-episode: an evaluation must not
    # count an episode found under way (begun by an earlier policy, partly scored).
    args = tiny_args(num_envs=3, test_repetitions=2, start_level=40)
    wm, agent = make_models(args)
    made, make_env = [], dreamer_ppo.make_env

    def probed_make_env(env_id, num_envs, num_levels, seed, start_level=0):
        made.append(dict(num_levels=num_levels, start_level=start_level, seed=seed,
                         probe=EpisodeProbe(make_env(env_id, num_envs, num_levels, seed, start_level))))
        return made[-1]["probe"]

    monkeypatch.setattr(dreamer_ppo, "make_env", probed_make_env)
    for step in (100, 200):
        returns = dreamer_ppo.evaluate(wm, agent, args, step, CPU)
        assert set(returns) == {"test_return", "train_levels_return"}
        for score in returns.values():  # the mean of six coinrun scores (0 or 10), one per environment
            assert abs(score * 6 / 10 - round(score * 6 / 10)) < 1e-9 and 0 <= score <= 10
    probes = [m["probe"] for m in made]
    assert len(probes) == 4, "evaluate made its environments elsewhere than through make_env"
    assert all(p.num_envs == 6 and (p.whole >= 1).all() for p in probes), [p.whole for p in probes]
    # the full distribution, then the training levels start_level, ..., start_level + N - 1
    assert [(m["num_levels"], m["start_level"]) for m in made] == [(0, 0), (args.num_levels, 40)] * 2
    assert len({m["seed"] for m in made}) == 4  # other levels for each kind and at each step
    assert all(p.closed for p in probes)
    made.clear()
    assert set(dreamer_ppo.evaluate(wm, agent, replace(args, eval_train_levels=False), 100, CPU)) == {"test_return"}
    assert [m["num_levels"] for m in made] == [0]


def action_reward_envs(monkeypatch):
    """Evaluations on ActionRewardEnvs (episodes of 4 steps): their returns follow every action sampled."""
    monkeypatch.setattr(dreamer_ppo, "make_env",
                        lambda env_id, num_envs, num_levels, seed, start_level=0: ActionRewardEnv(num_envs, 4, 1))


def test_evaluation_draws_its_own_random_numbers(monkeypatch):
    # evaluate samples latents and actions from a generator of its own, seeded by the seed and the step: the same
    # returns whatever torch's global generator holds (whenever it runs, in the background or not), and the global
    # generator untouched (training's random numbers do not depend on the evaluation).
    action_reward_envs(monkeypatch)
    args = tiny_args(num_envs=3, test_repetitions=2)
    wm, agent = make_models(args)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = dreamer_ppo.evaluate(wm, agent, args, 100, CPU)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    assert dreamer_ppo.evaluate(wm, agent, args, 100, CPU) == first
    assert dreamer_ppo.evaluate(wm, agent, args, 200, CPU) != first  # other random numbers at another step


def charts(log):
    return [point for point in log.points if point[0].startswith("charts/")]


@pytest.mark.parametrize("overlap", [True, False])
def test_an_epochs_evaluation_scores_the_weights_at_its_end(monkeypatch, tmp_path, overlap):
    # With --eval-overlap the evaluation runs in a thread while the next epoch trains: it scores a copy of the
    # weights of the epoch it belongs to, not the weights training changes under it, and its returns are logged at
    # that epoch's step once it is done. Without, at once. The same returns either way.
    action_reward_envs(monkeypatch)
    args = tiny_args(num_envs=3, test_repetitions=2, eval_overlap=overlap)
    wm, agent = make_models(args)
    expected = dreamer_ppo.evaluate(wm, agent, args, 100, CPU)
    log = RecordingRun(tmp_path, args, pos=dreamer_ppo.Position("day", 1, 100))
    evaluation = dreamer_ppo.Evaluator(args, CPU, log)
    evaluation.start(wm, agent, "train -")
    assert bool(charts(log)) is not overlap  # logged at once, or once it is done
    with torch.no_grad():  # the next epoch trains: the policy now always takes action 0 (reward 0)
        agent.actor[-1].weight.zero_()
        agent.actor[-1].bias.copy_(torch.arange(15, 0, -1.0) * 10)
    assert dreamer_ppo.evaluate(wm, agent, args, 100, CPU)["test_return"] == 0.0 != expected["test_return"]
    assert evaluation.finish() == expected["test_return"]
    assert sorted(charts(log)) == sorted((f"charts/{k}", 100, v) for k, v in expected.items())
    assert evaluation.finish() == expected["test_return"] and len(charts(log)) == 2  # nothing logged twice


def test_an_error_in_the_background_evaluation_reaches_the_run(monkeypatch, tmp_path):
    def no_environments(*args):
        raise RuntimeError("no environments here")

    monkeypatch.setattr(dreamer_ppo, "make_env", no_environments)
    args = tiny_args(eval_overlap=True)
    wm, agent = make_models(args)
    run = RecordingRun(tmp_path, args, pos=dreamer_ppo.Position("night", 1, 100))
    evaluation = dreamer_ppo.Evaluator(args, CPU, run)
    evaluation.start(wm, agent, "")
    with pytest.raises(RuntimeError, match="no environments here"):
        evaluation.finish()


class RowRewardEnv(StampedEnv):
    """A StampedEnv in which row i earns reward i at every step: episodes of `length` steps score i x length."""

    def step(self, action):
        obs, _, done, info = super().step(action)
        return obs, np.arange(self.num_envs, dtype=np.float32), done, info


def test_final_evaluation_plays_the_same_levels_for_a_day_and_its_nights(monkeypatch):
    # The final evaluation of a phase plays --final-episodes episodes of each kind on levels drawn from the seed alone:
    # the day's final agent and each night's (another agent, another step) meet the same levels, so that night - day
    # is a paired difference. Its means come with their standard errors.
    made = []

    def recording_make_env(env_id, num_envs, num_levels, seed, start_level=0):
        made.append((num_envs, num_levels, seed))
        return RowRewardEnv(num_envs, length=4, tag=1)

    monkeypatch.setattr(dreamer_ppo, "make_env", recording_make_env)
    args = tiny_args(final_episodes=6)
    day_agent, night_agent = make_models(args, seed=0), make_models(args, seed=1)
    log = RecordingLog()
    dreamer_ppo.final_evaluation(*day_agent, args, CPU, log, "day", 300)
    dreamer_ppo.final_evaluation(*night_agent, args, CPU, log, "night", 420)
    assert made[:2] == made[2:] and [m[:2] for m in made[:2]] == [(6, 0), (6, args.num_levels)]
    dreamer_ppo.evaluate(*day_agent, args, 300, CPU)
    assert made[-1][2] != made[0][2]  # an epoch's evaluation: other levels
    scores = 4 * np.arange(6)
    expected = dict(test_return=scores.mean(), test_return_se=scores.std(ddof=1) / np.sqrt(6))
    expected.update(train_levels_return=expected["test_return"], train_levels_return_se=expected["test_return_se"])
    for step in (300, 420):
        logged = {tag: value for tag, at, value in log.points if at == step}
        assert logged == pytest.approx({f"final/{k}": v for k, v in expected.items()})
    dreamer_ppo.final_evaluation(*day_agent, replace(args, final_episodes=0), CPU, log, "day", 500)
    assert len(made) == 6 and not [p for p in log.points if p[1] == 500]  # 0 skips it


def test_an_evaluation_of_a_broken_policy_stops_the_run(monkeypatch):
    # A policy whose probabilities hold NaN would play action 0 every step (the argmax of NaN rows): a return of a
    # broken policy, recorded as if it were one. The evaluation stops the run instead.
    action_reward_envs(monkeypatch)
    args = tiny_args()
    wm, agent = make_models(args)
    with torch.no_grad():
        agent.actor[-1].bias[3] = float("nan")
    with pytest.raises(SystemExit, match="not finite in the evaluation at step 100"):
        dreamer_ppo.evaluate(wm, agent, args, 100, CPU)


def test_the_day_trains_on_the_levels_from_start_level(monkeypatch, tmp_path):
    # --start-level moves the N training levels (ProcGen's start_level): the day's environments and the evaluation on
    # the training levels play start_level, ..., start_level + N - 1; the test episodes, all levels.
    made, make_env = [], dreamer_ppo.make_env

    def recording_make_env(env_id, num_envs, num_levels, seed, start_level=0):
        made.append((num_envs, num_levels, start_level))
        return make_env(env_id, num_envs, num_levels, seed, start_level)

    monkeypatch.setattr(dreamer_ppo, "make_env", recording_make_env)
    args = tiny_args(day_epochs=1, night_epochs=0, num_levels=8, start_level=1000, run_dir=str(tmp_path / "run"))
    dreamer_ppo.main(args)
    episodes = args.num_envs * args.test_repetitions
    assert made == [(args.num_envs, 8, 1000), (episodes, 0, 0), (episodes, 8, 1000), (2, 0, 0), (2, 8, 1000)]


def test_the_clock_leaves_a_nested_part_out_of_the_part_around_it(monkeypatch):
    # The transformation is timed inside the dreaming: time/dreaming counts the dreams without it, and the parts are
    # listed in the order they start (the epoch's line and time summary read them so).
    now = iter([0.0, 1.0, 4.0, 10.0, 10.0, 12.0])
    monkeypatch.setattr(dreamer_ppo, "time", SimpleNamespace(time=lambda: next(now)))
    clock = dreamer_ppo.Stopwatch()
    with clock("dreaming"):  # 0 to 10
        with clock("transformation"):  # 1 to 4
            pass
    with clock("ppo"):  # 10 to 12
        pass
    assert clock == {"dreaming": 7.0, "transformation": 3.0, "ppo": 2.0}
    assert list(clock) == ["dreaming", "transformation", "ppo"]
