"""The world model (RSSM, loss of Eq. 1 with free bits), reward shaping and the replay dataset."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dreamer_ppo
from dreamer_ppo import ReplayDataset, reward_shaping, shape_reward
from conftest import CPU, crafted_dataset, is_onehot, random_batch, tiny_args
from test_loop import RecordingLog


# %% reward shaping
def test_shape_reward_penalty_only_on_unsuccessful_ends():
    penalty, scale = reward_shaping(tiny_args(env_id="coinrun"))
    assert (penalty, scale) == (-10.0, 1.0)
    reward = np.array([0.0, 10.0, 0.0, 0.0, 10.0], np.float32)
    done = np.array([False, True, True, False, False])
    # done with reward 10: success, no penalty; done with reward 0: -10; not done: the reward as is
    assert shape_reward(reward, done, penalty, scale).tolist() == [0.0, 10.0, -10.0, 0.0, 10.0]


def test_reward_shaping_defaults_per_game():
    assert reward_shaping(tiny_args(env_id="caveflyer")) == (-10.0, 1.0)
    assert reward_shaping(tiny_args(env_id="chaser")) == (0.0, 25.0)
    assert reward_shaping(tiny_args(env_id="plunder")) == (0.0, 1.0)
    assert reward_shaping(tiny_args(env_id="coinrun", penalty=-3.0, reward_scale=2.0)) == (-3.0, 2.0)
    penalty, scale = reward_shaping(tiny_args(env_id="chaser"))
    reward = np.array([0.0, 1.0, 0.04], np.float32)
    done = np.array([True, True, False])
    assert shape_reward(reward, done, penalty, scale) == pytest.approx([0.0, 25.0, 1.0])


# %% RSSM
def crafted_two_episodes():
    """Two sequences of 6 steps; in sequence 0 an episode ends at step 2 (c = 0 stored there) and the frame
    of step 3 is the next level's first."""
    batch = random_batch(2, 6, seed=5)
    batch["conts"][0, 2] = 0.0
    batch["is_first"][0, 3] = True
    return batch


def test_observe_shapes_and_reset_at_is_first(args, models):
    wm, _ = models
    batch = crafted_two_episodes()
    with torch.no_grad():
        hs, zs, posts, priors, trans = wm.observe(batch["obs"], batch["actions"], batch["conts"], batch["is_first"])
    R, C, J = args.rnn_units, args.categoricals, args.classes
    assert hs.shape == (2, 6, R) and zs.shape == (2, 6, C, J)
    assert posts.shape == priors.shape == (2, 6, C, J)
    assert trans.shape == (2, 5, R + C * J) and wm.feat_dim == R + C * J
    assert is_onehot(zs)
    # h = 0 at the start of every sequence and right after the episode end, nowhere else
    assert (hs[:, 0] == 0).all()
    assert (hs[0, 3] == 0).all()
    for b, t in [(0, 1), (0, 2), (0, 4), (0, 5), (1, 1), (1, 2), (1, 3), (1, 4), (1, 5)]:
        assert hs[b, t].abs().sum() > 0, (b, t)
    # at the first step of an episode the prior is p(z | h = 0), like at t = 0
    assert torch.allclose(priors[0, 3], priors[0, 0])
    assert torch.allclose(priors[0, 0], wm.prior(wm.initial(1))[0])
    # the transition features are (h_t, z_t) of steps 1..T-1 except into a new episode, where h is the
    # recurrent state before the reset (what led to the end) and z comes from the prior
    for b, t in [(0, 1), (0, 2), (0, 4), (0, 5), (1, 3), (1, 5)]:
        assert torch.equal(trans[b, t - 1], torch.cat([hs[b, t], zs[b, t].flatten()])), (b, t)
    assert trans[0, 2, :R].abs().sum() > 0
    assert is_onehot(trans[0, 2, R:].reshape(C, J))


