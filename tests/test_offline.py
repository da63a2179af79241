"""The Offline baseline (dreamer_ppo_offline.py): GePPO's clipped objective and V-trace against hand-computed
cases and against PPO and GAE when the data come from the current policy, tiny behaviour probabilities, the
adaptive learning rate, the real sequences of the night, and whole runs from scratch and from a day
checkpoint written by dreamer_ppo.py."""

import dataclasses
import math

import numpy as np
import pytest
import torch

import dreamer_ppo
import dreamer_ppo_offline as offline
from conftest import CPU, SIZE_FLAGS, TINY, crafted_dataset, finish, make_models, run_script, run_variant
from test_end_to_end import scalars, single_run_dir
from test_variants_end_to_end import run_all

EPS, CAP = 0.2, 100.0


def offline_args(**changes):
    """dreamer_ppo_offline.Args (its offline flags at their defaults) at tiny sizes, `changes` on top."""
    return dataclasses.replace(offline.Args(), **{**TINY, **changes})


def logs(*probs):
    return torch.tensor(probs, dtype=torch.float64).log()


# %% GePPO's clipped objective
def test_geppo_loss_by_hand():
    # mu = 0.5, pi_old = 0.25, pi = 0.4: c = 0.5, r = 0.8, clip range [0.3, 0.7]
    # mu = 0.1, pi_old = 0.2, pi = 0.15: c = 2, r = 1.5, clip range [1.8, 2.2]
    mu, old, pi = logs(0.5, 0.5, 0.1, 0.1), logs(0.25, 0.25, 0.2, 0.2), logs(0.4, 0.4, 0.15, 0.15)
    advantages = torch.tensor([2.0, -1.0, 1.0, -3.0], dtype=torch.float64)
    pi.requires_grad_(True)
    loss, ratio, center = offline.geppo_loss(pi, old, mu, advantages, EPS, CAP)
    assert ratio.tolist() == pytest.approx([0.8, 0.8, 1.5, 1.5])
    assert center.tolist() == pytest.approx([0.5, 0.5, 2.0, 2.0])
    # -min(r A, clip(r) A): -min(1.6, 1.4), -min(-0.8, -0.7), -min(1.5, 1.8), -min(-4.5, -5.4)
    assert loss.tolist() == pytest.approx([-1.4, 0.8, -1.5, 5.4])
    loss.sum().backward()
    # d(-r A)/d log pi = -r A where the unclipped term is the minimum, 0 where the clipped one is
    assert pi.grad.tolist() == pytest.approx([0.0, 0.8, -1.5, 0.0])


def test_geppo_loss_on_policy_is_ppo():
    # mu = pi_old = 0.5: c = 1 and PPO's clip range [0.8, 1.2]; pi = 0.7 gives r = 1.4, pi = 0.3 gives r = 0.6
    mu = old = logs(0.5, 0.5, 0.5, 0.5)
    pi = logs(0.7, 0.7, 0.3, 0.3)
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    loss, _, center = offline.geppo_loss(pi, old, mu, advantages, EPS, CAP)
    assert center.tolist() == [1.0] * 4
    # -min(1.4, 1.2), -min(-1.4, -1.2), -min(0.6, 0.8), -min(-0.6, -0.8)
    assert loss.tolist() == pytest.approx([-1.2, 1.4, -0.6, 0.8])
    # and on any numbers, Eq. 7 with the ratio pi / pi_old
    g = torch.Generator().manual_seed(0)
    old = torch.rand(100, generator=g).log()
    pi = old + 0.5 * torch.randn(100, generator=g)
    advantages = torch.randn(100, generator=g)
    ppo_ratio = (pi - old).exp()
    ppo = -torch.min(ppo_ratio * advantages, ppo_ratio.clamp(1 - EPS, 1 + EPS) * advantages)
    assert torch.allclose(offline.geppo_loss(pi, old, old, advantages, EPS, CAP)[0], ppo, atol=1e-5)


