"""The agent block (acting, GAE, return scale, PPO), the dreams block (initial states, imagination), and the
per-step code reading nothing back from the device."""

import collections
import dataclasses
import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dreamer_ppo
from dreamer_ppo import (ReplayDataset, ReturnScale, check_args, gae, imagine, ppo_update, random_initial_states,
                         stack_trajectory, state_features, train_agent)
from conftest import CPU, NUM_ACTIONS, is_onehot, make_models, tiny_args



# %% acting
def test_draw_is_multinomials_draw():
    """draw: the classes torch.multinomial draws (one sample) from the same generator, left in the same state; on
    rows of any shape, from a generator of one's own or torch's global one."""
    probs = torch.rand(7, 3, 15).softmax(-1)
    mine, theirs = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    drawn = dreamer_ppo.draw(probs, mine)
    assert drawn.shape == (7, 3)
    assert torch.equal(drawn, torch.multinomial(probs.reshape(-1, 15), 1, generator=theirs).reshape(7, 3))
    assert torch.equal(mine.get_state(), theirs.get_state())
    torch.manual_seed(4)
    drawn = dreamer_ppo.draw(probs[:, 0])
    torch.manual_seed(4)
    assert torch.equal(drawn, torch.multinomial(probs[:, 0], 1, True).squeeze(-1))


def test_get_action_and_value_is_categoricals(args, models):
    """The agent's action, log-probability and entropy are torch.distributions.Categorical's, to the bit: sampled
    (the same action from the same seed) and for given actions."""
    _, agent = models
    s = torch.randn(64, agent.actor[0].in_features)
    torch.manual_seed(5)
    action, logprob, entropy, critic_logits, value = agent.get_action_and_value(s)
    torch.manual_seed(5)
    dist = torch.distributions.Categorical(logits=agent.actor(s).float())
    expected = dist.sample()
    assert torch.equal(action, expected) and len(action.unique()) > 1
    assert torch.equal(logprob, dist.log_prob(expected)) and torch.equal(entropy, dist.entropy())
    assert torch.equal(value, dreamer_ppo.twohot_decode(agent.critic(s), agent.bins))
    given = torch.randint(NUM_ACTIONS, (64,))
    _, logprob, _, _, _ = agent.get_action_and_value(s, given)
    assert torch.equal(logprob, dist.log_prob(given))


