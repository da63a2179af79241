"""Dreamer baseline: a world model learns from a little real ProcGen experience by day, then a PPO
agent keeps learning by night from plain dreams started at random (Eq. 2) or collected states.

Paper: "Do Agents Dream of Electric Sheep?" (Franceschelli & Musolesi), Sections 3-4, Algorithm 1,
Tables 1-2, Figures 3-4. Usage: python dreamer_ppo.py --env-id coinrun --seed 1
Where the paper is terse, the choices made (and why) are listed in CHOICES.md, beside this script.
"""

# %% imports
import concurrent.futures
import contextlib
import copy
import fcntl
import glob
import importlib.util
import itertools
import math
import os
import random
import shlex
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Annotated, Any, Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

try:  # gym's __init__ (imported by procgen) prints gym_notices' "Gym has been unmaintained" banner: drop only it
    import gym_notices.notices

    gym_notices.notices.notices.clear()
except ImportError:
    pass
from procgen import ProcgenEnv  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402


# %% hyperparameters
PROCGEN_GAMES = ("bigfish", "bossfight", "caveflyer", "chaser", "climber", "coinrun", "dodgeball", "fruitbot",
                 "heist", "jumper", "leaper", "maze", "miner", "ninja", "plunder", "starpilot")


@dataclass
class Hyperparameters:
    """The paper's hyperparameters (Tables 1-2); the run's own flags are `Args`, in the harness below."""

    # Environment (Section 5.1, Table 2)
    env_id: Literal[PROCGEN_GAMES] = "coinrun"
    """the ProcGen game (easy mode)"""
    num_levels: int = 200
    """N: training levels; tests use the full distribution (Section 5.1)"""
    start_level: int = 0
    """the first training level: the levels are start_level, ..., start_level + N - 1 (ProcGen's; the paper's: 0)"""
    num_envs: int = 5
    """parallelized environments (Table 2)"""
    test_repetitions: int = 5
    """test repetition (Table 2): each evaluation plays num_envs x test_repetitions test episodes"""
    penalty: Annotated[Optional[float], tyro.conf.arg(
        metavar="FLOAT", help_behavior_hint="(default: -10 on coinrun and caveflyer, 0 on the other games)")] = None
    """penalty for non-successful episodes (Table 2), 0 or below; the paper's -10 stalls small runs: use 0 there"""
    reward_scale: Annotated[Optional[float], tyro.conf.arg(
        metavar="FLOAT", help_behavior_hint="(default: 25 on chaser, 1 on the other games)")] = None
    """reward scaling factor (Table 2), positive"""

    # Algorithm 1 (Table 2)
    seed_episodes: int = 5
    """S: random seed episodes"""
    day_epochs: int = 200
    """E_d: day epochs"""
    wm_updates: int = 20
    """U_w: world-model update steps per day epoch"""
    day_steps: int = 5000
    """T_d: real steps per day epoch, over all environments"""
    wm_batch_size: int = 100
    """B_w: world batch size (sequences)"""
    seq_len: int = 25
    """L: sequence length"""
    reward_seq_fraction: float = 0.5
    """share of each world batch drawn around a non-zero reward (Section 4.2's prioritized sampling)"""
    night_epochs: int = 200
    """E_n: night epochs"""
    agent_updates: int = 26
    """U_a: update steps per night epoch (PPO minibatches per iteration, by day too)"""
    agent_batch_size: int = 12
    """B_a: agent batch size (dreams per minibatch; real sequences in the Offline script)"""
    horizon: int = 16
    """H: imagination horizon; the night's gamma is 1 - 1/H (Table 1)"""
    init_states: Literal["random", "collected"] = "random"
    """initial dream states: random (Eq. 2) or posterior states of collected data (Figure 3); Offline: no dreams"""
    burn_in: int = 25
    """steps filtered only to warm up (h, z) before a real state is used by night (collected initial states, the
    Offline night's sequences; not in the paper, = L)"""

    # Networks (Table 1)
    categoricals: int = 32
    """C: categorical latents"""
    classes: int = 32
    """J: classes per categorical"""
    rnn_units: int = 512
    """RNN hidden units (size of h)"""
    cnn_depth: int = 32
    """convolution filters [d, 2d, 4d, 8d] = [32, 64, 128, 256] for d = 32"""
    mlp_units: int = 512
    """linear units"""
    mlp_layers: int = 2
    """MLP layers"""
    bins: int = 255
    """K: reward/return bins, 2 or more"""
    bins_extreme: float = 20.0
    """bins extremes -20, +20 (in symlog space)"""
    unimix: float = 0.01
    """uniform share of the categorical latents (DreamerV3), in [0, 1)"""
    free_nats: float = 1.0
    """free bits: the KL terms are clipped below at this many nats (Section 3.1)"""
    beta_dyn: float = 0.5
    """beta_1: dynamics loss factor (Eq. 1)"""
    beta_rep: float = 0.1
    """beta_2: representation loss factor (Eq. 1)"""
    wm_grad_clip: float = 1000.0
    """world-model gradient clip (DreamerV3; the paper's 0.5 is PPO's)"""
    day_lr: float = 5e-4
    """learning rate during day (Adam, world model and agent)"""
    night_lr: float = 1e-4
    """learning rate at night (Adam, agent)"""

    # PPO (Table 1, Eqs. 6-9)
    day_gamma: float = 0.99
    """gamma during day (GAE)"""
    gae_lambda: float = 0.95
    """lambda (GAE, Eq. 9)"""
    clip_coef: float = 0.2
    """epsilon: PPO clip factor (Eq. 7)"""
    vf_coef: float = 0.5
    """c_v: critic loss factor (Eq. 6)"""
    ent_coef: float = 0.001
    """c_e: entropy loss factor (Eq. 6)"""
    max_grad_norm: float = 0.5
    """PPO gradient clip factor"""
    update_epochs: int = 4
    """PPO iterations"""
    return_scale_decay: float = 0.99
    """decay of P, the EMA of the 5th-95th percentile range of returns (Section 4.2)"""

    # %% transformation args
    # (none: the Dreamer baseline leaves its dreams as they are)


# %% environment
def make_env(env_id, num_envs, num_levels, seed, start_level=0):
    """ProcGen, easy mode, auto-resetting (the frame returned with `done` starts the next level); num_levels=0: all."""
    return ProcgenEnv(num_envs=num_envs, env_name=env_id, num_levels=num_levels, start_level=start_level,
                      distribution_mode="easy", rand_seed=seed)


def reward_shaping(args):
    """(penalty, scale) of Table 2 for this game, unless set by flag."""
    penalty = args.penalty if args.penalty is not None else (-10.0 if args.env_id in ("coinrun", "caveflyer") else 0.0)
    scale = args.reward_scale if args.reward_scale is not None else (25.0 if args.env_id == "chaser" else 1.0)
    return penalty, scale


def shape_reward(reward, done, penalty, scale):
    """What the agent and world model learn from: the game's reward times `scale`, plus `penalty` on the
    last step of an episode that ends without a positive reward (a non-successful episode)."""
    return reward * scale + penalty * (done & (reward <= 0))


# %% maths
def symlog(x):
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x):
    return torch.sign(x) * torch.expm1(x.abs())


def twohot_encode(y, bins):
    """Two-hot encoding of symlog(y) on the bins: weights by linear distance to the two nearest bins,
    all weight on the edge bin beyond the extremes."""
    x = symlog(y).clamp(bins[0], bins[-1])
    pos = (x - bins[0]) / (bins[1] - bins[0])
    below = pos.floor().long().clamp(0, len(bins) - 1)
    above = (below + 1).clamp(max=len(bins) - 1)
    w_above = (pos - below).unsqueeze(-1)
    return F.one_hot(below, len(bins)) * (1 - w_above) + F.one_hot(above, len(bins)) * w_above


def twohot_decode(logits, bins):
    """The prediction of a two-hot head: symexp of the expected bin."""
    return symexp((logits.float().softmax(-1) * bins).sum(-1))


def twohot_loss(logits, y, bins):
    """Cross-entropy against sg(two-hot(symlog(y))) (Eq. 8)."""
    return -(twohot_encode(y, bins).detach() * logits.float().log_softmax(-1)).sum(-1)


def latent_probs(logits, unimix):
    """Categorical probabilities with a `unimix` share of uniform (DreamerV3): 0.99 softmax + 0.01 / J."""
    return (1 - unimix) * logits.float().softmax(-1) + unimix / logits.shape[-1]


def draw(probs, generator=None):
    """One class per row of probabilities [..., K]: torch.multinomial's draw (argmax of probs / E, E ~ Exp(1)),
    without its checks, which read the probabilities back (a GPU wait at every step: pytorch/pytorch#108968).
    `generator`: torch's global one (None), a torch.Generator, or [(generator, rows), ...] for consecutive rows."""
    probs = probs.detach()
    if not isinstance(generator, list):
        return (probs / torch.empty_like(probs, memory_format=torch.contiguous_format).exponential_(
            generator=generator)).argmax(-1)
    noise = [torch.empty(rows, *probs.shape[1:], device=probs.device).exponential_(generator=g)
             for g, rows in generator]
    return (probs / torch.cat(noise)).argmax(-1)


def one_hot(index, n):
    """F.one_hot(index, n) as floats, without its checks of the indices (which read them back on the CPU)."""
    return torch.zeros(*index.shape, n, device=index.device).scatter_(-1, index.long().unsqueeze(-1), 1.0)


def sample_onehot(probs, generator=None):
    """One-hot samples [..., C, J] with straight-through gradients (from `generator`, or torch's global one)."""
    return one_hot(draw(probs, generator), probs.shape[-1]).to(probs.dtype) + (probs - probs.detach())


def categorical_kl(p, q):
    """KL(p || q) of C categoricals [..., C, J], summed over the categoricals."""
    return (p * (p.log() - q.log())).sum((-2, -1))


class LayerNorm(nn.LayerNorm):
    """LayerNorm with DreamerV3's epsilon (1e-3), computed in float32 on every device (CUDA's autocast does so;
    CPU's would compute it in bf16): its output is float32."""

    def __init__(self, dim):
        super().__init__(dim, eps=1e-3)

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps)


def mlp(in_dim, out_dim, units, layers, zero_init=False):
    """`layers` Linear-LayerNorm-SiLU blocks and a linear output (Table 1)."""
    modules, dim = [], in_dim
    for _ in range(layers):
        modules += [nn.Linear(dim, units), LayerNorm(units), nn.SiLU()]
        dim = units
    out = nn.Linear(dim, out_dim)
    if zero_init:
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
    return nn.Sequential(*modules, out)


def native_bf16(device):
    """Whether `device` computes bf16 natively: CUDA, or a CPU with AVX512-BF16 or AMX (emulated, it is slower)."""
    cpu_has = (getattr(torch.cpu, f"_is_{name}_supported", lambda: False)() for name in ("avx512_bf16", "amx_tile"))
    return device.type == "cuda" or any(cpu_has)


def autocast(device, args):
    """bf16 mixed precision (the paper's) with --bf16 where the device computes bf16 natively; else fp32. Without
    torch's cache of cast weights: it is one for the whole process, and another thread's autocast (the background
    evaluation's) empties it in the middle of a step, which then sums its weights' gradients otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16 and native_bf16(device),
                          cache_enabled=False)


# %% world model
class ChannelNorm(LayerNorm):
    """LayerNorm over the channels of an image [N, C, H, W]."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def preprocess(obs):
    """uint8 frames [..., 64, 64, 3] -> floats [..., 3, 64, 64] in [-0.5, 0.5]."""
    return obs.float().div(255).sub(0.5).movedim(-1, -3)