# %% V-trace
def test_vtrace_by_hand():
    # two steps, gamma 0.9, lambda 0.5; pi_old / mu = 2 then 0.5, so rho = (1, 0.5) and c = lambda rho
    rewards, values, next_values = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.5], [1.0]]), torch.tensor([[1.0], [3.0]])
    discounts = torch.full((2, 1), 0.9)
    log_rhos = torch.tensor([[math.log(2.0)], [math.log(0.5)]])
    advantages, targets = offline.vtrace(rewards, values, next_values, discounts, 0.5, log_rhos)
    # delta_0 = 1 + 0.9 * 1 - 0.5 = 1.4, delta_1 = 2 + 0.9 * 3 - 1 = 3.7
    # Espeholt et al.'s definition v_s = V_s + sum_t gamma^(t-s) (prod_{i=s}^{t-1} c_i) rho_t delta_t:
    # v_1 = 1 + 0.5 * 3.7 = 2.85; v_0 = 0.5 + 1 * 1.4 + 0.9 * (0.5 * 1) * 0.5 * 3.7 = 2.7325
    assert targets.flatten().tolist() == pytest.approx([2.7325, 2.85])
    # the advantages of the actions taken: A_1 = delta_1, A_0 = delta_0 + 0.9 * 0.5 * rho_1 * A_1 = 2.2325
    assert advantages.flatten().tolist() == pytest.approx([2.2325, 3.7])


def test_vtrace_with_unit_weights_and_lambda_one_is_the_discounted_return():
    rewards = torch.tensor([1.0, 0.0, 2.0, 5.0]).reshape(4, 1)
    values = torch.tensor([3.0, -1.0, 7.0, 0.5]).reshape(4, 1)  # bootstrapped only at the end of the data
    next_values = torch.tensor([-1.0, 7.0, 0.5, 4.0]).reshape(4, 1)
    discounts = torch.tensor([0.5, 0.5, 0.0, 0.5]).reshape(4, 1)  # the episode ends after step 2
    _, targets = offline.vtrace(rewards, values, next_values, discounts, 1.0, torch.zeros(4, 1))
    # v_0 = 1 + 0.5 * 0 + 0.25 * 2, v_1 = 0 + 0.5 * 2, v_2 = 2 (no bootstrap), v_3 = 5 + 0.5 * 4
    assert targets.flatten().tolist() == pytest.approx([1.5, 1.0, 2.0, 7.0])


@pytest.mark.parametrize("behaviour", ["same", "less likely"])
def test_vtrace_on_policy_is_gae(behaviour):
    """With pi_old / mu >= 1 every weight is truncated to 1: A is GAE(lambda) and the targets are A + v."""
    g = torch.Generator().manual_seed(1)
    T, N = 7, 5
    rewards, values, next_values = (torch.randn(T, N, generator=g) for _ in range(3))
    discounts = 0.99 * (torch.rand(T, N, generator=g) > 0.2)
    log_rhos = torch.zeros(T, N) if behaviour == "same" else torch.rand(T, N, generator=g) * 3
    advantages, targets = offline.vtrace(rewards, values, next_values, discounts, 0.95, log_rhos)
    expected = dreamer_ppo.gae(rewards, values, next_values, discounts, 0.95)
    assert torch.allclose(advantages, expected, atol=1e-5)
    assert torch.allclose(targets, expected + values, atol=1e-5)


def test_vtrace_advantage_with_lambda_one_looks_one_step_ahead():
    """With lambda = 1, A_t = r_{t+1} + d_t v_{t+1} - v(s_t): the action's value under pi_old, off-policy."""
    g = torch.Generator().manual_seed(2)
    T, N = 6, 4
    rewards, values = torch.randn(T, N, generator=g), torch.randn(T + 1, N, generator=g)
    values, next_values = values[:-1], values[1:]
    discounts = torch.full((T, N), 0.9)
    log_rhos = torch.randn(T, N, generator=g)
    advantages, targets = offline.vtrace(rewards, values, next_values, discounts, 1.0, log_rhos)
    assert torch.allclose(advantages[:-1], rewards[:-1] + 0.9 * targets[1:] - values[:-1], atol=1e-5)