def test_observe_new_episode_does_not_depend_on_the_previous_one(models):
    wm, _ = models
    batch = crafted_two_episodes()
    with torch.no_grad():
        _, _, posts, _, _ = wm.observe(batch["obs"], batch["actions"], batch["conts"], batch["is_first"])
        rest = {k: v[:, 3:] for k, v in batch.items()}
        _, _, posts_rest, _, _ = wm.observe(rest["obs"], rest["actions"], rest["conts"], rest["is_first"])
    # posterior at the reset step = posterior of the same frame at the start of a sequence
    assert torch.allclose(posts[0, 3], posts_rest[0, 0], atol=1e-6)
    assert not torch.allclose(posts[1, 3], posts_rest[1, 0], atol=1e-6)  # no reset in sequence 1


def test_filter_step_resets_on_is_first(args, models):
    wm, _ = models
    obs = random_batch(3, 1, seed=2)["obs"][:, 0]
    h, z = torch.randn(3, args.rnn_units), torch.zeros(3, args.categoricals, args.classes)
    with torch.no_grad():
        h2, z2 = wm.filter_step(h, z, torch.tensor([1, 2, 3]), obs, torch.tensor([True, False, True]))
    assert (h2[0] == 0).all() and (h2[2] == 0).all() and h2[1].abs().sum() > 0
    assert is_onehot(z2) and z2.shape == (3, args.categoricals, args.classes)


def set_latent_output(net, bias):
    """Make a latent head (prior_net or post_net) output the constant logits `bias` whatever its input."""
    torch.nn.init.zeros_(net[-1].weight)
    with torch.no_grad():
        net[-1].bias.copy_(bias)


def test_free_bits_through_the_loss(args, models):
    wm, _ = models
    batch = random_batch(2, 4, seed=1)
    # uniform prior and posterior: KL = 0 < 1 nat, so both terms are exactly free_nats with no gradient
    set_latent_output(wm.prior_net, torch.zeros(args.categoricals * args.classes))
    set_latent_output(wm.post_net, torch.zeros(args.categoricals * args.classes))
    loss, metrics, _ = wm.loss(batch, args)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["dyn_loss"] == metrics["rep_loss"] == args.free_nats == 1.0
    loss.backward()
    assert all(p.grad is None or (p.grad == 0).all() for p in wm.prior_net.parameters())

    # a peaked posterior (logits 10, 0, 0, 0 in each categorical) against the uniform prior: by hand,
    # p = 0.99 softmax + 0.01 / 4 and KL = C * sum_j p_j ln(p_j / (1/4)) > 1 nat
    wm.zero_grad()
    set_latent_output(wm.post_net, torch.tensor([10.0, 0.0, 0.0, 0.0] * args.categoricals))
    e = [math.exp(10), 1.0, 1.0, 1.0]
    p = [0.99 * v / sum(e) + 0.01 / 4 for v in e]
    expected = args.categoricals * sum(pj * math.log(pj * 4) for pj in p)
    assert expected > 1
    loss, metrics, _ = wm.loss(batch, args)
    assert metrics["dyn_loss"] == pytest.approx(expected, rel=1e-4)
    assert metrics["rep_loss"] == pytest.approx(expected, rel=1e-4)
    loss.backward()
    assert sum(p.grad.abs().sum() for p in wm.prior_net.parameters()) > 0


def test_transition_into_a_new_episode_takes_z_from_the_prior(args, models):
    # With uniform latents the KL terms are clamped (no gradient), so the prior can only get a gradient from
    # the transition into a new episode, whose z is sampled from the prior (straight-through) for the heads.
    wm, _ = models
    set_latent_output(wm.prior_net, torch.zeros(args.categoricals * args.classes))
    set_latent_output(wm.post_net, torch.zeros(args.categoricals * args.classes))
    loss, metrics, _ = wm.loss(crafted_two_episodes(), args)
    assert metrics["dyn_loss"] == metrics["rep_loss"] == 1.0
    loss.backward()
    assert sum(p.grad.abs().sum() for p in wm.prior_net.parameters() if p.grad is not None) > 0