class ConvEncoder(nn.Module):
    """Frames to embeddings: 4 convolutions (kernel 4, stride 2), filters [d, 2d, 4d, 8d] (Table 1)."""

    def __init__(self, depth):
        super().__init__()
        layers, channels = [], 3
        for mult in (1, 2, 4, 8):
            layers += [nn.Conv2d(channels, depth * mult, 4, 2, 1), ChannelNorm(depth * mult), nn.SiLU()]
            channels = depth * mult
        self.convs = nn.Sequential(*layers)
        self.out_dim = channels * 4 * 4

    def last_conv(self, image):
        """Activation of the last convolutional layer, q^LC of Eq. 4, for images [N, 3, 64, 64]."""
        return self.convs(image)

    def forward(self, obs):
        return self.embed(preprocess(obs))

    def embed(self, image):
        """Embeddings [..., out_dim] of preprocessed images [..., 3, 64, 64]."""
        return self.last_conv(image.reshape(-1, *image.shape[-3:])).reshape(*image.shape[:-3], -1)


class ConvDecoder(nn.Module):
    """Model states to images: a linear layer to 4x4x8d, then deconvolutions [4d, 2d, d, 3] (Table 1)."""

    def __init__(self, feat_dim, depth):
        super().__init__()
        self.depth = depth
        self.linear = nn.Linear(feat_dim, depth * 8 * 4 * 4)
        layers, channels = [], depth * 8
        for mult in (4, 2, 1):
            layers += [nn.ConvTranspose2d(channels, depth * mult, 4, 2, 1), ChannelNorm(depth * mult), nn.SiLU()]
            channels = depth * mult
        layers.append(nn.ConvTranspose2d(channels, 3, 4, 2, 1))
        self.deconvs = nn.Sequential(*layers)

    def forward(self, feat):
        x = self.linear(feat.reshape(-1, feat.shape[-1])).reshape(-1, self.depth * 8, 4, 4)
        # Channels-last, as ChannelNorm leaves every later layer's input: oneDNN's deconvolution is faster on it.
        x = x.contiguous(memory_format=torch.channels_last)
        return self.deconvs(x).reshape(*feat.shape[:-1], 3, 64, 64)


class LayerNormGRUCell(nn.Module):
    """DreamerV3's GRU cell (Table 1's layer normalization): h' = u * tanh(r * candidate) + (1 - u) * h, the
    gates from LayerNorm(W [x, h]), the update gate's bias at -1 (h changes slowly at first)."""

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.hidden_size = hidden_size
        self.linear = nn.Linear(input_size + hidden_size, 3 * hidden_size, bias=False)
        self.norm = LayerNorm(3 * hidden_size)

    def forward(self, x, h):
        reset, cand, update = self.norm(self.linear(torch.cat([x, h], -1))).chunk(3, -1)
        update = torch.sigmoid(update - 1)
        return update * torch.tanh(torch.sigmoid(reset) * cand) + (1 - update) * h


class WorldModel(nn.Module):
    """The RSSM of Section 3.1 with its heads. A model state is s = (h, z): h the GRU state, z the C
    one-hot categoricals (J classes each), flattened as feat = concat(h, z)."""

    def __init__(self, args, num_actions):
        super().__init__()
        self.C, self.J, self.num_actions = args.categoricals, args.classes, num_actions
        self.unimix = args.unimix
        z_dim = self.C * self.J
        self.encoder = ConvEncoder(args.cnn_depth)
        self.gru_in = nn.Sequential(nn.Linear(z_dim + num_actions, args.mlp_units),
                                    LayerNorm(args.mlp_units), nn.SiLU())
        self.gru = LayerNormGRUCell(args.mlp_units, args.rnn_units)
        self.prior_net = mlp(args.rnn_units, z_dim, args.mlp_units, 1)
        self.post_net = mlp(args.rnn_units + self.encoder.out_dim, z_dim, args.mlp_units, 1)
        self.feat_dim = args.rnn_units + z_dim
        self.reward_head = mlp(self.feat_dim, args.bins, args.mlp_units, args.mlp_layers, zero_init=True)
        self.cont_head = mlp(self.feat_dim, 1, args.mlp_units, args.mlp_layers)
        self.decoder = ConvDecoder(self.feat_dim, args.cnn_depth)
        self.register_buffer("bins", torch.linspace(-args.bins_extreme, args.bins_extreme, args.bins))

    def initial(self, n):
        """The state an episode starts from: h = 0 (z then comes from the first frame)."""
        return torch.zeros(n, self.gru.hidden_size, device=self.bins.device)

    def recurrent(self, h, z, action):
        """Recurrent model h_t = f(h_{t-1}, z_{t-1}, a_{t-1}); z [N, C, J], action [N] (or one-hot [N, A])."""
        if action.dim() == 1:
            action = one_hot(action, self.num_actions)
        return self.gru(self.gru_in(torch.cat([z.flatten(1), action], -1)).float(), h.float())

    def prior(self, h):
        """Transition predictor p(z_t | h_t): probabilities [..., C, J] for h [..., H]."""
        return latent_probs(self.prior_net(h).reshape(*h.shape[:-1], self.C, self.J), self.unimix)

    def posterior(self, h, embed):
        """Encoder model q(z_t | h_t, o_t): probabilities [N, C, J]."""
        return latent_probs(self.post_net(torch.cat([h, embed], -1)).reshape(-1, self.C, self.J), self.unimix)

    def heads(self, feat):
        """Reward r_t (decoded) and continuation probability c_t predicted from feat = (h_t, z_t)."""
        return twohot_decode(self.reward_head(feat), self.bins), torch.sigmoid(self.cont_head(feat).float()).squeeze(-1)

    def filter_step(self, h, z, prev_action, obs, is_first, generator=None):
        """One real step: the posterior state of frame `obs`, the agent's state s_t by day (Algorithm 1)."""
        first = is_first.reshape(-1, 1)
        h = torch.where(first, self.initial(len(obs)), self.recurrent(h, z, prev_action))
        z = sample_onehot(self.posterior(h, self.encoder(obs)), generator)
        return h, z

    def observe(self, obs, actions, conts, is_first, image=None, generator=None):
        """Per step of B sequences of T (step t: o_t, a_t, r_{t+1}, c_{t+1}): h, z, posterior, prior, and the features
        the heads learn r_t, c_t from (t >= 1), with z_t from the prior where a new episode starts, as in a dream."""
        B, T = actions.shape
        embed = self.encoder.embed(preprocess(obs) if image is None else image)
        first = is_first.clone()
        first[:, 0] = True
        h0 = self.initial(B)
        # The posterior's first layer W [h_t, e_t] + b = W_h h_t + (W_e e_t + b): the embeddings' share is computed
        # once for all B x T steps, as are the priors p(z_t | h_t) after the loop.
        w_h, w_e = self.post_net[0].weight.split([self.gru.hidden_size, embed.shape[-1]], 1)
        embed_shares = F.linear(embed, w_e, self.post_net[0].bias).unbind(1)
        h, z = h0, None
        hs, zs, posts, h_preds = [], [], [], []
        for t in range(T):
            h_pred = h0 if t == 0 else self.recurrent(h, z, actions[:, t - 1])  # f(h_{t-1}, z_{t-1}, a_{t-1})
            h = torch.where(first[:, t, None], h0, h_pred)
            post_logits = self.post_net[1:](F.linear(h, w_h) + embed_shares[t])
            post = latent_probs(post_logits.reshape(B, self.C, self.J), self.unimix)
            z = sample_onehot(post, generator)
            hs.append(h)
            zs.append(z)
            posts.append(post)
            h_preds.append(h_pred)
        hs, zs, posts, h_preds = (torch.stack(x, 1) for x in (hs, zs, posts, h_preds))
        prior_preds = self.prior(h_preds)
        priors = torch.where(first[:, :, None, None], self.prior(h0[:1]), prior_preds)
        # Into a new episode, the transition's z is sampled from the prior: only there.
        z_trans, new = zs[:, 1:].clone(), first[:, 1:]
        z_trans[new] = sample_onehot(prior_preds[:, 1:][new], generator)
        return hs, zs, posts, priors, torch.cat([h_preds[:, 1:], z_trans.flatten(2)], -1)

    def loss(self, batch, args):
        """Eq. 1: image MSE (summed over pixels) + reward two-hot CE + continue BCE
        + beta_1 max(1, KL(sg(post) || prior)) + beta_2 max(1, KL(post || sg(prior))), averaged over steps."""
        frames = preprocess(batch["obs"])
        hs, zs, post, prior, trans = self.observe(batch["obs"], batch["actions"], batch["conts"], batch["is_first"],
                                                  frames)
        feat = torch.cat([hs, zs.flatten(2)], -1)
        steps = batch["actions"].numel()  # B x T
        image = F.mse_loss(self.decoder(feat).float(), frames, reduction="sum") / steps  # summed over the pixels
        reward = twohot_loss(self.reward_head(trans), batch["rewards"][:, :-1], self.bins).mean()
        cont = F.binary_cross_entropy_with_logits(self.cont_head(trans).float().squeeze(-1), batch["conts"][:, :-1])
        kl = categorical_kl(post.detach(), prior)  # the value of KL(post || prior), its gradient to the prior only
        dyn = kl.clamp(min=args.free_nats).mean()
        rep = categorical_kl(post, prior.detach()).clamp(min=args.free_nats).mean()
        loss = image + reward + cont + args.beta_dyn * dyn + args.beta_rep * rep
        metrics = dict(loss=loss, image_loss=image, reward_loss=reward, cont_loss=cont, dyn_loss=dyn, rep_loss=rep,
                       kl=kl.mean())
        values = torch.stack(list(metrics.values())).tolist()  # one synchronisation with the GPU, not seven
        return loss, dict(zip(metrics, values)), (hs.detach(), zs.detach())