# %% tiny behaviour probabilities
def test_tiny_behaviour_probabilities_give_finite_losses_and_gradients():
    torch.manual_seed(0)
    logits = torch.randn(5, 15, requires_grad=True)
    actions = torch.tensor([0, 1, 2, 3, 4])
    logprob = logits.log_softmax(-1)[torch.arange(5), actions]
    old = logprob.detach()
    mu = torch.tensor([-1000.0, math.log(1e-30), -math.inf, -math.log(15), -2.0])
    advantages = torch.tensor([3.0, -2.0, 1.0, 1.0, -1.0])
    loss, ratio, center = offline.geppo_loss(logprob, old, mu, advantages, EPS, CAP)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logits.grad).all()
    assert ratio[:3].tolist() == pytest.approx([CAP] * 3) and (ratio <= CAP * 1.0001).all()
    # at the cap a sample gets no policy gradient; the others do
    assert logits.grad[:3].abs().max() == 0 and logits.grad[3:].abs().min(-1).values.gt(0).all()
    advantages, targets = offline.vtrace(torch.ones(5, 1), torch.zeros(5, 1), torch.zeros(5, 1),
                                         torch.full((5, 1), 0.99), 0.95, (old - mu).reshape(5, 1))
    assert torch.isfinite(advantages).all() and torch.isfinite(targets).all()
    assert math.isfinite(offline.tv_distance(logprob.detach() + 1, old, mu, CAP))


def real_like_traj(agent, feat_dim, T, N, behaviour_logprobs, seed=0):
    """A batch shaped as `offline_sequences` returns it, random states and rewards, pi_old from `agent`."""
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(T + 1, N, feat_dim, generator=g)
    actions = torch.randint(15, (T, N), generator=g)
    with torch.no_grad():
        old_logprobs = agent.get_action_and_value(states[:T], actions)[1]
        values = agent.value(states)
    return dict(states=states[:T], actions=actions, behaviour_logprobs=behaviour_logprobs.expand(T, N).clone(),
                old_logprobs=old_logprobs, values=values[:T], next_values=values[1:],
                rewards=torch.randn(T, N, generator=g) * 5, conts=torch.ones(T, N))


def test_a_night_update_on_tiny_behaviour_probabilities_stays_finite():
    args = offline_args(update_epochs=2)
    wm, agent = make_models(args)
    optimizer = offline.make_agent_optimizer(agent, args.night_lr)
    mu = torch.tensor([-1000.0, math.log(1e-30), -math.inf, -math.log(15)]).repeat(2)
    traj = real_like_traj(agent, wm.feat_dim, args.horizon, 8, mu)
    stats, offline_stats = offline.train_offline(agent, optimizer, dreamer_ppo.ReturnScale(0.99), traj, args, CPU)
    assert all(math.isfinite(v) for v in [*stats.values(), *offline_stats.values()])
    assert all(torch.isfinite(p).all() for p in agent.parameters())
    assert offline_stats["tiny_mu_frac"] == pytest.approx(0.75)
    assert offline_stats["capped_frac"] == pytest.approx(0.75)  # pi_old / mu hits the cap exactly for those



def test_train_offline_optimizes_the_geppo_objective(monkeypatch):
    """The night's policy term is GePPO's, on the stored behaviour probabilities, in every minibatch."""
    args = offline_args()
    wm, agent = make_models(args)
    optimizer = offline.make_agent_optimizer(agent, args.night_lr)
    traj = real_like_traj(agent, wm.feat_dim, args.horizon, 8, torch.tensor(-2.0))
    seen, geppo_loss = [], offline.geppo_loss
    monkeypatch.setattr(offline, "geppo_loss", lambda *a: seen.append(a[2]) or geppo_loss(*a))
    offline.train_offline(agent, optimizer, dreamer_ppo.ReturnScale(0.99), traj, args, CPU)
    assert len(seen) == args.update_epochs * min(args.agent_updates, 8 * args.horizon)
    assert all((mu == -2.0).all() for mu in seen)

# %% adaptive learning rate
def test_adapt_learning_rate():
    for tv, lr in ((0.3, 1 / 1.03), (0.11, 1 / 1.03), (0.01, 1.03), (0.049, 1.03), (0.07, 1.0), (0.1, 1.0)):
        group = dict(lr=1.0)
        assert offline.adapt_learning_rate(group, tv, 0.1, 0.03) == pytest.approx(lr), tv
        assert group["lr"] == pytest.approx(lr)


