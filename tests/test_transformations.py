"""The dream transformations of Section 4.1, one variant script each: random swing (Eq. 3), DeepDream (Eq. 4),
value diversification (Eq. 5), and FullDreamer's uniform mixture of the three. Tolerances are many standard
deviations wide: the statistical tests cannot flake."""

import dataclasses
import importlib
import inspect
import re
import shutil
import typing

import pytest
import torch
import torch.nn as nn
import tyro

import dreamer_ppo

from conftest import TINY, VARIANTS, find_variants, is_onehot, make_models
from test_blocks import ROOT, VARIANT_BLOCKS, blocks

MODULES = {name: importlib.import_module(f"dreamer_ppo_{name}") for name in VARIANTS}
SINGLES = ("random", "deepdream", "valdiv")  # FullDreamer mixes these three


def variant_args(name, **changes):
    """The variant's Args (its transformation flags at the paper's values) at tiny sizes, `changes` on top."""
    return dataclasses.replace(MODULES[name].Args(), **{**TINY, **changes})


def dream_states(wm, n, seed=0):
    """n random dream states (Eq. 2), exactly one-hot."""
    torch.manual_seed(seed)
    with torch.no_grad():
        h, z = MODULES["random"].random_initial_states(wm, n)
    return h, nn.functional.one_hot(z.argmax(-1), z.shape[-1]).float()


def steep_critic(agent, std, seed=0):
    """Re-initialise the critic's output layer (zero at start, so v is flat) at random: v varies with s."""
    torch.manual_seed(seed)
    nn.init.normal_(agent.critic[-1].weight, std=std)
    return agent


def value(agent, h, z):
    return agent.value(MODULES["valdiv"].state_features(h, z)).detach()


# %% random swing
@pytest.mark.parametrize("p_swing", [0.5, 1.0, 0.0])
def test_random_swing_redraws_a_share_of_the_categoricals(p_swing):
    module = MODULES["random"]
    args = variant_args("random", p_swing=p_swing, categoricals=8, classes=4)
    wm, agent = make_models(args)
    h, z = dream_states(wm, 2000)
    torch.manual_seed(1)
    h_new, z_new, changed = module.transform(h, z, wm, agent, args, force=True)
    assert changed.all()
    assert is_onehot(z_new, atol=0)
    # a categorical is re-drawn with probability p_swing, to one of J classes, its own among them
    share = (z_new.argmax(-1) != z.argmax(-1)).float().mean().item()  # over 16,000 categoricals: sd <= 0.004
    assert share == pytest.approx(p_swing * (args.classes - 1) / args.classes, abs=0.03)
    # h moves by N(0, I) noise (64,000 draws: the mean's sd is 0.004, the variance's 0.006)
    noise = h_new - h
    assert noise.mean().item() == pytest.approx(0.0, abs=0.03)
    assert noise.var().item() == pytest.approx(1.0, abs=0.05)


# %% DeepDream
def test_deep_dream_raises_its_objective():
    module = MODULES["deepdream"]
    args = variant_args("deepdream")
    wm, agent = make_models(args)
    wm.requires_grad_(False)  # as at night
    h, z = dream_states(wm, 300)
    with torch.no_grad():
        before = module.deepdream_objective(h, z, wm)
    h_new, z_new, _ = module.transform(h, z, wm, agent, args, force=True)
    with torch.no_grad():
        after = module.deepdream_objective(h_new, z_new, wm)
    assert is_onehot(z_new, atol=0)
    assert not torch.equal(h_new, h)
    assert (after > before).float().mean().item() >= 0.9


@pytest.mark.parametrize("step, moves", [("normalized", True), ("raw", False)])
def test_deep_dream_at_the_papers_step_moves_the_state_only_when_normalized(step, moves):
    """10 steps of 0.1 (Table 2): DeepDream's normalised step moves h by a clear amount and flips categoricals of
    z; the raw step of the same size leaves the state where it was (the gradient reaching h is tiny)."""
    module = MODULES["deepdream"]
    args = variant_args("deepdream", deepdream_step=step, categoricals=8, classes=8, rnn_units=64, cnn_depth=8,
                        mlp_units=64)
    wm, agent = make_models(args)
    wm.requires_grad_(False)
    h, z = dream_states(wm, 200)
    h_new, z_new, _ = module.transform(h, z, wm, agent, args, force=True)
    with torch.no_grad():
        rise = module.deepdream_objective(h_new, z_new, wm) - module.deepdream_objective(h, z, wm)
    h_move = (h_new - h).abs().mean().item()
    flipped = (z_new.argmax(-1) != z.argmax(-1)).float().mean().item()
    if moves:
        assert (rise > 0).float().mean().item() >= 0.9
        assert h_move > 0.3  # each step moves every unit of h by 0.1 on average
        assert flipped > 0.05
    else:
        assert h_move < 0.01 and flipped == 0.0


