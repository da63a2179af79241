"""The perfect-model control (benchmark/control.py): the night's rule fed with the real game instead of dreams."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from benchmark import control
from conftest import CPU, SIZE_FLAGS, finish, make_models, tiny_args
from test_end_to_end import AGENT_BATCH, AGENT_UPDATES, DAY_EPOCHS, HORIZON, day_runs, scalars  # noqa: F401 (fixture)
from test_loop import StampedEnv


class EndingEnv(StampedEnv):
    """Episodes of 3 steps that score 1 point at each step but the last (no success: the penalty falls there)."""

    def step(self, action):
        obs, _, done, info = super().step(action)
        return obs, np.where(done, 0.0, 1.0).astype(np.float32), done, info


def test_real_trajectories_are_a_nights_batch():
    # H = 5 real steps of each environment as `imagine` gives a dream: rewards shaped as the world model learned them
    # (coinrun: -10 where an episode ends without success), continuations, and weights that stop at the episode's
    # end, as for a dream that predicts one; the episodes go on from one batch to the next
    args = tiny_args(num_envs=4, horizon=5)
    wm, agent = make_models(args)
    envs = EndingEnv(6, length=3, tag=0)
    real = control.RealDreams(envs, args, wm, CPU)
    traj, real_return = real.trajectories(agent)
    assert traj["states"].shape == (5, 6, wm.feat_dim) and traj["actions"].shape == traj["weights"].shape == (5, 6)
    assert traj["rewards"][:, 0].tolist() == [1.0, 1.0, -10.0, 1.0, 1.0]
    assert traj["conts"][:, 0].tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert traj["weights"][:, 0].tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert real_return == pytest.approx(2.0)  # the game's own score until the end, weighed the same way
    assert torch.equal(traj["next_values"][:-1], traj["values"][1:])
    traj, _ = real.trajectories(agent)  # steps 6-10: the episodes end at steps 6 and 9
    assert traj["conts"][:, 0].tolist() == [0.0, 1.0, 1.0, 0.0, 1.0] and envs.t == 10


def test_the_control_runs_a_night_from_a_day_checkpoint(day_runs, tmp_path):
    day = day_runs["random"]
    day_end, day_return = day["scalars"]["charts/test_return"][DAY_EPOCHS - 1]
    cmd = [sys.executable, str(control.__file__), "--day-checkpoint", str(day["run_dir"] / "day.pt"), "--run-dir",
           str(tmp_path / "control"), "--night-epochs", "2", *SIZE_FLAGS]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    code, out, err = finish(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=-1, stderr=-1, text=True))
    assert code == 0, f"{out[-3000:]}\n{err[-3000:]}"
    tags = scalars(tmp_path / "control")
    epoch = AGENT_BATCH * AGENT_UPDATES * HORIZON  # as many real steps as a night epoch dreams
    assert [s for s, _ in tags["charts/test_return"]] == [day_end, day_end + epoch, day_end + 2 * epoch]
    assert tags["charts/test_return"][0][1] == pytest.approx(day_return)
    assert [s for s, _ in tags["final/test_return"]] == [day_end + 2 * epoch]
    assert all(kl > 0 for _, kl in tags["losses/approx_kl"])  # each epoch's PPO moved the policy
    # a day of other sizes is refused, as a night refuses it
    code, out, err = finish(subprocess.Popen([*cmd, "--rnn-units", "64"], cwd=tmp_path, env=env, stdout=-1,
                                             stderr=-1, text=True))
    assert code != 0 and "--day-checkpoint" in err and "--rnn-units 32 (here 64)" in err
