"""The maths block: symlog/symexp, two-hot, unimix latents, straight-through samples, KL with free bits."""

import math

import pytest
import torch
import torch.nn.functional as F

from dreamer_ppo import (categorical_kl, latent_probs, sample_onehot, symexp, symlog, twohot_decode, twohot_encode,
                         twohot_loss)
from conftest import is_onehot

VALUES = [-1e6, -1234.5, -10.0, -1.0, -1e-3, 0.0, 1e-3, 0.5, 1.0, 10.0, 1234.5, 1e6]


# %% symlog / symexp
def test_symlog_definition():
    x = torch.tensor(VALUES, dtype=torch.float64)
    expected = torch.tensor([math.copysign(math.log(1 + abs(v)), v) for v in VALUES], dtype=torch.float64)
    assert torch.allclose(symlog(x), expected, rtol=1e-12, atol=0)
    assert symlog(torch.tensor(0.0)).item() == 0.0
    assert symexp(torch.tensor(0.0)).item() == 0.0
    # by hand: ln(1 + e - 1) = 1
    assert symlog(torch.tensor([math.e - 1, 1 - math.e], dtype=torch.float64)).tolist() == pytest.approx([1.0, -1.0])


def test_symlog_symexp_are_inverses():
    x = torch.tensor(VALUES + [-1e30, 1e30], dtype=torch.float64)
    assert torch.allclose(symexp(symlog(x)), x, rtol=1e-12, atol=1e-15)
    y = torch.linspace(-60, 60, 121, dtype=torch.float64)
    assert torch.allclose(symlog(symexp(y)), y, rtol=1e-12, atol=1e-12)
    # float32 too, over the range of the bins and beyond
    x32 = torch.tensor(VALUES + [-1e20, 1e20])
    assert torch.allclose(symexp(symlog(x32)), x32, rtol=1e-5, atol=1e-6)


# %% two-hot
# 41 bins at -20..20 are exactly the integers: weights are easy to compute by hand.
BINS = torch.linspace(-20, 20, 41)


def test_twohot_rows_sum_to_one_on_two_adjacent_bins():
    bins = torch.linspace(-20, 20, 31)
    y = torch.tensor(VALUES + [3.3, -7.7, 2e8, -2e8])
    enc = twohot_encode(y, bins)
    assert enc.shape == (len(y), 31)
    assert torch.allclose(enc.sum(-1), torch.ones(len(y)), atol=1e-6)
    assert (enc >= 0).all()
    for row in enc:
        nz = torch.nonzero(row > 1e-7).flatten().tolist()
        assert 1 <= len(nz) <= 2
        if len(nz) == 2:
            assert nz[1] - nz[0] == 1


def test_twohot_decodes_back_inside_range():
    bins = torch.linspace(-20, 20, 31)
    y = torch.tensor([-1e6, -1234.5, -10.0, -1.0, -0.3, 0.0, 0.3, 1.0, 2.5, 10.0, 1234.5, 1e6])
    decoded = symexp((twohot_encode(y, bins) * bins).sum(-1))
    assert torch.allclose(decoded, y, rtol=1e-4, atol=1e-5)


def test_twohot_weights_by_hand():
    # symlog(y) = 2.25 lies between the bins 2 (index 22) and 3 (index 23): 0.75 and 0.25
    enc = twohot_encode(symexp(torch.tensor([2.25, -0.5])), BINS)
    expected = torch.zeros(2, 41)
    expected[0, 22], expected[0, 23] = 0.75, 0.25
    expected[1, 19], expected[1, 20] = 0.5, 0.5  # -0.5 between -1 (index 19) and 0 (index 20)
    assert torch.allclose(enc, expected, atol=1e-5)


def test_twohot_beyond_the_extremes_goes_to_the_edge_bin():
    # symlog(1e10) = 23.03 > 20, symlog(-1e12) = -27.6 < -20
    enc = twohot_encode(torch.tensor([1e10, -1e12, 1e30]), BINS)
    assert enc[0, -1] == 1 and enc[0, :-1].abs().sum() == 0
    assert enc[1, 0] == 1 and enc[1, 1:].abs().sum() == 0
    assert enc[2, -1] == 1 and enc[2, :-1].abs().sum() == 0


def test_twohot_value_on_a_bin_puts_all_weight_on_it():
    y = symexp(torch.tensor([0.0, 3.0, -7.0, 20.0, -20.0]))
    enc = twohot_encode(y, BINS)
    for row, index in zip(enc, (20, 23, 13, 40, 0)):
        assert row[index] == pytest.approx(1.0, abs=1e-5)
        assert row.sum() - row[index] == pytest.approx(0.0, abs=1e-5)


def test_twohot_decode_of_peaked_logits():
    bins = torch.linspace(-20, 20, 31)
    for k in (0, 5, 15, 17, 30):
        logits = 100.0 * F.one_hot(torch.tensor(k), 31).float()
        b = bins[k].item()
        expected = math.copysign(math.expm1(abs(b)), b)
        assert twohot_decode(logits, bins).item() == pytest.approx(expected, rel=1e-4, abs=1e-5)
    # uniform logits: expected bin 0 (the bins are symmetric), decoded 0
    assert twohot_decode(torch.zeros(31), bins).item() == pytest.approx(0.0, abs=1e-5)