@pytest.mark.parametrize("night_lr, adapt, moves", [(1.0, True, "down"), (1e-9, True, "up"), (1e-9, False, "stays")])
def test_train_offline_adapts_the_actor_learning_rate(night_lr, adapt, moves):
    args = offline_args(night_lr=night_lr, adapt_lr=adapt)
    wm, agent = make_models(args)
    optimizer = offline.make_agent_optimizer(agent, args.night_lr)
    traj = real_like_traj(agent, wm.feat_dim, args.horizon, 8, torch.tensor(-math.log(15)))
    _, stats = offline.train_offline(agent, optimizer, dreamer_ppo.ReturnScale(0.99), traj, args, CPU)
    assert stats["actor_lr"] == night_lr
    actor_lr, critic_lr = (group["lr"] for group in optimizer.param_groups)
    assert critic_lr == night_lr
    if moves == "down":
        assert stats["tv"] > args.tv_target and actor_lr == pytest.approx(night_lr / 1.03)
    elif moves == "up":
        assert stats["tv"] < args.tv_target / 2 and actor_lr == pytest.approx(night_lr * 1.03)
    else:
        assert actor_lr == night_lr


# %% the night's real sequences
def marked_dataset():
    """crafted_dataset whose logprobs tell env e and step t, an episode end after step 19 (the next level at 20),
    and a new episode at 35 whatever the continuation says."""
    dataset = crafted_dataset(num_envs=3, steps=50, capacity=50)
    dataset.data["actions"] %= 15
    dataset.data["logprobs"] = -(100.0 * np.arange(3)[:, None] + np.arange(50))
    dataset.data["conts"][:, 19] = 0.0
    dataset.data["is_first"][:, 20] = True
    dataset.data["is_first"][:, 35] = True
    return dataset


def seeded_sequences(models, n, **changes):
    """offline_sequences of `n` windows of the marked dataset, the RNGs seeded: (args, dataset, traj)."""
    args, dataset = offline_args(horizon=5, **changes), marked_dataset()
    np.random.seed(0)
    torch.manual_seed(0)
    return args, dataset, offline.offline_sequences(*models, dataset, n, args, CPU)


def test_offline_sequences_start_past_a_burn_in(models):
    """The samples start --burn-in steps into each window, their states filtered through the burn-in (the
    posterior states of the whole window at those steps), not from h = 0."""
    wm, agent = models
    args, dataset, traj = seeded_sequences(models, 50, burn_in=10)
    t0 = ((-traj["behaviour_logprobs"][0]) % 100).long()
    assert (t0 >= 10).all() and len(set(t0.tolist())) > 5
    np.random.seed(0)
    torch.manual_seed(0)
    window = dreamer_ppo.to_torch(dataset.sample(50, 16, 0.0), CPU)
    with torch.no_grad():
        hs, zs, *_ = wm.observe(window["obs"], window["actions"], window["conts"], window["is_first"])
    expected = dreamer_ppo.state_features(hs[:, 10:15].flatten(0, 1), zs[:, 10:15].flatten(0, 1))
    assert torch.allclose(traj["states"].transpose(0, 1).flatten(0, 1), expected)
    with pytest.raises(SystemExit, match="--burn-in"):
        offline.offline_sequences(wm, agent, dataset, 50, offline_args(horizon=5, burn_in=45), CPU)


def test_offline_sequences_cut_at_episode_boundaries(models):
    wm, agent = models
    args, dataset, traj = seeded_sequences(models, 200, burn_in=0)
    for key in ("states", "actions", "behaviour_logprobs", "old_logprobs", "values", "next_values", "rewards",
                "conts"):
        assert traj[key].shape[:2] == (5, 200), key
    assert traj["states"].shape[-1] == wm.feat_dim
    env, t = (-traj["behaviour_logprobs"]).long().div(100, rounding_mode="floor"), (-traj["behaviour_logprobs"]) % 100
    assert (env == env[0]).all() and (t[1:] == t[:-1] + 1).all()
    assert torch.equal(traj["actions"], t.long() % 15)
    assert torch.equal(traj["conts"], ((t != 19) & (t != 34)).float())
    assert ((t == 19) | (t == 34)).any()
    assert (traj["old_logprobs"] <= 0).all()
    assert torch.equal(traj["next_values"][:-1], traj["values"][1:])