# %% value diversification
def valdiv_setup(critic_std, **changes):
    """ValDreamer's args, tiny models with a critic of random slope `critic_std`, and 300 dream states."""
    args = variant_args("valdiv", **changes)
    wm, agent = make_models(args)
    steep_critic(agent, std=critic_std)
    return args, wm, agent, *dream_states(wm, 300)


def value_gaps(h, z, wm, agent, args, seed=1):
    """(v(h', z') - v(h, z))^2 per state after value diversification, and z'."""
    torch.manual_seed(seed)
    h_new, z_new = MODULES["valdiv"].value_diversification(h, z, wm, agent, args)
    assert is_onehot(z_new, atol=0)
    return (value(agent, h_new, z_new) - value(agent, h, z)) ** 2, z_new


def moves_the_values(gaps):
    """The value of nearly every state moved."""
    return (gaps > 0).float().mean().item() >= 0.9


def test_value_diversification_moves_the_value_and_raises_its_objective():
    args, wm, agent, h, z = valdiv_setup(critic_std=0.03)
    gaps, _ = value_gaps(h, z, wm, agent, args)
    assert moves_the_values(gaps)
    # the ascent raises the objective beyond where it starts (the same noise, no step)
    start, _ = value_gaps(h, z, wm, agent, dataclasses.replace(args, valdiv_steps=0))
    assert (gaps > start).float().mean().item() >= 0.9


def test_value_diversification_without_init_noise_is_stuck():
    """The test above discriminates: started at the input state, the gradient of Eq. 5 is zero, nothing moves."""
    args, wm, agent, h, z = valdiv_setup(critic_std=0.03, valdiv_init_noise=0.0)
    gaps, z_new = value_gaps(h, z, wm, agent, args)
    assert not moves_the_values(gaps) and (gaps == 0).all() and torch.equal(z_new, z)


def test_value_diversification_flips_classes_of_z_on_a_steep_critic():
    """The ascent reaches z too: its continuous copy accumulates the steps until classes change."""
    args, wm, agent, h, z = valdiv_setup(critic_std=0.1)
    _, z_new = value_gaps(h, z, wm, agent, args)
    assert (z_new.argmax(-1) != z.argmax(-1)).any(-1).float().mean().item() > 0.1


# %% every variant
def test_a_variant_saved_beside_the_others_is_found(tmp_path):
    """The per-variant tests run every dreamer_ppo_{name}.py with a transformation: a fork is found by its file; the
    baseline and the Offline baseline (no dreams) are not variants; the paper's four are found in the repository."""
    for script in ("dreamer_ppo.py", "dreamer_ppo_random.py", "dreamer_ppo_offline.py"):
        shutil.copy(ROOT / script, tmp_path / script)
    shutil.copy(ROOT / "dreamer_ppo_random.py", tmp_path / "dreamer_ppo_myidea.py")
    (tmp_path / "dreamer_ppo_notes.md").write_text("# %% transformation\n")
    assert find_variants(tmp_path) == ("myidea", "random")
    assert {"random", "deepdream", "valdiv", "full"} <= set(VARIANTS) and "offline" not in VARIANTS


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_is_the_baseline_but_for_its_transformation(name):
    """`diff dreamer_ppo.py dreamer_ppo_{name}.py` shows the transformation, its flags and the docstring only."""
    baseline, variant = blocks(ROOT / "dreamer_ppo.py"), blocks(MODULES[name].__file__)
    assert list(variant) == list(baseline)
    assert [b for b in baseline if baseline[b] != variant[b]] == list(VARIANT_BLOCKS)