class HostReads(TorchDispatchMode):
    """Counts the operations that read a tensor's values back to the host (on a GPU, the CPU waits for the GPU
    there): .item(), bool(tensor), the index sets of boolean masks, and torch.multinomial, whose checks of its
    probabilities read them inside the operation (pytorch/pytorch#108968)."""

    def __enter__(self):
        self.count = collections.Counter()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero,
                                   torch.ops.aten.multinomial):
            self.count[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_acting_and_evaluation_steps_read_nothing_back(args, models):
    """A step by day (the policy, then filtering the next frames) and a step of the evaluation (filtering, then the
    policy from a generator of its own) read no tensor back: the only wait per step on a GPU is for the actions the
    environments need. The counter does see torch.multinomial's and Categorical's checks."""
    wm, agent = models
    n = 6
    h, z = wm.initial(n), dreamer_ppo.sample_onehot(torch.rand(n, wm.C, wm.J).softmax(-1))
    obs = torch.randint(0, 256, (n, 64, 64, 3), dtype=torch.uint8)
    is_first = torch.tensor([True, False] * (n // 2))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad(), HostReads() as reads:
        action, *_ = agent.get_action_and_value(state_features(h, z))
        h, z = wm.filter_step(h, z, action, obs, is_first)
        h, z = wm.filter_step(h, z, action, obs, is_first, generator)
        action = dreamer_ppo.draw(agent.actor(state_features(h, z)).float().softmax(-1), generator)
    assert not reads.count and is_onehot(z)
    with torch.no_grad(), HostReads() as reads:
        torch.multinomial(torch.rand(n, NUM_ACTIONS), 1)
        torch.distributions.Categorical(logits=torch.randn(n, NUM_ACTIONS)).sample()
    assert reads.count == {"multinomial": 2, "_local_scalar_dense": 1}  # Categorical: a check of its logits, a draw


# %% GAE (Eq. 9)
def test_gae_by_hand_with_a_termination():
    # one trajectory of 3 steps ending (discount 0) after step 1, and a second one that goes on
    rewards = torch.tensor([[1.0, 0.0], [2.0, 1.0], [3.0, -1.0]])
    values = torch.tensor([[0.5, 1.0], [1.0, 1.0], [1.5, 2.0]])
    next_values = torch.tensor([[1.0, 1.0], [1.5, 2.0], [2.0, 4.0]])
    discounts = torch.tensor([[0.9, 0.9], [0.0, 0.9], [0.9, 0.9]])
    lam = 0.5
    # column 0: delta_t = r_t + d_t v_{t+1} - v_t, A_t = delta_t + lam d_t A_{t+1}
    d2 = 3.0 + 0.9 * 2.0 - 1.5                        # 3.3
    a2 = d2                                           # 3.3
    d1 = 2.0 + 0.0 * 1.5 - 1.0                        # 1.0
    a1 = d1 + 0.5 * 0.0 * a2                          # 1.0: the termination cuts A_2 off
    d0 = 1.0 + 0.9 * 1.0 - 0.5                        # 1.4
    a0 = d0 + 0.5 * 0.9 * a1                          # 1.85
    # column 1
    e2 = -1.0 + 0.9 * 4.0 - 2.0                       # 0.6
    e1 = 1.0 + 0.9 * 2.0 - 1.0                        # 1.8
    e0 = 0.0 + 0.9 * 1.0 - 1.0                        # -0.1
    b2 = e2
    b1 = e1 + 0.45 * b2                               # 2.07
    b0 = e0 + 0.45 * b1                               # 0.8315
    expected = torch.tensor([[a0, b0], [a1, b1], [a2, b2]])
    assert torch.allclose(gae(rewards, values, next_values, discounts, lam), expected, atol=1e-6)
    assert expected[:, 0].tolist() == pytest.approx([1.85, 1.0, 3.3])
    assert expected[:, 1].tolist() == pytest.approx([0.8315, 2.07, 0.6])


def test_gae_cut_before_a_transformed_state_by_hand():
    """Step 1 of column 0 is a transformed dream state: step 0 bootstraps from the value of the state before the
    transformation (next_values[0] = 2.0, where v(s'_1) = 7.0) and takes nothing of A_1. Column 1 is not cut."""
    rewards = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    values = torch.tensor([[0.5, 0.5], [7.0, 7.0]])
    next_values = torch.tensor([[2.0, 7.0], [1.0, 1.0]])
    discounts = torch.full((2, 2), 0.5)
    cuts = torch.tensor([[True, False], [False, False]])
    a1 = 0.0 + 0.5 * 1.0 - 7.0                        # -6.5 in both columns
    a0_cut = 1.0 + 0.5 * 2.0 - 0.5                    # 1.5: its own step only
    a0 = (1.0 + 0.5 * 7.0 - 0.5) + 0.5 * 0.5 * a1     # 4.0 - 1.625 = 2.375: v(s'_1) and A_1 leak in
    out = gae(rewards, values, next_values, discounts, 0.5, cuts)
    assert torch.allclose(out, torch.tensor([[a0_cut, a0], [a1, a1]]))
    assert gae(rewards, values, next_values, discounts, 0.5)[0, 0].item() == pytest.approx(1.5 + 0.25 * a1)


def test_imagine_bootstraps_a_transformed_state_from_its_untransformed_value(monkeypatch, args, models):
    """A transformation that moves h at step 2 of every dream: the step before bootstraps from v of the state
    before the transformation, cuts the trace there, and the moves are measured."""
    wm, agent = models
    torch.nn.init.normal_(agent.critic[-1].weight, std=0.05)  # a critic whose value varies with the state

    def shift_at_step_2(h, z, wm, agent, args, force=False, generator=None):
        calls.append(1)
        changed = torch.full((len(h),), len(calls) == 3)
        return h + 5.0 * changed[:, None], z, changed

    calls = []
    monkeypatch.setattr(dreamer_ppo, "transform", shift_at_step_2)
    torch.manual_seed(0)
    with torch.no_grad():
        h, z = random_initial_states(wm, 6)
    traj, stats = imagine(wm, agent, h, z, 4, args)
    s2 = traj["states"][2]
    h2 = s2[:, : wm.gru.hidden_size] - 5.0
    untransformed = agent.value(torch.cat([h2, s2[:, wm.gru.hidden_size:]], -1)).detach()
    assert not torch.allclose(traj["values"][2], untransformed)
    assert torch.allclose(traj["next_values"][1], untransformed, atol=1e-5)
    assert torch.equal(traj["next_values"][0], traj["values"][1]) and torch.equal(traj["next_values"][2], traj["values"][3])
    assert traj["cuts"].tolist() == [[False] * 6, [True] * 6, [False] * 6, [False] * 6]
    assert stats["transformed_frac"] == pytest.approx(0.25) and stats["h_move"] == pytest.approx(5.0)
    assert stats["z_flip_frac"] == 0.0
    assert stats["value_move"] == pytest.approx((traj["values"][2] - untransformed).abs().mean().item(), rel=1e-4)


def test_gae_lambda_one_is_discounted_return_minus_value():
    rewards = torch.tensor([[1.0], [2.0], [4.0]])
    values = torch.tensor([[0.3], [0.2], [0.1]])
    next_values = torch.tensor([[0.2], [0.1], [10.0]])
    discounts = torch.full((3, 1), 0.5)
    # lambda = 1: A_0 = r_0 + .5 r_1 + .25 r_2 + .125 v_3 - v_0
    assert gae(rewards, values, next_values, discounts, 1.0)[0, 0].item() == pytest.approx(
        1.0 + 0.5 * 2.0 + 0.25 * 4.0 + 0.125 * 10.0 - 0.3)


def test_stack_trajectory_next_values():
    steps = dict(values=[torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])],
                 actions=[torch.tensor([0, 1]), torch.tensor([2, 3])])
    traj = stack_trajectory(steps, torch.tensor([5.0, 6.0]))
    assert traj["values"].shape == (2, 2) and traj["actions"].dtype == torch.int64
    assert traj["next_values"].tolist() == [[3.0, 4.0], [5.0, 6.0]]


# %% return scale
def test_return_scale_first_update():
    scale = ReturnScale(0.99)
    assert scale.value == 0.0
    returns = torch.arange(101.0)  # the 5th and 95th percentiles are 5 and 95
    assert scale.update(returns) == 1.0  # max(1, 0.01 * 90)
    assert scale.value == pytest.approx(0.01 * (95 - 5))
    # second update: 0.99 * 0.9 + 0.01 * 90 = 1.791, now above 1
    assert scale.update(returns) == pytest.approx(0.99 * 0.9 + 0.01 * 90)
    assert scale.value == pytest.approx(1.791)


def test_return_scale_large_returns():
    scale = ReturnScale(0.99)
    returns = (torch.arange(101.0) * 1000).reshape(101, 1)  # percentiles 5000 and 95000
    p = scale.update(returns)
    assert p == pytest.approx(0.01 * 90000) and p > 1
    assert scale.value == pytest.approx(900.0)


# %% PPO
def flat_batch(n, feat_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(states=torch.randn(n, feat_dim, generator=g), actions=torch.randint(NUM_ACTIONS, (n,), generator=g),
                logprobs=torch.full((n,), -math.log(NUM_ACTIONS)), advantages=torch.randn(n, generator=g),
                targets=torch.randn(n, generator=g) * 3, weights=torch.ones(n))


def test_ppo_objective_clips_the_ratio_by_hand(args):
    # eps = 0.2: r = 1.5 and r = 0.5 lie beyond [0.8, 1.2], r = 1.1 inside; -min(r A, clip(r, 0.8, 1.2) A)
    assert args.clip_coef == 0.2
    ratios = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1, 1.1], dtype=torch.float64)
    advantages = torch.tensor([1.0, -1.0, 2.0, -2.0, 3.0, -3.0], dtype=torch.float64)
    old = torch.full((6,), -1.0, dtype=torch.float64)
    logprob = (old + ratios.log()).requires_grad_(True)
    loss, clipped = dreamer_ppo.ppo_objective(logprob, dict(logprobs=old), advantages, args)
    # -min(1.5, 1.2), -min(-1.5, -1.2), -min(1.0, 1.6), -min(-1.0, -1.6), -min(3.3, 3.3), -min(-3.3, -3.3)
    assert loss.tolist() == pytest.approx([-1.2, 1.5, -1.0, 1.6, -3.3, 3.3])
    assert clipped.tolist() == [True, True, True, True, False, False]
    loss.sum().backward()
    # d(-r A)/d log pi = -r A where the unclipped term is the minimum, 0 where the clipped one is
    assert logprob.grad.tolist() == pytest.approx([0.0, 1.5, -1.0, 0.0, -3.3, 3.3])