def test_loss_metrics_combine_as_eq1(args, models):
    wm, _ = models
    loss, m, (hs, zs) = wm.loss(random_batch(2, 5, seed=4), args)
    total = m["image_loss"] + m["reward_loss"] + m["cont_loss"] + args.beta_dyn * m["dyn_loss"] \
        + args.beta_rep * m["rep_loss"]
    assert m["loss"] == pytest.approx(total, rel=1e-5)
    assert loss.item() == pytest.approx(total, rel=1e-5)
    assert hs.shape == (2, 5, args.rnn_units) and not hs.requires_grad and not zs.requires_grad
    # the reward head starts at zero: uniform logits, CE = ln K
    assert m["reward_loss"] == pytest.approx(math.log(args.bins), rel=1e-5)
    # the image loss sums over the 3 x 64 x 64 pixels
    assert m["image_loss"] > 100


def argmax_onehot(probs, generator=None):
    """sample_onehot with the sample replaced by the most likely class: deterministic, whatever the RNG."""
    return F.one_hot(probs.argmax(-1), probs.shape[-1]).to(probs.dtype) + (probs - probs.detach())


def plain_loss(wm, batch, args):
    """Eq. 1 written plainly, step by step: the prior and the posterior's whole first layer inside the recurrence,
    a prior sample for every row at every step, the frames preprocessed twice, the decoder fed NCHW, the KL
    computed three times. The loss and its metrics."""
    obs, actions, is_first = batch["obs"], batch["actions"], batch["is_first"]
    B, T = actions.shape
    embed = wm.encoder(obs)
    h0 = wm.initial(B)
    prior0 = wm.prior(h0[:1])
    h, z = h0, None
    hs, zs, posts, priors, trans = [], [], [], [], []
    for t in range(T):
        first = is_first[:, t].reshape(B, 1) | (t == 0)
        h_trans = h if t == 0 else wm.recurrent(h, z, actions[:, t - 1])
        prior_trans = wm.prior(h_trans)
        h = torch.where(first, h0, h_trans)
        priors.append(torch.where(first.unsqueeze(-1), prior0, prior_trans))
        posts.append(wm.posterior(h, embed[:, t]))
        z = dreamer_ppo.sample_onehot(posts[-1])
        if t > 0:
            z_trans = torch.where(first.unsqueeze(-1), dreamer_ppo.sample_onehot(prior_trans), z)
            trans.append(torch.cat([h_trans, z_trans.flatten(1)], -1))
        hs.append(h)
        zs.append(z)
    hs, zs, post, prior = (torch.stack(x, 1) for x in (hs, zs, posts, priors))
    trans = torch.stack(trans, 1) if trans else hs[:, :0, :0]  # (no transition in a sequence of one step)
    feat = torch.cat([hs, zs.flatten(2)], -1).flatten(0, 1)
    decoded = wm.decoder.deconvs(wm.decoder.linear(feat).reshape(-1, wm.decoder.depth * 8, 4, 4))
    image = ((decoded.reshape(B, T, 3, 64, 64) - dreamer_ppo.preprocess(obs)) ** 2).sum((-3, -2, -1)).mean()
    if trans.shape[1]:
        reward = dreamer_ppo.twohot_loss(wm.reward_head(trans), batch["rewards"][:, :-1], wm.bins).mean()
        cont = F.binary_cross_entropy_with_logits(wm.cont_head(trans).squeeze(-1), batch["conts"][:, :-1])
    kl = dreamer_ppo.categorical_kl
    dyn = kl(post.detach(), prior).clamp(min=args.free_nats).mean()
    rep = kl(post, prior.detach()).clamp(min=args.free_nats).mean()
    if not trans.shape[1]:
        return dict(image_loss=image, dyn_loss=dyn, rep_loss=rep, kl=kl(post, prior).mean())
    loss = image + reward + cont + args.beta_dyn * dyn + args.beta_rep * rep
    return dict(loss=loss, image_loss=image, reward_loss=reward, cont_loss=cont, dyn_loss=dyn, rep_loss=rep,
                kl=kl(post, prior).mean())