@pytest.mark.parametrize("name", VARIANTS)
def test_transform_changes_only_the_states_it_reports(name):
    module = MODULES[name]
    args = variant_args(name)
    wm, agent = make_models(args)
    steep_critic(agent, std=0.03)
    wm.requires_grad_(False)  # as at night
    params = {k: v.clone() for k, v in {**dict(wm.named_parameters()), **dict(agent.named_parameters())}.items()}
    h, z = dream_states(wm, 200)
    torch.manual_seed(1)
    h_new, z_new, changed = module.transform(h, z, wm, agent, args)
    assert changed.dtype == torch.bool and changed.shape == (200,) and changed.any() and not changed.all()
    assert torch.equal(h_new[~changed], h[~changed]) and torch.equal(z_new[~changed], z[~changed])
    assert not torch.equal(h_new[changed], h[changed])
    assert is_onehot(z_new, atol=0)
    assert not h_new.requires_grad and not z_new.requires_grad
    # the models are untouched: no parameter moved, no gradient left behind
    for key, value_ in {**dict(wm.named_parameters()), **dict(agent.named_parameters())}.items():
        assert torch.equal(value_, params[key]) and value_.grad is None, key


@pytest.mark.parametrize("name", VARIANTS)
def test_imagine_transforms_one_dream_state_in_H(name):
    module = MODULES[name]
    args = variant_args(name, horizon=8)
    wm, agent = make_models(args)
    wm.requires_grad_(False)
    h, z = dream_states(wm, 250)
    torch.manual_seed(1)
    traj, stats = module.imagine(wm, agent, h, z, args.horizon, args)
    # 2,000 dream states, each transformed with probability 1/8: the share's sd is 0.007
    assert stats["transformed_frac"] == pytest.approx(1 / args.horizon, abs=0.04)
    assert stats["value_move"] >= 0.0
    assert is_onehot(traj["states"][..., args.rnn_units:].unflatten(-1, (args.categoricals, args.classes)))


@pytest.mark.parametrize("name", VARIANTS)
def test_dream_states_are_float32_in_bf16_autocast(name, monkeypatch):
    """In bf16 autocast the GRU's gates come from a float32 LayerNorm: the dream states are float32 on every device
    (bf16 autocast forced here where the CPU would emulate it), and they transform."""
    module = MODULES[name]
    monkeypatch.setattr(module, "native_bf16", lambda device: True)
    args = variant_args(name, horizon=4, bf16=True)
    wm, agent = make_models(args)
    h, z = dream_states(wm, 64)
    with torch.no_grad(), module.autocast(torch.device("cpu"), args):
        assert wm.recurrent(h, z, torch.zeros(64, dtype=torch.long)).dtype == torch.float32
    torch.manual_seed(1)
    traj, stats = module.imagine(wm, agent, h, z, args.horizon, args)
    assert stats["transformed_frac"] > 0 and traj["states"].dtype == torch.float32


# %% FullDreamer
def test_full_dreamer_uses_the_three_transformations_in_equal_shares(monkeypatch):
    module = MODULES["full"]
    args = variant_args("full")
    wm, agent = make_models(args)
    marked = lambda mark: lambda h, z, wm, agent, args, generator: (torch.full_like(h, mark), z)  # noqa: E731
    monkeypatch.setattr(module, "TRANSFORMATIONS", tuple(marked(k + 1.0) for k in range(3)))
    h, z = dream_states(wm, 3000)
    h = h.clamp(-0.5, 0.5)  # no state is marked before its transformation
    torch.manual_seed(1)
    h_new, _, changed = module.transform(h, z, wm, agent, args, force=True)
    assert changed.all() and (h_new == h_new[:, :1]).all()
    for mark in (1.0, 2.0, 3.0):  # 3,000 states: each share's sd is 0.009
        assert (h_new[:, 0] == mark).float().mean().item() == pytest.approx(1 / 3, abs=0.05)
    # and by chance, one state in H, the marks only on the changed states
    torch.manual_seed(2)
    h_new, _, changed = module.transform(h, z, wm, agent, args)
    assert changed.float().mean().item() == pytest.approx(1 / args.horizon, abs=0.04)
    assert torch.equal(h_new[~changed], h[~changed]) and (h_new[changed, 0] >= 1).all()