def test_ppo_update_follows_the_advantage(models):
    wm, agent = models
    args = tiny_args(update_epochs=4, agent_updates=2)
    batch = flat_batch(64, wm.feat_dim)
    batch["actions"][:] = 3
    batch["advantages"] = torch.ones(64)  # action 3 is better than expected everywhere
    opt = torch.optim.Adam(agent.parameters(), lr=1e-3)
    with torch.no_grad():
        before = agent.get_action_and_value(batch["states"], batch["actions"])[1].mean()
    stats = ppo_update(agent, opt, ReturnScale(args.return_scale_decay), batch, args.agent_updates, args, CPU)
    with torch.no_grad():
        after = agent.get_action_and_value(batch["states"], batch["actions"])[1].mean()
    assert after > before
    assert set(stats) == {"loss", "policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac",
                          "return_scale"}
    assert all(np.isfinite(v) for v in stats.values())
    assert 0 < stats["entropy"] <= math.log(NUM_ACTIONS) + 1e-6  # at most the uniform policy's
    assert stats["policy_loss"] < 0  # positive advantages, ratios near 1


def test_the_agent_optimizer_updates_as_one_adam(args, models):
    """make_agent_optimizer keeps the actor's parameters (first) and the critic's in two groups, for the Offline
    night's learning rates: the same PPO update as one Adam over all of them."""
    wm, agent = models
    _, twin = make_models(args)
    grouped, single = dreamer_ppo.make_agent_optimizer(agent, 1e-3), torch.optim.Adam(twin.parameters(), lr=1e-3)
    assert [list(group["params"]) for group in grouped.param_groups] == [list(agent.actor.parameters()),
                                                                         list(agent.critic.parameters())]
    batch = flat_batch(32, wm.feat_dim)
    for model, optimizer in ((agent, grouped), (twin, single)):
        torch.manual_seed(0)  # the same minibatches
        ppo_update(model, optimizer, ReturnScale(args.return_scale_decay), dict(batch), 2, args, CPU)
    _, start = make_models(args)
    for p, q in zip(agent.parameters(), twin.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-7)
    assert not torch.equal(agent.actor[0].weight, start.actor[0].weight)  # the update moved the actor