@pytest.mark.parametrize("B, T, new_episode", [(2, 6, True), (3, 5, False)])
def test_loss_and_gradients_match_the_plain_formulation(args, models, monkeypatch, B, T, new_episode):
    # The update's faster paths (the posterior's embedding share and the priors outside the recurrence, a prior
    # sample only into a new episode, ...) compute the same loss and gradients as the plain formulation. Samples
    # are made deterministic: the faster path draws fewer of them, so the RNG could not line them up.
    wm, _ = models
    monkeypatch.setattr(dreamer_ppo, "sample_onehot", argmax_onehot)
    batch = crafted_two_episodes() if new_episode else random_batch(B, T, seed=3)
    batch["rewards"][:, 1] = 3.0  # a reward to predict: the reward head's loss has a gradient
    plain = plain_loss(wm, batch, args)
    plain["loss"].backward()
    plain_grads = {name: p.grad.clone() for name, p in wm.named_parameters()}
    wm.zero_grad()
    loss, metrics, _ = wm.loss(batch, args)
    loss.backward()
    assert metrics == pytest.approx({k: v.item() for k, v in plain.items()}, rel=1e-5)
    for name, p in wm.named_parameters():  # float32 sums in another order: within 1e-4 of each gradient's scale
        assert (p.grad - plain_grads[name]).abs().max() <= 1e-4 * plain_grads[name].abs().max(), name
    assert sum(g.abs().sum() for g in plain_grads.values()) > 0


def test_observe_matches_the_plain_formulation_on_one_step(args, models, monkeypatch):
    # Sequences of one step (collected initial states with --burn-in 0): no transition, z from the posterior.
    wm, _ = models
    monkeypatch.setattr(dreamer_ppo, "sample_onehot", argmax_onehot)
    batch = random_batch(3, 1, seed=6)
    plain = plain_loss(wm, batch, args)
    hs, zs, posts, priors, trans = wm.observe(batch["obs"], batch["actions"], batch["conts"], batch["is_first"])
    assert trans.shape == (3, 0, wm.feat_dim) and (hs == 0).all()
    kl = dreamer_ppo.categorical_kl(posts, priors).mean()
    assert kl.item() == pytest.approx(plain["kl"].item(), rel=1e-5)


def test_world_model_loss_goes_down_on_real_frames(args, coinrun_dataset):
    torch.manual_seed(0)
    np.random.seed(0)
    wm = dreamer_ppo.WorldModel(args, 15)
    opt = torch.optim.Adam(wm.parameters(), lr=1e-3)
    losses, images = [], []
    for _ in range(35):
        batch = dreamer_ppo.to_torch(coinrun_dataset.sample(args.wm_batch_size, args.seq_len, args.reward_seq_fraction),
                                     CPU)
        loss, metrics, _ = wm.loss(batch, args)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(wm.parameters(), args.wm_grad_clip)
        opt.step()
        losses.append(metrics["loss"])
        images.append(metrics["image_loss"])
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.8 * losses[0], losses
    assert np.mean(images[-5:]) < 0.8 * images[0], images


# %% replay dataset
def test_sample_sequences_are_contiguous(args):
    np.random.seed(0)
    batch = crafted_dataset().sample(64, args.seq_len, 0.5)
    assert batch["obs"].shape == (64, args.seq_len, 64, 64, 3) and batch["obs"].dtype == np.uint8
    assert batch["actions"].shape == batch["rewards"].shape == batch["is_first"].shape == (64, args.seq_len)
    assert (np.diff(batch["actions"], axis=1) == 1).all()
    assert (batch["logprobs"] == batch["logprobs"][:, :1]).all()  # one environment per sequence
    assert (batch["obs"][:, :, 0, 0, 0] == batch["actions"] % 256).all()


