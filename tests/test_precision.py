"""The paper's mixed precision: bf16 autocast where the device computes bf16 natively (CUDA, a CPU with AVX512-BF16
or AMX), fp32 elsewhere and with --no-bf16. These run on any CPU: native bf16 is pretended where a test needs it
(torch then emulates it, slowly but correctly)."""

import dataclasses
import importlib
import subprocess
import sys

import pytest
import torch

import dreamer_ppo
from conftest import CPU, SIZE_FLAGS, TINY, VARIANTS, make_models, tiny_args
from test_blocks import SCRIPTS as PATHS
from test_end_to_end import scalars, single_run_dir
from test_transformations import ROOT, variant_args

SCRIPTS = tuple(path.stem for path in PATHS)  # every script in the repository, dreamer_ppo first
# Runs a script as `python SCRIPT ARGS` would, on a CPU that says it has native bf16.
PRETEND_BF16 = ("import runpy, sys, torch; torch.cpu._is_avx512_bf16_supported = lambda: True; "
                "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


@pytest.fixture
def native(monkeypatch):
    """native(True/False): pretend this CPU has native bf16, or has none."""
    def pretend(has):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: has, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    return pretend


@pytest.mark.parametrize("has, flag, on", [(True, True, True), (True, False, False), (False, True, False)])
def test_cpu_autocast_where_bf16_is_native_and_the_flag_is_on(native, has, flag, on):
    native(has)
    args = tiny_args(bf16=flag)
    with dreamer_ppo.autocast(CPU, args):
        assert torch.is_autocast_enabled("cpu") == on
        out = torch.nn.Linear(4, 4)(torch.ones(2, 4))
    assert out.dtype == (torch.bfloat16 if on else torch.float32)
    assert dreamer_ppo.precision(args, CPU).startswith("bf16" if on else "fp32")
    assert dreamer_ppo.native_bf16(torch.device("cuda"))  # on CUDA, always


def test_world_model_loss_under_cpu_bf16(native, coinrun_dataset):
    # The convolutions compute in bf16; the loss, KL and decoded heads stay float32; the gradients reach every weight.
    native(True)
    args = tiny_args(bf16=True)
    wm, _ = make_models(args)
    seen = []
    wm.encoder.convs[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    batch = {k: torch.as_tensor(v) for k, v in coinrun_dataset.sample(4, 8, 0.5).items()}
    with dreamer_ppo.autocast(CPU, args):
        loss, metrics, (hs, zs) = wm.loss(batch, args)
    assert seen == [torch.bfloat16] and loss.dtype == torch.float32 and hs.dtype == zs.dtype == torch.float32
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in wm.parameters())


@pytest.mark.parametrize("name", VARIANTS)
def test_dream_states_stay_float32_under_cpu_bf16(native, name):
    native(True)
    module = importlib.import_module(f"dreamer_ppo_{name}")
    args = variant_args(name, horizon=4, bf16=True)
    wm, agent = make_models(args)
    with torch.no_grad(), module.autocast(CPU, args):
        h, z = module.random_initial_states(wm, 32)
        h_new, z_new, changed = module.transform(h.float(), z.float(), wm, agent, args, force=True)
    assert changed.all() and h_new.dtype == z_new.dtype == torch.float32
    torch.manual_seed(0)
    traj, stats = module.imagine(wm, agent, h.float(), z.float(), args.horizon, args)
    assert stats["transformed_frac"] > 0 and traj["states"].dtype == torch.float32


def test_offline_sequences_stay_float32_under_cpu_bf16(native, coinrun_dataset):
    native(True)
    import dreamer_ppo_offline as offline
    args = dataclasses.replace(offline.Args(), **{**TINY, "bf16": True})
    wm, agent = make_models(args)
    traj = offline.offline_sequences(wm, agent, coinrun_dataset, 6, args, CPU)
    assert all(v.dtype == torch.float32 for k, v in traj.items() if v.is_floating_point())


def test_every_script_runs_a_day_and_a_night_in_bf16(tmp_path):
    # Each script as a user starts it, on a CPU with native bf16 (pretended): in bf16 mixed precision by default. The
    # day of dreamer_ppo.py and its night, then each other script's night from that day, two at a time (one core
    # each). The other tests run every script in fp32 (--no-bf16 in SIZE_FLAGS).
    flags = ["--num-envs", "2", *SIZE_FLAGS, "--bf16"]
    env = dict(OMP_NUM_THREADS="1", PATH="/usr/bin:/bin", COLUMNS="200")

    def start(name, *more):
        (tmp_path / name).mkdir()
        return name, subprocess.Popen([sys.executable, "-c", PRETEND_BF16, f"{ROOT / name}.py", *flags, *more],
                                      cwd=tmp_path / name, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)

    def check(name, proc):
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, f"{name}:\n{out[-3000:]}"
        assert "in bf16 mixed precision" in out, out[:500]
        assert len(scalars(single_run_dir(tmp_path / name))["final/test_return"]) == (2 if name == SCRIPTS[0] else 1)

    check(*start(SCRIPTS[0], "--day-epochs", "1", "--night-epochs", "1", "--save-day"))
    day = single_run_dir(tmp_path / SCRIPTS[0]) / "day.pt"
    names = list(SCRIPTS[1:])
    while names:
        running = [start(name, "--night-epochs", "1", "--day-checkpoint", str(day)) for name in names[:2]]
        names = names[2:]
        for name, proc in running:
            check(name, proc)