def test_twohot_loss_is_cross_entropy_by_hand():
    logits = torch.tensor([[0.5, -1.0, 2.0] + [0.0] * 38, [1.0] * 41])
    y = symexp(torch.tensor([2.25, -0.5]))
    loss = twohot_loss(logits, y, BINS)
    lse0 = math.log(sum(math.exp(v) for v in logits[0].tolist()))
    lse1 = math.log(41 * math.e)
    expected0 = -(0.75 * (logits[0, 22].item() - lse0) + 0.25 * (logits[0, 23].item() - lse0))
    expected1 = -(0.5 * (1.0 - lse1) + 0.5 * (1.0 - lse1))  # = ln 41 for uniform logits
    assert loss.tolist() == pytest.approx([expected0, expected1], rel=1e-5)
    assert expected1 == pytest.approx(math.log(41))
    # the target is a stop-gradient: the gradient w.r.t. the logits is softmax - target
    logits = logits.clone().requires_grad_(True)
    twohot_loss(logits, y, BINS).sum().backward()
    assert torch.allclose(logits.grad, logits.detach().softmax(-1) - twohot_encode(y, BINS), atol=1e-5)


# %% categorical latents
def test_latent_probs_unimix():
    logits = torch.randn(5, 4, 6, generator=torch.Generator().manual_seed(0)) * 3
    probs = latent_probs(logits, 0.01)
    assert torch.allclose(probs, 0.99 * logits.softmax(-1) + 0.01 / 6, atol=1e-7)
    assert torch.allclose(probs.sum(-1), torch.ones(5, 4), atol=1e-6)


def test_latent_probs_floor_for_extreme_logits():
    J = 4
    logits = torch.tensor([[1e4, -1e4, -1e4, 0.0], [-1e30, 1e30, 0.0, 0.0]])
    probs = latent_probs(logits, 0.01)
    assert probs.min().item() >= 0.01 / J * (1 - 1e-6)  # float32 rounding of 0.0025
    assert torch.allclose(probs.sum(-1), torch.ones(2), atol=1e-6)
    assert probs[0, 0].item() == pytest.approx(0.99 + 0.01 / J, abs=1e-6)
    assert torch.isfinite(probs).all()


def test_sample_onehot_is_one_hot_and_follows_probs():
    torch.manual_seed(0)
    probs = latent_probs(torch.randn(3, 5), 0.01).expand(20000, 3, 5).contiguous()
    sample = sample_onehot(probs)
    assert sample.shape == (20000, 3, 5)
    assert is_onehot(sample)
    # the empirical frequencies match the probabilities
    assert torch.allclose(sample.mean(0), probs[0], atol=0.015)


def test_sample_onehot_values_are_exactly_one_hot():
    # The straight-through trick must not change the value: sample + (probs - sg(probs)) is exactly the sample,
    # whereas (sample + probs) - sg(probs) rounds 1 + p - p to 1 +- 1 ulp.
    torch.manual_seed(1)
    probs = latent_probs(torch.randn(64, 4, 5), 0.01).requires_grad_(True)
    sample = sample_onehot(probs).detach()
    assert ((sample == 0) | (sample == 1)).all(), f"values off one-hot: {sample[(sample != 0) & (sample != 1)][:4]}"
    assert (sample.sum(-1) == 1).all()


def test_sample_onehot_straight_through_gradient():
    torch.manual_seed(1)
    probs = latent_probs(torch.randn(6, 4, 5), 0.01).detach().requires_grad_(True)
    w = torch.randn(6, 4, 5)
    sample = sample_onehot(probs)
    assert is_onehot(sample.detach())
    (sample * w).sum().backward()
    assert torch.allclose(probs.grad, w)


# %% KL and free bits
def test_categorical_kl_by_hand():
    p = torch.tensor([[[0.5, 0.5], [0.9, 0.1]]])  # 1 sample, C = 2, J = 2
    q = torch.tensor([[[0.25, 0.75], [0.5, 0.5]]])
    expected = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)) + (0.9 * math.log(0.9 / 0.5)
                                                                            + 0.1 * math.log(0.1 / 0.5))
    kl = categorical_kl(p, q)
    assert kl.shape == (1,)
    assert kl.item() == pytest.approx(expected, rel=1e-6)
    assert categorical_kl(q, q).item() == pytest.approx(0.0, abs=1e-7)


def test_free_bits_clamp_as_in_the_loss():
    free_nats = 1.0
    p = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]])
    # below 1 nat: KL(p || q) = 2 (0.5 ln(0.5/0.4) + 0.5 ln(0.5/0.6)) = 0.0408 nats
    q = torch.tensor([[[0.4, 0.6], [0.4, 0.6]]], requires_grad=True)
    term = categorical_kl(p.detach(), q).clamp(min=free_nats).mean()
    term.backward()
    assert term.item() == 1.0
    assert (q.grad == 0).all()
    # above 1 nat: KL = 2 (0.5 ln(0.5/0.05) + 0.5 ln(0.5/0.95)) = 1.6607 nats
    q = torch.tensor([[[0.05, 0.95], [0.05, 0.95]]], requires_grad=True)
    term = categorical_kl(p.detach(), q).clamp(min=free_nats).mean()
    term.backward()
    assert term.item() == pytest.approx(2 * (0.5 * math.log(10) + 0.5 * math.log(0.5 / 0.95)), rel=1e-6)
    assert q.grad.abs().sum() > 0
    # d/dq of -sum p ln q = -p / q
    assert torch.allclose(q.grad, -p / q.detach())