def test_sample_reward_fraction_one_holds_a_learnable_reward(args):
    np.random.seed(0)
    dataset = crafted_dataset()
    batch = dataset.sample(300, args.seq_len, 1.0)
    # r_{t+1} is stored at step t; the heads learn rewards[:, :-1]
    assert (np.abs(batch["rewards"][:, :-1]).max(1) > 0).all()
    # every reward that can be learnt from comes up (the one at the last stored step cannot)
    seen = {(int(batch["logprobs"][i, 0]), int(batch["actions"][i, t]))
            for i, t in zip(*np.nonzero(batch["rewards"][:, :-1]))}
    assert seen == {(0, 0), (1, 20), (2, 48)}


def test_sample_reward_fraction_share(args):
    np.random.seed(1)
    batch = crafted_dataset().sample(100, args.seq_len, 0.5)
    with_reward = (np.abs(batch["rewards"][:, :-1]).max(1) > 0).sum()
    assert with_reward >= 50
    # no reward at all: the fraction cannot be met, sampling still works
    empty = ReplayDataset(2, 20)
    for t in range(20):
        empty.add(obs=np.zeros((2, 64, 64, 3), np.uint8), actions=np.full(2, t), rewards=np.zeros(2),
                  conts=np.ones(2), is_first=np.zeros(2, bool), logprobs=np.zeros(2))
    assert empty.sample(10, 8, 1.0)["actions"].shape == (10, 8)


def test_dataset_grows_past_capacity_without_losing_data():
    dataset = crafted_dataset(num_envs=2, steps=37, capacity=3)
    assert dataset.size == 37
    state = dataset.steps()
    assert state["actions"].shape == (2, 37) and (state["actions"] == np.arange(37)).all()
    assert (state["obs"][:, :, 5, 5, 2] == np.arange(37)).all()
    assert state["rewards"][1, 20] == 5.0 and state["rewards"][0, 0] == 5.0
    assert state["is_first"][:, 0].all() and not state["is_first"][:, 1:].any()


def test_replay_on_disk_in_chunks_reloads_what_a_checkpoint_counts(tmp_path):
    """The day appends each epoch's new steps as a chunk; a resumed run reloads the steps its checkpoint counted,
    grows from there, and writes the chunks after that checkpoint again under their names."""
    full = crafted_dataset(num_envs=2, steps=30, capacity=30)
    dataset = crafted_dataset(num_envs=2, steps=30, capacity=30)
    for size in (10, 25, 25, 30):  # the ends of four epochs (the third added nothing); a checkpoint at 25
        dataset.size = size
        dreamer_ppo.save_new_steps(dataset, tmp_path)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["0000000000.pt", "0000000010.pt", "0000000025.pt"]
    resumed = ReplayDataset(2, 1)
    dreamer_ppo.load_steps(resumed, tmp_path, 25)
    assert resumed.size == resumed.saved == 25
    for key, value in full.steps().items():
        assert np.array_equal(resumed.steps()[key], value[:, :25]), key
    resumed.add(**{k: v[:, 25].numpy() for k, v in full.steps().items()})
    dreamer_ppo.save_new_steps(resumed, tmp_path)
    assert (resumed.steps()["actions"] == np.arange(26)).all()
    assert torch.load(tmp_path / "0000000025.pt")["actions"].shape[1] == 1  # the killed run's chunk, written again
    again = ReplayDataset(2, 1)
    dreamer_ppo.load_steps(again, tmp_path, 26)
    assert (again.steps()["actions"] == np.arange(26)).all()


def test_dreamerv3_gru_cell_by_hand():
    """DreamerV3's cell: LayerNorm on one bias-free linear map of (x, h), update gate's bias at -1. With the map
    at zero the normalised gates are 0: r = 0.5, candidate tanh(0) = 0, u = sigmoid(-1), so h' = (1 - u) h."""
    cell = dreamer_ppo.LayerNormGRUCell(3, 4)
    assert cell.linear.bias is None and isinstance(cell.norm, torch.nn.LayerNorm)
    x, h = torch.randn(5, 3), torch.randn(5, 4)
    torch.nn.init.zeros_(cell.linear.weight)
    assert torch.allclose(cell(x, h), (1 - torch.sigmoid(torch.tensor(-1.0))) * h)
    torch.nn.init.normal_(cell.linear.weight)
    parts = torch.nn.functional.layer_norm(torch.cat([x, h], -1) @ cell.linear.weight.T, (12,), eps=1e-3)
    r, c, u = torch.sigmoid(parts[:, :4]), parts[:, 4:8], torch.sigmoid(parts[:, 8:] - 1)
    assert torch.allclose(cell(x, h), u * torch.tanh(r * c) + (1 - u) * h, atol=1e-6)