def test_full_dreamer_copies_the_three_transformations():
    """FullDreamer's transformation functions and flags are those of the three single-transformation scripts."""
    full_blocks = blocks(ROOT / "dreamer_ppo_full.py")
    own = ("transform", "check_transformation_args")
    args_lines = []
    for name in SINGLES:
        single = MODULES[name]
        functions = [f for f, v in vars(single).items()
                     if inspect.isfunction(v) and f not in own and "def " + f + "(" in "\n".join(
                         blocks(single.__file__)["transformation"])]
        assert functions, name
        for function in functions:
            assert inspect.getsource(getattr(MODULES["full"], function)) == inspect.getsource(getattr(single, function))
        args_lines += [line for line in blocks(single.__file__)["transformation args"] if line.strip()]
    assert [line for line in full_blocks["transformation args"] if line.strip()] == args_lines


# %% flags
@pytest.mark.parametrize("name, changes, flag, words", [
    ("random", dict(p_swing=-0.1), "--p-swing", ["[0, 1]", "-0.1"]),
    ("random", dict(p_swing=1.5), "--p-swing", ["[0, 1]", "1.5"]),
    ("deepdream", dict(deepdream_steps=0), "--deepdream-steps", ["positive", "0"]),
    ("deepdream", dict(deepdream_lr=0.0), "--deepdream-lr", ["positive"]),
    ("deepdream", dict(deepdream_lr=float("nan")), "--deepdream-lr", ["positive", "nan"]),
    ("valdiv", dict(valdiv_steps=-2), "--valdiv-steps", ["positive", "-2"]),
    ("valdiv", dict(valdiv_lr=-0.5), "--valdiv-lr", ["positive", "-0.5"]),
    ("valdiv", dict(valdiv_init_noise=0.0), "--valdiv-init-noise", ["positive", "zero"]),
    ("full", dict(p_swing=2.0), "--p-swing", ["[0, 1]"]),
    ("full", dict(deepdream_steps=0), "--deepdream-steps", ["positive"]),
    ("full", dict(valdiv_lr=0.0), "--valdiv-lr", ["positive"]),
    ("full", dict(valdiv_init_noise=-1.0), "--valdiv-init-noise", ["positive"]),
])
def test_check_args_refuses_bad_transformation_flags(name, changes, flag, words):
    with pytest.raises(SystemExit) as e:
        MODULES[name].check_args(variant_args(name, **changes))
    message = str(e.value)
    assert flag in message
    for word in words:
        assert word in message


def other_value(field):
    """The command-line tokens that set a flag to a value other than its default (another of a Literal's choices,
    the other boolean, else 1), and that value."""
    flag = "--" + field.name.replace("_", "-")
    if field.type is bool:
        return [flag if not field.default else "--no-" + flag[2:]], not field.default
    choices = typing.get_args(field.type) if typing.get_origin(field.type) is typing.Literal else ()
    value = next(c for c in choices if c != field.default) if choices else field.type(1)
    return [flag, str(value)], value


@pytest.mark.parametrize("name", VARIANTS)
def test_transformation_flags_parse_with_the_paper_defaults(name):
    """A variant's flags beyond the baseline's are those of its `transformation args` block, at the paper's values
    where the paper gives one, and each parses from the command line."""
    module = MODULES[name]
    baseline = {f.name for f in dataclasses.fields(dreamer_ppo.Args)}
    new = [f for f in dataclasses.fields(module.Args) if f.name not in baseline]
    declared = [re.match(r"\s+(\w+):", line) for line in blocks(module.__file__)["transformation args"]]
    assert {f.name for f in new} == {m.group(1) for m in declared if m}
    paper = dict(p_swing=0.5, deepdream_steps=10, deepdream_lr=0.1, valdiv_steps=10, valdiv_lr=0.5,
                 deepdream_step="normalized")  # DeepDream's own step (Mordvintsev et al., 2015)
    args = tyro.cli(module.Args, args=[])
    assert all(getattr(args, f.name) == paper[f.name] for f in new if f.name in paper)
    module.check_args(variant_args(name))
    given = {f.name: other_value(f) for f in new}
    parsed = tyro.cli(module.Args, args=[token for tokens, _ in given.values() for token in tokens])
    assert {f: getattr(parsed, f) for f in given} == {f: value for f, (_, value) in given.items()}