# %% dataset
class ReplayDataset:
    """The real experience D: one stream per environment, step t holding (o_t, a_t, r_{t+1}, c_{t+1}) as in
    Algorithm 1 (rewards shaped), is_first_t and the behaviour policy's log-probability of a_t; frames as uint8."""

    KEYS = ("obs", "actions", "rewards", "conts", "is_first", "logprobs")

    def __init__(self, num_envs, capacity):
        self.size = self.saved = 0  # the steps held, and those of them on disk (`save_new_steps`)
        self.data = dict(obs=np.zeros((num_envs, capacity, 64, 64, 3), np.uint8),
                         actions=np.zeros((num_envs, capacity), np.int64),
                         rewards=np.zeros((num_envs, capacity), np.float32),
                         conts=np.zeros((num_envs, capacity), np.float32),
                         is_first=np.zeros((num_envs, capacity), bool),
                         logprobs=np.zeros((num_envs, capacity), np.float32))

    def add(self, **step):
        """Append one step of every environment (arrays with a leading num_envs axis)."""
        if self.size == self.data["actions"].shape[1]:
            grow = max(1, self.size // 2)
            self.data = {k: np.concatenate([v, np.zeros_like(v[:, :grow])], 1) for k, v in self.data.items()}
        for key in self.KEYS:
            self.data[key][:, self.size] = step[key]
        self.size += 1

    def sample(self, batch_size, length, reward_fraction):
        """B sequences of `length` steps; a `reward_fraction` share of them holds a step whose (shaped)
        reward is non-zero, when there is one, so that the reward predictor sees rewards."""
        num_envs, last_start = self.data["actions"].shape[0], self.size - length
        envs = np.random.randint(num_envs, size=batch_size)
        starts = np.random.randint(last_start + 1, size=batch_size)
        rewarded_env, rewarded_t = np.nonzero(self.data["rewards"][:, : self.size - 1])
        n_rewarded = int(round(batch_size * reward_fraction)) if len(rewarded_t) else 0
        pick = np.random.randint(len(rewarded_t), size=n_rewarded) if n_rewarded else np.zeros(0, np.int64)
        envs[:n_rewarded] = rewarded_env[pick]
        # r_{t+1} is stored at step t and predicted at step t + 1 of the sequence.
        starts[:n_rewarded] = np.clip(rewarded_t[pick] + 1 - np.random.randint(1, length, size=n_rewarded),
                                      0, last_start)
        index = starts[:, None] + np.arange(length)
        return {k: v[envs[:, None], index] for k, v in self.data.items()}

    def steps(self, start=0):
        """Steps [start, size) of every environment as tensors (which torch.save writes raw, unlike numpy arrays)."""
        return {k: torch.from_numpy(np.ascontiguousarray(v[:, start: self.size])) for k, v in self.data.items()}


def to_torch(batch, device):
    return {k: torch.as_tensor(v, device=device) for k, v in batch.items()}


# %% agent
class Agent(nn.Module):
    """Actor pi_phi(a | s) and two-hot critic v_phi(s) on the model state s = (h, z) (Section 4.2)."""

    def __init__(self, feat_dim, num_actions, args):
        super().__init__()
        self.actor = mlp(feat_dim, num_actions, args.mlp_units, args.mlp_layers)
        self.critic = mlp(feat_dim, args.bins, args.mlp_units, args.mlp_layers, zero_init=True)
        self.register_buffer("bins", torch.linspace(-args.bins_extreme, args.bins_extreme, args.bins))

    def value(self, s):
        return twohot_decode(self.critic(s), self.bins)

    def get_action_and_value(self, s, action=None):
        """a ~ pi(. | s) (or `action`), log pi(a | s), entropy, critic logits, v(s): Categorical without its checks."""
        logits = self.actor(s).float()
        logits = logits - logits.logsumexp(-1, keepdim=True)  # log pi(. | s)
        probs = logits.softmax(-1)
        if action is None:
            action = draw(probs)
        logprob = logits.gather(-1, action.long().unsqueeze(-1)).squeeze(-1)
        entropy = -(logits.clamp(min=torch.finfo(logits.dtype).min) * probs).sum(-1)
        critic_logits = self.critic(s)
        return action, logprob, entropy, critic_logits, twohot_decode(critic_logits, self.bins)


def make_agent_optimizer(agent, lr):
    """Adam on the agent, the actor in param_groups[0], the critic in [1] (the Offline night sets their rates apart)."""
    return torch.optim.Adam([dict(params=agent.actor.parameters()), dict(params=agent.critic.parameters())], lr=lr)


def state_features(h, z):
    """The agent's input s = concat(h, z), detached: the agent never trains the world model."""
    return torch.cat([h, z.flatten(1)], -1).detach()


def gae(rewards, values, next_values, discounts, lam, cuts=None):
    """Eq. 9 over time-first tensors [T, N], d_t = gamma c_{t+1}: A_t = delta_t + lambda d_t A_{t+1}. Where cuts[t]
    is set (a transformed state follows), step t bootstraps from next_values[t] and takes nothing of A_{t+1}."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + discounts[t] * next_values[t] - values[t]
        if cuts is not None:
            last = torch.where(cuts[t], 0.0, last)
        last = delta + discounts[t] * lam * last
        advantages[t] = last
    return advantages


def stack_trajectory(steps, last_value):
    """Per-step lists to time-first float32 tensors [T, N, ...], with next_values[t] = v(s_{t+1}) (a dream's
    `bootstrap_values` when there are; the last from `last_value`)."""
    traj = {k: torch.stack(v) for k, v in steps.items()}
    traj = {k: v.float() if v.is_floating_point() else v for k, v in traj.items()}
    traj["next_values"] = torch.cat([traj.pop("bootstrap_values", traj["values"])[1:], last_value[None].float()])
    return traj


class ReturnScale:
    """P of Section 4.2 (DreamerV3): an EMA of the 5th-95th percentile range of the return targets, updated every
    minibatch; advantages are divided by max(1, P)."""

    def __init__(self, decay):
        self.decay, self.value = decay, 0.0

    def update(self, returns):
        low, high = torch.quantile(returns.float().flatten(), torch.tensor([0.05, 0.95], device=returns.device))
        self.value = self.decay * self.value + (1 - self.decay) * (high - low).item()
        return max(1.0, self.value)


def ppo_objective(logprob, mb, advantages, args):
    """PPO's clipped objective (Eq. 7) as a loss per sample, -min(r A, clip(r, 1 - eps, 1 + eps) A) with
    r = pi/pi_old, and whether each r lies beyond the clip."""
    ratio = (logprob - mb["logprobs"]).exp()
    pg_loss = -torch.min(ratio * advantages, ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef) * advantages)
    return pg_loss, (ratio - 1).abs() > args.clip_coef


def ppo_update(agent, optimizer, return_scale, batch, num_minibatches, args, device, objective=ppo_objective):
    """PPO (Eqs. 6-8): `update_epochs` passes over `num_minibatches` minibatches of the flat `batch`, advantages
    divided by max(1, P), each sample's loss weighted; a non-finite loss returns its terms before its step."""
    names = ("loss", "policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac")
    stats, scales = [], []
    for _ in range(args.update_epochs):
        for index in torch.randperm(len(batch["actions"]), device=device).chunk(num_minibatches):
            mb = {k: v[index] for k, v in batch.items()}
            scales.append(return_scale.update(mb["targets"]))
            with autocast(device, args):
                _, logprob, entropy, critic_logits, _ = agent.get_action_and_value(mb["states"], mb["actions"])
            logprob = logprob.float()
            pg_loss, clipped = objective(logprob, mb, mb["advantages"] / scales[-1], args)
            v_loss = twohot_loss(critic_logits, mb["targets"], agent.bins)
            w = mb["weights"] / mb["weights"].sum()
            loss = (w * (pg_loss + args.vf_coef * v_loss - args.ent_coef * entropy)).sum()
            with torch.no_grad():
                log_ratio = logprob - mb["logprobs"]  # pi / pi_old
                stats.append(torch.stack([loss, (w * pg_loss).sum(), (w * v_loss).sum(), (w * entropy).sum(),
                                          (log_ratio.exp() - 1 - log_ratio).mean(), clipped.float().mean()]))
            if not torch.isfinite(stats[-1]).all():  # no step from a non-finite loss: the caller names its terms
                return dict(zip(names, stats[-1].tolist()), return_scale=scales[-1])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            optimizer.step()
    return dict(zip(names, torch.stack(stats).mean(0).tolist()), return_scale=float(np.mean(scales)))


def train_agent(agent, optimizer, return_scale, traj, gamma, args, device):
    """GAE on a batch of trajectories (time-first), critic targets A + v (Eq. 8), then PPO. `traj` holds
    states, actions, logprobs, values, next_values, rewards, conts, weights."""
    advantages = gae(traj["rewards"], traj["values"], traj["next_values"], gamma * traj["conts"], args.gae_lambda,
                     traj.get("cuts"))
    batch = dict(states=traj["states"], actions=traj["actions"], logprobs=traj["logprobs"], advantages=advantages,
                 targets=advantages + traj["values"], weights=traj["weights"])
    return ppo_update(agent, optimizer, return_scale, {k: v.flatten(0, 1) for k, v in batch.items()},
                      args.agent_updates, args, device)


# %% dreams
def random_initial_states(wm, n):
    """Eq. 2: h_init ~ N(0, I), z_init uniform one-hot, a_init = 0; h_0 = f(h_init, z_init, a_init),
    z_0 ~ p(z | h_0)."""
    device = wm.bins.device
    h_init = torch.randn(n, wm.gru.hidden_size, device=device)
    z_init = F.one_hot(torch.randint(wm.J, (n, wm.C), device=device), wm.J).float()
    h = wm.recurrent(h_init, z_init, torch.zeros(n, wm.num_actions, device=device))
    return h, sample_onehot(wm.prior(h))


def collected_initial_states(wm, dataset, n, args):
    """Posterior states of real data (Figure 3), as DreamerV3 starts imagination: the last of n uniformly drawn
    windows of burn_in + 1 steps (no reward prioritisation), filtered to warm up (h, z)."""
    batch = to_torch(dataset.sample(n, args.burn_in + 1, 0.0), wm.bins.device)
    hs, zs, *_ = wm.observe(batch["obs"], batch["actions"], batch["conts"], batch["is_first"])
    return hs[:, -1], zs[:, -1]


def imagine(wm, agent, h, z, horizon, args, clock=None):
    """Dream `horizon` steps from (h, z) with the frozen world model: transform, a_t ~ pi(s_t),
    h_{t+1} = f(h_t, z_t, a_t), z_{t+1} ~ p(z | h_{t+1}), r_{t+1} and c_{t+1} from the heads (time-first tensors)."""
    keys = ("states", "actions", "logprobs", "values", "bootstrap_values", "rewards", "conts", "changed")
    traj = {k: [] for k in keys}
    moves = {k: [] for k in ("value_move", "h_move", "z_flip_frac")}
    clock = Stopwatch() if clock is None else clock
    for _ in range(horizon):
        h_in, z_in = h, z
        with clock("transformation"):
            h, z, changed = transform(h, z, wm, agent, args)  # with gradients: DeepDream and ValDiv climb them
        s = state_features(h, z)
        with torch.no_grad(), autocast(h.device, args):
            action, logprob, _, _, value = agent.get_action_and_value(s)
            # r_t and c_t were predicted from the untransformed state: the step before bootstraps from its value.
            bootstrap_value = value.clone()
            if changed.any():
                bootstrap_value[changed] = agent.value(state_features(h_in[changed], z_in[changed])).float()
                moves["value_move"].append((value[changed] - bootstrap_value[changed]).abs())
                moves["h_move"].append((h[changed] - h_in[changed]).abs().mean(1))
                moves["z_flip_frac"].append((z[changed].argmax(-1) != z_in[changed].argmax(-1)).float().mean(1))
            h = wm.recurrent(h, z, action)  # float32: the GRU's gates come from a float32 LayerNorm
            z = sample_onehot(wm.prior(h))
            reward, cont = wm.heads(state_features(h, z))
        for key, x in zip(keys, (s, action, logprob, value, bootstrap_value, reward, cont, changed)):
            traj[key].append(x)
    with torch.no_grad(), autocast(h.device, args):
        traj = stack_trajectory(traj, agent.value(state_features(h, z)))
    # A transformed state starts a new segment: the step before it takes nothing of its advantage (`gae`).
    changed = traj.pop("changed")
    traj["cuts"] = torch.cat([changed[1:], torch.zeros_like(changed[:1])])
    # The chance that the dream is still going at step t weighs that step's loss.
    traj["weights"] = torch.cat([torch.ones_like(traj["conts"][:1]), traj["conts"][:-1].cumprod(0)])
    # A dream's imagined return: its rewards weighed by the predicted chance that it is still going (undiscounted).
    stats = dict(return_mean=(traj["weights"] * traj["rewards"]).sum(0).mean().item(),
                 reward_mean=traj["rewards"].mean().item(), cont_mean=traj["conts"].mean().item(),
                 value_mean=traj["values"].mean().item(), transformed_frac=changed.float().mean().item(),
                 **{k: torch.cat(v).mean().item() if v else 0.0 for k, v in moves.items()})
    return traj, stats


# %% transformation
def check_transformation_args(args):
    """The Dreamer baseline has no transformation flags to check."""


def transform(h, z, wm, agent, args, force=False, generator=None):
    """Dreamer baseline: dream states stay as predicted. A transformation returns the new (h, z) and the mask of
    the states it changed (each with probability 1/H, all when `force`), drawing from `generator` (None: torch's)."""
    return h, z, torch.zeros(len(h), dtype=torch.bool, device=h.device)


# %% day
@dataclass
class DayState:
    """What the day's acting goes on from: the frames shown, each episode's first step, score so far, the agent's
    state (h, z) of the frame shown, and ProcGen's own state (`envs_state`, set in a checkpoint)."""
    obs: np.ndarray
    is_first: np.ndarray
    score: np.ndarray
    h: torch.Tensor
    z: torch.Tensor
    envs_state: Any = None


def day(args, wm, agent, wm_optimizer, agent_optimizer, return_scale, dataset, envs, device, run):
    """Algorithm 1 by day: S random seed episodes, then E_d epochs of U_w world-model updates, T_d real steps acting
    on posterior states and PPO on them. `run` (the harness) times the parts, logs, evaluates and checkpoints;
    resumed, the epochs after its position, from its `acting` state."""
    penalty, scale = reward_shaping(args)
    n = args.num_envs
    s = run.acting or play_seed_episodes(args, wm, dataset, envs, device)
    if s.envs_state is not None:
        envs.env.set_state(s.envs_state)
    s.h, s.z = s.h.to(device), s.z.to(device)
    if run.pos.epoch == 0:  # the model's predictions on the steps it has not trained on yet: the seed episodes'
        open_loop(wm, dataset, 0, args, device, run, 0, 1)
    for epoch in run.epochs("day"):
        with run.clock("world_model"):
            wm_stats = []
            for _ in range(args.wm_updates):
                batch = to_torch(dataset.sample(args.wm_batch_size, args.seq_len, args.reward_seq_fraction), device)
                with autocast(device, args):
                    loss, metrics, _ = wm.loss(batch, args)
                check_finite(metrics, "world-model", "day", epoch)  # before its step spoils the model
                wm_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(wm.parameters(), args.wm_grad_clip)
                wm_optimizer.step()
                wm_stats.append(metrics)
            wm_means = {k: float(np.mean([m[k] for m in wm_stats])) for k in wm_stats[0]}
        with run.clock("acting"):
            keys = ("states", "actions", "logprobs", "values", "rewards", "conts")
            traj, finished = {k: [] for k in keys}, []
            for _ in range(args.day_steps // n):
                states = state_features(s.h, s.z)
                with torch.no_grad(), autocast(device, args):
                    action, logprob, _, _, value = agent.get_action_and_value(states)
                action_np = action.cpu().numpy()
                next_obs, reward, done, _ = envs.step(action_np)
                shaped = shape_reward(reward, done, penalty, scale)
                dataset.add(obs=s.obs, actions=action_np, rewards=shaped, conts=1.0 - done, is_first=s.is_first,
                            logprobs=logprob.float().cpu().numpy())
                s.score += reward
                finished += list(s.score[done])
                s.score[done] = 0.0
                s.obs, s.is_first = next_obs["rgb"], done
                with torch.no_grad(), autocast(device, args):
                    s.h, s.z = wm.filter_step(s.h, s.z, action, torch.as_tensor(s.obs, device=device),
                                              torch.as_tensor(done, device=device))
                for key, x in zip(keys, (states, action, logprob, value, torch.as_tensor(shaped, device=device),
                                         torch.as_tensor(1.0 - done, device=device))):
                    traj[key].append(x)
            with torch.no_grad(), autocast(device, args):
                traj = stack_trajectory(traj, agent.value(state_features(s.h, s.z)))
            traj["weights"] = torch.ones_like(traj["rewards"])
        with run.clock("ppo"):
            stats = train_agent(agent, agent_optimizer, return_scale, traj, args.day_gamma, args, device)
        run.pos.step += args.day_steps
        with run.clock("diagnostics"):  # on this epoch's steps, which the next epoch trains on (before a checkpoint)
            if epoch < args.day_epochs:
                open_loop(wm, dataset, dataset.size - args.day_steps // n, args, device, run, run.pos.step, epoch + 1)
        charts = dict(wm_update_seconds=run.clock["world_model"] / args.wm_updates)
        if finished:
            charts["train_return"] = float(np.mean(finished))
        train = f"{charts['train_return']:.2f}" if finished else "-"
        run.end_epoch(f"train {train} wm_loss {wm_means['loss']:.1f}", acting=s, losses=stats, world_model=wm_means,
                      charts=charts)


def play_seed_episodes(args, wm, dataset, envs, device):
    """S episodes of random actions (at least L steps) into D, and the agent's state s_t of the frame then shown:
    from here on each real frame is filtered once."""
    penalty, scale = reward_shaping(args)
    n, num_actions = args.num_envs, envs.action_space.n
    obs, is_first = envs.reset()["rgb"], np.ones(n, bool)
    score, seed_steps, episodes = np.zeros(n), 0, 0
    while episodes < args.seed_episodes or dataset.size < args.seq_len:
        action = np.random.randint(num_actions, size=n)
        next_obs, reward, done, _ = envs.step(action)
        dataset.add(obs=obs, actions=action, rewards=shape_reward(reward, done, penalty, scale), conts=1.0 - done,
                    is_first=is_first, logprobs=np.full(n, -math.log(num_actions)))
        score += reward
        score[done] = 0.0
        obs, is_first, seed_steps, episodes = next_obs["rgb"], done, seed_steps + n, episodes + done.sum()
    with torch.no_grad(), autocast(device, args):
        h, z = wm.filter_step(wm.initial(n), torch.zeros(n, wm.C, wm.J, device=device),
                              torch.zeros(n, dtype=torch.long, device=device), torch.as_tensor(obs, device=device),
                              torch.ones(n, dtype=torch.bool, device=device))
    # The x-axis counts the real steps of the day epochs (E_d T_d = 1M at the paper's size), not the seed episodes'.
    print(f"{seed_steps:,} real steps of {episodes} seed episodes (random actions), not counted on the x-axis",
          flush=True)
    return DayState(obs, is_first, score, h, z)

# %% night
def night(args, wm, agent, agent_optimizer, return_scale, dataset, device, run):
    """Algorithm 1 by night: E_n epochs of B_a U_a dreams of H steps from the frozen world model and PPO on them
    (gamma = 1 - 1/H). `run` (the harness) times, logs, evaluates and checkpoints; resumed, the epochs after its
    position."""
    wm.requires_grad_(False)
    if run.pos.phase == "day":  # a resumed night keeps the learning rates restored with its optimizer
        for group in agent_optimizer.param_groups:
            group["lr"] = args.night_lr
    n = args.agent_batch_size * args.agent_updates
    for epoch in run.epochs("night"):
        with run.clock("dreaming"):
            with torch.no_grad(), autocast(device, args):
                if args.init_states == "random":
                    h, z = random_initial_states(wm, n)
                else:
                    h, z = collected_initial_states(wm, dataset, n, args)
            traj, dream_stats = imagine(wm, agent, h.float(), z.float(), args.horizon, args, run.clock)
        with run.clock("ppo"):
            stats = train_agent(agent, agent_optimizer, return_scale, traj, 1 - 1 / args.horizon, args, device)
        run.pos.step += n * args.horizon
        log_dream_images(wm, agent, traj["states"], args, run, run.pos.step, epoch)
        run.end_epoch(f"dream return {dream_stats['return_mean']:.2f}", losses=stats, dream=dream_stats)


def needs_replay(args):
    """Whether this night learns from the day's real data (replay/): only from collected initial states."""
    return args.init_states == "collected"

# %% run flags
# ===== The harness: run flags, checks, checkpoints and resume, logging, evaluation, diagnostics, main =====


@dataclass
class Args(Hyperparameters):
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (the script's name)"""
    seed: int = 1
    """seed of the experiment, in [0, 2^31) (a night goes on from its day's random states and shares its seed)"""
    torch_deterministic: bool = True
    """`torch.backends.cudnn.deterministic`"""
    cuda: bool = True
    """use CUDA when there is a GPU; CPU otherwise"""
    bf16: bool = True
    """the paper's mixed precision: bf16 autocast where the device computes bf16 natively (CUDA, a CPU with
    AVX512-BF16 or AMX), fp32 elsewhere; --no-bf16: fp32 everywhere"""
    track: bool = False
    """mirror TensorBoard to Weights & Biases (`pip install -e ".[wandb]"`; `wandb login` or WANDB_MODE=offline)"""
    wandb_project_name: str = "dreamer-ppo"
    """the Weights & Biases project"""
    wandb_entity: Optional[str] = None
    """the Weights & Biases entity (team)"""
    run_dir: Optional[str] = None
    """where the run writes (events, checkpoints, real data), refused when another run uses it or when it holds a
    run's events (unless --resume); default runs/{env_id}__{exp_name}[_collected][_night]__{seed}__{time}"""
    resume: bool = False
    """continue the run of --run-dir from its last checkpoint (start it when it has none): the same command with
    --resume added; the epochs after that checkpoint are redone (not in the paper)"""
    checkpoint_every: int = 10
    """write {run_dir}/checkpoint.pt (replacing the one before) every this many epochs, at the end of the day and
    of the night, and on SIGTERM or SIGUSR1 (then exit 75); 0: only at those ends (not in the paper)"""
    save_day: bool = False
    """write the end of the day to {run_dir}/day.pt and keep the real data in {run_dir}/replay/ (12.3 GB at the
    paper's size; deleted at the run's end otherwise), for nights run with --day-checkpoint"""
    day_checkpoint: Optional[str] = None
    """start from a day checkpoint written by any dreamer_ppo*.py script and run only the night"""
    eval_train_levels: bool = True
    """also evaluate on the N training levels every epoch, in the same batch as the test episodes
    (charts/train_levels_return, the generalization gap; not in the paper); --no-eval-train-levels saves that"""
    eval_overlap: bool = True
    """run each epoch's evaluation in a background thread, on a copy of the weights, while the next epoch trains
    (not in the paper: the same returns, logged at the epoch they belong to); --no-eval-overlap waits for it"""
    dream_images_every: int = 10
    """log images every this many epochs: by night decoded dream states before and after their transformation
    (Figure 2, for one's own runs; not in the Offline script), by day the open-loop prediction; 0 never"""
    capture_video: bool = False
    """record videos (CleanRL's flag; not in the paper; `pip install -e ".[video]"`) under {run_dir}/videos/ and in
    TensorBoard (and W&B): the evaluation's first test episodes, and the dreams and open-loop prediction in motion
    where --dream-images-every logs their images"""
    video_every: int = 10
    """with --capture-video, film the evaluation's test episodes every this many epochs and at each phase's end"""
    final_episodes: int = 500
    """the final evaluation at the end of each phase: this many test and as many training-level episodes on levels
    drawn from the seed alone, the same for a day and its nights (final/*, not in the paper); 0 skips it"""

# %% checks
POSITIVE = (lambda x: x >= 1, "a positive integer")
AT_LEAST_0 = (lambda x: x >= 0, "0 or more")
ABOVE_0 = (lambda x: x > 0, "positive, in (0, inf)")
# What each flag may take: (name, whether a value is allowed, the allowed values in words); NaN passes none.
CHECKS = [
    *[(name, *POSITIVE) for name in ("num_levels", "num_envs", "test_repetitions", "seed_episodes", "day_epochs",
                                     "wm_updates", "day_steps", "wm_batch_size", "agent_updates", "agent_batch_size",
                                     "horizon", "categoricals", "classes", "rnn_units", "cnn_depth", "mlp_units",
                                     "mlp_layers", "update_epochs", "video_every")],
    *[(name, *AT_LEAST_0) for name in ("night_epochs", "dream_images_every", "burn_in", "checkpoint_every",
                                       "final_episodes", "free_nats", "beta_dyn", "beta_rep", "vf_coef", "ent_coef")],
    *[(name, *ABOVE_0) for name in ("reward_scale", "bins_extreme", "wm_grad_clip", "day_lr", "night_lr",
                                    "max_grad_norm")],
    ("seed", lambda x: 0 <= x < 2**31, "in [0, 2^31) (ProcGen's seeds)"),
    ("start_level", lambda x: 0 <= x < 2**31, "in [0, 2^31) (ProcGen's levels)"),
    ("bins", lambda x: x >= 2, "2 or more (a two-hot target spreads over two neighbouring bins)"),
    ("seq_len", lambda x: x >= 2, "2 or more (a sequence needs a transition)"),
    ("penalty", lambda x: x <= 0, "in (-inf, 0]"),
    ("reward_seq_fraction", lambda x: 0 <= x <= 1, "in [0, 1]"),
    ("unimix", lambda x: 0 <= x < 1, "in [0, 1)"),
    ("day_gamma", lambda x: 0 < x <= 1, "in (0, 1]"),
    ("gae_lambda", lambda x: 0 <= x <= 1, "in [0, 1]"),
    ("clip_coef", lambda x: 0 < x < 1, "in (0, 1)"),
    ("return_scale_decay", lambda x: 0 <= x < 1, "in [0, 1)"),
]


class Refused(SystemExit):
    """Bad input, refused in one line before any work (exit 2, as tyro's own refusals)."""


def fail(flag, message):
    raise Refused(f"error: {flag}: {message}")


def check_values(args, checks):
    """Refuse a flag whose value its check refuses (a flag left at None takes its game's value)."""
    for name, allowed, words in checks:
        x = getattr(args, name)
        if x is not None and not allowed(x):
            fail("--" + name.replace("_", "-"), f"must be {words}, got {x}")


def check_args(args):
    """Refuse bad input before any work starts, naming the flag, its value and what is allowed (tyro refuses a
    choice outside a Literal's)."""
    check_values(args, CHECKS)
    per_env = args.day_steps // args.num_envs  # the steps each environment adds in a day epoch
    inside = os.path.join(args.day_checkpoint or "", "day.pt")
    for flag, bad, message in [
        ("--day-steps", args.day_steps % args.num_envs,
         f"must be a multiple of --num-envs ({args.num_envs}), got {args.day_steps}"),
        ("--seq-len", args.seq_len > per_env, f"must be at most --day-steps / --num-envs = {per_env} (else the first "
                                              f"sequence waits for {args.seq_len} random steps in each environment), "
                                              f"got {args.seq_len}"),
        ("--wm-batch-size", args.wm_batch_size * args.seq_len > args.day_steps,
         f"--wm-batch-size x --seq-len = {args.wm_batch_size * args.seq_len} frames must fit in the {args.day_steps} "
         f"of a day epoch (--day-steps); lower one or raise --day-steps"),
        ("--start-level", args.start_level + args.num_levels >= 2**31, f"--start-level + --num-levels must be below "
                                                                       f"2^31 (ProcGen's levels), got "
                                                                       f"{args.start_level + args.num_levels}"),
        ("--exp-name", "/" in args.exp_name, f"names a run directory, so it cannot hold '/', got {args.exp_name!r}"),
        ("--day-checkpoint", args.day_checkpoint is not None and not os.path.isfile(args.day_checkpoint),
         f"no file at {args.day_checkpoint!r}" + (f"; did you mean {inside!r}?" if os.path.isfile(inside) else "")),
        ("--resume", args.resume and args.run_dir is None,
         "needs --run-dir, the directory of the run to continue (a new run's default name is new)"),
        ("--save-day", args.day_checkpoint is not None and args.save_day,
         f"there is no day to save: the night starts from --day-checkpoint {args.day_checkpoint}"),
        ("--track", args.track and importlib.util.find_spec("wandb") is None,
         'needs wandb, which is not installed: pip install -e ".[wandb]"'),
        ("--capture-video", args.capture_video and None in (importlib.util.find_spec("av"),
                                                            importlib.util.find_spec("imageio")),
         'needs PyAV and imageio, which are not installed: pip install -e ".[video]"'),
    ]:
        if bad:
            fail(flag, message)
    check_transformation_args(args)


def resolved(args):
    """`args` with Table 2's reward shaping of its game where --penalty or --reward-scale is left out: once, at the
    start, so that the run logs and checkpoints what it uses."""
    return replace(args, **dict(zip(("penalty", "reward_scale"), reward_shaping(args))))

# %% checkpoint
CHECKPOINT_FORMAT = 5  # the version of checkpoint.pt and day.pt as written here: a new model or content, a new one
PREEMPTED = 75  # the exit status after SIGTERM or SIGUSR1 and its checkpoint: run the same command with --resume
# The flags a night shares with the day checkpoint it starts from (the model, the levels and rewards of its real data,
# the random states it goes on from, the final evaluation's levels), and those a resumed run may change (how it runs,
# not what it computes); a night does not read DAY_ONLY.
DAY_FIXED = ("env_id", "num_levels", "start_level", "num_envs", "penalty", "reward_scale", "categoricals", "classes",
             "rnn_units", "cnn_depth", "mlp_units", "mlp_layers", "bins", "bins_extreme", "seed", "final_episodes")
RESUMABLE = ("cuda", "bf16", "track", "wandb_project_name", "wandb_entity", "run_dir", "resume", "checkpoint_every",
             "eval_overlap", "capture_video", "video_every")
DAY_ONLY = ("seed_episodes", "day_epochs", "wm_updates", "day_steps", "wm_batch_size", "seq_len", "reward_seq_fraction",
            "free_nats", "beta_dyn", "beta_rep", "wm_grad_clip", "day_lr", "day_gamma")


@dataclass
class Position:
    """Where a run is: its phase, the last epoch done in it, the x-axis step, the last test return, and the day's
    final evaluation (`day_final`, what a night's final is compared with)."""
    phase: str = "day"
    epoch: int = 0
    step: int = 0
    test_return: Optional[float] = None
    day_final: Optional[dict] = None

    def __str__(self):
        return f"{self.phase} epoch {self.epoch}"


class Generators:
    """Every random generator of the run, saved and restored like a module's state."""

    def state_dict(self):
        return dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                    cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)

    def load_state_dict(self, state):
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if state["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def stateful(wm, agent, wm_optimizer, agent_optimizer, return_scale):
    """The run's stateful objects by the name a checkpoint keeps each under (P by its attributes)."""
    return dict(world_model=wm, agent=agent, wm_optimizer=wm_optimizer, agent_optimizer=agent_optimizer,
                return_scale=return_scale, rng=Generators())


def run_state(objects, args, pos, replay_size, acting=None):
    """What a run goes on from at the end of an epoch: the state of each of `objects`, the arguments, its position,
    the size of the real data (on disk already) and the day's `acting` state."""
    states = {k: x.state_dict() if hasattr(x, "state_dict") else vars(x) for k, x in objects.items()}
    return dict(format=CHECKPOINT_FORMAT, args=asdict(args), position=asdict(pos), replay_size=replay_size,
                acting=acting, **states)


def restore(ckpt, objects, dataset, replay=None):
    """Load a checkpoint into `objects` (and the real data it counts from the directory `replay`, when given)."""
    for name, x in objects.items():
        x.load_state_dict(ckpt[name]) if hasattr(x, "load_state_dict") else vars(x).update(ckpt[name])
    if replay is not None:
        load_steps(dataset, replay, ckpt["replay_size"])


def atomic_save(obj, path):
    """torch.save to a temporary file, then a rename: Ctrl-C or a full disk while writing leaves no broken file."""
    try:
        torch.save(obj, f"{path}.tmp")
        os.replace(f"{path}.tmp", path)
    finally:
        if os.path.exists(f"{path}.tmp"):
            os.remove(f"{path}.tmp")


def save_new_steps(dataset, directory):
    """Write the steps added to `dataset` since the last call to `directory`, one chunk named by its first step: the
    real data reach the disk once per day epoch, and a checkpoint only counts them."""
    if dataset.size > dataset.saved:
        os.makedirs(directory, exist_ok=True)
        atomic_save(dataset.steps(dataset.saved), os.path.join(directory, f"{dataset.saved:010d}.pt"))
        dataset.saved = dataset.size


def load_steps(dataset, directory, size):
    """Fill the empty `dataset` with the first `size` steps that `save_new_steps` wrote to `directory` (the chunks
    past them, written after the checkpoint that counted them, are written again by the resumed run)."""
    if dataset.data["actions"].shape[1] < size:
        dataset.data = {k: np.zeros((v.shape[0], size) + v.shape[2:], v.dtype) for k, v in dataset.data.items()}
    for name in sorted(os.listdir(directory)):
        start = int(name.split(".")[0])
        if name.endswith(".pt") and start < size:
            chunk = torch.load(os.path.join(directory, name), map_location="cpu", weights_only=True)
            end = min(start + chunk["actions"].shape[1], size)
            for key in dataset.KEYS:
                dataset.data[key][:, start:end] = chunk[key][:, : end - start].numpy()
    dataset.size = dataset.saved = size


def check_finite(losses, what, phase, epoch):
    """Stop the run when a loss term is not finite, naming the terms; the last checkpoint, written before, stays."""
    bad = [f"{k.removesuffix('_loss')} ({v})" for k, v in losses.items() if not math.isfinite(v)]
    if bad:
        raise SystemExit(f"error: the {what} loss is not finite at {phase} epoch {epoch}, in its terms "
                         f"{', '.join(bad)}; the run stops, and its last checkpoint is kept")


def check_disk(run_dir, args, wm, agent, day_to_run):
    """Refuse a run directory without room for what the run writes: the day's real data (12.3 KB a real step, less
    what is written already) and up to three checkpoints (the last, the one being written, day.pt)."""
    replay = os.path.join(run_dir, "replay")
    written = sum(os.path.getsize(os.path.join(replay, f)) for f in os.listdir(replay)) if os.path.isdir(replay) else 0
    step_bytes = sum(v.itemsize * math.prod(v.shape[2:]) for v in ReplayDataset(1, 1).data.values())
    replay = max(0, step_bytes * args.day_epochs * args.day_steps - written) if day_to_run else 0
    checkpoint = 3 * sum(p.numel() * p.element_size() for p in [*wm.parameters(), *agent.parameters()])  # + Adam's
    need, free = replay + 3 * checkpoint, shutil.disk_usage(run_dir).free
    if free < need:
        fail("--run-dir", f"{run_dir!r} has {free / 2**30:.2f} GiB free, and this run writes about "
                          f"{need / 2**30:.2f} GiB (real data {replay / 2**30:.2f} GiB, checkpoints "
                          f"{3 * checkpoint / 2**30:.2f} GiB); free some space or choose another --run-dir")


def day_replay(args):
    """The real data of the day of --day-checkpoint, beside it."""
    return os.path.join(os.path.dirname(args.day_checkpoint), "replay")


def read_checkpoint(path, args, flag):
    """Read a checkpoint for `flag`, --resume or --day-checkpoint, refusing one made with other settings: for a
    resume any but the RESUMABLE flags, for a night the DAY_FIXED flags."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        saved = ckpt["args"]
    except Exception:  # a file cut short, damaged, or not a checkpoint
        fail(flag, f"{path!r} cannot be read as a checkpoint (damaged or cut short); remove it to start the run again"
             if flag == "--resume" else f"{path!r} is not a checkpoint of these scripts; give the day.pt that a day "
                                        f"run with --save-day wrote")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        fail(flag, f"{path!r} was written by an older version of these scripts; "
                   + ("start the run again" if flag == "--resume" else "make it again with --save-day"))
    if flag == "--day-checkpoint" and ckpt["position"]["phase"] != "day":
        fail(flag, f"{path!r} was taken during a night; a night starts from a day's checkpoint (day.pt)")
    names = DAY_FIXED if flag == "--day-checkpoint" else [f.name for f in fields(args) if f.name not in RESUMABLE]
    wrong = [f"--{k.replace('_', '-')} {saved.get(k)!r} (here {getattr(args, k)!r})"
             for k in names if saved.get(k) != getattr(args, k)]
    if wrong:
        fail(flag, f"{path!r} was made with other settings; run with: " + ", ".join(wrong))
    if flag == "--day-checkpoint" and needs_replay(args) and not os.path.isdir(day_replay(args)):
        fail(flag, f"this night learns from the day's real data, and {day_replay(args)!r} is missing (a benchmark "
                   f"removes it once the nights that need it are done)")
    return ckpt

# %% logging
class Stopwatch(dict):
    """The seconds of each part of an epoch: `with clock(part)` times a part, less the parts timed inside it."""

    def __init__(self):
        super().__init__()
        self.inner = []  # the seconds of the parts timed inside each part under way

    @contextlib.contextmanager
    def __call__(self, part):
        self.setdefault(part, 0.0)  # the parts listed in the order they start
        start = time.time()
        self.inner.append(0.0)
        try:
            yield
        finally:
            seconds = time.time() - start
            self[part] += seconds - self.inner.pop()
            if self.inner:
                self.inner[-1] += seconds


def precision(args, device):
    """The precision a run computes in, in words."""
    if args.bf16 and native_bf16(device):
        return "bf16 mixed precision"
    return "fp32" + ("" if not args.bf16 else " (this CPU has no native bf16; emulated, it would be slower)")


class Run:
    """The harness as the loops see it: the run's position, each epoch's clock, TensorBoard (mirrored to W&B), the
    epoch's line with its ETA, the evaluation, and checkpoint.pt (every --checkpoint-every epochs, at each phase's
    end, and after SIGTERM or SIGUSR1, then exit PREEMPTED); replay/ by day; day.pt with --save-day."""

    def __init__(self, run_dir, args, objects, dataset, envs, device, pos, acting=None, resumed=False):
        """From `pos` (and the day's `acting` state) of a checkpoint: a resumed run's own (what it logged after it is
        purged, TensorBoard's purge_step, so that the curves go on without a repeated point) or a night's day.pt."""
        self.run_dir, self.args, self.objects, self.dataset, self.envs = run_dir, args, objects, dataset, envs
        self.device, self.pos, self.acting = device, pos, acting and DayState(**acting)
        self.latest = f"{pos}" if resumed else None  # the last checkpoint written (or resumed from), in words
        self.signal, self.in_epoch, self.clock, self.epoch_start = None, False, Stopwatch(), 0
        params = dict(vars(args), run_dir=run_dir, cuda=device.type == "cuda", device=str(device),
                      precision=precision(args, device))
        if args.track:
            import wandb

            id_file = os.path.join(run_dir, "wandb_id")  # a resumed run goes on in the same W&B run
            if not os.path.exists(id_file):
                with open(id_file, "w") as f:
                    f.write(os.urandom(4).hex())  # a W&B run id (wandb 0.31 has no wandb.util.generate_id)
            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                       config=params, name=os.path.basename(run_dir), save_code=True, id=open(id_file).read(),
                       resume="allow")
        # --resume without a checkpoint starts again: whatever a killed first start logged goes (from step 0 on).
        self.writer = SummaryWriter(run_dir, purge_step=(self.pos.step + 1 if resumed else 0) if args.resume else None)
        if not resumed:
            self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
                f"|{k}|{v}|" for k, v in params.items()))
        self.evaluation = Evaluator(args, device, self)
        self.start = self.last = time.time()
        self.seconds, self.totals = {}, {}  # each phase's epoch durations (for the ETA) and seconds by part

    def last_epoch(self, phase):
        return self.args.day_epochs if phase == "day" else self.args.night_epochs

    def phase_ends(self):
        """Whether the epoch at the run's position is its phase's last."""
        return self.pos.epoch == self.last_epoch(self.pos.phase)

    def epochs(self, phase):
        """The epochs of `phase` still to run (after a resumed position's), each timed by a new clock."""
        if self.pos.phase != phase:
            self.pos.phase, self.pos.epoch = phase, 0
        for self.pos.epoch in range(self.pos.epoch + 1, self.last_epoch(phase) + 1):
            self.clock, self.epoch_start, self.in_epoch = Stopwatch(), self.pos.step, True
            yield self.pos.epoch

    def end_epoch(self, text, acting=None, **scalars):
        """An epoch's end: its scalars and SPS, its evaluation (line "test {return} {text} SPS {sps}"), its time/*,
        at the phase's end the final evaluation, then the checkpoint (with the day's `acting` state)."""
        pos, clock = self.pos, self.clock
        check_finite(scalars["losses"], "agent", pos.phase, pos.epoch)
        # Steps a second of acting or dreaming and of PPO (by day without the world model's updates).
        seconds = sum(v for k, v in clock.items() if k not in ("world_model", "diagnostics"))
        sps = (pos.step - self.epoch_start) / seconds
        for family, values in dict(scalars, charts=dict(scalars.get("charts", {}), SPS=sps)).items():
            self.scalars(family, values, pos.step)
        with clock("evaluation"):
            self.evaluation.start(self.objects["world_model"], self.objects["agent"], f"{text} SPS {sps:.0f}")
        self.scalars("time", clock, pos.step)
        if torch.cuda.is_initialized():
            self.writer.add_scalar("time/peak_gpu_mem_gb", torch.cuda.max_memory_allocated() / 2**30, pos.step)
        totals = self.totals.setdefault(pos.phase, {})
        for key, value in clock.items():
            totals[key] = totals.get(key, 0.0) + value
        if self.phase_ends():
            self.evaluation.finish()
            final = final_evaluation(self.objects["world_model"], self.objects["agent"], self.args, self.device, self,
                                     pos.phase, pos.step)
            if pos.phase == "day":
                pos.day_final = final
        self.checkpoint(acting)
        self.in_epoch = False

    def checkpoint(self, acting=None):
        """checkpoint.pt (and day.pt) at the end of an epoch when one is due; the real data added by day (replay/)."""
        pos, every, last = self.pos, self.args.checkpoint_every, self.phase_ends()
        if pos.phase == "day":
            save_new_steps(self.dataset, os.path.join(self.run_dir, "replay"))
        if not (last or (every and pos.epoch % every == 0) or self.signal):
            return
        self.evaluation.finish()  # a checkpoint follows everything logged up to its step
        if acting is not None:
            acting.envs_state = self.envs.env.get_state()
        state = run_state(self.objects, self.args, pos, self.dataset.size, acting and dict(vars(acting)))
        atomic_save(state, os.path.join(self.run_dir, "checkpoint.pt"))
        self.latest = f"{pos}/{self.last_epoch(pos.phase)}"
        if pos.phase == "day" and last and self.args.save_day:
            atomic_save(state, os.path.join(self.run_dir, "day.pt"))
            print(f"day checkpoint: {os.path.join(self.run_dir, 'day.pt')}", flush=True)
        if self.signal:
            print(f"{self.signal}: stopped after {self.latest} with its checkpoint; run the same command with --resume "
                  f"to continue", file=sys.stderr, flush=True)
            raise SystemExit(PREEMPTED)

    def on_stop_signal(self, signum, frame):
        """SIGTERM or SIGUSR1 (a preemption, scancel, a shutdown): checkpoint at the end of this epoch, then exit
        PREEMPTED. A second signal ends the run at once (its last checkpoint stays)."""
        self.signal = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)
        phase, epoch = self.pos.phase, self.pos.epoch + (not self.in_epoch)  # the epoch under way, or the next
        if phase == "day" and epoch > self.args.day_epochs:
            phase, epoch = "night", 1
        print(f"{self.signal}: the run stops at the end of {phase} epoch {epoch}/{self.last_epoch(phase)}, with a "
              f"checkpoint", file=sys.stderr, flush=True)

    def interrupted(self):
        """The line for Ctrl-C: what the run has saved, and the command that continues it."""
        if self.latest is None:  # a checkpoint is written whole or not at all (`atomic_save`)
            return f"interrupted: no checkpoint saved yet; the TensorBoard events so far are in {self.run_dir}"
        argv = sys.argv[1:] + ([] if "--resume" in sys.argv else ["--resume"])
        argv += [] if any(a.split("=")[0] == "--run-dir" for a in argv) else ["--run-dir", self.run_dir]
        return (f"interrupted: the checkpoint of {self.latest} is {os.path.join(self.run_dir, 'checkpoint.pt')}; "
                f"continue with: {shlex.join(['python', sys.argv[0], *argv])}")

    def scalars(self, family, values, step):
        for key, value in values.items():
            self.writer.add_scalar(f"{family}/{key}", value, step)

    def progress(self, phase, epoch, step, text):
        """Print an epoch's line, with the time left in this phase from this phase's own mean epoch (without its
        first epoch once there are others: the first carries the seed episodes, a checkpoint, the warm-up)."""
        now, epochs = time.time(), self.last_epoch(phase)
        seconds = self.seconds.setdefault(phase, [])
        seconds.append(now - self.last)
        self.last = now
        timed = seconds[1:] or seconds
        left = sum(timed) / len(timed) * (epochs - epoch)
        later = self.args.night_epochs if phase == "day" else 0  # the night epochs to come
        eta = (f"about {left / 60:.1f} min left in the {phase}, then {later} night epochs (not timed yet)" if later
               else f"about {left / 60:.1f} min left")
        print(f"[{phase} {epoch}/{epochs}] step {step:,} {text} | {(now - self.start) / 60:.1f} min, {eta}",
              flush=True)

    def time_summary(self):
        """The run's last line: the seconds spent in each part of each phase, and the run's minutes."""
        parts = [f"{phase}: " + ", ".join(f"{key} {value:.1f}" for key, value in totals.items())
                 for phase, totals in self.totals.items()]
        return f"time by phase (s): {'; '.join(parts)}; total {(time.time() - self.start) / 60:.1f} min"


# %% evaluation
@torch.no_grad()
def evaluate(wm, agent, args, step, device, episodes=None, film=None):
    """test_return: the policy's mean score in the first episode of num_envs x test_repetitions environments on all
    levels (Table 2), and train_levels_return on the N training levels. Each kind has levels and draws of its own,
    from (seed, step, kind) alone, played side by side. `episodes` (step -1): the final evaluation's, with standard
    errors {name}_se. `film`: a Film of the first test episodes (--capture-video)."""
    n = episodes or args.num_envs * args.test_repetitions
    levels = dict(test_return=(0, 0), **(dict(train_levels_return=(args.num_levels, args.start_level))
                                         if args.eval_train_levels else {}))
    seeds = [int(np.random.SeedSequence([args.seed, step + 1, kind]).generate_state(1)[0] >> 1) for kind in range(2)]
    envs = [make_env(args.env_id, n, num_levels, seed, start)
            for (num_levels, start), seed in zip(levels.values(), seeds)]
    generators = [torch.Generator(device).manual_seed(seed) for seed in seeds[: len(envs)]]
    rows = n * len(envs)
    obs = torch.as_tensor(np.concatenate([e.reset()["rgb"] for e in envs]), device=device)
    h, z = wm.initial(rows), torch.zeros(rows, wm.C, wm.J, device=device)
    action = torch.zeros(rows, dtype=torch.long, device=device)
    is_first = torch.ones(rows, dtype=torch.bool, device=device)
    score, first_scores, actions = np.zeros(rows), np.full(rows, np.nan), np.zeros(rows, np.int64)
    live = np.arange(rows)  # the rows still in their first episode: only they go through the networks
    finite = torch.ones((), dtype=torch.bool, device=device)  # read once at the end: no wait at every step
    while len(live):
        if film is not None:
            film.add(live, obs)
        # each kind's rows still playing draw from its generator: a kind's draws do not depend on the other's
        streams = list(zip(generators, np.bincount(live // n, minlength=len(envs)).tolist()))
        with autocast(device, args):
            h, z = wm.filter_step(h, z, action, obs, is_first, streams)
            probs = agent.actor(state_features(h, z)).float().softmax(-1)
            finite &= probs.isfinite().all()
            action = draw(probs, streams)
        actions[live] = action.cpu().numpy()
        steps = [e.step(a) for e, a in zip(envs, np.split(actions, len(envs)))]
        next_obs, reward, done = (np.concatenate(x) for x in zip(*[(o["rgb"], r, d) for o, r, d, _ in steps]))
        score += reward
        first_end = done & np.isnan(first_scores)
        first_scores[first_end] = score[first_end]
        score[done] = 0.0
        if first_end.any():
            keep = np.flatnonzero(~first_end[live])
            live, keep = live[keep], torch.as_tensor(keep, device=device)
            h, z, action = h[keep], z[keep], action[keep]
        obs = torch.as_tensor(next_obs[live], device=device)
        is_first = torch.as_tensor(done[live], device=device)
    for e in envs:
        e.close()
    if film is not None:
        film.write()
    if not finite:
        raise SystemExit(f"error: the policy's action probabilities are not finite in the evaluation at step {step}: "
                         f"no return is recorded for a broken policy; the run stops, and its last checkpoint is kept")
    scores = dict(zip(levels, np.split(first_scores, len(envs))))
    returns = {name: float(x.mean()) for name, x in scores.items()}
    if episodes:
        returns.update({f"{name}_se": float(x.std(ddof=1) / math.sqrt(len(x))) for name, x in scores.items()})
    return returns


class Evaluator:
    """Each epoch's `evaluate`, logged as charts/* with the epoch's line; with --eval-overlap in a daemon thread (not an
    executor's: Ctrl-C and SIGTERM need not wait for it) on a copy of the epoch's weights while the next epoch trains."""

    def __init__(self, args, device, run):
        self.args, self.device, self.run = args, device, run
        self.pending, self.copies = None, None  # (the evaluation's Future, its epoch); the copies of the weights
        self.stream = torch.cuda.Stream(device) if args.eval_overlap and device.type == "cuda" else None

    def start(self, wm, agent, text):
        """Evaluate the weights at the run's position; its line is "test {return} {text}"."""
        self.finish()
        pos = self.run.pos
        epoch = (pos.phase, pos.epoch, pos.step, text)
        film = Film.every(self.args, self.run, pos.phase, pos.epoch, self.run.last_epoch(pos.phase), pos.step)
        if not self.args.eval_overlap:
            return self.log_returns(evaluate(wm, agent, self.args, pos.step, self.device, film=film), *epoch)
        if self.copies is None:
            self.copies = [copy.deepcopy(m).requires_grad_(False) for m in (wm, agent)]
        for model, copied in zip((wm, agent), self.copies):
            copied.load_state_dict(model.state_dict())  # the weights of this epoch's end, which training goes on from
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the copies are made before it reads
        future = concurrent.futures.Future()
        threading.Thread(target=self.background, args=(future, pos.step, film), daemon=True).start()
        self.pending = future, epoch

    def background(self, future, step, film):
        """The background thread: `evaluate` on the copies; its returns and seconds (or its exception) in `future`."""
        start = time.time()
        try:
            with torch.cuda.stream(self.stream):  # a no-op without a stream (CPU)
                returns = evaluate(*self.copies, self.args, step, self.device, film=film)
            if self.stream is not None:
                self.stream.synchronize()
            future.set_result((returns, time.time() - start))
        except BaseException as e:  # raised in the main thread by `finish`
            future.set_exception(e)

    def finish(self):
        """Wait for the evaluation under way (if any) and log it; returns the last test return logged."""
        if self.pending is not None:
            (future, epoch), self.pending = self.pending, None
            returns, seconds = future.result()
            self.log_returns(returns, *epoch)
            self.run.scalars("time", dict(evaluation_background=seconds), epoch[2])
        return self.run.pos.test_return

    def log_returns(self, returns, phase, epoch, step, text):
        self.run.pos.test_return = returns["test_return"]
        self.run.scalars("charts", returns, step)
        self.run.progress(phase, epoch, step, f"test {returns['test_return']:.2f} {text}")


def final_evaluation(wm, agent, args, device, log, phase, step):
    """The phase's end measured precisely (not in the paper): --final-episodes of each kind on levels drawn from the
    seed alone, the same for a day and its nights; final/* at the phase's last step, and a line. Returns them."""
    if args.final_episodes:
        start = time.time()
        returns = evaluate(wm, agent, args, -1, device, episodes=args.final_episodes)
        log.scalars("final", returns, step)
        print(f"final evaluation of the {phase} ({args.final_episodes} episodes each, {time.time() - start:.0f} s): "
              f"{described(returns)}", flush=True)
        return returns


def described(returns):
    """Returns with their standard errors, in words: "test 2.50 ± 0.99, train levels 3.00 ± 0.80"."""
    return ", ".join(f"{name.removesuffix('_return').replace('_', ' ')} {returns[name]:.2f} ± "
                     f"{returns[name + '_se']:.2f}" for name in returns if not name.endswith("_se"))


# %% diagnostics
@torch.no_grad()
def open_loop(wm, dataset, start, args, device, log, step, epoch):
    """Open-loop prediction (DreamerV3's openl) on windows of steps [start, size), not trained on yet: filter burn_in
    + 1 frames, predict H steps with the real actions; openloop/* over the horizon and at k = 1, 2, 4, ..., H."""
    b, H, B = args.burn_in, args.horizon, args.wm_batch_size
    length, data = b + 1 + H, dataset.data
    if dataset.size < length:
        return
    rng = np.random.default_rng([args.seed, step])
    last = dataset.size - length
    envs, starts = rng.integers(len(data["actions"]), size=B), rng.integers(min(start, last), last + 1, size=B)
    event_env, event_t = np.nonzero((data["rewards"][:, start: dataset.size] != 0)
                                    | (data["conts"][:, start: dataset.size] == 0))
    if len(event_t):  # step t's reward and end are predicted at step k of a window that starts at t - b - k + 1
        pick = rng.integers(len(event_t), size=B)
        envs = np.concatenate([envs, event_env[pick]])
        starts = np.concatenate([starts, np.clip(start + event_t[pick] - b - rng.integers(0, H, size=B), 0, last)])
    batch = to_torch({k: v[envs[:, None], starts[:, None] + np.arange(length)] for k, v in data.items()}, device)
    generator = torch.Generator(device).manual_seed((args.seed * 1_000_003 + step) % 2**31)
    with autocast(device, args):
        hs, zs, *_ = wm.observe(*(batch[k][:, : b + 1] for k in ("obs", "actions", "conts", "is_first")),
                                generator=generator)
        h, z, feats = hs[:, -1], zs[:, -1], []
        for k in range(H):  # the states of steps b + 1, ..., b + H
            h = wm.recurrent(h, z, batch["actions"][:, b + k]).float()
            z = sample_onehot(wm.prior(h), generator)
            feats.append(state_features(h, z))
        feats = torch.stack(feats, 1)
        reward, cont = wm.heads(feats)
        image = wm.decoder(feats[:B]).float()
    truth = preprocess(batch["obs"][:B, b + 1:])
    real_reward, real_cont = batch["rewards"][:, b: b + H], batch["conts"][:, b: b + H]
    # Step k's reward and continuation can be predicted while the episode has not ended before k; its frame, through k.
    going = torch.cat([torch.ones_like(real_cont[:, :1]), real_cont[:, :-1].cumprod(1)], 1).bool()
    error = (reward.float() - real_reward).abs()
    # Errors, accuracy and image MSE on the B_w uniform windows; the recalls also on the B_w windows around an event.
    metrics = dict(reward_error=(error[:B], going[:B]),
                   cont_accuracy=(((cont[:B] > 0.5).float() == real_cont[:B]).float(), going[:B]),
                   image_mse=((image - truth).pow(2).mean((-3, -2, -1)), real_cont[:B].cumprod(1).bool()),
                   reward_recall=((error < real_reward.abs() / 2).float(), going & (real_reward != 0)),
                   end_recall=((cont < 0.5).float(), going & (real_cont == 0)))
    ks = sorted({2**i for i in range(H.bit_length())} | {H})
    values = {}
    for name, (x, mask) in metrics.items():
        x = torch.where(mask, x, 0.0)
        values[name] = x.sum() / mask.sum()  # NaN where nothing counts: left out below
        values.update({f"{name}_{k}": x[:, k - 1].sum() / mask[:, k - 1].sum() for k in ks})
    values.update(rewards_seen=metrics["reward_recall"][1].sum().float(),
                  ends_seen=metrics["end_recall"][1].sum().float())
    log.scalars("openloop", {k: v for k, v in zip(values, torch.stack(list(values.values())).tolist())
                             if math.isfinite(v)}, step)
    if args.dream_images_every and (epoch - 1) % args.dream_images_every == 0:
        rows = [x for i in range(min(2, B)) for x in (truth[i] + 0.5, image[i] + 0.5, (image[i] - truth[i]).abs())]
        log.writer.add_image("openloop/truth_prediction_error", torch.cat([torch.cat(list(r), -1) for r in rows], -2)
                             .clamp(0, 1), step)
        log_openloop_video(truth, image, args, log, step)


# %% dream images
def log_dream_images(wm, agent, states, args, log, step, epoch, n=4):
    """Figure 2 for one's own runs, every --dream-images-every epochs: n of the dream states (time-first) decoded
    before (left) and after (right) a forced transform, drawn from a generator of their own (the run's draws stay)."""
    if args.dream_images_every and (epoch - 1) % args.dream_images_every == 0:
        flat = states.flatten(0, 1)
        generator = torch.Generator(states.device).manual_seed(args.seed * 1_000_003 + step)
        images = before_after(wm, agent, flat[torch.randint(len(flat), (n,), device=states.device,
                                                            generator=generator)], args, generator)
        log.writer.add_image("dream/before_after", torch.cat([torch.cat(list(images[:n]), 1),
                                                              torch.cat(list(images[n:]), 1)], 2), step)
        log_dream_video(wm, agent, states, args, log, step)


def before_after(wm, agent, s, args, generator):
    """The dream states `s` (rows) decoded before, then after, a forced transform drawn from `generator`, in [0, 1]."""
    h, z = s[:, : wm.gru.hidden_size], s[:, wm.gru.hidden_size:].reshape(len(s), wm.C, wm.J)
    h_new, z_new, _ = transform(h, z, wm, agent, args, force=True, generator=generator)
    with torch.no_grad(), autocast(s.device, args):
        images = wm.decoder(torch.cat([state_features(h, z), state_features(h_new, z_new)])).float()
    return (images + 0.5).clamp(0, 1)


# %% dream videos
def log_dream_video(wm, agent, states, args, log, step, n=4):
    """The night's first n dreams (rows; `states` time-first) decoded frame by frame before (left) and after (right) a
    forced transform (equal for the Dreamer baseline), from a generator of their own (--capture-video)."""
    if args.capture_video:
        generator = torch.Generator(states.device).manual_seed(args.seed * 1_000_003 + step + 1)
        images = before_after(wm, agent, states[:, :n].flatten(0, 1), args, generator)
        before, after = images.unflatten(0, (2, len(states), -1)).transpose(2, 3).flatten(3, 4)  # (T, 3, rows * 64, 64)
        write_video(log, "dream/video_before_after", torch.cat([before, after], -1), step)


# %% videos
def write_video(log, tag, frames, step, fps=15):
    """`frames` (T, 3, height, width) in [0, 1] to {run_dir}/videos/{tag}_{step}.mp4 (H.264 by PyAV's own FFmpeg) and
    to TensorBoard as an animated GIF, which W&B's mirror shows as a video (add_video would need moviepy)."""
    import imageio.v3 as iio
    from tensorboard.compat.proto.summary_pb2 import Summary

    frames = (frames * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    path = os.path.join(log.writer.log_dir, "videos", f"{tag.replace('/', '_')}_{step}.mp4")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    iio.imwrite(path, frames, plugin="pyav", codec="libx264", fps=fps)
    gif = iio.imwrite("<bytes>", frames, extension=".gif", duration=1000 / fps, loop=0)
    image = Summary.Image(height=frames.shape[1], width=frames.shape[2], colorspace=3, encoded_image_string=gif)
    log.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


class Film:
    """An evaluation's first `k` test episodes side by side, frame by frame (black once an episode has ended), taken
    from the observations `evaluate` plays: no step and no draw of its own."""

    def __init__(self, log, tag, step, k=4):
        self.log, self.tag, self.step, self.k, self.frames = log, tag, step, k, []

    @staticmethod
    def every(args, log, phase, epoch, epochs, step):
        """A Film of this epoch's evaluation every --video-every epochs and at the phase's end (--capture-video)."""
        if args.capture_video and (epoch % args.video_every == 0 or epoch == epochs):
            return Film(log, f"videos/{phase}_agent", step, min(4, args.num_envs * args.test_repetitions))

    def add(self, live, obs):
        rows = np.flatnonzero(live < self.k)
        if len(rows):
            frame = np.zeros((self.k, *obs.shape[1:]), np.uint8)
            frame[live[rows]] = obs[torch.as_tensor(rows, device=obs.device)].cpu().numpy()
            self.frames.append(np.concatenate(frame, 1))

    def write(self):
        write_video(self.log, self.tag, torch.as_tensor(np.stack(self.frames)).permute(0, 3, 1, 2) / 255, self.step)


def log_openloop_video(truth, image, args, log, step):
    """The open-loop prediction in motion (--capture-video): for two windows (rows), the real frames, the predicted ones
    and their difference (columns) over the horizon."""
    if args.capture_video:
        rows = [torch.cat([t + 0.5, p + 0.5, (p - t).abs()], -1) for t, p in zip(truth[:2], image[:2])]
        write_video(log, "openloop/video_truth_prediction_error", torch.cat(rows, -2).clamp(0, 1), step)


# %% main
def claim_run_dir(args):
    """The run's directory (--run-dir, or a new runs/{env_id}__{exp_name}[_collected][_night]__{seed}__{time}[_k]),
    locked with flock before any work; refused when in use, holding a run's events (without --resume), or unwritable."""
    path = args.run_dir
    try:
        if path is None:
            tag = ("_collected" if args.init_states == "collected" else "") + ("_night" if args.day_checkpoint else "")
            base = path = os.path.join("runs", f"{args.env_id}__{args.exp_name}{tag}__{args.seed}__{int(time.time())}")
            for k in itertools.count(2):  # two runs started in the same second get two directories
                try:
                    os.makedirs(path)
                    break
                except FileExistsError:
                    path = f"{base}_{k}"
        os.makedirs(path, exist_ok=True)
        lock = open(os.path.join(path, ".lock"), "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            fail("--run-dir", f"{path!r} is in use by another run (process {lock.read().strip()}); choose another "
                              f"--run-dir")
        if not args.resume and glob.glob(os.path.join(path, "events.out.tfevents.*")):
            fail("--run-dir", f"{path!r} already holds a run's TensorBoard events; continue it with --resume, or choose "
                              f"another --run-dir")
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
    except OSError as e:  # a file in the way, or no permission
        reason = "a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror
        fail("--run-dir", f"cannot make the run's directory {path!r} ({reason}); choose another --run-dir")
    return path, lock


def main(args):
    check_args(args)
    args = resolved(args)
    day_ckpt = read_checkpoint(args.day_checkpoint, args, "--day-checkpoint") if args.day_checkpoint else None
    run_dir, lock = claim_run_dir(args)
    last = os.path.join(run_dir, "checkpoint.pt")
    resumed = read_checkpoint(last, args, "--resume") if args.resume and os.path.exists(last) else None
    ckpt = resumed or day_ckpt
    pos = Position(**ckpt["position"]) if ckpt else Position()
    if resumed and (pos.epoch == args.night_epochs if pos.phase == "night" else
                    pos.epoch == args.day_epochs and not args.night_epochs):
        print(f"{run_dir}: the run is finished (its last checkpoint is the end of the {pos.phase}); nothing to do")
        return end_run(args, run_dir, lock)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    envs = make_env(args.env_id, args.num_envs, args.num_levels, args.seed, args.start_level)
    num_actions = envs.action_space.n
    wm = WorldModel(args, num_actions).to(device)
    agent = Agent(wm.feat_dim, num_actions, args).to(device)
    wm_optimizer = torch.optim.Adam(wm.parameters(), lr=args.day_lr)
    agent_optimizer = make_agent_optimizer(agent, args.day_lr)
    return_scale = ReturnScale(args.return_scale_decay)
    dataset = ReplayDataset(args.num_envs, math.ceil((args.day_epochs * args.day_steps) / args.num_envs) + 1000)
    objects = stateful(wm, agent, wm_optimizer, agent_optimizer, return_scale)
    day_to_run = pos.phase == "day" and not args.day_checkpoint
    check_disk(run_dir, args, wm, agent, day_to_run)
    run = Run(run_dir, args, objects, dataset, envs, device, pos, ckpt and ckpt["acting"], resumed is not None)
    day_text = f"night only, from {args.day_checkpoint}" if args.day_checkpoint else \
        f"{args.day_epochs} day epochs of {args.day_steps} real steps"
    night_text = f"{args.night_epochs} night epochs of {args.agent_batch_size * args.agent_updates} agent sequences " \
                 f"of {args.horizon} steps" if args.night_epochs else "no night"
    print(f"{run_dir} on {device} in {precision(args, device)}: {day_text}, {night_text}", flush=True)
    if resumed:
        print(f"resumed from the checkpoint of {pos} (step {pos.step:,}, test return {pos.test_return:.2f}): the "
              f"epochs after it are redone", flush=True)
    paper = resolved(Hyperparameters(env_id=args.env_id))  # the paper runs every game; a night reads its flags only
    skip = DAY_ONLY + DAY_FIXED if args.day_checkpoint else ()
    changed = [f"--{f.name.replace('_', '-')}" for f in fields(Hyperparameters)
               if f.name not in skip and getattr(args, f.name) != getattr(paper, f.name)]
    if changed:
        print(f"not the paper's protocol ({' '.join(changed)} changed): the full run is every default, "
              f"`python {os.path.basename(__file__)} --env-id {args.env_id} --seed {args.seed}` (1M real steps "
              f"by day, about 1M dreamed by night; a GPU job)", flush=True)

    handlers = {s: signal.signal(s, run.on_stop_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        if ckpt:  # the real data: this run's own, or a night-only run's day's, when the rest of the run needs them
            replay = day_replay(args) if args.day_checkpoint else os.path.join(run_dir, "replay")
            restore(ckpt, objects, dataset, replay if day_to_run or needs_replay(args) else None)
            ckpt = resumed = day_ckpt = None  # the rest now lives in the run's objects
        if day_to_run:
            day(args, wm, agent, wm_optimizer, agent_optimizer, return_scale, dataset, envs, device, run)
        elif pos.phase == "day":  # a new night from a day checkpoint
            run.scalars("charts", dict(test_return=pos.test_return), pos.step)
            print(f"night from {args.day_checkpoint}: the day ended at step {pos.step:,}; its final evaluation: "
                  f"{described(pos.day_final) if pos.day_final else 'none (--final-episodes 0)'}", flush=True)
        night(args, wm, agent, agent_optimizer, return_scale, dataset, device, run)
    except KeyboardInterrupt:
        run.writer.close()
        if args.track:
            import wandb

            wandb.finish(exit_code=130)
        print(run.interrupted(), file=sys.stderr, flush=True)
        sys.stdout.flush()
        # os._exit, not SystemExit: the interpreter's exit with the background evaluation's torch and ProcGen state
        # alive aborts the process one time in two (`terminate called without an active exception`, exit -6)
        os._exit(130)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    print(run.time_summary(), flush=True)
    run.writer.close()
    envs.close()
    end_run(args, run_dir, lock)


def end_run(args, run_dir, lock):
    """Drop what only a resume needed (the real data, unless --save-day keeps them for nights) and free the run
    directory."""
    if not args.save_day:
        shutil.rmtree(os.path.join(run_dir, "replay"), ignore_errors=True)
    os.remove(lock.name)
    lock.close()


if __name__ == "__main__":
    try:
        main(tyro.cli(Args, description=__doc__.split("\n\n")[0]))
    except Refused as e:
        print(e, file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted before the run started: nothing saved", file=sys.stderr, flush=True)
        sys.exit(130)