def test_world_model_recurrence_is_the_layernorm_gru(args):
    wm = dreamer_ppo.WorldModel(args, 15)
    assert isinstance(wm.gru, dreamer_ppo.LayerNormGRUCell) and wm.gru.hidden_size == args.rnn_units


def test_layer_norms_use_dreamerv3s_epsilon(args, models):
    norms = [m for model in models for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) >= 10 and all(m.eps == 1e-3 for m in norms)


class Oracle:
    """A world-model stand-in that knows the data: a state h is (environment, step), read off a frame's stamp; it
    predicts the stored reward (times `reward_factor`), continuation and frame of its step, or (`wrong`) none of
    them."""

    def __init__(self, dataset, wrong=False, reward_factor=1.0):
        self.data, self.wrong = {k: torch.as_tensor(v) for k, v in dataset.data.items()}, wrong
        self.reward_factor = reward_factor

    def observe(self, obs, actions, conts, is_first, generator=None):
        return obs[..., 0, 0, :2].flip(-1).float(), torch.zeros(*obs.shape[:2], 2, 2), None, None, None

    def recurrent(self, h, z, action):
        return h + torch.tensor([0.0, 1.0])

    def prior(self, h):
        return torch.full((len(h), 2, 2), 0.5)

    def lookup(self, feat):
        return feat[..., 0].long(), feat[..., 1].long()

    def heads(self, feat):
        env, t = self.lookup(feat)
        reward, cont = self.data["rewards"][env, t - 1], self.data["conts"][env, t - 1]  # r_t, c_t stored at t - 1
        return (torch.zeros_like(reward), 1 - cont) if self.wrong else (self.reward_factor * reward, cont)

    def decoder(self, feat):
        env, t = self.lookup(feat)
        image = dreamer_ppo.preprocess(self.data["obs"][env, t])
        return torch.zeros_like(image) if self.wrong else image


class ImageLog(RecordingLog):
    def __init__(self):
        super().__init__()
        self.writer, self.images = self, []

    def add_image(self, tag, image, step):
        self.images.append((tag, tuple(image.shape), step))


def stamped_dataset(num_envs=2, steps=120):
    """Frames stamped with their step (and environment), a reward of 2 every third step, an episode end every 11th."""
    dataset = ReplayDataset(num_envs, steps)
    rng = np.random.RandomState(0)
    for t in range(steps):
        obs = rng.randint(0, 256, (num_envs, 64, 64, 3)).astype(np.uint8)
        obs[:, 0, 0, :2] = np.stack([np.full(num_envs, t), np.arange(num_envs)], 1)
        dataset.add(obs=obs, actions=np.zeros(num_envs), rewards=np.full(num_envs, 2.0 if t % 3 == 0 else 0.0),
                    conts=np.full(num_envs, 0.0 if t % 11 == 10 else 1.0), is_first=np.full(num_envs, t % 11 == 0),
                    logprobs=np.zeros(num_envs))
    return dataset