@pytest.mark.parametrize("changes, flag", [(dict(tv_target=0.0), "--tv-target"), (dict(adapt_factor=-0.1),
                                           "--adapt-factor"), (dict(max_ratio=1.0), "--max-ratio")])
def test_check_args_refuses_bad_offline_flags(changes, flag):
    with pytest.raises(SystemExit) as e:
        offline.check_args(offline_args(**changes))
    assert flag in str(e.value)
    offline.check_args(offline_args())


# %% whole runs
NIGHT_EPOCHS = 2
NIGHT_FLAGS = ["--night-epochs", str(NIGHT_EPOCHS), *SIZE_FLAGS]
NIGHT_STEPS = math.prod(int(SIZE_FLAGS[SIZE_FLAGS.index(f) + 1])
                        for f in ("--agent-updates", "--agent-batch-size", "--horizon"))
OFFLINE_TAGS = ("actor_lr", "tv", "ratio_mean", "rho_mean", "capped_frac", "tiny_mu_frac")


@pytest.fixture(scope="module")
def offline_runs(tmp_path_factory):
    """dreamer_ppo.py's day saved beside the offline script from scratch, then the offline night from that day."""
    day, scratch, resumed = (tmp_path_factory.mktemp(name) for name in ("day", "scratch", "checkpoint"))
    run_all([("day", lambda: (day, run_script(["--save-day", "--day-epochs", "1", "--night-epochs", "0",
                                               *SIZE_FLAGS], day))),
             ("scratch", lambda: (scratch, run_variant("offline", ["--day-epochs", "1", *NIGHT_FLAGS], scratch)))])
    checkpoint = single_run_dir(day) / "day.pt"
    code, out, err = finish(run_variant("offline", ["--day-checkpoint", str(checkpoint), *NIGHT_FLAGS], resumed))
    assert code == 0, f"{out[-3000:]}\n{err[-3000:]}"
    day_end = torch.load(checkpoint, weights_only=False)["position"]["step"]
    return day_end, {name: scalars(single_run_dir(cwd)) for name, cwd in (("scratch", scratch), ("checkpoint", resumed))}


@pytest.mark.parametrize("start", ["scratch", "checkpoint"])
def test_offline_night_runs(offline_runs, start):
    day_end, runs = offline_runs
    tags = runs[start]
    steps = [s for s, _ in tags["charts/test_return"]]
    assert steps == [day_end + k * NIGHT_STEPS for k in range(NIGHT_EPOCHS + 1)]
    assert ("world_model/loss" in tags) == (start == "scratch")
    assert not any(tag.startswith("dream/") for tag in tags)
    night_tags = [f"offline/{t}" for t in OFFLINE_TAGS] + ["losses/policy_loss", "losses/value_loss", "charts/SPS"]
    for tag in night_tags + [f"time/{part}" for part in ("sequences", "ppo", "evaluation")]:
        night = [(s, v) for s, v in tags[tag] if s > day_end]  # losses, SPS and times are logged by day too
        assert [s for s, _ in night] == steps[1:], tag
        assert all(math.isfinite(v) and (v >= 0 or not tag.startswith("time/")) for _, v in night), tag
    assert all(tag.startswith(("charts/", "losses/", "world_model/", "offline/", "time/", "final/", "openloop/"))
               for tag in tags)
    assert [s for s, _ in tags["final/test_return"]] == ([day_end] if start == "scratch" else []) + steps[-1:]
    (_, lr1), (_, lr2) = tags["offline/actor_lr"]
    tv1 = tags["offline/tv"][0][1]
    assert lr1 == pytest.approx(1e-4)
    assert lr2 == pytest.approx(lr1 / 1.03 if tv1 > 0.1 else lr1 * 1.03 if tv1 < 0.05 else lr1)
    assert all(v == 0 for _, v in tags["offline/tiny_mu_frac"])  # every mu here is 1/15 or the day policy's


def test_offline_night_from_the_checkpoint_is_the_night_after_the_same_day(offline_runs):
    """dreamer_ppo.py's day is this script's day, and the checkpoint keeps the RNG states."""
    _, runs = offline_runs
    for tag in ("charts/test_return", "offline/tv", "losses/value_loss"):
        assert runs["checkpoint"][tag] == runs["scratch"][tag][-len(runs["checkpoint"][tag]):], tag