def test_ppo_zero_weights_do_not_train(args, models):
    wm, agent = models
    batch = flat_batch(16, wm.feat_dim)
    batch["weights"] = torch.zeros(16)
    batch["weights"][0] = 1.0
    opt = torch.optim.Adam(agent.parameters(), lr=1e-3)
    ppo_update(agent, opt, ReturnScale(args.return_scale_decay), dict(batch), 1, args, CPU)
    # only sample 0 counts: the same update from sample 0 alone gives the same agent
    _, agent2 = make_models(args)
    opt2 = torch.optim.Adam(agent2.parameters(), lr=1e-3)
    ppo_update(agent2, opt2, ReturnScale(args.return_scale_decay), {k: v[:1] for k, v in batch.items()}, 1, args, CPU)
    for p, q in zip(agent.parameters(), agent2.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_day_batch_smaller_than_minibatch_count_is_refused_or_works(models):
    # By day the PPO batch has day_steps samples split into agent_updates minibatches. With fewer samples than
    # minibatches either check_args refuses the flags or the update still works on the samples there are.
    wm, agent = models
    args = tiny_args(day_steps=10, num_envs=5, agent_updates=26)
    try:
        check_args(args)
    except SystemExit as e:
        assert "--day-steps" in str(e) or "--agent-updates" in str(e)
        return
    opt = torch.optim.Adam(agent.parameters(), lr=1e-3)
    stats = ppo_update(agent, opt, ReturnScale(args.return_scale_decay), flat_batch(args.day_steps, wm.feat_dim),
                       args.agent_updates, args, CPU)
    assert all(np.isfinite(v) for v in stats.values())


def test_train_agent_hands_gae_and_targets_to_ppo(args, models, monkeypatch):
    wm, agent = models
    T, N = 4, 3
    g = torch.Generator().manual_seed(0)
    conts = torch.ones(T, N)
    conts[1, 0] = 0.0  # environment 0's episode ends at step 1: d_1 = gamma c_2 = 0
    traj = dict(states=torch.randn(T, N, wm.feat_dim, generator=g), actions=torch.randint(NUM_ACTIONS, (T, N)),
                logprobs=torch.full((T, N), -math.log(NUM_ACTIONS)), values=torch.full((T, N), 2.0),
                next_values=torch.full((T, N), 2.0), rewards=torch.full((T, N), 1000.0), conts=conts,
                weights=torch.ones(T, N))
    seen = {}
    monkeypatch.setattr(dreamer_ppo, "ppo_update", lambda agent, opt, scale, batch, *a: seen.update(batch) or {})
    train_agent(agent, None, ReturnScale(0.99), traj, 0.5, args, CPU)
    # by hand, gamma = 0.5: delta = 1000 + 0.5 * 2 - 2 = 999 where the episode goes on, 1000 - 2 = 998 at its end
    lam = args.gae_lambda
    ended = [999 + 0.5 * lam * 998, 998.0, 999 + 0.5 * lam * 999, 999.0]
    going = [999 * sum((0.5 * lam) ** k for k in range(T - t)) for t in range(T)]
    expected_adv = torch.tensor([[e] + [o] * (N - 1) for e, o in zip(ended, going)])
    assert torch.allclose(seen["advantages"], expected_adv.flatten())
    assert torch.allclose(seen["targets"], (expected_adv + 2.0).flatten())  # V_target = A + v (Eq. 8)
    assert seen["states"].shape == (T * N, wm.feat_dim)


def test_ppo_update_divides_advantages_by_the_scale(args):
    # With the critic and entropy terms off, an update with advantages A and return targets whose
    # percentile range is p > 1 moves the actor exactly as one with advantages A / p and P <= 1.
    args = dataclasses.replace(args, vf_coef=0.0, ent_coef=0.0, update_epochs=1)
    batch = flat_batch(32, make_models(args)[1].actor[0].in_features)
    batch["targets"] = torch.linspace(0.0, 100.0, 32)
    p = (torch.quantile(batch["targets"], 0.95) - torch.quantile(batch["targets"], 0.05)).item()
    actors = []
    for advantages, targets in ((batch["advantages"], batch["targets"]), (batch["advantages"] / p, batch["targets"] / p)):
        torch.manual_seed(0)
        _, agent = make_models(args)
        opt = torch.optim.SGD(agent.parameters(), lr=0.1)
        stats = ppo_update(agent, opt, ReturnScale(0.0), dict(batch, advantages=advantages, targets=targets), 1,
                           args, CPU)
        actors.append([q.detach().clone() for q in agent.actor.parameters()])
    assert stats["return_scale"] == 1.0  # targets / p have a percentile range of 1
    for a, b in zip(*actors):
        assert torch.allclose(a, b, atol=1e-6)
    assert any(not torch.allclose(a, q) for a, q in zip(actors[0], make_models(args)[1].actor.parameters()))


# %% dreams
def test_random_initial_states(args, models):
    wm, _ = models
    torch.manual_seed(0)
    with torch.no_grad():
        h, z = random_initial_states(wm, 7)
    assert h.shape == (7, args.rnn_units)
    assert z.shape == (7, args.categoricals, args.classes)
    assert is_onehot(z)
    assert (h.std(0) > 0).any() and not torch.allclose(h[0], h[1])


def test_imagine_shapes_weights_and_values(args, models):
    wm, agent = models
    H, N = 5, 6
    torch.manual_seed(0)
    with torch.no_grad():
        h, z = random_initial_states(wm, N)
    traj, stats = imagine(wm, agent, h, z, H, args)
    for key in ("actions", "logprobs", "values", "rewards", "conts", "weights", "next_values"):
        assert traj[key].shape == (H, N), key
    assert traj["states"].shape == (H, N, wm.feat_dim)
    assert torch.equal(traj["states"][0], state_features(h, z))
    assert ((traj["actions"] >= 0) & (traj["actions"] < NUM_ACTIONS)).all()
    assert (traj["logprobs"] <= 0).all()
    assert ((traj["conts"] >= 0) & (traj["conts"] <= 1)).all()
    assert (traj["weights"][0] == 1).all()
    assert (traj["weights"][1:] <= traj["weights"][:-1]).all()
    assert torch.allclose(traj["weights"][1:], traj["conts"][:-1].cumprod(0))
    assert torch.equal(traj["next_values"][:-1], traj["values"][1:])
    # the reward and continuation of step t are predicted from the next dream state
    with torch.no_grad():
        reward, cont = wm.heads(traj["states"][1:])
        assert torch.allclose(reward, traj["rewards"][:-1], atol=1e-6)
        assert torch.allclose(cont, traj["conts"][:-1], atol=1e-6)
        assert torch.allclose(agent.value(traj["states"]), traj["values"], atol=1e-6)
    # every dream state is a valid latent
    assert is_onehot(traj["states"][..., args.rnn_units:].reshape(H, N, args.categoricals, args.classes))
    assert stats["transformed_frac"] == 0 and stats["value_move"] == 0.0
    assert stats["reward_mean"] == pytest.approx(traj["rewards"].mean().item())
    assert stats["cont_mean"] == pytest.approx(traj["conts"].mean().item())


def test_imagine_does_not_train_the_world_model(args, models):
    wm, agent = models
    with torch.no_grad():
        h, z = random_initial_states(wm, 4)
    traj, _ = imagine(wm, agent, h, z, 3, args)
    assert not any(v.requires_grad for v in traj.values())


def test_collected_initial_states(args, models, coinrun_dataset, monkeypatch):
    """One state from each of n uniformly drawn sequences, the last of burn_in + 1 filtered steps: states with a
    memory (h != 0), not the h = 0 states at the start of a few sequences."""
    wm, _ = models
    drawn = []
    sample = coinrun_dataset.sample
    monkeypatch.setattr(coinrun_dataset, "sample", lambda *a: drawn.append((a, sample(*a))) or drawn[-1][1])
    np.random.seed(0)
    torch.manual_seed(0)
    with torch.no_grad():
        h, z = dreamer_ppo.collected_initial_states(wm, coinrun_dataset, 10, args)
    assert h.shape == (10, args.rnn_units) and z.shape == (10, args.categoricals, args.classes)
    assert is_onehot(z)
    (call, batch), = drawn
    assert call == (10, args.burn_in + 1, 0.0)
    torch.manual_seed(0)
    with torch.no_grad():
        hs, zs, *_ = wm.observe(*(torch.as_tensor(batch[k]) for k in ("obs", "actions", "conts", "is_first")))
    assert torch.equal(h, hs[:, -1]) and torch.equal(z, zs[:, -1])
    started_there = torch.as_tensor(batch["is_first"][:, -1])
    assert (h.abs().sum(1) > 0).tolist() == (~started_there).tolist()


class ResetCounter:
    """A world-model stand-in for collected_initial_states: a window's "state" h counts the episode starts inside its
    burn-in (after its first step), where a real h would have been reset."""
    bins = torch.zeros(1)

    def observe(self, obs, actions, conts, is_first):
        resets = is_first[:, 1:].cumsum(1).float()
        return torch.cat([torch.zeros_like(resets[:, :1]), resets], 1)[..., None], torch.zeros(*is_first.shape, 1, 1)


def test_collected_initial_states_rarely_start_just_after_a_reset():
    # Episodes of 60-400 steps that all end on a non-zero reward (coinrun and caveflyer with the paper's penalty).
    # Drawn as the world model's batches are (half of them around a reward, the reward 1-L steps back), the last state
    # of a window sits just after the next episode's start: its burn-in holds a reset, its h a short memory. Uniform
    # windows hold one only about burn_in / (mean episode length) of the time.
    rng = np.random.RandomState(0)
    num_envs, steps, burn_in = 2, 6000, 25
    dataset = ReplayDataset(num_envs, steps)
    ends = [set(np.cumsum(rng.randint(60, 401, size=steps // 60)) - 1) for _ in range(num_envs)]
    starts = [{0} | {t + 1 for t in e} for e in ends]
    for t in range(steps):
        end = np.array([t in e for e in ends])
        dataset.add(obs=0, actions=np.zeros(num_envs), rewards=np.where(end, 10.0, 0.0), conts=1.0 - end,
                    is_first=np.array([t in s for s in starts]), logprobs=np.zeros(num_envs))
    args = tiny_args(burn_in=burn_in)
    np.random.seed(0)
    h, _ = dreamer_ppo.collected_initial_states(ResetCounter(), dataset, 4000, args)
    uniform_rate = (h[:, 0] > 0).float().mean().item()
    prioritised = dataset.sample(4000, burn_in + 1, args.reward_seq_fraction)["is_first"][:, 1:]
    prioritised_rate = prioritised.any(1).mean()
    print(f"start states with a reset in their burn-in: {uniform_rate:.3f} uniform, {prioritised_rate:.3f} prioritised")
    assert 0.05 < uniform_rate < 0.16 and prioritised_rate > 0.4


def test_a_dreams_imagined_return_weighs_its_rewards_by_the_predicted_continuation(args, models, monkeypatch):
    # Every dream step predicts reward 2 and continuation 0.5: a dream of H steps is still going at step t with
    # chance 0.5^t, and its imagined return is 2 (1 + 0.5 + ... + 0.5^(H-1)).
    wm, agent = models
    monkeypatch.setattr(wm, "heads", lambda feat: (torch.full(feat.shape[:-1], 2.0), torch.full(feat.shape[:-1], 0.5)))
    with torch.no_grad():
        h, z = random_initial_states(wm, 6)
    _, stats = imagine(wm, agent, h, z, args.horizon, args)
    assert stats["return_mean"] == pytest.approx(2 * sum(0.5**t for t in range(args.horizon)))