@pytest.mark.parametrize("wrong", [False, True])
def test_open_loop_metrics_of_a_perfect_and_a_wrong_model(wrong):
    # Half of the windows hold an event (a reward or an end) in their horizon; all count for the recalls.
    dataset = stamped_dataset()
    args = tiny_args(wm_batch_size=16, burn_in=3, horizon=5, dream_images_every=1)
    log = ImageLog()
    dreamer_ppo.open_loop(Oracle(dataset, wrong), dataset, 0, args, CPU, log, 700, 1)
    logged = {tag.removeprefix("openloop/"): value for tag, step, value in log.points if step == 700}
    ks = ("", "_1", "_2", "_4", "_5")
    assert {f"{m}{k}" for m in ("reward_error", "cont_accuracy", "image_mse") for k in ks} <= set(logged)
    assert logged["rewards_seen"] > 0 and logged["ends_seen"] > 0
    expected = (dict(reward_recall=0.0, end_recall=0.0, cont_accuracy=0.0) if wrong else
                dict(reward_error=0.0, reward_recall=1.0, end_recall=1.0, cont_accuracy=1.0, image_mse=0.0))
    assert {k: logged[k] for k in expected} == pytest.approx(expected)
    if wrong:
        assert logged["reward_error"] > 0.3 and logged["image_mse"] > 0.05
    assert log.images == [("openloop/truth_prediction_error", (3, 6 * 64, 5 * 64), 700)]


@pytest.mark.parametrize("factor, recall", [(0.6, 1.0), (0.4, 0.0), (1.4, 1.0), (1.6, 0.0)])
def test_open_loop_recalls_a_reward_predicted_within_half_of_it(factor, recall):
    # A reward r counts as recalled where the prediction is off by less than |r| / 2: 0.6 r and 1.4 r are; 0.4 r and
    # 1.6 r are not, though they are nearer to r than 0 is.
    dataset = stamped_dataset()
    args = tiny_args(wm_batch_size=16, burn_in=3, horizon=5, dream_images_every=0)
    log = RecordingLog()
    dreamer_ppo.open_loop(Oracle(dataset, reward_factor=factor), dataset, 0, args, CPU, log, 700, 1)
    logged = {tag.removeprefix("openloop/"): value for tag, _, value in log.points}
    assert logged["rewards_seen"] > 0
    assert logged["reward_recall"] == recall
    assert logged["reward_error"] > 0 and logged["end_recall"] == 1.0


def test_open_loop_recalls_count_windows_drawn_around_the_rare_events():
    # One reward (ending its episode) in 200 steps of each environment: uniform windows would hardly ever hold it in
    # their horizon; the windows drawn around the events do, so every recall has its support.
    num_envs, steps = 2, 200
    dataset = ReplayDataset(num_envs, steps)
    for t in range(steps):
        obs = np.zeros((num_envs, 64, 64, 3), np.uint8)
        obs[:, 0, 0, :2] = np.stack([np.full(num_envs, t), np.arange(num_envs)], 1)
        dataset.add(obs=obs, actions=np.zeros(num_envs), rewards=np.full(num_envs, 10.0 * (t == 120)),
                    conts=np.full(num_envs, float(t != 120)), is_first=np.full(num_envs, t in (0, 121)),
                    logprobs=np.zeros(num_envs))
    args = tiny_args(wm_batch_size=8, burn_in=3, horizon=5, dream_images_every=0)
    log = RecordingLog()
    dreamer_ppo.open_loop(Oracle(dataset), dataset, 0, args, CPU, log, 10, 1)
    logged = {tag: value for tag, _, value in log.points}
    assert logged["openloop/rewards_seen"] >= 8 and logged["openloop/ends_seen"] >= 8
    assert logged["openloop/reward_recall"] == logged["openloop/end_recall"] == 1.0


def test_every_layer_norm_computes_in_float32_under_autocast(models):
    # CUDA's autocast computes LayerNorm in float32, CPU's would in bf16: each of the model's LayerNorms (the GRU's
    # gates, the MLPs', the images' channels) gives the float32 result of its input on every device.
    wm, agent = models
    norms = [m for m in (*wm.modules(), *agent.modules()) if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) >= 10 and any(isinstance(m, dreamer_ppo.ChannelNorm) for m in norms)
    for norm in norms:
        shape = (3, norm.normalized_shape[0], 4, 4) if isinstance(norm, dreamer_ppo.ChannelNorm) else \
            (3, norm.normalized_shape[0])
        x = torch.randn(shape).bfloat16()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = norm(x)
        assert y.dtype == torch.float32 and torch.equal(y, norm(x.float()))
