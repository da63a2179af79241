"""Shared fixtures and helpers for the tests of dreamer_ppo.py: tiny sizes everywhere."""

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dreamer_ppo
from tools.sync_blocks import blocks

# On a 2-core machine that is also busy with other work, torch's intra-op thread pool thrashes: a tiny
# evaluation that takes 1 s with one thread took over a minute with two. Tests run single-threaded.
torch.set_num_threads(1)

SCRIPT = Path(dreamer_ppo.__file__).resolve()
NUM_ACTIONS = 15  # every ProcGen game has 15 actions
CPU = torch.device("cpu")

TINY = dict(categoricals=4, classes=4, rnn_units=32, cnn_depth=4, mlp_units=32, bins=31, seq_len=8,
            wm_batch_size=4, num_envs=4, day_steps=100, agent_batch_size=4, agent_updates=2, horizon=5,
            test_repetitions=1, seed_episodes=1, day_epochs=2, wm_updates=2, night_epochs=2, update_epochs=1,
            burn_in=3, cuda=False, final_episodes=2, bf16=False)

# Tiny sizes as command-line flags, for runs of the script itself (epochs are set by each run; --num-envs
# stays at the paper's 5). Tests run in fp32 on every CPU (tests/test_precision.py runs the scripts in bf16).
SIZE_FLAGS = ["--wm-updates", "2", "--day-steps", "100", "--wm-batch-size", "4", "--seq-len", "8",
              "--agent-updates", "2", "--agent-batch-size", "4", "--horizon", "5", "--test-repetitions", "1",
              "--seed-episodes", "1", "--categoricals", "4", "--classes", "4", "--rnn-units", "32",
              "--cnn-depth", "4", "--mlp-units", "32", "--bins", "31", "--burn-in", "3", "--final-episodes", "2",
              "--no-bf16"]


def tiny_args(**changes):
    """dreamer_ppo.Args at tiny sizes, with `changes` on top."""
    return dataclasses.replace(dreamer_ppo.Args(), **{**TINY, **changes})


def make_models(args, seed=0):
    """A fresh tiny world model and agent, seeded."""
    torch.manual_seed(seed)
    wm = dreamer_ppo.WorldModel(args, NUM_ACTIONS)
    agent = dreamer_ppo.Agent(wm.feat_dim, NUM_ACTIONS, args)
    return wm, agent


def make_optimizers(wm, agent, args):
    return torch.optim.Adam(wm.parameters(), lr=args.day_lr), dreamer_ppo.make_agent_optimizer(agent, args.day_lr)


class RecordingRun(dreamer_ppo.Run):
    """The harness of a run in `run_dir` (TensorBoard events, checkpoints) that also keeps every scalar it logs as
    (tag, step, value) in `points`."""

    def __init__(self, run_dir, args, objects=None, dataset=None, envs=None, pos=None, acting=None):
        super().__init__(str(run_dir), args, objects or {}, dataset, envs, CPU, pos or dreamer_ppo.Position(), acting)
        self.points = []

    def scalars(self, family, values, step):
        self.points += [(f"{family}/{k}", step, v) for k, v in values.items()]
        super().scalars(family, values, step)


def is_onehot(z, atol=1e-6):
    """Each categorical (last axis) holds one 1 and zeros elsewhere (within `atol`; 0 for exactly)."""
    ones = (z - 1).abs() <= atol
    return bool((((z.abs() <= atol) | ones).all() and (ones.sum(-1) == 1).all()
                 and ((z.sum(-1) - 1).abs() <= 2 * atol).all()))


def random_batch(B, T, seed=0):
    """A batch laid out as ReplayDataset.sample returns it (as tensors), random frames and actions, no episode
    boundary inside."""
    g = torch.Generator().manual_seed(seed)
    return dict(obs=torch.randint(0, 256, (B, T, 64, 64, 3), dtype=torch.uint8, generator=g),
                actions=torch.randint(NUM_ACTIONS, (B, T), generator=g),
                rewards=torch.zeros(B, T), conts=torch.ones(B, T),
                is_first=torch.zeros(B, T, dtype=torch.bool), logprobs=torch.zeros(B, T))


def crafted_dataset(num_envs=3, steps=50, capacity=50):
    """Step t of environment e holds action t, logprob e, and a few non-zero rewards (one at the very last
    step, which no sequence can learn from)."""
    dataset = dreamer_ppo.ReplayDataset(num_envs, capacity)
    rewarded = {(0, 0), (1, 20), (2, steps - 2), (2, steps - 1)}
    for t in range(steps):
        dataset.add(obs=np.full((num_envs, 64, 64, 3), t % 256, np.uint8), actions=np.full(num_envs, t),
                    rewards=np.array([5.0 if (e, t) in rewarded else 0.0 for e in range(num_envs)]),
                    conts=np.ones(num_envs), is_first=np.full(num_envs, t == 0), logprobs=np.arange(num_envs))
    return dataset


def collect_random(args, steps, seed):
    """`steps` real steps of every environment with uniformly random actions, stored as day() stores its seed
    episodes (shaped rewards, continuation flags, is_first, the uniform log-probability)."""
    penalty, scale = dreamer_ppo.reward_shaping(args)
    envs = dreamer_ppo.make_env(args.env_id, args.num_envs, args.num_levels, seed)
    n = args.num_envs
    rng = np.random.RandomState(seed)
    dataset = dreamer_ppo.ReplayDataset(n, steps)
    obs, is_first = envs.reset()["rgb"], np.ones(n, bool)
    for _ in range(steps):
        action = rng.randint(NUM_ACTIONS, size=n)
        next_obs, reward, done, _ = envs.step(action)
        dataset.add(obs=obs, actions=action, rewards=dreamer_ppo.shape_reward(reward, done, penalty, scale),
                    conts=1.0 - done, is_first=is_first, logprobs=np.full(n, -math.log(NUM_ACTIONS)))
        obs, is_first = next_obs["rgb"], done
    envs.close()
    return dataset


def run_script(args, cwd):
    """Start `python dreamer_ppo.py ARGS` in `cwd` (single-threaded torch, see above); returns the Popen."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", COLUMNS="200")
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=300):
    """Wait for a run started by run_script; returns (returncode, stdout, stderr)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"run timed out after {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
    return proc.returncode, out, err


@pytest.fixture
def args():
    return tiny_args()


@pytest.fixture
def models(args):
    return make_models(args)


@pytest.fixture(scope="session")
def coinrun_dataset():
    """A few hundred real coinrun frames (4 environments x 80 steps) with random actions."""
    return collect_random(tiny_args(), steps=80, seed=3)


# %% the variants: dreamer_ppo.py with one transformation of the dreams each (dreamer_ppo_{name}.py)
def find_variants(root):
    """The names of the dreamer_ppo_{name}.py scripts in `root` that transform their dreams (a `transformation`
    block), sorted: a fork saved beside the others is run by every per-variant test; the Offline baseline, which
    spends its night on real data, is not one."""
    return tuple(sorted(path.stem.removeprefix("dreamer_ppo_") for path in Path(root).glob("dreamer_ppo_*.py")
                        if "transformation" in blocks(path)))


VARIANTS = find_variants(SCRIPT.parent)


def run_variant(name, args, cwd):
    """run_script for dreamer_ppo_{name}.py (beside dreamer_ppo.py)."""
    global SCRIPT
    baseline, SCRIPT = SCRIPT, SCRIPT.with_name(f"dreamer_ppo_{name}.py")
    try:
        return run_script(args, cwd)
    finally:
        SCRIPT = baseline
