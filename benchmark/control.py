"""The perfect-model control: a night exactly as dreamer_ppo.py runs it, fed with the real game instead of dreams.

Not a method of the paper: a control that tells whether the night's learning rule can improve the day's agent at
all at a given size. From a day checkpoint (day.pt), E_n epochs of the night's PPO (the same U_a minibatches of B_a
trajectories of H steps, gamma = 1 - 1/H, the night's learning rate, the return scale P, each step weighed by the
chance that its episode is still going) on trajectories of H real steps on the N training levels, the agent acting
on the frozen world model's posterior states as by day: as if the world model dreamed the game perfectly. If it
gains where the dreams do not, the dreams are the limit; if it loses too, the night's rule is.

Its flags are dreamer_ppo.py's (the night's sizes, --day-checkpoint required); it logs a night's tags (charts/*,
losses/*, final/*) to --run-dir, so that benchmark/plot.py reads it as the method `control`:

    python benchmark/control.py --day-checkpoint OUT/coinrun/day/seed1/day.pt --run-dir OUT/coinrun/control/seed1 \
        --env-id coinrun --seed 1 [the day's size flags] [--night-epochs 40]
"""

import os
import sys
from pathlib import Path

import numpy as np
import torch
import tyro
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dreamer_ppo as dp  # noqa: E402


class RealDreams:
    """n real environments on the training levels, H steps of each per night epoch, the agent acting on posterior
    states of the frozen world model; the episodes go on from one epoch to the next."""

    def __init__(self, envs, args, wm, device):
        self.envs, self.args, self.wm, self.device = envs, args, wm, device
        self.n = envs.num_envs
        self.penalty, self.scale = dp.reward_shaping(args)
        obs, first = self.envs.reset()["rgb"], torch.ones(self.n, dtype=torch.bool, device=device)
        with torch.no_grad(), dp.autocast(device, args):
            self.h, self.z = wm.filter_step(wm.initial(self.n), torch.zeros(self.n, wm.C, wm.J, device=device),
                                            torch.zeros(self.n, dtype=torch.long, device=device),
                                            torch.as_tensor(obs, device=device), first)

    @torch.no_grad()
    def trajectories(self, agent):
        """A night's batch as `imagine` gives it (time-first): states, actions, log-probabilities, values, next
        values, the shaped rewards the world model learned, continuations, and weights (the chance that the
        episode is still going: 0 after its end, as for a dream that predicts one); and the mean real return."""
        keys = ("states", "actions", "logprobs", "values", "rewards", "conts")
        steps, returns = {k: [] for k in keys}, []
        for _ in range(self.args.horizon):
            s = dp.state_features(self.h, self.z)
            with dp.autocast(self.device, self.args):
                action, logprob, _, _, value = agent.get_action_and_value(s)
            obs, reward, done, _ = self.envs.step(action.cpu().numpy())
            shaped = dp.shape_reward(reward, done, self.penalty, self.scale)
            returns.append(reward)
            obs, first = (torch.as_tensor(x, device=self.device) for x in (obs["rgb"], done))
            with dp.autocast(self.device, self.args):
                self.h, self.z = self.wm.filter_step(self.h, self.z, action, obs, first)
            for key, x in zip(keys, (s, action, logprob, value, torch.as_tensor(shaped, device=self.device),
                                     torch.as_tensor(1.0 - done, device=self.device))):
                steps[key].append(x)
        with dp.autocast(self.device, self.args):
            traj = dp.stack_trajectory(steps, agent.value(dp.state_features(self.h, self.z)))
        traj["weights"] = torch.cat([torch.ones_like(traj["conts"][:1]), traj["conts"][:-1].cumprod(0)])
        real_return = float((traj["weights"].cpu().numpy() * np.array(returns)).sum(0).mean())
        return traj, real_return


def main(args):
    dp.check_args(args)
    if args.day_checkpoint is None or args.run_dir is None:
        dp.fail("--day-checkpoint" if args.day_checkpoint is None else "--run-dir", "the control needs it: it runs a "
                "night from a day checkpoint into its own run directory")
    args = dp.resolved(args)
    ckpt = dp.read_checkpoint(args.day_checkpoint, args, "--day-checkpoint")
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    envs = dp.make_env(args.env_id, args.agent_batch_size * args.agent_updates, args.num_levels, args.seed,
                       args.start_level)
    wm = dp.WorldModel(args, envs.action_space.n).to(device)
    agent = dp.Agent(wm.feat_dim, envs.action_space.n, args).to(device)
    optimizer = dp.make_agent_optimizer(agent, args.night_lr)
    return_scale = dp.ReturnScale(args.return_scale_decay)
    wm.load_state_dict(ckpt["world_model"])
    agent.load_state_dict(ckpt["agent"])
    optimizer.load_state_dict(ckpt["agent_optimizer"])  # Adam's moments from the day, as a night keeps them
    for group in optimizer.param_groups:
        group["lr"] = args.night_lr
    return_scale.value = ckpt["return_scale"]["value"]
    np.random.set_state(ckpt["rng"]["numpy"])  # the night's random numbers go on from the day's
    torch.set_rng_state(ckpt["rng"]["torch"])
    wm.requires_grad_(False)
    step = ckpt["position"]["step"]
    os.makedirs(args.run_dir, exist_ok=True)
    writer = SummaryWriter(args.run_dir, purge_step=0)  # a control run again (10 minutes at the CPU sizes) starts over
    writer.add_scalar("charts/test_return", ckpt["position"]["test_return"], step)
    real = RealDreams(envs, args, wm, device)
    print(f"{args.run_dir}: the perfect-model control from {args.day_checkpoint} (day ended at step {step:,}), "
          f"{args.night_epochs} epochs of {real.n} real trajectories of {args.horizon} steps", flush=True)
    for epoch in range(1, args.night_epochs + 1):
        traj, real_return = real.trajectories(agent)
        stats = dp.train_agent(agent, optimizer, return_scale, traj, 1 - 1 / args.horizon, args, device)
        dp.check_finite(stats, "agent", "night", epoch)
        step += real.n * args.horizon
        returns = dp.evaluate(wm, agent, args, step, device)
        for family, values in (("losses", stats), ("charts", returns), ("control", dict(return_mean=real_return))):
            for key, value in values.items():
                writer.add_scalar(f"{family}/{key}", value, step)
        print(f"[control {epoch}/{args.night_epochs}] step {step:,} test {returns['test_return']:.2f} real "
              f"trajectories' return {real_return:.2f}", flush=True)
    if args.final_episodes:
        returns = dp.evaluate(wm, agent, args, -1, device, episodes=args.final_episodes)
        for key, value in returns.items():
            writer.add_scalar(f"final/{key}", value, step)
        print("final evaluation of the control: " + ", ".join(f"{k} {v:.2f}" for k, v in returns.items()), flush=True)
    writer.close()
    envs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(dp.Args, description=__doc__.split("\n\n")[0])))
