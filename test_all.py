"""The test suite: pytest test_all.py (a few minutes on 2 CPU cores, no downloads, no GPU)."""
import colorsys
import contextlib
import csv
import importlib.util
import io
import itertools
import json
import math
import os
import pickle
import signal
import struct
import subprocess
import sys
import tarfile
import time
import warnings
import zipfile
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import data
import losses
import metrics
import models
import runtime
import train
import traverse
from data import DataError

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = "sprites:positions=4,orientations=4,scales=2"  # 3 x 2 x 4 x 4 x 4 = 384 images


# ----------------------------------------------------------------------------- models

@pytest.mark.parametrize("arch,channels", [("conv", 1), ("conv", 3), ("mlp", 1), ("mlp", 3)])
def test_model_shapes_and_gradients(arch, channels):
    torch.manual_seed(0)
    model = models.build_model(arch, latents=6, channels=channels)
    x = torch.rand(5, channels, 64, 64)
    logits, mu, logvar, z = model(x)
    assert logits.shape == x.shape and mu.shape == logvar.shape == z.shape == (5, 6)
    (logits.mean() + z.pow(2).mean()).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_conv_layers_follow_burgess():
    model = models.build_model("conv", latents=10, channels=1)
    convs = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [(32, (4, 4), (2, 2), (1, 1))] * 4
    linears = [m.out_features for m in model.encoder if isinstance(m, torch.nn.Linear)]
    assert linears == [256, 256, 20]
    # encoder 544 + 3 * 16,416 + 131,328 + 65,792 + 5,140; decoder 2,816 + 65,792 + 131,584
    # + 3 * 16,416 + 513 (the weights and biases of each layer, counted by hand)
    assert sum(p.numel() for p in model.parameters()) == 502_005


def test_deterministic_model_is_an_autoencoder():
    model = models.build_model("mlp", latents=4, deterministic=True)
    x = torch.rand(3, 1, 64, 64)
    _, mu, logvar, z = model(x)
    assert torch.equal(z, mu) and torch.equal(logvar, torch.zeros_like(mu))


def test_model_rejects_bad_sizes():
    with pytest.raises(ValueError, match="64x64"):
        models.build_model("conv", size=32)
    with pytest.raises(ValueError, match="channels"):
        models.build_model("conv", channels=2)
    assert models.build_model("mlp", size=32)(torch.rand(2, 1, 32, 32))[0].shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="arch='mlp'") as error:
        models.build_model("conv", size=32)
    assert "--" not in str(error.value)  # a leaf names its own arguments, not the CLI's flags
    with pytest.raises(ValueError, match="latents"):
        models.build_discriminator(0)


def test_discriminator_follows_kim_and_mnih():
    torch.manual_seed(0)
    discriminator = models.build_discriminator(latents=7)
    layers = list(discriminator)
    linears = [m for m in layers if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(7, 1000)] + [(1000, 1000)] * 5 + [(1000, 2)]
    activations = [m for m in layers if not isinstance(m, torch.nn.Linear)]
    assert len(activations) == 6 and all(isinstance(m, torch.nn.LeakyReLU) and m.negative_slope == 0.2
                                          for m in activations)
    assert isinstance(layers[-1], torch.nn.Linear)  # logits out, no activation after the last layer
    # 7 * 1000 + 1000, then 5 * (1000 * 1000 + 1000), then 1000 * 2 + 2, counted by hand
    assert sum(p.numel() for p in discriminator.parameters()) == 8_000 + 5_005_000 + 2_002
    z = torch.randn(5, 7, requires_grad=True)
    logits = discriminator(z)
    assert logits.shape == (5, 2)
    (logits[:, 0] - logits[:, 1]).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # the VAE's TC term reaches the encoder


# ----------------------------------------------------------------------------- losses (float64 references)

def reference_log_normal(x, mu, logvar):
    return -0.5 * (np.log(2 * np.pi) + logvar + (x - mu) ** 2 / np.exp(logvar))


def reference_logsumexp(a, axis):
    top = a.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(a - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def reference_weights(batch, n, estimator):
    if estimator == "mws":
        return np.full((batch, batch), 1.0 / (batch * n))
    m = batch - 1
    w = np.full((batch, batch), 1.0 / m)
    for i in range(batch):
        w[i, i] = 1.0 / n
        w[i, (i + 1) % batch] = (n - m) / (n * m)
    return w


def reference_tc(z, mu, logvar, n, estimator):
    L = reference_log_normal(z[:, None, :], mu[None, :, :], logvar[None, :, :])  # (B, B, D)
    log_w = np.log(reference_weights(len(z), n, estimator))
    log_qz = reference_logsumexp(log_w + L.sum(2), axis=1)
    log_prod = reference_logsumexp(log_w[:, :, None] + L, axis=1).sum(1)
    log_qzx = reference_log_normal(z, mu, logvar).sum(1)
    log_pz = reference_log_normal(z, 0.0, 0.0).sum(1)
    return log_qzx - log_qz, log_qz - log_prod, log_prod - log_pz


def reference_tc_torch(z, mu, logvar, n, estimator):
    """reference_tc in float64 torch, for autograd; the difference scaled before squaring."""
    def log_normal(x, m, lv):
        return -0.5 * (math.log(2 * math.pi) + lv + ((x - m) * torch.exp(-0.5 * lv)) ** 2)
    L = log_normal(z[:, None, :], mu[None, :, :], logvar[None, :, :])  # (B, B, D)
    log_w = torch.tensor(np.log(reference_weights(len(z), n, estimator)))
    log_qz = torch.logsumexp(log_w + L.sum(2), dim=1)
    log_prod = torch.logsumexp(log_w[:, :, None] + L, dim=1).sum(1)
    log_qzx = log_normal(z, mu, logvar).sum(1)
    log_pz = log_normal(z, torch.zeros_like(z), torch.zeros_like(z)).sum(1)
    return log_qzx - log_qz, log_qz - log_prod, log_prod - log_pz


def random_posterior(batch=12, dims=5, seed=0):
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(batch, dims))
    logvar = rng.normal(-1, 0.7, size=(batch, dims))
    z = mu + rng.normal(size=(batch, dims)) * np.exp(0.5 * logvar)
    return z, mu, logvar


@pytest.mark.parametrize("estimator", ["mws", "mss"])
def test_tc_terms_match_reference(estimator):
    z, mu, logvar = random_posterior()
    expected = reference_tc(z, mu, logvar, 1000, estimator)
    got = losses.tc_terms(*(torch.tensor(a) for a in (z, mu, logvar)), 1000, estimator)
    for g, e in zip(got, expected):
        assert g.shape == (12,)
        np.testing.assert_allclose(g.double().numpy(), e, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("estimator", ["mws", "mss"])
def test_tc_gradients_match_finite_differences(estimator):
    z, mu, logvar = (torch.tensor(a, requires_grad=True) for a in random_posterior(6, 3, seed=1))
    assert torch.autograd.gradcheck(lambda a, b, c: losses.tc_terms(a, b, c, 50, estimator), (z, mu, logvar))


def test_mss_weights_rows_sum_to_one_with_diagonal_one_over_n():
    w = losses.log_importance_weights(7, 100, "mss").double().exp()
    np.testing.assert_allclose(w.sum(1).numpy(), 1.0, atol=1e-6)
    np.testing.assert_allclose(torch.diagonal(w).numpy(), 1 / 100, rtol=1e-6)
    np.testing.assert_allclose(w.numpy(), reference_weights(7, 100, "mss"), rtol=1e-6)


def test_recon_and_kl_match_reference():
    rng = np.random.default_rng(2)
    logits, x = rng.normal(size=(4, 1, 8, 8)), rng.random((4, 1, 8, 8))
    p = 1 / (1 + np.exp(-logits))
    bce = -(x * np.log(p) + (1 - x) * np.log(1 - p)).reshape(4, -1).sum(1)
    mse = ((p - x) ** 2).reshape(4, -1).sum(1)
    np.testing.assert_allclose(losses.recon_loss(torch.tensor(logits), torch.tensor(x), "bce"), bce, rtol=1e-5)
    np.testing.assert_allclose(losses.recon_loss(torch.tensor(logits), torch.tensor(x), "mse"), mse, rtol=1e-5)
    mu, logvar = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    # KL by its definition, E_q[log q - log p], by quadrature on a grid in float64
    grid = np.linspace(-12, 12, 200_001)
    q = np.exp(reference_log_normal(grid[:, None, None], mu, logvar))
    kl_quadrature = np.trapezoid(q * (reference_log_normal(grid[:, None, None], mu, logvar)
                                      - reference_log_normal(grid[:, None, None], 0, 0)), grid, axis=0)
    np.testing.assert_allclose(losses.kl_normal(torch.tensor(mu), torch.tensor(logvar)), kl_quadrature,
                               rtol=1e-4, atol=1e-6)


def reference_dip(mu, logvar=None):
    """Kumar et al.'s Cov_p(x)[mu(x)] (+ E[diag exp(logvar)]) by numpy's 1/B covariance: (off, diagonal)."""
    c = np.cov(mu, rowvar=False, bias=True)
    if logvar is not None:
        c = c + np.diag(np.exp(logvar).mean(0))
    return (c ** 2).sum() - (np.diag(c) ** 2).sum(), ((np.diag(c) - 1) ** 2).sum()


@pytest.mark.parametrize("name", losses.OBJECTIVES)
@pytest.mark.parametrize("estimator", ["mws", "mss"])
def test_objectives_match_reference(name, estimator):
    rng = np.random.default_rng(3)
    z, mu, logvar = random_posterior(10, 4, seed=3)
    logits, x = rng.normal(size=(10, 1, 8, 8)), (rng.random((10, 1, 8, 8)) > 0.5).astype(float)
    tc_logits = rng.normal(size=(10, 2)) * 3
    p = 1 / (1 + np.exp(-logits))
    recon = -(x * np.log(p) + (1 - x) * np.log(1 - p)).reshape(10, -1).sum(1)
    kl = (0.5 * (mu ** 2 + np.exp(logvar) - 1 - logvar)).sum(1)
    mi, tc, dwkl = reference_tc(z, mu, logvar, 500, estimator)
    factor_tc = tc_logits[:, 0] - tc_logits[:, 1]  # log D / (1 - D), D the softmax's class 0
    dip1, dip2 = reference_dip(mu), reference_dip(mu, logvar)
    beta, alpha, gamma, lambda_od, lambda_d = 3.0, 0.5, 2.0, 4.0, 7.0
    expected = {"ae": recon.mean(), "vae": (recon + kl).mean(), "betavae": (recon + beta * kl).mean(),
                "betatc": (recon + alpha * mi + beta * tc + gamma * dwkl).mean(),
                "factorvae": (recon + kl + gamma * factor_tc).mean(),
                "dipvae1": (recon + kl).mean() + lambda_od * dip1[0] + lambda_d * dip1[1],
                "dipvae2": (recon + kl).mean() + lambda_od * dip2[0] + lambda_d * dip2[1]}[name]
    t = [torch.tensor(a) for a in (x, logits, mu, logvar, z)]
    loss, terms = losses.objective(name, *t, beta=beta, alpha=alpha, gamma=gamma, dataset_size=500,
                                   estimator=estimator, lambda_od=lambda_od, lambda_d=lambda_d,
                                   tc_logits=torch.tensor(tc_logits))
    assert loss.dtype == torch.float32 and abs(loss.item() - expected) < 1e-4 * max(1, abs(expected))
    assert abs(terms["recon"] - recon.mean()) < 1e-3 and abs(terms["kl"] - kl.mean()) < 1e-4
    if name == "betatc":  # logged without the mws estimator's constants (0 for mss)
        n_log = math.log(500) if estimator == "mws" else 0.0
        assert abs(terms["mi"] - (mi.mean() - n_log)) < 1e-4 and abs(terms["tc"] - (tc.mean() - 3 * n_log)) < 1e-4
        assert abs(terms["dwkl"] - (dwkl.mean() + 4 * n_log)) < 1e-4
    if name == "factorvae":
        assert abs(terms["tc"] - factor_tc.mean()) < 1e-5
    if name.startswith("dipvae"):
        assert abs(terms["dip"] - sum(dip1 if name == "dipvae1" else dip2)) < 1e-5
    extra = {"ae": set(), "vae": set(), "betavae": set(), "betatc": {"mi", "tc", "dwkl"},
             "factorvae": {"tc"}, "dipvae1": {"dip"}, "dipvae2": {"dip"}}[name]
    assert set(terms) == {"recon", "kl"} | extra


def test_objective_defaults_follow_the_papers():
    """gamma 35 (Kim & Mnih); lambda_od 10 with lambda_d = 10 lambda_od (DIP-VAE-I) or = lambda_od (II)."""
    z, mu, logvar = (torch.tensor(a, dtype=torch.float32) for a in random_posterior(8, 3, seed=4))
    x, logits = torch.zeros(8, 1, 4, 4), torch.zeros(8, 1, 4, 4)
    tc_logits = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))

    def loss(name, **hyper):
        return losses.objective(name, x, logits, mu, logvar, z, tc_logits=tc_logits, **hyper)[0].item()

    assert loss("factorvae") == loss("factorvae", gamma=35.0) != loss("factorvae", gamma=1.0)
    assert loss("dipvae1") == loss("dipvae1", lambda_od=10.0, lambda_d=100.0)
    assert loss("dipvae2") == loss("dipvae2", lambda_od=10.0, lambda_d=10.0)
    assert loss("dipvae1", lambda_od=2.0) == loss("dipvae1", lambda_od=2.0, lambda_d=20.0)
    assert loss("dipvae2", lambda_od=2.0) == loss("dipvae2", lambda_od=2.0, lambda_d=2.0)
    assert losses.DISCRIMINATOR_LR == 1e-4 and losses.DISCRIMINATOR_BETAS == (0.5, 0.9)


def test_objective_errors_name_the_missing_argument():
    z, mu, logvar = (torch.tensor(a, dtype=torch.float32) for a in random_posterior(4, 3))
    x = torch.zeros(4, 1, 4, 4)
    with pytest.raises(ValueError, match="tc_logits"):
        losses.objective("factorvae", x, x, mu, logvar, z)
    with pytest.raises(ValueError, match=r"tc_logits must have shape \(B, 2\), got \(4, 3\)"):
        losses.objective("factorvae", x, x, mu, logvar, z, tc_logits=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="3 rows for a batch of 4"):
        losses.objective("factorvae", x, x, mu, logvar, z, tc_logits=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="dataset_size"):
        losses.objective("betatc", x, x, mu, logvar, z)
    with pytest.raises(ValueError, match="at least 2"):
        losses.objective("dipvae1", x[:1], x[:1], mu[:1], logvar[:1], z[:1])
    with pytest.raises(ValueError, match="factorvae, dipvae1, dipvae2"):
        losses.objective("dipvae3", x, x, mu, logvar, z)


@pytest.mark.parametrize("estimator", ["mws", "mss"])
def test_betatc_logs_zero_terms_for_a_collapsed_model(estimator):
    """q(z|x) = p(z) for every x: MI, TC and DWKL are 0; the logged terms must be, the loss unchanged.

    Tolerance 2e-3 nats: the float32 terms are differences of sums of magnitude
    D (log 2 pi + z^2) / 2 + D log(B N), about 200 nats here, each carrying a relative rounding
    error of a few float32 epsilons (6e-8) per operation over some tens of operations.
    """
    batch, dims, n = 32, 10, 737_280
    noise = torch.randn(batch, dims, generator=torch.Generator().manual_seed(1))
    mu, logvar = torch.zeros(batch, dims, requires_grad=True), torch.zeros(batch, dims, requires_grad=True)
    z = mu + noise * torch.exp(0.5 * logvar)
    x, logits = torch.zeros(batch, 1, 4, 4), torch.zeros(batch, 1, 4, 4)
    loss, terms = losses.objective("betatc", x, logits, mu, logvar, z, beta=6.0, dataset_size=n,
                                   estimator=estimator)
    for name in ("mi", "tc", "dwkl"):
        assert abs(terms[name]) < 2e-3, (name, terms[name])
    # the estimator as published keeps its constants (known answer for mws: log N, 9 log N, -10 log N)
    raw = [t.mean().item() for t in losses.tc_terms(z, mu, logvar, n, estimator)]
    offsets = [math.log(n), 9 * math.log(n), -10 * math.log(n)] if estimator == "mws" else [0, 0, 0]
    np.testing.assert_allclose(raw, offsets, atol=2e-3)
    assert losses.estimator_offsets(estimator, n, dims) == pytest.approx(offsets, abs=1e-9)
    # the loss and its gradient are those of Chen et al.'s terms, constants included, in float64
    loss.backward()
    mu64, logvar64 = torch.zeros(batch, dims, dtype=torch.float64, requires_grad=True), torch.zeros(
        batch, dims, dtype=torch.float64, requires_grad=True)
    mi, tc, dwkl = reference_tc_torch(mu64 + noise.double() * torch.exp(0.5 * logvar64), mu64, logvar64, n, estimator)
    expected = 16 * math.log(2) + (mi + 6 * tc + dwkl).mean()
    expected.backward()
    assert abs(loss.item() - expected.item()) < 2e-3
    np.testing.assert_allclose(mu.grad.numpy(), mu64.grad.numpy(), atol=1e-5)
    np.testing.assert_allclose(logvar.grad.numpy(), logvar64.grad.numpy(), atol=1e-5)


def test_capacity_schedule():
    z, mu, logvar = (torch.tensor(a) for a in random_posterior(8, 3))
    x, logits = torch.zeros(8, 1, 4, 4), torch.zeros(8, 1, 4, 4)
    kl = losses.kl_normal(mu, logvar).sum(1).mean().item()
    recon = 16 * math.log(2)
    for step, target in [(0, 0.0), (50, 10.0), (100, 20.0), (500, 20.0)]:
        loss, terms = losses.objective("betavae", x, logits, mu, logvar, z, capacity=20,
                                       capacity_steps=100, step=step)
        assert abs(terms["capacity"] - target) < 1e-6
        assert abs(loss.item() - (recon + 1000 * abs(kl - target))) < 1e-2


@pytest.mark.parametrize("name", losses.OBJECTIVES + losses.PAIR_OBJECTIVES)
def test_losses_are_float32_under_autocast(name):
    z, mu, logvar = (torch.tensor(a, dtype=torch.bfloat16) for a in random_posterior(8, 3))
    tc_logits, x, spread = torch.randn(8, 2).bfloat16(), torch.rand(8, 1, 4, 4), mu * 100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, terms = losses.objective(name, x, torch.zeros(8, 1, 4, 4, dtype=torch.bfloat16), mu, logvar, z,
                                       dataset_size=100, tc_logits=tc_logits)
        d_loss = losses.discriminator_loss(tc_logits, tc_logits.flip(0))
        off_diagonal, diagonal = losses.dip_terms(spread, logvar)
    assert loss.dtype == d_loss.dtype == off_diagonal.dtype == torch.float32
    # the covariance's matrix product stays in float32 (in bf16 it is off by about 1e-3 relative)
    exact = losses.dip_terms(spread.float(), logvar.float())
    assert abs(off_diagonal.item() - exact[0].item()) < 1e-5 * exact[0].item()
    assert abs(diagonal.item() - exact[1].item()) < 1e-5 * exact[1].item()


@pytest.mark.parametrize("estimator", ["mws", "mss"])
def test_tc_log_densities_survive_underflow(estimator):
    """Far-apart, narrow posteriors: exp(L) underflows, and the exact fallback must take over."""
    torch.manual_seed(0)
    mu = (torch.randn(6, 3, dtype=torch.float64) * 50).requires_grad_()
    logvar = torch.full((6, 3), -12.0, dtype=torch.float64)
    logvar[0] = 5
    logvar.requires_grad_()
    z = (mu.detach() + torch.randn(6, 3, dtype=torch.float64) * torch.exp(0.5 * logvar.detach())).requires_grad_()
    got = losses.tc_terms(z, mu, logvar, 100, estimator)
    expected = reference_tc(*(a.detach().numpy() for a in (z, mu, logvar)), 100, estimator)
    for g, e in zip(got, expected):
        assert torch.isfinite(g).all()
        np.testing.assert_allclose(g.double().detach().numpy(), e, rtol=1e-3, atol=1e-2)
    assert torch.autograd.gradcheck(lambda a, b, c: losses.tc_terms(a, b, c, 100, estimator), (z, mu, logvar))


@pytest.mark.parametrize("estimator", ["mws", "mss"])
def test_tc_terms_in_blocks_of_rows_match_reference(monkeypatch, estimator):
    """The estimator forms L a block of rows at a time (at B = 2048 on the CPU, 128 rows): blocks
    of 3 and 2 rows here, values against the float64 reference, gradients against finite
    differences, also where some blocks underflow and are redone and others are not."""
    monkeypatch.setattr(losses, "BLOCK_ELEMENTS", 36)
    assert len(losses._row_blocks(12, torch.device("cpu"))) == 4
    z, mu, logvar = random_posterior()
    expected = reference_tc(z, mu, logvar, 1000, estimator)
    got = losses.tc_terms(*(torch.tensor(a, dtype=torch.float32) for a in (z, mu, logvar)), 1000,
                          estimator)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g.double().numpy(), e, rtol=1e-5, atol=1e-4)
    monkeypatch.setattr(losses, "BLOCK_ELEMENTS", 12)  # 6 rows: blocks of 2
    generator = torch.Generator().manual_seed(0)
    mu = torch.randn(6, 3, dtype=torch.float64, generator=generator) * 50
    logvar = torch.full((6, 3), -12.0, dtype=torch.float64)
    z = mu + torch.randn(6, 3, dtype=torch.float64, generator=generator) * torch.exp(0.5 * logvar)
    logvar[0] = 150  # sample 0's own density is e^-81 of the peak: block 0 is redone, not 1 and 2
    z[0] = mu[0] + 0.5
    got = losses.tc_terms(z, mu, logvar, 100, estimator)
    for g, e in zip(got, reference_tc(z.numpy(), mu.numpy(), logvar.numpy(), 100, estimator)):
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-3, atol=1e-2)
    inputs = tuple(t.clone().requires_grad_() for t in (z, mu, logvar))
    assert torch.autograd.gradcheck(lambda a, b, c: losses.tc_terms(a, b, c, 100, estimator), inputs)


def test_log_normal_is_finite_for_any_finite_logvar():
    """x == mu: log N = -(log 2 pi + logvar) / 2 exactly, gradients 0, 0, -1/2, however small sigma is."""
    for value in (-80.0, -89.0, -200.0, -400.0, -1e30):
        mu = torch.tensor([0.3, -1.7], requires_grad=True)
        x, logvar = mu.detach().clone().requires_grad_(), torch.full((2,), value, requires_grad=True)
        got = losses.log_normal(x, mu, logvar)
        np.testing.assert_allclose(got.detach().double().numpy(), -0.5 * (math.log(2 * math.pi) + value), rtol=1e-6)
        got.sum().backward()
        assert x.grad.tolist() == mu.grad.tolist() == [0.0, 0.0] and logvar.grad.tolist() == [-0.5, -0.5]
    # far from the mean at a tiny variance: -inf (the float64 value, -0.5 e^200, is beyond float32), not NaN
    far = losses.log_normal(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(-200.0))
    assert far.item() == -math.inf
    # an ordinary variance: the density's closed form
    assert abs(losses.log_normal(torch.tensor(1.5), torch.tensor(0.5), torch.tensor(math.log(4.0))).item()
               - (-0.5 * math.log(2 * math.pi * 4) - 1 / 8)) < 1e-6


@pytest.mark.parametrize("estimator", ["mws", "mss"])
@pytest.mark.parametrize("value", [-80.0, -89.0, -95.0, -200.0])
def test_tc_terms_and_gradients_at_tiny_variances(estimator, value):
    """float32 exp(-logvar) overflows below -88.7 and (z - mu)^2 * inf is NaN where z == mu.

    The float32 estimate and its gradients must equal a float64 reference computed from the same
    float32 inputs (where z == mu exactly, as z = mu + eps sigma rounds to at such sigma).
    """
    generator = torch.Generator().manual_seed(5)
    mu = torch.randn(8, 3, generator=generator)
    logvar = torch.full((8, 3), value)
    logvar[:, 0] = -2.0  # one ordinary latent beside the collapsed ones
    z = mu + torch.randn(8, 3, generator=generator) * torch.exp(0.5 * logvar)
    weights = torch.randn(3, 8, generator=generator, dtype=torch.float64)  # a random linear combination

    def values_and_gradients(tc_terms, dtype):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (z, mu, logvar)]
        terms = tc_terms(*inputs, 1000, estimator)
        sum((w.to(dtype) * t).sum() for w, t in zip(weights, terms)).backward()
        return [t.detach().double() for t in terms] + [t.grad.double() for t in inputs]

    got = values_and_gradients(losses.tc_terms, torch.float32)
    expected = values_and_gradients(reference_tc_torch, torch.float64)
    for name, g, e in zip(("mi", "tc", "dwkl", "dz", "dmu", "dlogvar"), got, expected):
        assert torch.isfinite(e).all() and torch.isfinite(g).all(), name
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-4, atol=1e-3, err_msg=name)


def test_dip_terms_match_reference_and_a_hand_computed_case():
    z, mu, logvar = random_posterior(9, 4, seed=6)
    for with_logvar in (False, True):
        got = losses.dip_terms(torch.tensor(mu), torch.tensor(logvar) if with_logvar else None)
        np.testing.assert_allclose([g.item() for g in got], reference_dip(mu, logvar if with_logvar else None),
                                   rtol=1e-5)
    # means (1, 2), (-1, 0): Cov = [[1, 1], [1, 1]] with the 1/B estimator (1/(B-1) would give 2s),
    # so the off-diagonal sum is 1 + 1 and the diagonal one 0; variances e^0 = 1 add 1 to the diagonal
    mu = torch.tensor([[1.0, 2.0], [-1.0, 0.0]])
    assert [t.item() for t in losses.dip_terms(mu)] == [2.0, 0.0]
    assert [t.item() for t in losses.dip_terms(mu, torch.zeros(2, 2))] == [2.0, 2.0]


def test_permute_dims_keeps_columns_and_breaks_rows():
    z = torch.randn(64, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    permuted = losses.permute_dims(z, torch.Generator().manual_seed(1))
    assert permuted.shape == z.shape and permuted.dtype == z.dtype
    assert torch.equal(permuted.sort(0).values, z.sort(0).values)  # every column keeps its values
    rows = {tuple(row) for row in z.tolist()}
    kept = sum(tuple(row) in rows for row in permuted.tolist())
    assert kept <= 2  # the joint is broken: a row survives with chance about 1/64^4 (and one 1/64 for all)
    assert all((permuted[:, d] != z[:, d]).sum() > 50 for d in range(5))  # each column moved on its own
    assert not torch.equal(permuted[:, 0].argsort(), permuted[:, 1].argsort())
    again = losses.permute_dims(z, torch.Generator().manual_seed(1))
    other = losses.permute_dims(z, torch.Generator().manual_seed(2))
    assert torch.equal(again, permuted) and not torch.equal(other, permuted)
    weights = torch.randn(64, 5)
    (permuted * weights).sum().backward()  # a permutation: each z entry gets its new position's weight
    assert torch.equal(z.grad.sort(0).values, weights.sort(0).values)


def test_discriminator_loss_and_accuracy_by_hand():
    joint = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # right, wrong
    permuted = torch.tensor([[0.0, 1.0], [3.0, 3.0]])  # right, a tie (wrong)
    # cross-entropy of class 0 for (2, 0): log(1 + e^-2); of class 1 for (0, 1): log(1 + e^-1); ...
    ce_joint = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1))) / 2
    ce_permuted = (math.log(1 + math.exp(-1)) + math.log(2)) / 2
    loss = losses.discriminator_loss(joint, permuted)
    assert loss.dtype == torch.float32 and abs(loss.item() - 0.5 * (ce_joint + ce_permuted)) < 1e-6
    assert losses.discriminator_accuracy(joint, permuted).item() == 0.5
    # a bigger random case against a float64 log-softmax written out
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(16, 2)) * 3, rng.normal(size=(12, 2)) * 3
    def ce(logits, k):
        return (reference_logsumexp(logits, axis=1) - logits[:, k]).mean()
    got = losses.discriminator_loss(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32))
    assert abs(got.item() - 0.5 * (ce(a, 0) + ce(b, 1))) < 1e-5
    assert losses.discriminator_accuracy(torch.tensor(a), torch.tensor(b)).item() == pytest.approx(
        ((a[:, 0] > a[:, 1]).sum() + (b[:, 1] > b[:, 0]).sum()) / 28)
    with pytest.raises(ValueError, match="logits_permuted must have shape"):
        losses.discriminator_loss(joint, torch.zeros(3))


def test_factorvae_gradients_reach_the_encoder_not_the_discriminator_update():
    torch.manual_seed(0)
    discriminator = models.build_discriminator(3)
    mu = torch.randn(16, 3, requires_grad=True)
    z = mu + 0.1 * torch.randn(16, 3)
    x, logits = torch.zeros(16, 1, 4, 4), torch.zeros(16, 1, 4, 4)
    loss, terms = losses.objective("factorvae", x, logits, mu, torch.zeros(16, 3), z,
                                   tc_logits=discriminator(z), gamma=10.0)
    vae_only, _ = losses.objective("vae", x, logits, mu, torch.zeros(16, 3), z)
    tc_grad = torch.autograd.grad(loss - vae_only, mu)[0]
    assert tc_grad.abs().sum() > 0  # the TC term pulls on the codes through the discriminator
    joint = z.detach()
    d_loss = losses.discriminator_loss(discriminator(joint), discriminator(losses.permute_dims(joint)))
    d_loss.backward()
    assert mu.grad is None and all(p.grad is not None for p in discriminator.parameters())


def reference_pair_kl(mu1, logvar1, mu2, logvar2):
    """KL(N(mu1, v1) || N(mu2, v2)) per dimension, the textbook closed form in float64."""
    v1, v2 = np.exp(logvar1), np.exp(logvar2)
    return 0.5 * (np.log(v2 / v1) + (v1 + (mu1 - mu2) ** 2) / v2 - 1)


def reference_aggregate(mu1, logvar1, mu2, logvar2, method, lib=np):
    """Locatello et al. 2020 in float64 (numpy, or torch for gradients): shared where the KL is below
    the midpoint of the pair's smallest and largest; Ada-GVAE averages means and variances, ML-VAE
    takes the product of the Gaussians with its variance doubled (disentanglement_lib's)."""
    kl = reference_pair_kl(*(np.asarray(t.detach() if lib is torch else t)
                             for t in (mu1, logvar1, mu2, logvar2)))
    shared = kl < 0.5 * (kl.min(1, keepdims=True) + kl.max(1, keepdims=True))
    v1, v2 = lib.exp(logvar1), lib.exp(logvar2)
    if method == "adagvae":
        mean, var = (mu1 + mu2) / 2, (v1 + v2) / 2
    else:
        precision = 1 / v1 + 1 / v2  # the product of the two Gaussians: N(mean, 1 / precision)
        mean, var = (mu1 / v1 + mu2 / v2) / precision, 2 / precision
    mask = torch.tensor(shared) if lib is torch else shared
    pick = torch.where if lib is torch else np.where
    return (pick(mask, mean, mu1), pick(mask, lib.log(var), logvar1),
            pick(mask, mean, mu2), pick(mask, lib.log(var), logvar2), shared)


def random_pairs(pairs=6, dims=5, seed=5):
    """Two posteriors per pair, none of whose KLs lies within 0.01 of its pair's threshold."""
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.normal(size=(pairs, dims)), rng.normal(size=(pairs, dims))
    logvar1, logvar2 = rng.normal(-1, 0.7, size=(pairs, dims)), rng.normal(-1, 0.7, size=(pairs, dims))
    mu2[:, :2] = mu1[:, :2] + 0.01 * rng.normal(size=(pairs, 2))  # two latents nearly shared
    logvar2[:, :2] = logvar1[:, :2]
    kl = reference_pair_kl(mu1, logvar1, mu2, logvar2)
    threshold = 0.5 * (kl.min(1, keepdims=True) + kl.max(1, keepdims=True))
    assert np.abs(kl - threshold).min() > 0.01
    return mu1, logvar1, mu2, logvar2


def test_pair_kl_and_threshold_match_reference():
    mu1, logvar1, mu2, logvar2 = random_pairs()
    got = losses.pair_kl(*(torch.tensor(a) for a in (mu1, logvar1, mu2, logvar2)))
    # (the reference's log ratio + ratio - 1 loses digits near 0 that expm1 keeps)
    np.testing.assert_allclose(got.numpy(), reference_pair_kl(mu1, logvar1, mu2, logvar2), rtol=1e-9)
    # the closed form against the definition, E_q1[log q1 - log q2], by quadrature
    grid = np.linspace(-12, 12, 200_001)[:, None, None]
    log_q1 = reference_log_normal(grid, mu1[:3], logvar1[:3])
    log_q2 = reference_log_normal(grid, mu2[:3], logvar2[:3])
    quadrature = np.trapezoid(np.exp(log_q1) * (log_q1 - log_q2), grid[:, 0, 0], axis=0)
    np.testing.assert_allclose(got.numpy()[:3], quadrature, rtol=1e-5, atol=1e-7)
    shared = losses.shared_latents(*(torch.tensor(a, dtype=torch.float32) for a in (mu1, logvar1, mu2, logvar2)))
    assert shared.dtype == torch.bool and not shared.requires_grad
    np.testing.assert_array_equal(shared.numpy(), reference_aggregate(mu1, logvar1, mu2, logvar2, "adagvae")[4])
    assert shared[:, :2].all()  # the nearly equal latents are shared


def test_shared_latents_by_hand():
    def shared(mu1, var1, mu2, var2):
        t = [torch.tensor([v], dtype=torch.float32) for v in (mu1, var1, mu2, var2)]
        return losses.shared_latents(t[0], t[1].log(), t[2], t[3].log())[0].tolist()
    # KL(q1||q2) = 0.318, 1.0, 0: threshold 0.5, the first two latents shared; the other
    # direction, KL(q2||q1) = 0.807, 1.0, 0, shares only the last: the rule reads q1 against q2
    assert shared([0, 0, 0], [1, 1, 1], [0, 2 ** 0.5, 0], [4, 1, 1]) == [True, False, True]
    assert shared([0, 2 ** 0.5, 0], [4, 1, 1], [0, 0, 0], [1, 1, 1]) == [False, False, True]
    # KL 0.5, 12.5, 24.5: the middle one lies at the threshold, 12.5, and is not shared
    assert shared([0, 0, 0], [1, 1, 1], [1, 5, 7], [1, 1, 1]) == [True, False, False]
    assert shared([0, 0], [1, 1], [3, -3], [1, 1]) == [False, False]  # all equally far: none shared
    assert shared([0], [1], [0], [1]) == [False]


@pytest.mark.parametrize("method", losses.PAIR_OBJECTIVES)
def test_aggregate_pair_matches_reference(method):
    pair = random_pairs()
    expected = reference_aggregate(*pair, method)
    got = losses.aggregate_pair(*(torch.tensor(a) for a in pair), method=method)
    for g, e in zip(got, expected):
        assert g.dtype == torch.float64
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-12, atol=1e-14)
    got32 = losses.aggregate_pair(*(torch.tensor(a, dtype=torch.float32) for a in pair), method=method)
    for g, e in zip(got32, expected):
        assert g.dtype == torch.float32
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-5, atol=1e-6)
    # where shared, both images get one Gaussian; elsewhere each keeps its own
    shared = expected[4]
    assert shared.any() and (~shared).any()
    np.testing.assert_array_equal(got[0].numpy()[shared], got[2].numpy()[shared])
    np.testing.assert_array_equal(got[1].numpy()[~shared], pair[1][~shared])


def test_aggregate_pair_by_hand_and_idempotent():
    mu1, logvar1 = torch.tensor([[0.0, 5.0]]), torch.tensor([[math.log(1.0), 0.0]])
    mu2, logvar2 = torch.tensor([[2.0, -5.0]]), torch.tensor([[math.log(3.0), 0.0]])
    # latent 0 (KL 0.88) is shared, latent 1 (KL 50) is not: threshold 25.4
    m1, lv1, m2, lv2 = losses.aggregate_pair(mu1, logvar1, mu2, logvar2, "adagvae")
    assert m1[0, 0] == m2[0, 0] and lv1[0, 0] == lv2[0, 0]
    assert abs(m1[0, 0] - 1.0) < 1e-6 and abs(lv1[0, 0].exp() - 2.0) < 1e-5  # (1 + 3) / 2
    assert m1[0, 1] == 5.0 and m2[0, 1] == -5.0
    m1, lv1, m2, lv2 = losses.aggregate_pair(mu1, logvar1, mu2, logvar2, "mlvae")
    assert abs(m1[0, 0] - 0.5) < 1e-6  # (0 / 1 + 2 / 3) / (1 / 1 + 1 / 3)
    assert abs(lv1[0, 0].exp() - 1.5) < 1e-5  # 2 x the product's variance 3 / 4
    for method in losses.PAIR_OBJECTIVES:  # equal posteriors stay as they are; twice is once
        mu, logvar = torch.randn(4, 3), torch.randn(4, 3)
        same = losses.aggregate_pair(mu, logvar, mu, logvar, method)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(same, (mu, logvar, mu, logvar)))
        once = losses.aggregate_pair(*(torch.tensor(a) for a in random_pairs()), method=method)
        twice = losses.aggregate_pair(*once, method=method)
        assert all(torch.allclose(a, b, rtol=1e-12) for a, b in zip(once, twice))


@pytest.mark.parametrize("method", losses.PAIR_OBJECTIVES)
def test_aggregate_pair_gradients(method):
    pair = [torch.tensor(a, requires_grad=True) for a in random_pairs(4, 4, seed=6)]
    assert torch.autograd.gradcheck(lambda *t: losses.aggregate_pair(*t, method=method), pair)
    # and against the reference's autograd (the product's textbook form, not the code's)
    got = losses.aggregate_pair(*pair, method=method)
    weights = [torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
               for i in range(4)]
    grads = torch.autograd.grad(sum((g * w).sum() for g, w in zip(got, weights)), pair)
    expected = reference_aggregate(*pair, method, lib=torch)[:4]
    expected_grads = torch.autograd.grad(sum((e * w).sum() for e, w in zip(expected, weights)), pair)
    for g, e in zip(grads, expected_grads):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", losses.PAIR_OBJECTIVES)
def test_pair_objectives_match_reference(method):
    rng = np.random.default_rng(7)
    mu1, logvar1, mu2, logvar2 = random_pairs(6, 5, seed=7)
    mu, logvar = np.concatenate([mu1, mu2]), np.concatenate([logvar1, logvar2])
    logits, x = rng.normal(size=(12, 1, 8, 8)), (rng.random((12, 1, 8, 8)) > 0.5).astype(float)
    p = 1 / (1 + np.exp(-logits))
    recon = -(x * np.log(p) + (1 - x) * np.log(1 - p)).reshape(12, -1).sum(1)
    a_mu1, a_logvar1, a_mu2, a_logvar2, shared = reference_aggregate(mu1, logvar1, mu2, logvar2, method)
    a_mu, a_logvar = np.concatenate([a_mu1, a_mu2]), np.concatenate([a_logvar1, a_logvar2])
    kl = (0.5 * (a_mu ** 2 + np.exp(a_logvar) - 1 - a_logvar)).sum(1)
    beta = 3.0
    t = [torch.tensor(a, dtype=torch.float32, requires_grad=True) for a in (mu, logvar)]
    z = torch.tensor(a_mu, dtype=torch.float32)
    loss, terms = losses.objective(method, torch.tensor(x).float(), torch.tensor(logits).float(), *t, z, beta=beta)
    expected = (recon + beta * kl).mean()  # = 0.5 (first images' mean + second images' mean)
    assert loss.dtype == torch.float32 and abs(loss.item() - expected) < 1e-5 * expected
    assert set(terms) == {"recon", "kl", "shared"}
    assert abs(terms["recon"] - recon.mean()) < 1e-3 and abs(terms["kl"] - kl.mean()) < 1e-4
    assert terms["shared"] == shared.sum(1).mean() and 2 <= terms["shared"] < 5
    # gradients against the float64 reference's autograd
    r_mu, r_logvar = (torch.tensor(a, requires_grad=True) for a in (mu, logvar))
    r = reference_aggregate(r_mu[:6], r_logvar[:6], r_mu[6:], r_logvar[6:], method, lib=torch)
    r_mu_all, r_logvar_all = torch.cat([r[0], r[2]]), torch.cat([r[1], r[3]])
    r_kl = (0.5 * (r_mu_all ** 2 + r_logvar_all.exp() - 1 - r_logvar_all)).sum(1)
    expected_grads = torch.autograd.grad(beta * r_kl.mean(), (r_mu, r_logvar))
    for g, e in zip(torch.autograd.grad(loss, t), expected_grads):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-4, atol=1e-6)
    # the aggregated posteriors give the same loss as the encoder's own (aggregation is idempotent)
    again, _ = losses.objective(method, torch.tensor(x).float(), torch.tensor(logits).float(),
                                torch.tensor(a_mu).float(), torch.tensor(a_logvar).float(), z, beta=beta)
    assert abs(again.item() - loss.item()) < 1e-5 * loss.item()


def test_pair_objective_errors():
    mu, logvar, x = torch.zeros(5, 3), torch.zeros(5, 3), torch.zeros(5, 1, 4, 4)
    with pytest.raises(ValueError, match="even number of rows, got 5"):
        losses.objective("adagvae", x, x, mu, logvar, mu)
    with pytest.raises(ValueError, match="4 images for 5 codes"):
        losses.objective("mlvae", x[:4], x[:4], mu, logvar, mu)
    with pytest.raises(ValueError, match="unknown aggregation 'gvae'"):
        losses.aggregate_pair(mu, logvar, mu, logvar, "gvae")
    with pytest.raises(ValueError, match=r"one \(P, D\) shape"):
        losses.aggregate_pair(mu, logvar, mu[:4], logvar[:4])
    with pytest.raises(ValueError, match="mlvae"):
        losses.objective("groupvae", x, x, mu, logvar, mu)


# ----------------------------------------------------------------------------- data: readers and built-ins

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def car_im(k):  # as fixtures/make_fixtures.py
    h, w, c, a, e = np.indices((16, 16, 3, 24, 4))
    return ((h * 7 + w * 13 + c * 50 + a * 9 + e * 31 + k * 17) % 256).astype(np.uint8)


def face_grid():  # as fixtures/make_fixtures.py
    return (np.arange(2 * 3 * 2 * 2 * 8 * 8) * 7 % 251).astype(np.uint8).reshape(2, 3, 2, 2, 8, 8)


def expected_cars(ims):
    """The cars3d layout: rows in C order over (elevation, azimuth, object), LANCZOS to 64x64."""
    out = np.empty((ims[0].shape[4], ims[0].shape[3], len(ims), 64, 64, 3), np.uint8)
    for o, im in enumerate(ims):
        for e, a in itertools.product(range(im.shape[4]), range(im.shape[3])):
            view = Image.fromarray(np.ascontiguousarray(im[:, :, :, a, e]))
            out[e, a, o] = np.asarray(view.resize((64, 64), Image.LANCZOS))
    return out.reshape(-1, 64, 64, 3)


def mat_v5(variables, order="<"):
    """A hand-written, uncompressed MATLAB v5 file: [(name, array, class code, stored dtype)]."""
    def element(kind, payload):
        if len(payload) <= 4:  # small data element format
            return struct.pack(order + "I", (len(payload) << 16) | kind) + payload.ljust(4, b"\0")
        return struct.pack(order + "II", kind, len(payload)) + payload + b"\0" * (-len(payload) % 8)
    kinds = {"u1": 2, "i2": 3, "i4": 5, "f8": 9}
    out = b"MATLAB 5.0 MAT-file, written by test_data.py".ljust(116) + bytes(8)
    out += struct.pack(order + "H", 0x0100) + (b"IM" if order == "<" else b"MI")
    for name, array, mclass, stored in variables:
        body = element(6, struct.pack(order + "II", mclass, 0))
        body += element(5, np.array(array.shape, order + "i4").tobytes())
        body += element(1, name.encode())
        body += element(kinds[stored], array.astype(order + stored).tobytes(order="F"))
        out += struct.pack(order + "II", 14, len(body)) + body
    return out


def save_png(path, array):
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path, format="PNG")


def rng_images(n, h, w, c, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# built-ins

def test_sprites_factor_table_and_format():
    ds = data.load("sprites:positions=2,orientations=3,scales=2")
    assert ds.factor_names == ["shape", "scale", "orientation", "posX", "posY"]
    assert ds.factor_sizes == [3, 2, 3, 2, 2]
    assert ds.factors.dtype == np.int64
    assert ds.factors.tolist() == [list(p) for p in itertools.product(range(3), range(2), range(3), range(2), range(2))]
    assert ds.images.dtype == np.uint8 and ds.images.shape == (72, 64, 64, 1)
    assert set(np.unique(ds.images)) == {0, 255}
    assert np.array_equal(ds.images, data.load("sprites", positions=2, orientations=3, scales=2).images)


def test_sprites_geometry():
    ds = data.load("sprites", positions=8, orientations=4)  # orientations 0, 90, 180, 270 degrees
    im = ds.images.reshape(3, 6, 4, 8, 8, 64, 64)

    def extent(mask):
        r, c = np.nonzero(mask)
        return r.max() - r.min() + 1, c.max() - c.min() + 1, r.mean(), c.mean()
    h, w, _, _ = extent(im[0, 5, 0, 3, 3])
    assert 17 <= h <= 21 and 17 <= w <= 21  # square side ~19 at scale 1
    h_half, _, _, _ = extent(im[0, 0, 0, 3, 3])
    assert abs(h_half - h / 2) <= 2  # sizes proportional to scale
    h, w, _, _ = extent(im[1, 5, 0, 3, 3])
    assert w > h and 24 <= w <= 28 and 12 <= h <= 16  # ellipse 13 x 7 semi-axes, long axis horizontal
    h, w, _, _ = extent(im[1, 5, 1, 3, 3])
    assert h > w  # turned by 90 degrees
    _, w, _, _ = extent(im[2, 5, 0, 3, 3])
    assert 16 <= w <= 20  # heart ~18 px across
    centres = [extent(im[0, 5, 0, x, 0])[2:] for x in range(8)]
    cols = [c for _, c in centres]
    assert abs(cols[0] - 16) <= 1 and abs(cols[-1] - 48) <= 1 and np.all(np.diff(cols) > 0)
    assert len({r for r, _ in centres}) == 1  # posX leaves the rows alone
    rows = [extent(im[0, 5, 0, 0, y])[2] for y in range(8)]
    assert abs(rows[0] - 16) <= 1 and abs(rows[-1] - 48) <= 1 and np.all(np.diff(rows) > 0)


def test_sprites_heart_area_matches_published_dsprites():
    # heart pixels in published dSprites: 55-57, 112 and 145 at scale classes 0, 2 and 3 (scales
    # np.linspace(0.5, 1, 6)), i.e. about 227 px x scale^2
    ds = data.load("sprites", positions=1, orientations=40)
    area = (ds.images.reshape(3, 6, 40, 64 * 64) > 0).sum(-1).mean(-1)[2]  # mean over orientations
    assert all(abs(area[k] / want - 1) <= 0.05 for k, want in {0: 56, 2: 112, 3: 145}.items())
    assert np.all(abs(area / (227 * np.linspace(0.5, 1, 6) ** 2) - 1) <= 0.05)


def test_sprites_medium_grid_timing_note():
    start = time.time()
    ds = data.load("sprites:positions=8")
    print(f"\nnote: sprites with 8x8 positions ({len(ds)} images) in {time.time() - start:.2f} s")
    assert ds.factor_sizes == [3, 6, 40, 8, 8]


def test_shapes():
    ds = data.load("shapes:hues=3,orientations=3,scales=2")
    assert ds.factor_names == ["floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation"]
    assert ds.factor_sizes == [3, 3, 3, 2, 4, 3]
    assert ds.images.shape == (3 * 3 * 3 * 2 * 4 * 3, 64, 64, 3) and ds.images.dtype == np.uint8
    assert ds.factors.tolist() == [list(p) for p in itertools.product(*map(range, ds.factor_sizes))]
    for row in range(0, len(ds), 7):
        floor_hue, wall_hue = ds.factors[row, :2] / 3
        for (y, x), hue in (((63, 0), floor_hue), ((2, 2), wall_hue)):
            got = colorsys.rgb_to_hsv(*(ds.images[row, y, x] / 255.0))[0]
            assert min(abs(got - hue), 1 - abs(got - hue)) < 0.02
    im = ds.images.reshape(3, 3, 3, 2, 4, 3, 64, 64, 3)
    for shape in range(4):  # the object's centre takes the object hue
        assert not np.array_equal(im[0, 0, 0, 0, shape, 1, 47, 32], im[0, 0, 1, 0, shape, 1, 47, 32])
        assert not np.array_equal(im[0, 0, 0, 0, shape, 0], im[0, 0, 0, 0, shape, 2])  # orientation
        assert not np.array_equal(im[0, 0, 0, 0, shape, 1], im[0, 0, 0, 1, shape, 1])  # scale


def test_builtin_options_and_names():
    with pytest.raises(DataError, match="positions"):
        data.load("sprites:colour=3")
    with pytest.raises(DataError, match="hues"):
        data.load("shapes", colour=3)
    with pytest.raises(DataError, match="positions"):
        data.load("sprites:positions=100")
    for bad in ("sprites:positions=many", "sprites:positions=inf", "sprites:positions=nan", "sprites:scales=2.5"):
        with pytest.raises(DataError, match="must be a whole number in 1"):
            data.load(bad)
    with pytest.raises(DataError, match=r"positions='8x' must be a whole number in 1\.\.32"):
        data.load("sprites", positions="8x")
    with pytest.raises(DataError, match="option 'scales' is not key=value"):
        data.load("sprites:positions=2,scales")
    with pytest.raises(DataError, match="built-in.*sprites.*must exist"):
        data.load("spritez")
    assert data.load("sprites:positions=1,orientations=1,scales=1,shapes=1").factors is None  # unlabelled


def test_limit_takes_a_sorted_random_subset():
    full = data.load("sprites:positions=2,orientations=2,scales=2")
    part = data.load("sprites:positions=2,orientations=2,scales=2", limit=10, seed=3)
    rows = np.sort(np.random.default_rng(3).choice(len(full), 10, replace=False))
    assert np.array_equal(part.images, full.images[rows]) and np.array_equal(part.factors, full.factors[rows])
    assert len(data.load("sprites:positions=2,orientations=2,scales=2", limit=10 ** 6)) == len(full)


def test_limit_drops_a_factor_that_became_constant(tmp_path):
    factors = np.stack([np.arange(200) % 4, np.arange(200) == 0], 1).astype(np.int64)  # factor1: 1 in row 0 only
    np.savez(tmp_path / "own.npz", images=rng_images(200, 4, 4, 1), factors=factors)
    assert data.load(tmp_path / "own.npz").factor_names == ["factor0", "factor1"]
    rows = np.sort(np.random.default_rng(0).choice(200, 20, replace=False))
    assert 0 not in rows  # so factor1 is 0 in every row kept
    part = data.load(tmp_path / "own.npz", limit=20, seed=0)
    assert part.factor_names == ["factor0"] and part.factor_sizes == [4]
    assert np.array_equal(part.factors, factors[rows, :1])
    with pytest.raises(DataError, match="own.npz: limit must be a positive number of images, not 0"):
        data.load(tmp_path / "own.npz", limit=0)


def test_describe():
    ds = data.load("sprites:positions=2,orientations=3,scales=2")
    assert data.describe(ds) == ("sprites: 72 images 64x64x1 uint8, "
                                 "factors shape(3) scale(2) orientation(3) posX(2) posY(2)")
    assert data.describe(data.Dataset(np.zeros((2, 3, 4, 1), np.uint8), name="x")) == \
        "x: 2 images 3x4x1 uint8, factors none"


def test_a_bug_is_not_reported_as_a_damaged_file(tmp_path, monkeypatch):
    np.savez(tmp_path / "own.npz", images=rng_images(2, 4, 4, 1))

    def bug(*args, **kwargs):
        raise TypeError("a bug in the reader")
    monkeypatch.setattr(np.lib.format, "read_array", bug)
    with pytest.raises(TypeError, match="a bug in the reader"):  # not "own.npz: not a readable .npz file"
        data.load(tmp_path / "own.npz")


@pytest.mark.parametrize("extra", [{"factor_names": np.array("ab")}, {"factor_sizes": np.array(4)},
                                   {"factor_sizes": np.array([2 + 1j, 2])}, {"factor_sizes": np.array(["2", "2"])}])
def test_factor_names_and_sizes_of_the_wrong_kind(tmp_path, extra):
    np.savez(tmp_path / "own.npz", images=rng_images(3, 4, 4, 1), factors=np.eye(3, 2, dtype=np.int64), **extra)
    with pytest.raises(DataError, match="own.npz: factor_names should be a list of names and factor_sizes a list"):
        data.load(tmp_path / "own.npz")


# --------------------------------------------------------------------------------------------
# numpy files

UNPICKLED = []


def _trip():
    UNPICKLED.append(True)
    return "unpickled!"


class Trap:
    def __reduce__(self):
        return _trip, ()


def dsprites_npz(path, compressed=True):
    classes = np.array(list(itertools.product([0], range(3), range(2), range(2), range(2), range(2))), np.int64)
    imgs = np.random.default_rng(0).integers(0, 2, (len(classes), 64, 64), dtype=np.uint8)
    meta = np.empty((), object)
    meta[()] = Trap()
    (np.savez_compressed if compressed else np.savez)(
        path, imgs=imgs, latents_classes=classes, latents_values=classes / 2.0, metadata=meta)
    return imgs, classes


@pytest.mark.parametrize("compressed", [True, False])
def test_dsprites_npz_never_unpickles(tmp_path, compressed):
    path = str(tmp_path / "dsprites.npz")
    imgs, classes = dsprites_npz(path, compressed)
    ds = data.load(path)
    assert not UNPICKLED
    assert ds.images.shape == (48, 64, 64, 1) and ds.images.dtype == np.uint8
    assert np.array_equal(ds.images[..., 0], imgs * 255)
    assert ds.factor_names == ["shape", "scale", "orientation", "posX", "posY"]
    assert ds.factor_sizes == [3, 2, 2, 2, 2] and np.array_equal(ds.factors, classes[:, 1:])
    np.load(path, allow_pickle=True)["metadata"]  # the trap does spring when unpickled
    assert UNPICKLED
    UNPICKLED.clear()


def test_generic_npz_and_npy(tmp_path):
    images = rng_images(6, 8, 10, 3)
    factors = np.array([[i % 2, i % 3] for i in range(6)])
    np.savez(tmp_path / "own.npz", images=images, factors=factors,
             factor_names=np.array(["a", "b"]), factor_sizes=np.array([2, 4]))
    ds = data.load(tmp_path / "own.npz")
    assert np.array_equal(ds.images, images) and np.array_equal(ds.factors, factors)
    assert ds.factor_names == ["a", "b"] and ds.factor_sizes == [2, 4] and ds.factors.dtype == np.int64
    np.save(tmp_path / "own.npy", images[..., 0])
    ds = data.load(tmp_path / "own.npy")
    assert isinstance(ds.images, np.memmap) and np.array_equal(ds.images, images[..., :1])
    assert ds.factors is None
    np.save(tmp_path / "binary.npy", images[..., 0] % 2)
    assert np.array_equal(data.load(tmp_path / "binary.npy").images[..., 0], images[..., 0] % 2 * 255)


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "none.npz", pictures=rng_images(2, 4, 4, 1))
    with pytest.raises(DataError, match="none.npz.*no 'images'"):
        data.load(tmp_path / "none.npz")
    np.savez(tmp_path / "float.npz", images=np.zeros((2, 4, 4, 1)))
    with pytest.raises(DataError, match="float.npz.*float64"):
        data.load(tmp_path / "float.npz")
    np.savez(tmp_path / "short.npz", images=rng_images(3, 4, 4, 1), factors=np.zeros((2, 1), int))
    with pytest.raises(DataError, match="short.npz.*factors"):
        data.load(tmp_path / "short.npz")
    np.savez(tmp_path / "shape.npz", images=rng_images(3, 4, 4, 1)[..., 0, 0])
    with pytest.raises(DataError, match="shape.npz.*shape"):
        data.load(tmp_path / "shape.npz")
    np.savez(tmp_path / "obj.npz", images=np.array([Trap()], object))
    with pytest.raises(DataError, match="obj.npz"):
        data.load(tmp_path / "obj.npz")
    assert not UNPICKLED


def test_zero_images_are_refused_by_name(tmp_path):
    np.savez(tmp_path / "empty.npz", images=np.zeros((0, 64, 64), np.uint8))
    np.save(tmp_path / "empty.npy", np.zeros((0, 8, 8, 3), np.uint8))
    sources = ["empty.npz", "empty.npy"]
    with contextlib.suppress(ImportError):
        import h5py  # only to write the input
        with h5py.File(tmp_path / "empty.h5", "w") as f:
            f.create_dataset("images", shape=(0, 64, 64), dtype="u1")
        sources.append("empty.h5")
    for source in sources:
        with pytest.raises(DataError) as caught:
            data.load(tmp_path / source)
        shape = "(0, 8, 8, 3)" if source.endswith("npy") else "(0, 64, 64)"  # as stored
        assert str(caught.value) == f"{tmp_path / source}: no images (the images array has shape {shape})"


def test_negative_factors_are_blamed_on_the_factors(tmp_path):
    factors = np.stack([np.arange(20) % 2, np.arange(20) % 3 - 1], 1)  # -1 ("unknown") in column 1, row 0
    np.savez(tmp_path / "neg.npz", images=rng_images(20, 4, 4, 1), factors=factors)
    with pytest.raises(DataError) as caught:
        data.load(tmp_path / "neg.npz")
    assert str(caught.value) == (f"{tmp_path / 'neg.npz'}: factor factor1 is -1 at row 0; factor values must "
                                 "be class indices 0, 1, 2, ... (negative values such as -1 for 'unknown' "
                                 "are not)")
    np.savez(tmp_path / "named.npz", images=rng_images(20, 4, 4, 1), factors=factors[:, ::-1] * 3,
             factor_names=np.array(["size", "colour"]))  # -3 now, at row 0 of the first column
    with pytest.raises(DataError, match=r"named.npz: factor size is -3 at row 0"):
        data.load(tmp_path / "named.npz")
    np.savez(tmp_path / "small.npz", images=rng_images(20, 4, 4, 1), factors=factors + 1,
             factor_sizes=np.array([2, 2]))  # values 0..2 in a factor of 2 classes
    with pytest.raises(DataError, match=r"small.npz: factor_sizes \[2, 2\] do not fit factors whose largest "
                                        r"values are \[2, 2\]"):
        data.load(tmp_path / "small.npz")


def test_data_whose_factors_are_all_constant_is_unlabelled(tmp_path):
    np.savez(tmp_path / "flat.npz", images=rng_images(6, 4, 4, 1), factors=np.full((6, 3), 2),
             factor_names=np.array(["a", "b", "c"]))
    ds = data.load(tmp_path / "flat.npz")
    assert ds.factors is None and ds.factor_names == [] and ds.factor_sizes == []
    assert data.describe(ds).endswith("factors none")
    one_varies = np.column_stack([np.full(6, 2), np.arange(6) % 2])
    np.savez(tmp_path / "one.npz", images=rng_images(6, 4, 4, 1), factors=one_varies)
    ds = data.load(tmp_path / "one.npz")
    assert ds.factor_names == ["factor1"] and ds.factors.tolist() == [[i % 2] for i in range(6)]


@pytest.mark.parametrize("dtype", ["u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", ">u4", ">i8"])
def test_factors_of_any_integer_type_read_as_int64(tmp_path, dtype):
    high = 127 if dtype == "i1" else 255  # the largest value each type holds here; 255 + 1 overflows uint8
    factors = np.stack([np.arange(40) * high // 39, np.arange(40) % 4], 1)
    np.savez(tmp_path / "own.npz", images=rng_images(40, 4, 4, 1), factors=factors.astype(dtype))
    ds = data.load(tmp_path / "own.npz")
    assert ds.factors.dtype == np.int64 and np.array_equal(ds.factors, factors)
    assert ds.factor_sizes == [high + 1, 4]
    sub = data.load(tmp_path / "own.npz", limit=10, seed=3)
    rows = np.sort(np.random.default_rng(3).choice(40, 10, replace=False))
    assert np.array_equal(sub.factors, factors[rows]) and sub.factors.dtype == np.int64
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "own.h5", "w") as f:
        f["images"] = rng_images(40, 4, 4, 1)
        f["factors"] = factors.astype(dtype)
    sub = data.load(tmp_path / "own.h5", limit=10, seed=3)  # read by rows: sizes from the whole file
    assert np.array_equal(sub.factors, factors[rows]) and sub.factor_sizes == [high + 1, 4]


def test_uint64_factors_too_large_for_a_class_index_are_refused(tmp_path):
    np.savez(tmp_path / "huge.npz", images=rng_images(2, 4, 4, 1), factors=np.array([[0], [2 ** 63]], np.uint64))
    with pytest.raises(DataError, match=r"huge.npz: factor factor0 holds 9223372036854775808, too large"):
        data.load(tmp_path / "huge.npz")


DSPRITES_GRIDS = [np.ones(1), np.arange(1.0, 4.0), np.linspace(0.5, 1, 6), np.linspace(0, 2 * np.pi, 40),
                  np.linspace(0, 1, 32), np.linspace(0, 1, 32)]  # published: dSprites' README


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])  # stored and deflated members
def test_dsprites_classes_from_latents_values(tmp_path, save):
    rng = np.random.default_rng(5)
    classes = np.column_stack([rng.integers(0, len(g), 300) for g in DSPRITES_GRIDS])
    values = np.column_stack([g[c] for g, c in zip(DSPRITES_GRIDS, classes.T)])
    values[:, 2:] += rng.uniform(-1e-9, 1e-9, (300, 4))  # float32 round trips and the like
    imgs = rng.integers(0, 2, (300, 64, 64), dtype=np.uint8)
    save(tmp_path / "subset.npz", imgs=imgs, latents_values=values)
    ds = data.load(tmp_path / "subset.npz")
    assert ds.factor_names == ["shape", "scale", "orientation", "posX", "posY"]  # colour is constant
    assert ds.factor_sizes == [3, 6, 40, 32, 32]  # the published grid's, not this subset's largest + 1
    assert np.array_equal(ds.factors, classes[:, 1:]) and np.array_equal(ds.images[..., 0], imgs * 255)
    values[7, 3] = 0.5  # between orientations 3 (0.483) and 4 (0.644)
    save(tmp_path / "off.npz", imgs=imgs, latents_values=values)
    with pytest.raises(DataError, match=r"off.npz: latents_values\[7, 3\] = 0.5 is not a dSprites orientation "
                                        r"value \(the published grid: 40 values from 0 to 6.28319\)"):
        data.load(tmp_path / "off.npz")
    save(tmp_path / "narrow.npz", imgs=imgs, latents_values=values[:, :4])
    with pytest.raises(DataError, match=r"narrow.npz: latents_values is float64 \(300, 4\); dSprites' has 6"):
        data.load(tmp_path / "narrow.npz")


def test_path_errors(tmp_path):
    with pytest.raises(DataError, match="nowhere.npz.*no such file"):
        data.load(tmp_path / "nowhere.npz")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="notes.txt.*unknown kind"):
        data.load(tmp_path / "notes.txt")
    (tmp_path / "fake.npz").write_text("hello")
    with pytest.raises(DataError, match="fake.npz"):
        data.load(tmp_path / "fake.npz")
    os.mkdir(tmp_path / "empty")
    with pytest.raises(DataError, match="empty"):
        data.load(tmp_path / "empty")
    with pytest.raises(DataError, match="unknown option"):
        data.load(FIXTURES + "/faces_zip.pth", size=32)


def test_exclude_option_leaves_out_one_class_of_a_factor(tmp_path):
    whole = data.load(TINY)
    others = whole.factors[:, 0] != 1  # every ellipse left out, in the name or as a keyword
    for held_out in (data.load(TINY + ",exclude=shape=1"), data.load(TINY, exclude="shape=1")):
        assert len(held_out) == 256 and 1 not in held_out.factors[:, 0]
        assert np.array_equal(held_out.images, whole.images[others])
        assert np.array_equal(held_out.factors, whole.factors[others])
        assert held_out.factor_sizes == whole.factor_sizes  # labels as in the whole dataset
    limited = data.load(TINY + ",exclude=shape=0", limit=50, seed=3)  # limit: 50 of the others
    assert len(limited) == 50 and 0 not in limited.factors[:, 0]
    np.savez(tmp_path / "own.npz", images=whole.images, factors=whole.factors)  # any labelled file
    assert 2 not in data.load(f"{tmp_path / 'own.npz'}:exclude=factor0=2").factors[:, 0]
    for option, message in [("exclude=shape", "expected exclude=FACTOR=CLASS"),
                            ("exclude=hue=1", "no factor 'hue'"),
                            ("exclude=shape=3", r"must be a whole number in 0\.\.2"),
                            ("shapes=1,exclude=shape=0", "no factor 'shape'")]:
        with pytest.raises(DataError, match=message):
            data.load(f"{TINY},{option}")
    np.savez(tmp_path / "plain.npz", images=whole.images)
    with pytest.raises(DataError, match="no factors"):
        data.load(f"{tmp_path / 'plain.npz'}:exclude=shape=0")


# --------------------------------------------------------------------------------------------
# folders and zips of images

def test_image_folder_zip_and_cache(tmp_path, capsys):
    images = rng_images(5, 64, 64, 3)
    folder = tmp_path / "pics"
    folder.mkdir()
    for i, im in enumerate(images):
        save_png(folder / f"{i:03d}.png", im)
    (folder / "readme.txt").write_text("ignored")
    np.save(tmp_path / "pics.64x64.npy", images[::-1])  # the old toolkit's cache name: not read
    ds = data.load(folder)
    assert np.array_equal(ds.images, images) and ds.factors is None
    caches = [n for n in os.listdir(tmp_path) if n.startswith("pics.64x64.") and n != "pics.64x64.npy"]
    assert isinstance(ds.images, np.memmap) and len(caches) == 1
    cache = tmp_path / caches[0]
    capsys.readouterr()
    again = data.load(folder)  # the cache, memory-mapped, nothing decoded again
    assert isinstance(again.images, np.memmap) and np.array_equal(again.images, images)
    assert "decoding" not in capsys.readouterr().err
    with zipfile.ZipFile(tmp_path / "pics.zip", "w") as zf:
        for i, im in enumerate(images[::-1]):  # stored out of order: read sorted by name
            buf = io.BytesIO()
            save_png(buf, im)
            zf.writestr(f"pics/{4 - i:03d}.png", buf.getvalue())
    cache_dir = tmp_path / "elsewhere"
    ds = data.load(tmp_path / "pics.zip", cache_dir=cache_dir)
    assert np.array_equal(ds.images, images) and [n[:15] for n in os.listdir(cache_dir)] == ["pics.zip.64x64."]

    cache.write_bytes(b"garbage")  # a corrupt cache is rebuilt
    assert np.array_equal(data.load(folder).images, images)
    np.save(cache, images[:3])  # so is one of the wrong shape
    assert np.array_equal(data.load(folder).images, images)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp.npy")]


def test_image_cache_follows_its_source(tmp_path, capsys):
    first, second = rng_images(3, 16, 16, 3, seed=6), rng_images(3, 16, 16, 3, seed=7)
    (tmp_path / "pics").mkdir()
    for i, im in enumerate(first):
        save_png(tmp_path / "pics" / f"{i}.png", im)
    assert np.array_equal(data.load(tmp_path / "pics", size=16).images, first)
    old_cache = [n for n in os.listdir(tmp_path) if n.endswith(".npy")]
    folder_time, before = os.stat(tmp_path / "pics").st_mtime_ns, os.stat(tmp_path / "pics" / "0.png")
    save_png(tmp_path / "pics" / "0.png", second[0])  # replaced in place by one of the same size
    later = before.st_mtime_ns + 10 ** 9  # saved a second later
    os.utime(tmp_path / "pics" / "0.png", ns=(later, later))
    os.utime(tmp_path / "pics", ns=(folder_time, folder_time))  # the folder itself looks untouched
    assert os.path.getsize(tmp_path / "pics" / "0.png") == before.st_size
    capsys.readouterr()
    assert np.array_equal(data.load(tmp_path / "pics", size=16).images, [second[0], first[1], first[2]])
    assert "is stale (its source changed): rebuilding" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / old_cache[0])  # the stale copy is removed
    save_png(tmp_path / "pics" / "3.png", second[1])  # an image added
    assert len(data.load(tmp_path / "pics", size=16)) == 4

    with zipfile.ZipFile(tmp_path / "pics.zip", "w") as zf:  # beside the folder: its own images
        for i, im in enumerate(second):
            buf = io.BytesIO()
            save_png(buf, im)
            zf.writestr(f"{i}.png", buf.getvalue())
    assert np.array_equal(data.load(tmp_path / "pics.zip", size=16).images, second)
    assert np.array_equal(data.load(tmp_path / "pics", size=16).images[1:3], first[1:3])
    with tarfile.open(tmp_path / "pics.tar", "w") as tar:  # a tar too, and a tar rewritten in place
        tar.add(tmp_path / "pics" / "1.png", "1.png")
    assert np.array_equal(data.load(tmp_path / "pics.tar", size=16).images, first[1:2])
    written = os.stat(tmp_path / "pics.tar")
    with tarfile.open(tmp_path / "pics.tar", "w") as tar:
        tar.add(tmp_path / "pics" / "0.png", "1.png")
    os.utime(tmp_path / "pics.tar", ns=(written.st_mtime_ns + 10 ** 9,) * 2)  # a second later
    assert os.path.getsize(tmp_path / "pics.tar") == written.st_size
    assert np.array_equal(data.load(tmp_path / "pics.tar", size=16).images, second[:1])


def test_hidden_files_are_skipped_and_counted(tmp_path, capsys):
    images = rng_images(3, 16, 16, 3, seed=8)
    apple = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(60)  # AppleDouble header
    png = []
    for im in images:
        buf = io.BytesIO()
        save_png(buf, im)
        png.append(buf.getvalue())
    folder = tmp_path / "pics"  # read recursively, sorted by path: a.png, sub/b.png, sub/deeper/c.png
    (folder / "sub" / "deeper").mkdir(parents=True)
    (folder / ".thumbnails").mkdir()  # a hidden folder: skipped whole, counted once
    members = {"a.png": png[0], "sub/b.png": png[1], "sub/deeper/c.png": png[2], "._a.png": apple,
               "sub/._b.png": apple, ".DS_Store": b"\0", "Thumbs.db": b"\0", "sub/desktop.ini": b"x",
               ".thumbnails/a.png": png[0], "notes.txt": b"not an image, not hidden"}
    for name, raw in members.items():
        (folder / name).write_bytes(raw)
    with zipfile.ZipFile(tmp_path / "pics.zip", "w") as zf, tarfile.open(tmp_path / "pics.tgz", "w:gz") as tar:
        for name, raw in {**members, "__MACOSX/pics/._a.png": apple}.items():
            zf.writestr("pics/" + name if "MACOSX" not in name else name, raw)
            info = tarfile.TarInfo("./pics/" + name if "MACOSX" not in name else name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    # folder: ._a.png, sub/._b.png, .DS_Store, Thumbs.db, sub/desktop.ini, .thumbnails/ = 6 entries;
    # archives: the same with .thumbnails/a.png a file, and __MACOSX/pics/._a.png = 7 files
    for source, hidden in (("pics", 6), ("pics.zip", 7), ("pics.tgz", 7)):
        capsys.readouterr()
        assert np.array_equal(data.load(tmp_path / source, size=16).images, images), source
        assert f"skipped {hidden} hidden or system entries" in capsys.readouterr().err, source
    (folder / "sub" / "b.png").unlink()  # a folder whose images are all in sub-folders
    assert np.array_equal(data.load(folder / "sub", size=16).images, images[2:])
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "._a.png").write_bytes(apple)
    with pytest.raises(DataError, match=r"only: no images .* found \(1 hidden or system entries skipped\)"):
        data.load(tmp_path / "only")


def png16(array):
    """A 16-bit PNG written by hand (Pillow writes no 16-bit colour): gray (H, W) or RGB (H, W, 3)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    h, w = array.shape[:2]
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in array)  # filter 0 per row
    header = struct.pack(">IIBBBBB", w, h, 16, 0 if array.ndim == 2 else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_deep_images_are_scaled_or_refused(tmp_path):
    v = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # every 16-bit value
    want = np.floor(v / 257 + 0.5).astype(np.uint8)  # round(v / 257): 0..255, no ties
    assert want[0, 0] == 0 and want[-1, -1] == 255 and (want == 255).sum() == 129
    (tmp_path / "png16").mkdir()
    (tmp_path / "png16" / "gray.png").write_bytes(png16(v))
    (tmp_path / "tif16").mkdir()
    Image.frombytes("I;16B", (256, 256), v.astype(">u2").tobytes()).save(tmp_path / "tif16" / "big.tif")
    Image.frombytes("I;16", (256, 256), v.astype("<u2").tobytes()).save(tmp_path / "tif16" / "little.tiff")
    for folder in ("png16", "tif16"):
        ds = data.load(tmp_path / folder, size=256)
        assert ds.images.shape[3] == 1 and all(np.array_equal(im[..., 0], want) for im in ds.images), folder
    # 16-bit colour: the installed Pillow keeps the high byte, v >> 8, within one level of v / 257
    rgb = np.stack([v, v[::-1], v.T], -1)
    (tmp_path / "rgb16").mkdir()
    (tmp_path / "rgb16" / "colour.png").write_bytes(png16(rgb))
    got = data.load(tmp_path / "rgb16", size=256).images[0].astype(int)
    assert np.array_equal(got, rgb >> 8) and np.abs(got - rgb / 257).max() < 1
    for mode, array in (("I", v.astype(np.int32)), ("F", v.astype(np.float32) / 65535)):
        (tmp_path / mode).mkdir()
        Image.fromarray(array).save(tmp_path / mode / "deep.tif")
        with pytest.raises(DataError, match=rf"deep.tif: Pillow mode {mode} .* no fixed range"):
            data.load(tmp_path / mode)


def test_gray_is_decided_by_content(tmp_path):
    rng = np.random.default_rng(9)
    bits, gray = rng.random((16, 16)) > 0.5, rng.integers(0, 256, (16, 16), dtype=np.uint8)
    colour = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    palette = Image.fromarray(gray, "L").convert("P")  # a palette of grays only
    cases = {"bits": [(Image.fromarray(bits), bits * 255)],
             "la": [(Image.fromarray(np.stack([gray, np.full_like(gray, 255)], -1), "LA"), gray)],
             "palette": [(palette, gray)],
             "rgb_of_gray": [(Image.fromarray(np.repeat(gray[..., None], 3, -1)), gray)],
             "mixed": [(Image.fromarray(bits), np.repeat(bits[..., None] * 255, 3, -1)), (Image.fromarray(colour), colour)]}
    for folder, items in cases.items():
        (tmp_path / folder).mkdir()
        for i, (im, _) in enumerate(items):
            im.save(tmp_path / folder / f"{i}.png")
        got = data.load(tmp_path / folder, size=16).images
        want = np.stack([w if w.ndim == 3 else w[..., None] for _, w in items])
        assert got.shape == want.shape and np.array_equal(got, want), folder


def test_transparency_is_composited_on_black(tmp_path):
    (tmp_path / "rgba").mkdir()
    rgba = np.array([[[200, 100, 50, 128], [10, 250, 90, 0], [33, 66, 99, 255]]] * 3, np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba" / "0.png")
    got = data.load(tmp_path / "rgba", size=3).images[0, 0]
    # by hand, c * alpha / 255 rounded: 200*128/255 = 100.4, 100*128/255 = 50.2, 50*128/255 = 25.1
    assert got.tolist() == [[100, 50, 25], [0, 0, 0], [33, 66, 99]]
    (tmp_path / "la").mkdir()
    la = np.array([[[200, 64], [255, 0], [17, 255]]] * 3, np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la" / "0.png")
    got = data.load(tmp_path / "la", size=3).images
    assert got.shape == (1, 3, 3, 1) and got[0, 0, :, 0].tolist() == [50, 0, 17]  # 200*64/255 = 50.2
    (tmp_path / "palette").mkdir()
    index = np.array([[0, 1, 2]] * 3, np.uint8)
    im = Image.fromarray(index, "P")
    im.putpalette([10, 200, 30, 128, 128, 128, 250, 10, 10] + [0] * 759)
    im.save(tmp_path / "palette" / "0.png", transparency=bytes([0, 255, 51]))  # tRNS: alpha per entry
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no Pillow warning about palette transparency
        got = data.load(tmp_path / "palette", size=3).images[0, 0]
    assert got.tolist() == [[0, 0, 0], [128, 128, 128], [50, 2, 2]]  # 250*51/255 = 50, 10*51/255 = 2
    (tmp_path / "key").mkdir()  # RGB with one transparent colour (tRNS)
    Image.fromarray(np.array([[[1, 2, 3], [4, 5, 6]]] * 2, np.uint8)).save(
        tmp_path / "key" / "0.png", transparency=(4, 5, 6))
    assert data.load(tmp_path / "key", size=2).images[0, 0].tolist() == [[1, 2, 3], [0, 0, 0]]


def test_exif_orientation_is_applied_before_the_crop(tmp_path):
    pixels = rng_images(1, 32, 48, 3, seed=10)[0]  # stored 32 rows x 48 columns
    rotated = {3: np.rot90(pixels, 2), 6: np.rot90(pixels, -1), 8: np.rot90(pixels, 1)}
    for orientation, want in rotated.items():  # 6: shown turned 90 degrees clockwise
        (tmp_path / str(orientation)).mkdir()
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(pixels).save(tmp_path / str(orientation) / "photo.png", exif=exif)
        top = (want.shape[0] - 32) // 2  # then the centre square
        left = (want.shape[1] - 32) // 2
        got = data.load(tmp_path / str(orientation), size=32).images[0]
        assert np.array_equal(got, want[top:top + 32, left:left + 32]), orientation


def test_crop_resize_gray_and_mixed(tmp_path):
    rgb, gray = rng_images(2, 50, 80, 3, seed=1), rng_images(2, 90, 70, 1, seed=2)
    for folder, arrays in (("gray", gray), ("mixed", [rgb[0], gray[1]])):
        (tmp_path / folder).mkdir()
        for i, im in enumerate(arrays):
            save_png(tmp_path / folder / f"{i}.png", im)

    def expected(array, mode):
        im = Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).convert(mode)
        w, h = im.size
        s = min(w, h)
        left, top = round((w - s) / 2), round((h - s) / 2)
        out = np.asarray(im.crop((left, top, left + s, top + s)).resize((32, 32), Image.BILINEAR))
        return out if out.ndim == 3 else out[..., None]
    ds = data.load(tmp_path / "gray", size=32)
    assert ds.images.shape == (2, 32, 32, 1)
    assert np.array_equal(ds.images, [expected(g, "L") for g in gray])
    ds = data.load(tmp_path / "mixed", size=32)
    assert np.array_equal(ds.images, [expected(rgb[0], "RGB"), np.repeat(expected(gray[1], "L"), 3, -1)])


def test_celeba_crop148(tmp_path):
    faces = rng_images(2, 218, 178, 3, seed=4)
    (tmp_path / "img_align_celeba").mkdir()
    for i, im in enumerate(faces):
        Image.fromarray(im).save(tmp_path / "img_align_celeba" / f"{i + 1:06d}.jpg", quality=95)
    ds = data.load(tmp_path / "img_align_celeba")
    for got, name in zip(ds.images, ["000001.jpg", "000002.jpg"]):
        with Image.open(tmp_path / "img_align_celeba" / name) as im:  # CenterCrop(148) + Resize(64)
            want = np.asarray(im.convert("RGB").crop((15, 35, 163, 183)).resize((64, 64), Image.BILINEAR))
        assert np.array_equal(got, want)
    assert [n.startswith("img_align_celeba.64x64-celeba148.") for n in os.listdir(tmp_path)].count(True) == 1


def test_unreadable_image_is_named(tmp_path):
    (tmp_path / "pics").mkdir()
    save_png(tmp_path / "pics" / "good.png", rng_images(1, 8, 8, 3)[0])
    (tmp_path / "pics" / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="bad.png"):
        data.load(tmp_path / "pics")
    assert sorted(os.listdir(tmp_path)) == ["pics"]  # no cache, complete or partial, is left


def test_symlinked_subfolders_are_followed_once_each(tmp_path):
    images = rng_images(6, 8, 8, 3, seed=11)
    for name, im in zip(["pics/a/0.png", "pics/a/1.png", "store/b/2.png", "store/b/3.png", "store/b/4.png",
                         "pics/5.png"], images):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        save_png(tmp_path / name, im)
    os.symlink(os.path.join("..", "store", "b"), tmp_path / "pics" / "linked")  # a linked sub-folder
    os.symlink(os.path.join("..", "store", "b"), tmp_path / "pics" / "same")  # linked twice: read once
    os.symlink("..", tmp_path / "pics" / "a" / "loop")  # a loop back up the tree
    os.symlink("nowhere", tmp_path / "pics" / "broken.png")  # a broken link: no file
    os.symlink(os.path.join("a", "0.png"), tmp_path / "pics" / "6.png")  # a linked file: an image
    ds = data.load(tmp_path / "pics", size=8)
    # sorted by path: 5.png, 6.png (-> a/0.png), a/0.png, a/1.png, linked/2..4.png
    want = [images[5], images[0], images[0], images[1], images[2], images[3], images[4]]
    assert np.array_equal(ds.images, want)


def make_celeba(folder, count=3, seed=12, size=(178, 218)):
    """celebA-like aligned images: NNNNNN.jpg of 178x218 (width x height); returns their paths."""
    folder.mkdir(parents=True)
    paths = []
    for i, im in enumerate(rng_images(count, size[1], size[0], 3, seed=seed)):
        paths.append(folder / f"{i + 1:06d}.jpg")
        Image.fromarray(im).save(paths[-1], quality=95)
    return paths


def test_celeba_is_recognised_by_its_files_however_it_is_given(tmp_path):
    paths = make_celeba(tmp_path / "celeba" / "img_align_celeba")
    (tmp_path / "celeba" / "list_attr_celeba.txt").write_text("not an image")  # torchvision's layout
    want = []
    for path in paths:  # CenterCrop(148) + Resize(64) by hand
        with Image.open(path) as im:
            want.append(np.asarray(im.convert("RGB").crop((15, 35, 163, 183)).resize((64, 64), Image.BILINEAR)))
    with zipfile.ZipFile(tmp_path / "archive.zip", "w") as zf:  # Kaggle's layout
        for path in paths:
            zf.write(path, f"img_align_celeba/img_align_celeba/{path.name}")
    with tarfile.open(tmp_path / "faces.tar.gz", "w:gz") as tar:
        for path in paths:
            tar.add(path, f"faces/{path.name}")
    (tmp_path / "renamed").symlink_to(tmp_path / "celeba" / "img_align_celeba")
    for source in ["celeba/img_align_celeba", "celeba", "archive.zip", "faces.tar.gz", "renamed"]:
        ds = data.load(tmp_path / source)
        assert np.array_equal(ds.images, want), source
        assert ds.preprocessing == ("celebA's aligned images (recognised by their NNNNNN.jpg names and "
                                    "178x218 size): centre crop 148x148 as torchvision's CenterCrop(148), "
                                    "resized to 64x64 (bilinear)"), source
        assert data.describe(ds).endswith(f"; {ds.preprocessing}")
    cropped = data.load(tmp_path / "celeba", crop=100, size=32)  # an explicit crop wins
    assert cropped.preprocessing == "centre crop 100x100, resized to 32x32 (bilinear)"
    make_celeba(tmp_path / "other", size=(178, 200))  # named alike, another size: not celebA
    assert data.load(tmp_path / "other").preprocessing == "centre square crop, resized to 64x64 (bilinear)"


def test_a_cached_tar_is_not_read_again(tmp_path, monkeypatch):
    make_celeba(tmp_path / "faces")
    with tarfile.open(tmp_path / "faces.tar", "w") as tar:
        tar.add(tmp_path / "faces", "faces")
    first = data.load(tmp_path / "faces.tar")
    monkeypatch.setattr(data, "_tar_files", None)  # reading the tar again would fail
    again = data.load(tmp_path / "faces.tar")
    assert np.array_equal(again.images, first.images) and again.preprocessing == first.preprocessing
    assert "celebA" in again.preprocessing
    with pytest.raises(TypeError):  # other options: another cache, so the tar is read
        data.load(tmp_path / "faces.tar", crop=None)


def test_write_atomically_writes_whole_files_through_links_with_the_umask(tmp_path):
    target = tmp_path / "real.bin"
    target.write_bytes(b"old")
    (tmp_path / "link.bin").symlink_to(target)
    old_mask = os.umask(0o027)
    try:
        assert data.write_atomically(tmp_path / "link.bin", lambda f: f.write(b"new")) == str(target)
        assert os.path.islink(tmp_path / "link.bin") and target.read_bytes() == b"new"  # written through
        assert os.stat(target).st_mode & 0o777 == 0o640  # 0o666 & ~umask, not mkstemp's 0o600
        os.umask(0o002)
        data.write_atomically(tmp_path / "shared.bin", lambda f: f.write(b"x"))
        assert os.stat(tmp_path / "shared.bin").st_mode & 0o777 == 0o664
    finally:
        os.umask(old_mask)

    def half_then_fail(f):
        f.write(b"half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):  # what write() raises passes through; nothing is left
        data.write_atomically(target, half_then_fail)
    assert target.read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["link.bin", "real.bin", "shared.bin"]
    with pytest.raises(data.WriteError, match=r"^disk full writing .*big.bin \(needs 1,000,000,000,000.0 MB"):
        data.write_atomically(tmp_path / "big.bin", lambda f: f.write(b"x"), nbytes=10 ** 18)
    with pytest.raises(data.WriteError, match=r"^cannot write .*nofolder/x.bin: No such file or directory"):
        data.write_atomically(tmp_path / "nofolder" / "x.bin", lambda f: f.write(b"x"))
    assert sorted(os.listdir(tmp_path)) == ["link.bin", "real.bin", "shared.bin"]


FULL_DISK = r'''
import os, resource, sys
sys.path.insert(0, sys.argv[1])
import data
folder = sys.argv[2]
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # writes past 20 kB fail with EFBIG
try:
    data.load(folder, size=32)
except data.WriteError as e:
    print(e)
print(sorted(os.listdir(os.path.dirname(folder))))
'''


def test_an_image_cache_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path):
    (tmp_path / "pics").mkdir()
    for i, im in enumerate(rng_images(10, 32, 32, 3, seed=13)):  # a 30 kB cache
        save_png(tmp_path / "pics" / f"{i}.png", im)
    run = subprocess.run([sys.executable, "-c", FULL_DISK, HERE, str(tmp_path / "pics")],
                         capture_output=True, text=True, timeout=120)
    said = run.stdout.strip().split("\n")
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    assert said[0].startswith(f"file size limit reached writing {tmp_path}/pics.32x32.")
    assert said[0].endswith(".npy (File too large; see ulimit -f)") and said[1] == "['pics']"
    cached = data.load(tmp_path / "pics", size=32)  # with room, the cache is written, umask permissions
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(cached.images.filename).st_mode & 0o777 == 0o666 & ~mask


ON_A_SMALL_DISK = r'''
import os, sys
sys.path.insert(0, sys.argv[1])
import data
small = sys.argv[2]
try:  # no size given: the disk fills while writing (ENOSPC), not in a check before
    data.write_atomically(os.path.join(small, "big.bin"), lambda f: f.write(bytes(200_000)))
except data.WriteError as e:
    print(e)
print(os.listdir(small))
'''


def test_a_disk_that_fills_while_writing_is_one_line_and_leaves_nothing(tmp_path):
    """On a 64 kB tmpfs in a private mount namespace (unshare -rm, where the system allows it)."""
    small = tmp_path / "small"
    small.mkdir()
    command = ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$1" && exec "$2" -c "$3" "$4" "$1"',
               "sh", str(small), sys.executable, ON_A_SMALL_DISK, HERE]
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        pytest.skip("no unshare")
    if "mount" in run.stderr or "unshare" in run.stderr:
        pytest.skip(f"no private tmpfs here: {run.stderr.strip()[:100]}")
    assert run.stdout.strip().split("\n") == [f"disk full writing {small}/big.bin (No space left on device)", "[]"]


# --------------------------------------------------------------------------------------------
# MATLAB files and cars3d

def test_read_mat_compressed_fixture():
    path = os.path.join(FIXTURES, "cars", "car_002_mesh.mat")
    im = data.read_mat(path, "im")
    assert im.shape == (16, 16, 3, 24, 4) and im.dtype == np.uint8 and np.array_equal(im, car_im(2))
    assert np.allclose(data.read_mat(path, "mesh"), np.arange(15).reshape(5, 3) / 7)
    with pytest.raises(DataError, match="car_002_mesh.mat.*no variable 'x'"):
        data.read_mat(path, "x")


@pytest.mark.parametrize("order", ["<", ">"])
def test_read_mat_uncompressed_by_hand(order, tmp_path):
    small = np.array([[1, -2], [3, 4]], np.int16)
    counts = np.arange(24).reshape(2, 3, 4) * 10
    text = np.array([[104, 105]])  # 'hi', a char array (class 4): not numeric
    raw = mat_v5([("small", small, 10, "i2"), ("counts", counts, 6, "u1"), ("text", text, 4, "u1")], order)
    got = data.read_mat(raw, "counts")  # a double stored as uint8
    assert got.dtype == np.float64 and np.array_equal(got, counts)
    (tmp_path / "hand.mat").write_bytes(raw)
    assert np.array_equal(data.read_mat(tmp_path / "hand.mat", "small"), small)  # a path-like source
    with pytest.raises(DataError, match=r"hand\.mat: variable text: not a real numeric array \(class 4"):
        data.read_mat(tmp_path / "hand.mat", "text")
    with pytest.raises(DataError, match="<mat bytes>: no variable 'nothing'"):
        data.read_mat(raw, "nothing")


def test_cars3d_folder_tar_and_uncompressed(tmp_path, capsys):
    want = expected_cars([car_im(k) for k in (1, 2, 3)])
    ds = data.load(os.path.join(FIXTURES, "cars"), cache_dir=tmp_path / "cache")
    assert ds.factor_names == ["elevation", "azimuth", "object"] and ds.factor_sizes == [4, 24, 3]
    assert ds.factors.tolist() == [list(p) for p in itertools.product(range(4), range(24), range(3))]
    assert np.array_equal(ds.images, want) and isinstance(ds.images, np.memmap)

    with tarfile.open(tmp_path / "nips2015-analogy-data.tar.gz", "w:gz") as tar:
        tar.add(os.path.join(FIXTURES, "cars", "car_003_mesh.mat"), "data/cars/car_003_mesh.mat")
        tar.add(os.path.join(FIXTURES, "make_fixtures.py"), "data/other.py")
        tar.add(os.path.join(FIXTURES, "cars", "car_001_mesh.mat"), "data/cars/car_001_mesh.mat")
        tar.add(os.path.join(FIXTURES, "cars", "car_002_mesh.mat"), "__MACOSX/data/cars/._car_002_mesh.mat")
        info = tarfile.TarInfo("data/preview.png")  # an image beside the cars: still cars3d
        png = io.BytesIO()
        save_png(png, rng_images(1, 8, 8, 3)[0])
        info.size = len(png.getvalue())
        tar.addfile(info, io.BytesIO(png.getvalue()))
    built = []
    for _ in range(2):  # the second time from the same cache file
        ds = data.load(tmp_path / "nips2015-analogy-data.tar.gz")
        assert np.array_equal(ds.images, expected_cars([car_im(1), car_im(3)]))
        built.append({n: os.stat(tmp_path / n).st_mtime_ns for n in os.listdir(tmp_path) if n.endswith(".npy")})
    assert built[0] == built[1] and len(built[0]) == 1
    assert next(iter(built[0])).startswith("nips2015-analogy-data.tar.gz.cars3d-64x64.")
    with pytest.raises(DataError, match="holds cars3d, read at 64x64; options size and crop do not apply"):
        data.load(tmp_path / "nips2015-analogy-data.tar.gz", size=32)

    (tmp_path / "plain").mkdir()
    for k in (1, 2):
        (tmp_path / "plain" / f"car_{k:03d}_mesh.mat").write_bytes(mat_v5([("im", car_im(k), 9, "u1")]))
    assert np.array_equal(data.load(tmp_path / "plain").images, expected_cars([car_im(1), car_im(2)]))
    (tmp_path / "plain" / "car_002_mesh.mat").write_bytes(mat_v5([("im", car_im(3), 9, "u1")]))  # replaced
    assert np.array_equal(data.load(tmp_path / "plain").images, expected_cars([car_im(1), car_im(3)]))
    assert "is stale (its source changed): rebuilding" in capsys.readouterr().err


def test_cars3d_resize_matches_disentanglement_lib(tmp_path):
    im = rng_images(1, 128, 128, 3, seed=5)[0][..., None, None]  # one view, (128, 128, 3, 1, 1)
    (tmp_path / "cars").mkdir()
    (tmp_path / "cars" / "car_001_mesh.mat").write_bytes(mat_v5([("im", im, 9, "u1")]))
    pic = Image.fromarray(im[..., 0, 0])
    pic.thumbnail((64, 64), Image.LANCZOS)  # disentanglement_lib's cars3d resize
    assert np.array_equal(data.load(tmp_path / "cars").images[0], np.asarray(pic))


# --------------------------------------------------------------------------------------------
# torch files (3D faces)

@pytest.mark.parametrize("name", ["faces_legacy.pth", "faces_zip.pth"])
def test_faces_grid(name):
    ds = data.load(os.path.join(FIXTURES, name))
    assert ds.factor_names == ["identity", "azimuth", "elevation", "lighting"]
    assert ds.factor_sizes == [2, 3, 2, 2]
    assert ds.factors.tolist() == [list(p) for p in itertools.product(range(2), range(3), range(2), range(2))]
    assert ds.images.shape == (24, 8, 8, 1) and np.array_equal(ds.images[..., 0], face_grid().reshape(24, 8, 8))


def test_faces_flat():
    ds = data.load(os.path.join(FIXTURES, "faces_flat.pth"))
    assert ds.factors is None and np.array_equal(ds.images[..., 0], face_grid().reshape(24, 8, 8))


def test_torch_file_with_other_pickles_is_refused(tmp_path):
    """A legacy-layout file whose object pickle calls _trip: refused, and nothing runs."""
    stream = b"".join(pickle.dumps(x, protocol=2) for x in
                      (0x1950a86a20f9469cfc6c, 1001, {"little_endian": True}, Trap(), []))
    (tmp_path / "evil.pth").write_bytes(stream)
    with pytest.raises(DataError, match="evil.pth.*single tensor"):
        data.load(tmp_path / "evil.pth")
    assert not UNPICKLED


# --------------------------------------------------------------------------------------------
# fuzz: truncated and bit-flipped files give the right array or a DataError, nothing else

def damaged(raw, seed=0, n=20):
    rng = np.random.default_rng(seed)
    for cut in np.linspace(0, len(raw) - 1, n).astype(int):
        yield raw[:cut]
    for pos in rng.integers(0, len(raw), n):
        flipped = bytearray(raw)
        flipped[pos] ^= 1 << int(rng.integers(8))
        yield bytes(flipped)


def check_fuzz(tmp_path, raw, suffix, expected, exact=True):
    cached = suffix in (".zip", ".tar.gz")  # a fresh cache for each damaged file
    (tmp_path / f"intact{suffix}").write_bytes(raw)
    assert np.array_equal(data.load(tmp_path / f"intact{suffix}", **(
        {"cache_dir": tmp_path / "c"} if cached else {})).images, expected)
    for i, bad in enumerate(damaged(raw)):
        path = tmp_path / f"f{i}{suffix}"
        path.write_bytes(bad)
        try:
            ds = data.load(path, **({"cache_dir": tmp_path / f"c{i}"} if cached else {}))
        except DataError:
            continue
        assert ds.images.shape == expected.shape
        assert np.array_equal(ds.images, expected) or not exact, f"wrong pixels from damage #{i}"


def test_fuzz_npz(tmp_path):
    imgs, _ = dsprites_npz(tmp_path / "d.npz")
    raw = (tmp_path / "d.npz").read_bytes()
    check_fuzz(tmp_path, raw, ".npz", imgs[..., None] * 255)
    assert not UNPICKLED


def test_fuzz_image_zip(tmp_path):
    images = rng_images(3, 64, 64, 3)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for i, im in enumerate(images):
            png = io.BytesIO()
            save_png(png, im)
            zf.writestr(f"{i}.png", png.getvalue())
    check_fuzz(tmp_path, buf.getvalue(), ".zip", images)


def test_fuzz_mat_and_tar(tmp_path):
    raw = open(os.path.join(FIXTURES, "cars", "car_001_mesh.mat"), "rb").read()
    for bad in damaged(raw):
        try:
            assert np.array_equal(data.read_mat(bad, "im"), car_im(1))
        except DataError:
            pass
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(os.path.join(FIXTURES, "cars", "car_001_mesh.mat"), "data/cars/car_001_mesh.mat")
    check_fuzz(tmp_path, buf.getvalue(), ".tar.gz", expected_cars([car_im(1)]))


def test_fuzz_torch(tmp_path):
    want = face_grid().reshape(24, 8, 8, 1)
    check_fuzz(tmp_path, open(os.path.join(FIXTURES, "faces_zip.pth"), "rb").read(), ".pth", want)
    # the legacy format has no checksum: a flipped pixel byte cannot be noticed
    check_fuzz(tmp_path, open(os.path.join(FIXTURES, "faces_legacy.pth"), "rb").read(), ".pth",
               want, exact=False)
    assert not UNPICKLED


# ----------------------------------------------------------------------------- data: pairs (weak supervision)

def pair_differences(factors, first, second):
    return (factors[first] != factors[second]).sum(1)


@pytest.mark.parametrize("source", [TINY, "shapes:hues=2,orientations=2,scales=2"])
def test_pairs_differ_in_exactly_k_factors_on_grids(source):
    ds = data.load(source)
    for k in range(1, len(ds.factor_sizes)):
        sampler = data.PairSampler(ds.factors, ds.factor_sizes, k)
        first, second = sampler.draw(2000, np.random.default_rng(k))
        assert first.dtype == second.dtype == np.int64 and first.shape == second.shape == (2000,)
        assert (pair_differences(ds.factors, first, second) == k).all()
        changed = ds.factors[first] != ds.factors[second]
        assert changed.any(0).all()  # every factor is among those that change
    # the first rows are uniform over the rows (a grid: over the factor combinations)
    first, _ = data.PairSampler(ds.factors, ds.factor_sizes, 1).draw(50 * len(ds), np.random.default_rng(0))
    counts = np.bincount(first, minlength=len(ds))
    assert counts.min() > 0 and counts.std() < 1.5 * 50 ** 0.5  # multinomial: about 50 ** 0.5


def test_pairs_on_a_table_with_missing_and_repeated_rows():
    grid = np.array(list(itertools.product(range(3), range(4), range(5))))
    rng = np.random.default_rng(1)
    table = grid[rng.random(len(grid)) < 0.4]  # about 60% of the combinations missing
    table = np.concatenate([table, table[:5]])  # and five repeated
    present = {tuple(row) for row in table}
    for k in (1, 2):
        first, second = data.PairSampler(table, [3, 4, 5], k).draw(3000, np.random.default_rng(k))
        assert (pair_differences(table, first, second) == k).all()
        assert all(tuple(table[i]) in present for i in second)
    _, second = data.PairSampler(table, [3, 4, 5], 1).draw(20000, np.random.default_rng(3))
    repeats = [i for i in range(len(table)) if (table == table[i]).all(1).sum() == 2]
    assert all(np.isin(repeats, second))  # both copies of a repeated combination are drawn
    # a table where no row has a partner differing in one factor
    sparse = data.PairSampler(np.array([[0, 0], [1, 1]]), [2, 2], 1, where="t.npz")
    with pytest.raises(DataError, match=r"^t.npz: no row differs from row \d in exactly 1 factors"):
        sparse.draw(4, np.random.default_rng(0))


def test_pairs_k0_is_uniform_over_1_to_k_minus_1():
    ds = data.load(TINY)  # 5 factors: k in 1..4
    first, second = data.PairSampler(ds.factors, ds.factor_sizes, 0).draw(20000, np.random.default_rng(2))
    counts = np.bincount(pair_differences(ds.factors, first, second), minlength=6)
    assert counts[0] == counts[5] == 0
    assert np.abs(counts[1:5] - 5000).max() < 4 * (20000 * 0.25 * 0.75) ** 0.5


def test_pairs_are_deterministic_and_resume_from_the_generator_state():
    ds = data.load(TINY)
    sampler = data.PairSampler(ds.factors, ds.factor_sizes, 0)
    a = [sampler.draw(64, np.random.default_rng(5)) for _ in range(2)]
    assert all(np.array_equal(x, y) for x, y in zip(a[0], a[1]))
    rng = np.random.default_rng(5)
    sampler.draw(64, rng)
    state = rng.bit_generator.state
    after = sampler.draw(64, rng)
    resumed = np.random.default_rng()
    resumed.bit_generator.state = state
    assert all(np.array_equal(x, y) for x, y in zip(after, sampler.draw(64, resumed)))
    other = sampler.draw(64, np.random.default_rng(6))
    assert not np.array_equal(a[0][0], other[0])


def test_pairs_refuse_unlabelled_data_and_bad_k():
    with pytest.raises(DataError, match=r"^faces: has no factors \(unlabelled\)"):
        data.PairSampler(None, [], 1, where="faces")
    factors = np.array([[0, 1, 0], [1, 0, 0]])
    with pytest.raises(DataError, match="k must be 0 .random. or 1..1 for its 2 varying factors, got 2"):
        data.PairSampler(factors, [2, 2, 1], 2)
    with pytest.raises(DataError, match="at least 2 factors that vary, it has 1"):
        data.PairSampler(factors[:, :1], [2], 0)
    with pytest.raises(DataError, match="outside 0..factor_sizes - 1"):
        data.PairSampler(factors, [2, 1, 1], 1)


# ----------------------------------------------------------------------------- data: the benchmark datasets

_bench_spec = importlib.util.spec_from_file_location(
    "make_benchmark_fixtures", os.path.join(FIXTURES, "make_benchmark_fixtures.py"))
bench_fx = importlib.util.module_from_spec(_bench_spec)
_bench_spec.loader.exec_module(bench_fx)


@pytest.mark.parametrize("name", sorted(bench_fx.MPI3D_GRIDS))
def test_mpi3d_published_files_are_memory_mapped_with_their_grid(tmp_path, name):
    path = tmp_path / name
    grid = bench_fx.MPI3D_GRIDS[name]
    bench_fx.write_mpi3d(path, grid)
    ds = data.load(path)
    assert type(ds.images).__name__ == "StoredRows" and ds.images.shape[0] == np.prod(grid)
    assert ds.factor_sizes == list(grid) and ds.factor_names[0] == "object_color"
    assert ds.factor_names[-2:] == ["horizontal_axis", "vertical_axis"]
    rows = np.random.default_rng(0).choice(len(ds), 2000, replace=False)
    # each fixture image carries its own factor indices in its first 7 bytes
    np.testing.assert_array_equal(ds.factors[rows], ds.images[rows].reshape(len(rows), -1)[:, :7])
    assert ds.factors[-1].tolist() == [s - 1 for s in grid]


def test_mpi3d_other_counts(tmp_path):
    np.savez(tmp_path / "mpi3d_toy.npz", images=np.zeros((1000, 64, 64, 3), np.uint8))
    with pytest.raises(DataError, match="mpi3d_toy.npz: .*1,036,800 .*460,800"):
        data.load(tmp_path / "mpi3d_toy.npz")
    np.savez(tmp_path / "mine.npz", images=np.full((50, 4, 4, 3), 7, np.uint8))  # not named MPI3D
    ds = data.load(tmp_path / "mine.npz")
    assert ds.factors is None and ds.images.shape == (50, 4, 4, 3) and ds.images.max() == 7


def test_raw_formats_need_fileformats_beside_data(tmp_path):
    bench_fx.write_smallnorb(tmp_path / "norb", rows=2)
    said = run_copied_alone(tmp_path, "data", "import data\n"
                            "try: data.load('../norb')\nexcept data.DataError as e: print(e)\n")
    assert said[-1].endswith("norb: reading this file needs fileformats.py (the toolkit's reader "
                             "of raw formats) beside data.py")


@pytest.mark.parametrize("compress", [False, True])
def test_smallnorb_as_disentanglement_lib(tmp_path, compress):
    folder = tmp_path / "norb"
    bench_fx.write_smallnorb(folder, rows=12, compress=compress)
    arrays = list(bench_fx.norb_arrays(12).values())
    expected = np.concatenate([np.column_stack([cat, info]) for _, cat, info in arrays])
    expected[:, 3] //= 2  # azimuths 0, 2, ..., 34 -> 0..17
    one_file = next(folder.glob("*testing-info.mat*"))
    for source in (folder, one_file):
        ds = data.load(source, cache_dir=tmp_path / "cache")
        assert ds.factor_names == ["category", "instance", "elevation", "azimuth", "lighting"]
        assert ds.factor_sizes == [5, 10, 9, 18, 6]
        np.testing.assert_array_equal(ds.factors, expected)
        assert ds.images.shape == (24, 64, 64, 1) and type(ds.images).__name__ == "StoredRows"
    firsts = np.concatenate([dat[:, 0] for dat, _, _ in arrays])
    for i in (0, 13, 23):  # the first image of each pair, LANCZOS-resized
        want = np.asarray(Image.fromarray(firsts[i]).resize((64, 64), Image.LANCZOS))
        np.testing.assert_array_equal(ds.images[i, :, :, 0], want)
    assert set(ds.factors[:12, 1]) <= {4, 6, 7, 8, 9} and set(ds.factors[12:, 1]) <= {0, 1, 2, 3, 5}
    next(folder.glob("*training-cat.mat*")).unlink()
    with pytest.raises(DataError, match="missing smallnorb-5x46789x9x18x6x2x96x96-training-cat.mat"):
        data.load(folder, cache_dir=tmp_path / "cache")


def test_chairs_folder_and_tar(tmp_path):
    folder = tmp_path / "rendered_chairs"
    bench_fx.write_chairs(folder)
    bench_fx.tar_chairs(folder, tmp_path / "rendered_chairs.tar")
    grid = (3, 31, 2)
    for source in (folder, tmp_path / "rendered_chairs.tar"):
        ds = data.load(source, cache_dir=tmp_path / "cache")
        assert ds.factor_names == ["chair", "azimuth", "elevation"] and ds.factor_sizes == list(grid)
        np.testing.assert_array_equal(ds.factors, np.indices(grid).reshape(3, -1).T)
        # the 2/3 centre crop keeps exactly the gray square: row r is the value r everywhere
        assert ds.images.shape == (186, 64, 64, 1)
        np.testing.assert_array_equal(np.asarray(ds.images).reshape(186, -1).min(1), np.arange(186))
        np.testing.assert_array_equal(np.asarray(ds.images).reshape(186, -1).max(1), np.arange(186))
    def no_reading(*args):
        raise AssertionError("a cached tar was read again")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, "_tar_files", no_reading)
        assert data.load(tmp_path / "rendered_chairs.tar", cache_dir=tmp_path / "cache").factor_sizes == list(grid)
    next((folder / bench_fx.CHAIRS[1] / "renders").glob(f"*_p030_t{bench_fx.CHAIR_AZIMUTHS[1]:03d}_*")).unlink()
    with pytest.raises(DataError, match=f"chair {bench_fx.CHAIRS[1]} has 61 views"):
        data.load(folder, cache_dir=tmp_path / "cache")


def test_dsprites_variants_are_drawn_per_batch(tmp_path):
    path = tmp_path / "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
    bench_fx.write_dsprites(path)
    plain = data.load(path)
    sprite = plain.images[..., 0] == 255
    rows = np.arange(0, len(plain), 5)
    color = data.load(f"{path}:variant=color", seed=3)
    assert color.images.shape == (192, 64, 64, 3) and color.factor_names == plain.factor_names
    batch = color.images[rows]
    assert batch.dtype == np.uint8 and (batch[~sprite[rows]] == 0).all()
    for image, mask in zip(batch, sprite[rows]):  # one colour per image, each channel in [0.5, 1]
        colour = image[mask]
        assert (colour == colour[0]).all() and (colour[0] >= 127).all()
    np.testing.assert_array_equal(color.images[rows], batch)  # fixed by (seed, row)
    assert not np.array_equal(data.load(f"{path}:variant=color", seed=4).images[rows], batch)
    noisy = data.load(f"{path}:variant=noisy").images[rows]
    assert (noisy[sprite[rows]] == 255).all()
    background = noisy[~sprite[rows]].astype(float)
    assert abs(background.mean() - 127.5) < 3 and background.min() == 0 and background.max() == 255
    picture = tmp_path / "scream.png"  # red channel = the row: 2 * out - row is constant per image
    Image.fromarray(np.repeat(np.arange(200, dtype=np.uint8)[:, None, None], 300, 1).repeat(3, 2)).save(picture)
    scream = data.load(path, scream=str(picture)).images[rows]
    for image, mask in zip(scream, sprite[rows]):
        red = np.where(mask, 255 - image[..., 0], image[..., 0]).astype(int)
        offset = 2 * red - np.arange(64)[:, None]  # top + colour, within rounding
        assert offset.max() - offset.min() <= 2
    with pytest.raises(DataError, match="variant='bw'"):
        data.load(f"{path}:variant=bw")
    with pytest.raises(DataError, match="1-channel"):
        data.load("shapes:hues=2,scales=1,orientations=1:variant=color".replace(":variant", ",variant"))


@pytest.mark.parametrize("kind", ["mpi3d", "norb", "chairs", "dsprites_color"])
def test_benchmark_datasets_train_end_to_end(tmp_path, kind):
    if kind == "mpi3d":
        source = tmp_path / "real3d_complicated_shapes_ordered.npz"
        bench_fx.write_mpi3d(source, bench_fx.MPI3D_GRIDS[source.name])
        extra, names = ["--arch", "mlp"], data.load(source).factor_names
    elif kind == "norb":
        bench_fx.write_smallnorb(tmp_path / "norb", rows=40, compress=True)
        source, extra, names = tmp_path / "norb", [], ["category", "instance", "elevation", "azimuth", "lighting"]
    elif kind == "chairs":
        source = tmp_path / "rendered_chairs.tar"
        bench_fx.write_chairs(tmp_path / "chairs")
        bench_fx.tar_chairs(tmp_path / "chairs", source)
        extra, names = [], ["chair", "azimuth", "elevation"]
    else:
        bench_fx.write_dsprites(tmp_path / "d.npz")
        source, extra = f"{tmp_path / 'd.npz'}:variant=color", []
        names = ["shape", "scale", "orientation", "posX", "posY"]
    out = str(tmp_path / "ckpt.pt")
    code = train.main(["--data", str(source), "--steps", "2", "--batch-size", "16", "--out", out,
                       "--final-eval", "64", "--latents", "4", *extra])
    assert code == 0
    state = torch.load(out, weights_only=True)
    assert state["config"]["factor_names"] == names and "final" in state


# ----------------------------------------------------------------------------- data: HDF5 files
# (h5.py itself is tested alone in test_h5.py)

FIX = FIXTURES
_spec = importlib.util.spec_from_file_location("make_h5_fixtures", os.path.join(FIX, "make_h5_fixtures.py"))
mk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mk)  # numpy only at import time; h5py is imported inside its main()

def _same(got, want):
    assert isinstance(got, np.ndarray)
    assert got.dtype == want.dtype.newbyteorder("=") and got.dtype.isnative
    assert got.shape == want.shape
    assert np.array_equal(got, want)


def test_load_dsprites():
    imgs, classes, _ = mk.dsprites_arrays()
    ds = data.load(os.path.join(FIX, "dsprites_small.h5"))
    assert ds.name == "dsprites_small.h5" and ds.factor_names == ["shape", "scale", "orientation", "posX", "posY"]
    assert ds.factor_sizes == [3, 2, 2, 4, 2]
    _same(ds.images, imgs[..., None] * np.uint8(255))
    _same(ds.factors, classes[:, 1:])
    sub = data.load(os.path.join(FIX, "dsprites_small.h5"), limit=10, seed=4)
    rows = np.sort(np.random.default_rng(4).choice(len(imgs), 10, replace=False))
    _same(sub.images, imgs[rows][..., None] * np.uint8(255))
    _same(sub.factors, classes[rows, 1:])
    assert sub.factor_sizes == [3, 2, 2, 4, 2]  # the whole file's sizes
    one = data.load(os.path.join(FIX, "dsprites_small.h5"), limit=1)
    assert one.factors is None and one.factor_names == []  # one row: every factor is constant: unlabelled


def test_one_shape_dsprites_drops_the_shape_factor():
    imgs, classes, _ = mk.dsprites_arrays()
    hearts = classes[:, 1] == 2
    ds = data.load(os.path.join(FIX, "dsprites_hearts.hdf5"))
    assert ds.factor_names == ["scale", "orientation", "posX", "posY"] and ds.factor_sizes == [2, 2, 4, 2]
    _same(ds.factors, classes[hearts][:, 2:])
    _same(ds.images, imgs[hearts][..., None] * np.uint8(255))


def test_load_3dshapes():
    images, _, idx = mk.shapes3d_arrays()
    ds = data.load(os.path.join(FIX, "3dshapes_small.h5"))
    assert ds.name == "3dshapes_small.h5" and ds.factor_sizes == [10, 10, 10, 8, 4, 15]
    assert ds.factor_names == ["floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation"]
    _same(ds.images, images)
    _same(ds.factors, idx.astype(np.int64))
    sub = data.load(os.path.join(FIX, "3dshapes_small.h5"), limit=7, seed=2)
    rows = np.sort(np.random.default_rng(2).choice(len(images), 7, replace=False))
    _same(sub.images, images[rows])
    _same(sub.factors, idx[rows].astype(np.int64))
    with pytest.raises(DataError, match="3dshapes_offgrid.h5.*scale"):
        data.load(os.path.join(FIX, "3dshapes_offgrid.h5"))


def test_load_generic_and_unknown(tmp_path):
    ds = data.load(os.path.join(FIX, "generic_images.h5"))
    assert ds.images.shape == (12, 8, 8, 1) and ds.factors.dtype == np.int64 and ds.factor_sizes == [5, 5]
    with pytest.raises(DataError, match=r"unknown\.h5.*foo \(10,\) float64"):
        data.load(os.path.join(FIX, "unknown.h5"))
    (tmp_path / "script.h5").write_bytes(open(os.path.join(FIX, "make_h5_fixtures.py"), "rb").read())
    with pytest.raises(DataError, match="script.h5: not an HDF5 file"):
        data.load(tmp_path / "script.h5")


def run_copied_alone(tmp_path, module, code):
    """Copy one module into an empty folder and run `code` there; returns its stdout lines."""
    folder = tmp_path / module
    folder.mkdir()
    (folder / f"{module}.py").write_bytes(open(os.path.join(HERE, f"{module}.py"), "rb").read())
    run = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip().split("\n")


def test_data_stands_alone_and_says_h5_needs_h5_py(tmp_path):
    """data.py copied alone reads every other format and says in one line that .h5 needs h5.py."""
    np.savez(tmp_path / "own.npz", images=rng_images(3, 4, 4, 1))
    said = run_copied_alone(tmp_path, "data", "import data\n"
                            "assert len(data.load('../own.npz')) == 3\n"
                            f"try: data.load({os.path.join(FIX, 'dsprites_small.h5')!r})\n"
                            "except data.DataError as e: print(e)\n")
    assert said[-1].endswith("dsprites_small.h5: reading .h5/.hdf5 files needs h5.py (the toolkit's "
                             "HDF5 reader) beside data.py")


def test_h5_problems_are_data_errors_naming_the_dataset():
    with pytest.raises(DataError, match="lzf.h5: dataset 'images'") as caught:  # the cause is kept
        data.load(os.path.join(FIX, "lzf.h5"))
    import h5
    assert isinstance(caught.value.__cause__, h5.H5Error)
    assert data.H5File is h5.H5File and data.H5Error is h5.H5Error  # re-exported


# ----------------------------------------------------------------------------- metrics

# -----------------------------------------------------------------------------
# independent references


def brute_discrete_mi(x, y):
    """MI in nats from the definition, counting pairs in Python dicts."""
    n = len(x)
    joint, px, py = Counter(zip(x.tolist(), y.tolist())), Counter(x.tolist()), Counter(y.tolist())
    return sum(c / n * math.log(c * n / (px[a] * py[b])) for (a, b), c in joint.items())


def brute_discrete_mig(codes, factors, bins):
    binned = [np.digitize(c, np.histogram(c, bins)[1][:-1]) for c in codes.T]
    mi = np.array([[brute_discrete_mi(b, f) for f in factors.T] for b in binned])
    entropy = np.array([brute_discrete_mi(f, f) for f in factors.T])
    ranked = np.sort(mi, axis=0)[::-1]
    return np.mean((ranked[0] - ranked[1]) / entropy), mi, entropy


def mixture_entropy(mu, sigma, points=40001):
    """Entropy (nats) of mean_n N(mu_n, sigma_n^2) by the trapezoid rule on exact pdf sums."""
    x = np.linspace(np.min(mu - 10 * sigma), np.max(mu + 10 * sigma), points)
    q = np.zeros_like(x)
    for m, s in zip(mu, sigma):
        q += np.exp(-0.5 * ((x - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))
    q /= len(mu)
    return np.trapezoid(-q * np.log(np.maximum(q, 1e-300)), x)


def reference_mi(mu, sigma, factor):
    """I(z; v) = H(q(z)) - sum_v p(v) H(q(z | v)) by quadrature."""
    values, counts = np.unique(factor, return_counts=True)
    conditional = sum(c / len(mu) * mixture_entropy(mu[factor == v], sigma[factor == v])
                      for v, c in zip(values, counts))
    return mixture_entropy(mu, sigma) - conditional


# -----------------------------------------------------------------------------
# discrete_mig


def test_discrete_matches_brute_force():
    rng = np.random.default_rng(0)
    factors = np.stack([rng.choice([10, -3, 7], 3000), rng.integers(0, 5, 3000), rng.integers(2, 9, 3000)], 1)
    codes = rng.normal(size=(3000, 4)) + 0.3 * factors[:, [0, 1, 2, 2]]
    codes[:, 3] = np.round(codes[:, 3])  # many ties on bin edges
    for bins in (5, 20):
        mig, mi, entropy = brute_discrete_mig(codes, factors, bins)
        out = metrics.discrete_mig(codes, factors, bins=bins)
        np.testing.assert_allclose(out["mi"], mi, rtol=0, atol=1e-9)
        np.testing.assert_allclose(out["entropy"], entropy, rtol=0, atol=1e-9)
        assert abs(out["mig"] - mig) < 1e-9


def test_discrete_known_cases():
    rng = np.random.default_rng(1)
    factors = np.stack([rng.integers(0, 3, 20000), rng.integers(0, 4, 20000)], 1)
    noise = rng.normal(size=(20000, 2))
    disentangled = np.concatenate([factors + 0.01 * noise, noise], 1)
    assert metrics.discrete_mig(disentangled, factors)["mig"] > 0.9
    assert metrics.discrete_mig(rng.normal(size=(20000, 4)), factors)["mig"] < 0.05
    duplicated = metrics.discrete_mig(disentangled[:, [0, 0, 1]], factors)
    assert duplicated["gaps"][0] < 1e-12 and duplicated["gaps"][1] > 0.9


def test_discrete_single_code_and_errors():
    rng = np.random.default_rng(2)
    factors = rng.integers(0, 4, (500, 2))
    out = metrics.discrete_mig(factors[:, :1] + 0.0, factors)
    np.testing.assert_allclose(out["gaps"], out["mi_normalized"][0])
    assert abs(out["gaps"][0] - 1) < 1e-12
    with pytest.raises(ValueError, match="non-finite"):
        metrics.discrete_mig(np.full((500, 1), np.nan), factors)
    with pytest.raises(ValueError, match="rows"):
        metrics.discrete_mig(np.zeros((499, 1)), factors)
    with pytest.raises(ValueError, match="factor 1"):
        metrics.discrete_mig(np.zeros((500, 1)), np.stack([factors[:, 0], np.zeros(500, int)], 1))


# -----------------------------------------------------------------------------
# gaussian_mig


def test_gaussian_copy_with_noise_and_prior():
    """z0 = value(v) + N(0, s^2) exactly; z1 at the prior. MI of z0 = H(q(z)) - H(N(0, s^2))."""
    values, s = np.array([-1.0, 0.0, 0.5, 2.0, 2.4]), 0.4
    factor = np.repeat(np.arange(5), 60)
    mu = np.stack([values[factor], np.zeros(300)], 1)
    logvar = np.stack([np.full(300, 2 * math.log(s)), np.zeros(300)], 1)
    out = metrics.gaussian_mig(mu, logvar, factor[:, None])
    expected = mixture_entropy(values, np.full(5, s)) - 0.5 * math.log(2 * math.pi * math.e * s * s)
    assert abs(out["mi"][0, 0] - expected) < 1e-4
    assert abs(out["mi"][1, 0]) < 1e-3
    assert abs(out["mig"] - expected / math.log(5)) < 1e-4


def test_gaussian_heteroscedastic_against_quadrature():
    rng = np.random.default_rng(3)
    n = 400
    factors = np.stack([rng.integers(0, 4, n), rng.integers(0, 3, n)], 1)
    mu = np.stack([factors[:, 0] * 0.7 + rng.normal(0, 0.1, n),
                   factors[:, 1] - 0.5 * factors[:, 0] + rng.normal(0, 0.3, n),
                   rng.normal(0, 1, n)], 1)
    sigma = np.exp(rng.uniform(math.log(0.02), 0, (n, 3)))
    out = metrics.gaussian_mig(mu, 2 * np.log(sigma), factors)
    expected = np.array([[reference_mi(mu[:, j], sigma[:, j], factors[:, k]) for k in range(2)] for j in range(3)])
    assert expected[0, 0] > 0.9 and expected[1, 1] > 0.3  # the reference sees the structure too
    np.testing.assert_allclose(out["mi"], np.maximum(expected, 0), rtol=0, atol=1e-4)


def test_gaussian_near_deterministic_and_grid_cap():
    rng = np.random.default_rng(4)
    factor = rng.integers(0, 6, (600, 1))
    mu, logvar = factor + 0.0, np.full((600, 1), 2 * math.log(1e-3))
    out = metrics.gaussian_mig(mu, logvar, factor)
    assert out["mi_normalized"][0, 0] > 0.999
    # a capped grid adds the same small noise to every component: a lower bound, still near 1
    capped = metrics.gaussian_mig(mu, logvar, factor, max_grid=512)
    assert out["mi"][0, 0] + 1e-9 >= capped["mi"][0, 0] and capped["mi_normalized"][0, 0] > 0.99


def test_gaussian_row_order_and_hand_built_mig():
    rng = np.random.default_rng(5)
    n = 1000
    factors = np.stack([rng.integers(0, 3, n), rng.integers(0, 5, n)], 1)
    noise = rng.normal(size=(n, 4))
    # z0 copies f0 cleanly, z1 and z2 copy f1 (z1 less noisy), z3 is noise
    mu = np.stack([factors[:, 0] * 3.0, factors[:, 1] * 2.0, factors[:, 1] + noise[:, 2], noise[:, 3]], 1)
    logvar = np.log(np.array([0.05, 0.2, 0.5, 1.0]) ** 2) + np.zeros((n, 4))
    out = metrics.gaussian_mig(mu, logvar, factors)
    assert list(np.argmax(out["mi"], axis=0)) == [0, 1]
    ranked = np.sort(out["mi"] / out["entropy"], axis=0)
    np.testing.assert_allclose(out["gaps"], ranked[-1] - ranked[-2], atol=1e-12)
    assert out["mig"] == pytest.approx(np.mean(out["gaps"]))
    assert out["gaps"][0] > 0.95 and 0.1 < out["gaps"][1] < 0.9
    order = rng.permutation(n)
    shuffled = metrics.gaussian_mig(mu[order], logvar[order], factors[order])
    np.testing.assert_allclose(shuffled["mi"], out["mi"], rtol=0, atol=1e-9)


def test_gaussian_agrees_with_sampling_estimator():
    rng = np.random.default_rng(6)
    n = 3000
    factor = rng.integers(0, 4, (n, 1))
    mu = np.stack([factor[:, 0] * 0.8 + rng.normal(0, 0.3, n), rng.normal(0, 0.5, n)], 1)
    logvar = 2 * np.log(rng.uniform(0.1, 0.6, (n, 2)))
    grid = metrics.gaussian_mig(mu, logvar, factor)["mi"]
    # Chen et al.'s estimator with every row as a sample: standard error ~0.01 nats here
    sampled = np.mean([metrics.gaussian_mig(mu, logvar, factor, seed=s, method="sample")["mi"]
                       for s in range(2)], axis=0)
    np.testing.assert_allclose(sampled, grid, rtol=0, atol=0.04)


def test_gaussian_errors():
    factors = np.repeat(np.arange(4), 25)[:, None]
    with pytest.raises(ValueError, match="non-finite"):
        metrics.gaussian_mig(np.zeros((100, 2)), np.full((100, 2), np.inf), factors)
    with pytest.raises(ValueError, match="shape"):
        metrics.gaussian_mig(np.zeros((100, 2)), np.zeros((100, 3)), factors)
    with pytest.raises(ValueError, match="factor 0"):
        metrics.gaussian_mig(np.zeros((100, 2)), np.zeros((100, 2)), np.zeros((100, 1), int))
    out = metrics.gaussian_mig(factors + 0.0, np.full((100, 1), -6.0), factors)
    np.testing.assert_allclose(out["gaps"], out["mi_normalized"][0])


# -----------------------------------------------------------------------------
# the other metrics: exact ones against brute force, classifier ones on known answers

GRID = np.indices((3, 6, 8, 8)).reshape(4, -1).T  # a full factor grid, 1,152 rows, K = 4


def binned_codes(codes, bins):
    """disentanglement_lib's histogram discretizer."""
    return [np.digitize(c, np.histogram(c, bins)[1][:-1]) for c in codes.T]


def test_modularity_matches_ridgeway_mozer_by_brute_force():
    rng = np.random.default_rng(7)
    factors = np.stack([rng.integers(0, 3, 2000), rng.integers(0, 5, 2000), rng.integers(0, 4, 2000)], 1)
    codes = np.stack([factors[:, 0] + 0.2 * rng.normal(size=2000), factors[:, 1] - factors[:, 2] * 0.5,
                      np.round(rng.normal(size=2000)), np.full(2000, 3.0)], 1)  # ties; a constant code
    for bins in (7, 20):
        expected = []
        for b in binned_codes(codes, bins):
            mi = np.array([brute_discrete_mi(b, f) for f in factors.T])
            theta = mi.max()
            template = np.where(np.arange(len(mi)) == mi.argmax(), theta, 0.0)
            expected.append(1 - np.sum((mi - template) ** 2) / (theta ** 2 * (len(mi) - 1)) if theta > 0 else 0.0)
        out = metrics.modularity_explicitness(codes, factors, bins=bins)
        assert abs(out["modularity"] - np.mean(expected)) < 1e-9
    assert expected[3] == 0.0 and expected[0] > 0.99  # the constant code counts 0; the clean one ~1


def test_dci_formulas_from_a_given_importance():
    rng = np.random.default_rng(8)
    codes = rng.normal(size=(300, 3))
    factors = rng.integers(0, 3, (300, 2))

    def one_minus_entropy(weights, base):  # per row, with disentanglement_lib's 1e-11
        p = [w + 1e-11 for w in weights]
        p = [q / sum(p) for q in p]
        return 1 - sum(-q * math.log(q) for q in p) / math.log(base)

    for importance in (rng.uniform(0, 1, (3, 2)), np.array([[0.0, 2.0], [1.0, 0.0], [0.5, 0.5]])):
        total = importance.sum()
        expected_d = sum(one_minus_entropy(row, 2) * row.sum() / total for row in importance)
        expected_c = sum(one_minus_entropy(col, 3) * col.sum() / total for col in importance.T)
        out = metrics.dci(codes, factors, importance=importance)
        assert abs(out["disentanglement"] - expected_d) < 1e-9 and abs(out["completeness"] - expected_c) < 1e-9
    # by hand: one code per factor is perfect; every code spread evenly over every factor is 0
    out = metrics.dci(codes[:, :2], factors, importance=np.eye(2))
    assert out["disentanglement"] == pytest.approx(1, abs=1e-9) and out["completeness"] == pytest.approx(1, abs=1e-9)
    out = metrics.dci(codes[:, :2], factors, importance=np.ones((2, 2)))
    assert out["disentanglement"] == pytest.approx(0, abs=1e-9) and out["completeness"] == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match="shape"):
        metrics.dci(codes, factors, importance=np.ones((2, 2)))
    with pytest.raises(ValueError, match=">= 0"):
        metrics.dci(codes, factors, importance=-np.ones((3, 2)))


def test_gaussian_total_correlation_against_float64_reference():
    rng = np.random.default_rng(9)
    codes = rng.normal(size=(500, 4)) @ rng.normal(size=(4, 4))
    # KL(N(0, C) || N(0, diag C)) = (tr(diag(C)^-1 C) - D + log det diag(C) - log det C) / 2
    c = np.cov(codes.T)
    diagonal = np.diag(np.diag(c))
    expected = 0.5 * (np.trace(np.linalg.inv(diagonal) @ c) - 4 + math.log(np.linalg.det(diagonal) / np.linalg.det(c)))
    with_constant = np.hstack([codes, np.full((500, 1), 2.0)])  # left out: independent of the rest
    assert abs(metrics.gaussian_total_correlation(with_constant)["score"] - expected) < 1e-9
    # two codes with sample correlation r: -log(1 - r^2) / 2 exactly
    pair = np.stack([codes[:, 0], codes[:, 0] + rng.normal(size=500)], 1)
    r = np.corrcoef(pair.T)[0, 1]
    assert abs(metrics.gaussian_total_correlation(pair)["score"] + 0.5 * math.log(1 - r * r)) < 1e-12
    with pytest.raises(ValueError, match="singular"):
        metrics.gaussian_total_correlation(np.stack([codes[:, 0], 2 * codes[:, 0] + 1], 1))


def test_mutual_info_score_brute_force():
    rng = np.random.default_rng(10)
    z = rng.normal(size=(1500, 2))
    codes = np.stack([z[:, 0], z[:, 0] + 0.5 * z[:, 1], np.round(z[:, 1]), z[:, 1] ** 2], 1)
    for bins in (5, 20):
        binned = binned_codes(codes, bins)
        pairs = [brute_discrete_mi(binned[i], binned[j]) for i in range(4) for j in range(4) if i != j]
        assert abs(metrics.mutual_info_score(codes, bins=bins)["score"] - np.mean(pairs)) < 1e-9
    assert metrics.mutual_info_score(np.stack([z[:, 0], np.ones(1500)], 1))["score"] == 0
    with pytest.raises(ValueError, match="2 code"):
        metrics.mutual_info_score(z[:, :1])


def test_sap_continuous_by_hand_and_discrete_on_a_perfect_code():
    rng = np.random.default_rng(11)
    factors = np.stack([rng.integers(0, 5, 800), rng.integers(0, 4, 800)], 1)
    codes = np.stack([factors[:, 0] * 2.0, factors[:, 0] + factors[:, 1], rng.normal(size=800), np.zeros(800)], 1)
    out = metrics.sap_score(codes, factors, continuous=True)
    expected = np.zeros((4, 2))
    for j in range(3):
        for k in range(2):
            expected[j, k] = np.corrcoef(codes[:, j], factors[:, k])[0, 1] ** 2
    np.testing.assert_allclose(out["score_matrix"], expected, rtol=0, atol=1e-12)
    ranked = [sorted(expected[:, k])[::-1] for k in range(2)]
    assert out["score"] == pytest.approx(np.mean([r[0] - r[1] for r in ranked]), abs=1e-12)
    assert out["score_matrix"][0, 0] == pytest.approx(1, abs=1e-12)
    # discrete: a perfect code classifies its factor exactly; a code blind to a factor scores about
    # the majority share (chance); the gap then is 1 - chance
    out = metrics.sap_score(GRID + 0.0, GRID)
    np.testing.assert_array_equal(np.diag(out["score_matrix"]), 1)
    off = out["score_matrix"][~np.eye(4, dtype=bool)].reshape(4, 3)
    assert np.all(off < 0.45)
    assert out["score"] == pytest.approx(np.mean(1 - np.max(out["score_matrix"] * (1 - np.eye(4)), 0)), abs=1e-12)
    one = metrics.sap_score(GRID[:, :1] + 0.0, GRID)
    np.testing.assert_array_equal(one["score"], np.mean(one["score_matrix"][0]))  # one code: its own entry


def known_codes(kind):
    rng = np.random.default_rng(12)
    f = GRID.astype(float)
    collapsed = np.stack([np.zeros(len(f)), 0.01 * rng.normal(size=len(f))], 1)
    if kind == "perfect":
        return np.hstack([f, collapsed])
    if kind == "monotone":
        return np.hstack([np.stack([np.exp(f[:, 0]), f[:, 1] ** 3, np.tanh(f[:, 2] / 4), -np.sqrt(f[:, 3])], 1), collapsed])
    return rng.normal(size=(len(f), 6))


@pytest.mark.parametrize("kind", ["perfect", "monotone"])
def test_classifier_metrics_score_perfect_codes_high(kind):
    codes = known_codes(kind)
    for name in ("beta_vae_score", "factor_vae_score"):
        out = getattr(metrics, name)(codes, GRID, samples=3000)
        assert out["score"] >= 0.95 and out["score"] == out["eval_accuracy"] and out["train_accuracy"] >= 0.95
    assert list(metrics.factor_vae_score(codes, GRID, samples=200)["active_dims"]) == [0, 1, 2, 3]  # std < 0.05 dropped
    out = metrics.dci(codes, GRID)
    assert out["disentanglement"] >= 0.95 and out["completeness"] >= 0.95 and out["informativeness_test"] >= 0.95
    assert out["importance"].shape == (6, 4) and np.allclose(out["importance"].sum(0), 1)
    assert np.all(np.argmax(out["importance"], 0) == np.arange(4))
    out = metrics.modularity_explicitness(codes, GRID)
    assert out["explicitness_train"] >= 0.95 and out["explicitness_test"] >= 0.95


def test_classifier_metrics_score_noise_at_chance():
    codes = known_codes("noise")
    # chance: 1/K = 0.25 for which factor was fixed; ROC-AUC 0.5; a random importance is spread out
    for name in ("beta_vae_score", "factor_vae_score"):
        assert abs(getattr(metrics, name)(codes, GRID, samples=3000)["score"] - 0.25) < 0.05
    out = metrics.dci(codes, GRID)
    assert out["disentanglement"] < 0.2 and out["completeness"] < 0.2
    # informativeness: the majority share of each factor's values in the test rows, about 1/size
    assert out["informativeness_test"] < np.mean([1 / 3, 1 / 6, 1 / 8, 1 / 8]) + 0.1
    out = metrics.modularity_explicitness(codes, GRID)
    assert abs(out["explicitness_test"] - 0.5) < 0.05
    assert metrics.sap_score(codes, GRID)["score"] < 0.05
    # constant codes: every row gets the same probabilities, so every ROC-AUC is 1/2 exactly (ties
    # count half), and a code with no MI has modularity 0
    out = metrics.modularity_explicitness(np.ones((len(GRID), 2)), GRID)
    assert out == {"modularity": 0.0, "explicitness_train": 0.5, "explicitness_test": 0.5}


def test_sampling_is_seeded_and_collapsed_codes_are_handled():
    codes = known_codes("noise")
    a, b = metrics.beta_vae_score(codes, GRID, samples=500, seed=3), metrics.beta_vae_score(codes, GRID, samples=500, seed=3)
    assert a == b and a != metrics.beta_vae_score(codes, GRID, samples=500, seed=4)
    out = metrics.factor_vae_score(np.zeros((len(GRID), 3)), GRID, samples=100)
    assert out["score"] == 0 and len(out["active_dims"]) == 0


def test_metrics_name_the_factor_that_data_cannot_serve():
    codes = GRID + 0.0
    sparse = GRID.copy()
    sparse[0, 1] = 9  # factor 1 value 9 now has a single row: no pair of rows can share it
    for name in ("beta_vae_score", "factor_vae_score"):
        with pytest.raises(ValueError, match="factor 1 value 9 has a single row"):
            getattr(metrics, name)(codes, sparse, samples=100)
    constant = np.stack([GRID[:, 0], np.zeros(len(GRID), int)], 1)
    for name in ("dci", "sap_score", "modularity_explicitness", "beta_vae_score"):
        with pytest.raises(ValueError, match="factor 1 takes a single value"):
            getattr(metrics, name)(codes[:, :2], constant)
    with pytest.raises(ValueError, match="samples"):
        metrics.beta_vae_score(codes, GRID, samples=1)
    result = metrics.evaluate(codes, np.zeros_like(codes), sparse)
    assert set(result["beta_vae_score"]) == {"error", "protocol"} and "factor 1 value 9" in result["beta_vae_score"]["error"]
    assert result["dci"]["disentanglement"] > 0.9  # the others are still computed


def test_evaluate_keys_with_and_without_factors():
    codes = known_codes("perfect")
    result = metrics.evaluate(codes, np.full_like(codes, -4.0), GRID)
    expected = {"beta_vae_score": {"score", "train_accuracy", "eval_accuracy"},
                "factor_vae_score": {"score", "train_accuracy", "eval_accuracy", "active_dims"},
                "dci": {"disentanglement", "completeness", "informativeness_train", "informativeness_test",
                        "importance", "importance_kind"},
                "sap_score": {"score", "score_matrix"},
                "modularity_explicitness": {"modularity", "explicitness_train", "explicitness_test"},
                "gaussian_total_correlation": {"score"}, "mutual_info_score": {"score"},
                "dcimig": {"dcimig", "gaps", "mi", "entropy"},
                "irs": {"score", "irs_matrix", "active_dims", "max_deviations"},
                "downstream": {"error"}}  # 1,152 rows: too few to hold 5,000 out
    assert set(result) == set(expected) | {"mig_discrete", "mig_gaussian"}
    for name, keys in expected.items():
        assert set(result[name]) == keys | {"protocol"}, name
        assert result[name]["protocol"] == "exact"
    assert result["mig_discrete"]["mig"] == metrics.discrete_mig(codes, GRID)["mig"]
    assert result["dcimig"]["dcimig"] == metrics.dcimig(codes, GRID)["dcimig"]
    assert result["mig_gaussian"]["mig"] > 0.95 and result["sap_score"]["score_matrix"].shape == (6, 4)
    unlabelled = metrics.evaluate(codes, None)
    assert set(unlabelled) == {"gaussian_total_correlation", "mutual_info_score"}
    assert unlabelled["mutual_info_score"] == result["mutual_info_score"]
    assert metrics.evaluate(codes, None, GRID)["mig_gaussian"] == {"error": "no logvar given", "protocol": "exact"}
    flat = metrics.dlib_names(result)
    assert flat["discrete_mig"] == result["mig_discrete"]["mig"] and flat["protocol"] == "exact"
    assert flat["dci_disentanglement"] == result["dci"]["disentanglement"] and "downstream_accuracy_10" not in flat


def test_evaluate_refuses_malformed_input_naming_the_argument():
    codes = known_codes("perfect")
    logvar = np.zeros_like(codes)
    nan_codes, inf_logvar = codes.copy(), logvar.copy()
    nan_codes[3, 1], inf_logvar[0, 0] = np.nan, np.inf
    cases = [((nan_codes, logvar, GRID), "mu contains non-finite"),
             ((codes[:, 0], None, GRID), "mu must have shape"),
             ((codes, logvar[:, :3], GRID), "logvar has shape"),
             ((codes, logvar[:10], GRID), "logvar has shape"),
             ((codes, inf_logvar, GRID), "logvar contains non-finite"),
             ((codes, logvar, GRID[:-1]), "factors has 1151 rows"),
             ((codes, logvar, GRID[:, :0]), "no factor varies"),
             ((codes, logvar, np.where(GRID == 0, np.nan, GRID)), "factors contains non-finite")]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            metrics.evaluate(*args)
    with pytest.raises(ValueError, match="protocol"):
        metrics.evaluate(codes, logvar, GRID, protocol="paper")


def test_data_without_a_varying_factor_gives_one_line_and_no_warning():
    mu = np.random.default_rng(0).standard_normal((200, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a NumPy warning fails the test
        with pytest.raises(ValueError, match=r"factors has shape \(200, 0\): no factor varies"):
            metrics.evaluate(mu, np.full_like(mu, -1.0), np.zeros((200, 0), np.int64))
        assert set(metrics.evaluate(mu, np.full_like(mu, -1.0), None)) == {"gaussian_total_correlation",
                                                                         "mutual_info_score"}


def numbers(result):
    """Every number of an evaluate() result, as plain lists, for equality."""
    return {name: {k: np.asarray(v).tolist() for k, v in entry.items()} for name, entry in result.items()}


def test_factors_of_any_integer_dtype_give_the_same_metrics():
    codes = known_codes("monotone") + 0.05 * np.random.default_rng(1).normal(size=(len(GRID), 6))
    expected = numbers(metrics.evaluate(codes, np.full_like(codes, -4.0), GRID))
    for dtype in (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64):
        assert numbers(metrics.evaluate(codes, np.full_like(codes, -4.0), GRID.astype(dtype))) == expected, dtype


def test_explicitness_logistic_regression_matches_scikit_learn():
    linear_model = pytest.importorskip("sklearn.linear_model")
    sk_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(13)
    n = 3000
    factors = np.stack([rng.integers(0, 7, n), rng.integers(0, 2, n)], 1)
    codes = np.stack([factors[:, 0] + rng.normal(0, 1.5, n), factors[:, 1] + rng.normal(0, 1, n),
                      rng.normal(size=n)], 1)
    out = metrics.modularity_explicitness(codes, factors, seed=5)
    order = np.random.default_rng(5).permutation(n)  # the documented 2:1 split of fewer rows
    train, test = order[:2 * n // 3], order[2 * n // 3:]
    mean, std = codes[train].mean(0), codes[train].std(0)
    aucs = []
    for k in range(2):
        model = linear_model.LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000)
        model.fit((codes[train] - mean) / std, factors[train, k])
        p = model.predict_proba((codes[test] - mean) / std)
        aucs.append(sk_metrics.roc_auc_score(np.eye(p.shape[1])[factors[test, k]], p, average="macro"))
    assert abs(out["explicitness_test"] - np.mean(aucs)) < 1e-4


def test_explicitness_of_a_factor_with_many_values_is_fast():
    rng = np.random.default_rng(0)
    n, values = 6000, 300
    factors = np.stack([np.arange(n) % values, rng.integers(0, 3, n)], 1)
    codes = rng.standard_normal((n, 10))
    codes[:, 0] += factors[:, 0] / values * 6
    start = time.perf_counter()
    out = metrics.modularity_explicitness(codes, factors)
    assert time.perf_counter() - start < 10 and out["explicitness_test"] > 0.6  # 0.9 s; the full Hessian: 16 s


# -----------------------------------------------------------------------------
# DCI from gradient-boosted trees, SAP's SVM: against scikit-learn on the same rows


def small_factor_codes(n=3000, seed=14):
    rng = np.random.default_rng(seed)
    factors = np.stack([rng.integers(0, 3, n), rng.integers(0, 2, n), rng.integers(0, 5, n)], 1)
    codes = np.stack([factors[:, 0] + 0.4 * rng.normal(size=n), factors[:, 1] + factors[:, 2] * 0.3
                      + 0.3 * rng.normal(size=n), factors[:, 2] + 0.8 * rng.normal(size=n), rng.normal(size=n)], 1)
    return codes, factors


def test_gbt_importance_matches_scikit_learn():
    ensemble = pytest.importorskip("sklearn.ensemble")
    codes, factors = small_factor_codes()
    out = metrics.dci(codes, factors, importance="gbt", seed=2)
    order = np.random.default_rng(2).permutation(len(codes))
    train, test = order[:2000], order[2000:]
    importance, accuracy = np.zeros((4, 3)), []
    for k in range(3):
        model = ensemble.GradientBoostingClassifier(random_state=0).fit(codes[train], factors[train, k])
        importance[:, k] = model.feature_importances_
        accuracy.append(np.mean(model.predict(codes[test]) == factors[test, k]))
    expected = metrics.dci(codes, factors, importance=importance, seed=2)
    assert out["importance_kind"] == "gbt" and np.abs(out["importance"] - importance).max() < 0.03
    assert abs(out["disentanglement"] - expected["disentanglement"]) < 0.02
    assert abs(out["completeness"] - expected["completeness"]) < 0.02
    assert abs(out["informativeness_test"] - np.mean(accuracy)) < 0.02
    assert out["disentanglement"] > 0.5 and np.argmax(out["importance"][:, 0]) == 0


def test_sap_svm_matches_scikit_learn_linear_svc():
    svm = pytest.importorskip("sklearn.svm")
    codes, factors = small_factor_codes(1500)
    out = metrics.sap_score(codes, factors, seed=3, classifier="svm")
    order = np.random.default_rng(3).permutation(len(codes))
    train, test = order[:1000], order[1000:]
    expected = np.zeros((4, 3))
    for j in range(4):
        for k in range(3):
            model = svm.LinearSVC(C=0.01, class_weight="balanced", tol=1e-10, max_iter=100_000)
            model.fit(codes[train, j:j + 1], factors[train, k])
            expected[j, k] = np.mean(model.predict(codes[test, j:j + 1]) == factors[test, k])
    np.testing.assert_allclose(out["score_matrix"], expected, rtol=0, atol=2 / 500)  # a row or two
    with pytest.raises(ValueError, match="classifier"):
        metrics.sap_score(codes, factors, classifier="tree")


# -----------------------------------------------------------------------------
# DCIMIG, IRS, UDR, downstream: known answers and our own float64 references of the formulas


def test_dcimig_against_its_definition():
    rng = np.random.default_rng(15)
    factors = np.stack([rng.integers(0, 4, 3000), rng.integers(0, 3, 3000)], 1)
    codes = np.stack([factors[:, 0] + 0.3 * rng.normal(size=3000), factors[:, 0] + factors[:, 1] * 0.5,
                      rng.normal(size=3000)], 1)
    out = metrics.dcimig(codes, factors, bins=10)
    mi = np.array([[brute_discrete_mi(b, f) for f in factors.T] for b in binned_codes(codes, 10)])
    entropy = [brute_discrete_mi(f, f) for f in factors.T]
    credit = [0.0, 0.0]  # each code's gap goes to its best factor; a factor keeps its largest
    for row in mi:
        credit[int(np.argmax(row))] = max(credit[int(np.argmax(row))], np.max(row) - np.min(row))
    assert abs(out["dcimig"] - sum(credit) / sum(entropy)) < 1e-9
    assert metrics.dcimig(GRID + 0.0, GRID)["dcimig"] == pytest.approx(1, abs=1e-12)
    # one factor in two codes and the other in none: only the first factor's entropy is earned
    two = metrics.dcimig(np.stack([GRID[:, 0], GRID[:, 0]], 1) + 0.0, GRID[:, :2])
    h = [brute_discrete_mi(f, f) for f in GRID[:, :2].T]
    assert two["dcimig"] == pytest.approx(h[0] / sum(h), abs=1e-12)


def reference_irs(codes, factors, quantile, factor_bins):
    """disentanglement_lib's IRS written from its definition, loop by loop."""
    if factor_bins:
        factors = np.stack(binned_codes(factors.astype(float), factor_bins), 1)
    codes = codes[:, codes.var(0) > 0]
    max_dev = np.abs(codes - codes.mean(0)).max(0)
    matrix = np.zeros((codes.shape[1], factors.shape[1]))
    for k in range(factors.shape[1]):
        values = np.unique(factors[:, k])
        for v in values:
            group = codes[factors[:, k] == v]
            matrix[:, k] += np.quantile(np.abs(group - group.mean(0)), quantile, axis=0) / len(values)
    best = (1 - matrix / max_dev[:, None]).max(1)
    return np.sum(best * max_dev) / np.sum(max_dev)


def test_irs_against_a_reference_and_known_codes():
    rng = np.random.default_rng(16)
    factors = np.stack([rng.integers(0, 40, 4000), rng.integers(0, 5, 4000)], 1)
    codes = np.stack([factors[:, 0] / 10 + 0.2 * rng.normal(size=4000), factors[:, 1] - factors[:, 0] / 40,
                      rng.normal(size=4000), np.full(4000, 2.0)], 1)
    for quantile, bins in ((0.99, 20), (1.0, None), (0.5, 7)):
        out = metrics.irs(codes, factors, diff_quantile=quantile, factor_bins=bins)
        assert abs(out["score"] - reference_irs(codes, factors, quantile, bins)) < 1e-12
    assert list(metrics.irs(codes, factors)["active_dims"]) == [0, 1, 2]
    assert metrics.irs(GRID + 0.0, GRID)["score"] == pytest.approx(1, abs=1e-12)  # every code fixed by its factor
    assert metrics.irs(np.ones((len(GRID), 2)), GRID)["score"] == 0.0


def relative_strength(m):
    """Duan et al.'s relative strength, written out."""
    columns = [max(c) ** 2 / sum(c) if sum(c) > 0 else 0 for c in m.T]
    rows = [max(r) ** 2 / sum(r) if sum(r) > 0 else 0 for r in m]
    return (np.mean(columns) + np.mean(rows)) / 2


def test_udr_identical_permuted_and_unrelated_models():
    codes = GRID.astype(float)  # a full grid: exactly uncorrelated columns
    flipped = -codes[:, [2, 0, 3, 1]] * 3 + 1
    out = metrics.udr([codes, codes, flipped], np.ones((3, 4)))
    np.testing.assert_allclose(out["scores"], 1, atol=1e-12)
    np.testing.assert_allclose(out["pairwise"], 1 - np.eye(3), atol=1e-12)
    # the Lasso's shrinkage (alpha 0.1 on standardised codes) leaves 0.9 on the diagonal, which the
    # unnormalised relative strength of disentanglement_lib keeps: identical models score 0.9
    lasso = metrics.udr([codes, codes], np.ones((2, 4)), correlation="lasso")
    np.testing.assert_allclose(lasso["scores"], 0.9, atol=1e-9)
    rng = np.random.default_rng(17)
    unrelated = metrics.udr([rng.normal(size=(3000, 5)) for _ in range(3)], np.ones((3, 5)))
    assert np.all(unrelated["scores"] < 0.1)
    # a latent below the KL threshold is left out of the pair's matrix
    kl = np.array([[1, 1, 1, 1], [1, 1, 1, 0.001]])
    partial = metrics.udr([codes, codes], kl)
    assert partial["pairwise"][0, 1] == pytest.approx(relative_strength(np.eye(4)[:, :3]), abs=1e-12)
    with pytest.raises(ValueError, match="kl must have shape"):
        metrics.udr([codes, codes], np.ones((2, 3)))
    with pytest.raises(ValueError, match="codes\\[1\\] has shape"):
        metrics.udr([codes, codes[:, :3]], np.ones((2, 4)))


def test_udr_against_scikit_learn_lasso_and_spearman():
    linear_model = pytest.importorskip("sklearn.linear_model")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(18)
    base = rng.normal(size=(800, 3))
    models = [base @ rng.normal(size=(3, 3)) + 0.3 * rng.normal(size=(800, 3)) for _ in range(3)]
    models[1][:, 2] = np.round(models[1][:, 2])  # ties for the ranks
    standard = [(m - m.mean(0)) / m.std(0) for m in models]
    for correlation in ("lasso", "spearman"):
        out = metrics.udr(models, np.ones((3, 3)), correlation=correlation)
        for i, j in itertools.permutations(range(3), 2):
            if correlation == "lasso":
                fit = linear_model.Lasso(alpha=0.1, tol=1e-12, max_iter=100_000).fit(standard[i], standard[j])
                matrix = np.abs(fit.coef_).T
            else:
                matrix = np.abs(stats.spearmanr(standard[i], standard[j])[0][:3, 3:])
            assert abs(out["pairwise"][i, j] - relative_strength(matrix)) < 1e-6, (correlation, i, j)
        assert out["scores"][0] == pytest.approx(np.median(out["pairwise"][1:, 0]), abs=1e-12)


def test_downstream_on_known_codes_and_short_data():
    rows = np.repeat(GRID, 6, 0)  # 6,912 rows: 5,000 held out, 1,912 to train on
    rng = np.random.default_rng(19)
    perfect = rows + 0.01 * rng.normal(size=rows.shape)
    out = metrics.downstream(perfect, rows, train_sizes=(10, 100, 1000, 10000))
    assert list(out["train_sizes"]) == [10, 100, 1000] and out["skipped_sizes"] == [10000]
    assert out["sample_efficiency"] is None and out["test_accuracy"].shape == (4, 3)
    assert out["mean_test_accuracy"][-1] > 0.95  # a clean code: the factors are linearly readable
    noise = metrics.downstream(rng.normal(size=rows.shape), rows, train_sizes=(1000,))
    assert noise["mean_test_accuracy"][0] < np.mean([1 / 3, 1 / 6, 1 / 8, 1 / 8]) + 0.05
    # sample efficiency: the mean accuracy at 100 rows over that at 10,000
    many = np.repeat(GRID, 14, 0)
    out = metrics.downstream(many + 0.3 * rng.normal(size=many.shape), many, train_sizes=(100, 10000))
    assert out["sample_efficiency"] == pytest.approx(out["mean_test_accuracy"][0] / out["mean_test_accuracy"][1])
    with pytest.raises(ValueError, match="5000 test rows"):
        metrics.downstream(GRID + 0.0, GRID)


# -----------------------------------------------------------------------------
# the dlib protocol


def test_dlib_protocol_mig_is_the_discrete_mig_of_its_10000_points():
    rng = np.random.default_rng(20)
    factors = np.stack([rng.integers(0, 3, 6000), rng.integers(0, 2, 6000)], 1)
    codes = np.stack([factors[:, 0] + 0.3 * rng.normal(size=6000), factors[:, 1] + 0.5 * rng.normal(size=6000),
                      rng.normal(size=6000)], 1)
    result = metrics.evaluate(codes, None, factors, seed=4, protocol="dlib")
    assert {entry["protocol"] for entry in result.values()} == {"dlib"} and "mig_gaussian" not in result
    points = np.random.default_rng(4).integers(6000, size=10_000)  # drawn with replacement, as documented
    mig, mi, entropy = brute_discrete_mig(codes[points], factors[points], 20)
    assert abs(result["mig_discrete"]["mig"] - mig) < 1e-9
    assert result["dci"]["importance_kind"] == "gbt" and result["dci"]["disentanglement"] > 0.5
    assert abs(result["irs"]["score"] - reference_irs(codes[points], factors[points], 0.99, 20)) < 1e-12
    flat = metrics.dlib_names(result)
    assert flat["protocol"] == "dlib" and flat["discrete_mig"] == result["mig_discrete"]["mig"]
    assert {"beta_vae_score", "factor_vae_score", "dci_disentanglement", "sap_score", "modularity", "irs"} <= set(flat)


# ----------------------------------------------------------------------------- training

def run_train(tmp_path, *extra, name="ckpt.pt"):
    out = str(tmp_path / name)
    argv = ["--data", TINY, "--batch-size", "16", "--steps", "6", "--out", out, "--log-every", "2",
            "--final-eval", "0", *extra]
    return train.main(argv), out


def load(path):
    return torch.load(path, weights_only=True)


def test_training_lowers_the_loss_and_saves_a_plain_checkpoint(tmp_path):
    code, out = run_train(tmp_path, "--model", "vae", "--steps", "60", "--log-every", "10", "--lr", "1e-3")
    assert code == 0
    state = load(out)
    history = state["history"]
    assert [h["step"] for h in history] == [10, 20, 30, 40, 50, 60]
    assert history[-1]["recon"] < 0.7 * history[0]["recon"]
    assert state["step"] == 60 and state["config"]["latents"] == 10
    final = state["final"]
    assert final["samples"] == 384 and set(final["metrics"]) >= {"mig_discrete", "mig_gaussian", "dci"}
    assert 0 <= final["metrics"]["mig_discrete"]["mig"] <= 1
    model = runtime.model_from_checkpoint(state)
    assert model(torch.rand(2, 1, 64, 64))[0].shape == (2, 1, 64, 64)


@pytest.mark.parametrize("extra", [["--model", "ae"], ["--model", "betavae", "--capacity", "5"],
                                   ["--model", "betatc", "--estimator", "mss", "--arch", "mlp"],
                                   ["--model", "dipvae1"], ["--model", "dipvae2", "--lambda-od", "2"]])
def test_every_objective_trains(tmp_path, extra):
    code, out = run_train(tmp_path, *extra)
    assert code == 0 and load(out)["step"] == 6
    assert all(math.isfinite(v) for h in load(out)["history"] for v in h.values())
    assert ("dip" in load(out)["history"][-1]) == extra[1].startswith("dipvae")


def same_state(a, b, *keys):
    for key in keys:
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)


def adam_moments(state, key="optimizer"):
    return [t for s in state[key]["state"].values() for t in (s["exp_avg"], s["exp_avg_sq"])]


@pytest.mark.parametrize("model", ["betatc", "factorvae", "adagvae"])
def test_resume_equals_uninterrupted_bit_for_bit(tmp_path, model):
    assert run_train(tmp_path, "--model", model, "--steps", "12", name="whole.pt")[0] == 0
    assert run_train(tmp_path, "--model", model, "--steps", "5", name="split.pt")[0] == 0
    assert run_train(tmp_path, "--steps", "12", "--resume", name="split.pt")[0] == 0
    whole, split = load(tmp_path / "whole.pt"), load(tmp_path / "split.pt")
    assert split["step"] == 12
    same_state(whole, split, "model")
    assert all(torch.equal(a, b) for a, b in zip(adam_moments(whole), adam_moments(split)))
    if model == "factorvae":  # the discriminator and its own Adam are part of the run
        same_state(whole, split, "discriminator")
        assert all(torch.equal(a, b) for a, b in zip(adam_moments(whole, "discriminator_optimizer"),
                                                     adam_moments(split, "discriminator_optimizer")))
        assert {"tc", "discriminator_accuracy"} <= set(whole["history"][-1])


@pytest.mark.parametrize("model,k", [("adagvae", 1), ("mlvae", 2), ("adagvae", 0)])
def test_pair_objectives_train_on_pairs_differing_in_k_factors(tmp_path, monkeypatch, model, k):
    drawn = []
    batch = runtime.ImageSource.batch
    monkeypatch.setattr(runtime.ImageSource, "batch", lambda self, index: drawn.append(index) or
                        batch(self, index))
    code, out = run_train(tmp_path, "--model", model, "--k", str(k), "--batch-size", "8",
                          "--steps", "2", "--log-every", "1")
    state = load(out)
    assert code == 0 and state["step"] == 2 and state["config"]["k"] == k
    assert all({"recon", "kl", "shared"} <= set(h) and 0 <= h["shared"] <= 10 for h in state["history"])
    factors = data.load(TINY).factors
    for index in drawn[:2]:  # the two training batches: [first images; second images]
        assert len(index) == 16
        differ = (factors[index[:8]] != factors[index[8:]]).sum(1)
        assert (differ == k).all() if k else ((differ >= 1) & (differ <= 4)).all()
    assert runtime.model_from_checkpoint(state) is not None


def test_pair_objectives_refuse_unlabelled_data_and_a_k_that_shares_nothing(tmp_path, capsys):
    np.savez(tmp_path / "plain.npz", images=np.zeros((8, 64, 64, 1), np.uint8))
    argv = ["--model", "adagvae", "--data", str(tmp_path / "plain.npz"), "--out", str(tmp_path / "a.pt")]
    assert train.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no factors (unlabelled); --model adagvae" in err[0]
    assert train.main(["--model", "mlvae", "--k", "5", "--data", TINY, "--out", str(tmp_path / "b.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--k 5:" in err[0] and "k must be 0 (random) or 1..4" in err[0]
    assert not os.path.exists(tmp_path / "a.pt") and not os.path.exists(tmp_path / "b.pt")


@pytest.mark.parametrize("argv,message", [(["--k", "1"], "--k is for --model adagvae or mlvae"),
                                          (["--model", "adagvae", "--k", "-1"], "--k must be >= 0")])
def test_pair_arguments_exit_2_with_one_line(argv, message, capsys):
    assert_one_line_usage_error(train.main, argv, "train.py", message, capsys)


def test_factorvae_learns_and_its_discriminator_tells_joint_from_permuted(tmp_path):
    code, out = run_train(tmp_path, "--model", "factorvae", "--steps", "60", "--log-every", "10")
    history = load(out)["history"]
    assert code == 0 and history[-1]["recon"] < 0.7 * history[0]["recon"]
    assert all(0 <= h["discriminator_accuracy"] <= 1 for h in history)
    discriminator = models.build_discriminator(10)
    discriminator.load_state_dict(load(out)["discriminator"])


def test_resuming_a_finished_run_only_remeasures_the_mig(tmp_path):
    assert run_train(tmp_path, "--final-eval", "50", "--precision", "bf16")[0] == 0
    before = load(tmp_path / "ckpt.pt")
    assert before["final"]["samples"] == 50
    assert train.main(["--resume", "--out", str(tmp_path / "ckpt.pt")]) == 0  # --final-eval 0 by default
    after = load(tmp_path / "ckpt.pt")
    assert after["step"] == 6 and after["final"]["samples"] == len(data.load(TINY))
    assert after["final"]["img_per_s"] == before["final"]["img_per_s"]
    assert after["config"]["precision"] == before["config"]["precision"] == "bf16"
    for key, tensor in before["model"].items():
        assert torch.equal(tensor, after["model"][key]), key


def test_amp_flag_is_bf16_on_the_cpu_and_no_amp_is_fp32(tmp_path):
    # --amp is mixed precision: bf16 autocast on the CPU (on CUDA, bf16 or fp16 as the GPU allows)
    assert run_train(tmp_path, "--amp", "--steps", "2", name="amp.pt")[0] == 0
    assert run_train(tmp_path, "--no-amp", "--steps", "2", name="fp32.pt")[0] == 0
    assert load(tmp_path / "amp.pt")["config"]["precision"] == "bf16"
    assert load(tmp_path / "fp32.pt")["config"]["precision"] == "fp32"


def test_existing_checkpoint_is_not_overwritten(tmp_path, capsys):
    assert run_train(tmp_path)[0] == 0
    before = (tmp_path / "ckpt.pt").read_bytes()
    assert run_train(tmp_path)[0] == 1
    assert "--resume" in capsys.readouterr().err and (tmp_path / "ckpt.pt").read_bytes() == before
    assert run_train(tmp_path, "--force")[0] == 0


@pytest.mark.parametrize("argv,message", [
    (["--beta", "-1"], "--beta"), (["--batch-size", "1"], "at least 2"), (["--steps", "0"], "--steps"),
    (["--latents", "0"], "--latents"), (["--model", "gan"], "invalid choice"), (["--lr", "0"], "--lr"),
    (["--capacity", "5"], "betavae"), (["--resume", "--force"], "pick one"), (["--bogus"], "--bogus"),
    (["--lambda-od", "3"], "dipvae"), (["--steps", "x"], "invalid int"), (["--beta", "nan"], "finite"),
    (["--model", "factorvae", "--gamma", "inf"], "finite"), (["--model", "betavae", "--capacity", "inf"], "finite"),
    (["--seed", "-1"], "--seed -1: a seed must be a whole number from 0 to 4,294,967,295"),
    (["--seed", str(2**32)], "--seed 4294967296: a seed must be")])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    assert_one_line_usage_error(train.main, argv, "train.py", message, capsys)


def assert_one_line_usage_error(main, argv, prog, message, capsys):
    """main(argv) exits 2 with one line: 'PROG: error: ... MESSAGE ... (see --help)'."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith(f"{prog}: error:")
    assert err[0].endswith("(see --help)")


def test_check_dataset_names_the_problem():
    square_only = data.Dataset(np.zeros((4, 32, 48, 1), np.uint8))
    with pytest.raises(runtime.UserError, match=r"own\.npy: images are 32x48; the mlp architecture needs square images"):
        runtime.check_dataset(square_only, "mlp", "own.npy")
    with pytest.raises(runtime.UserError, match="conv architecture needs 64x64"):
        runtime.check_dataset(data.Dataset(np.zeros((4, 32, 32, 1), np.uint8)), "conv", "own.npy")
    assert runtime.check_dataset(data.Dataset(np.zeros((4, 32, 32, 3), np.uint8)), "mlp", "x") == (3, 32)


def test_importing_train_leaves_torch_settings_alone():
    probe = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import runtime, train, traverse, bench; "
             "print(float(torch.tensor([1e-40]) * 1.0))")  # a denormal survives unless flushed
    out = subprocess.run([sys.executable, "-c", probe, HERE], capture_output=True, text=True, check=True)
    assert float(out.stdout) > 0


def without_config_entry(path, key):
    state = load(path)
    del state["config"][key]
    torch.save(state, path)
    return open(path, "rb").read()


def test_checkpoint_missing_a_config_entry_is_filled_or_named(tmp_path, capsys):
    code, out = run_train(tmp_path)
    without_config_entry(out, "data_limit")  # has a safe default (no limit): resuming works
    assert train.main(["--resume", "--out", out, "--steps", "8"]) == 0 and load(out)["step"] == 8
    before = without_config_entry(out, "latents")  # no safe default: named, nothing lost
    assert train.main(["--resume", "--out", out, "--steps", "9"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "latents" in err[-1] and "ckpt.pt" in err[-1] and open(out, "rb").read() == before


@pytest.mark.parametrize("entry,value,expected", [
    ("batch_size", "8", "a whole number >= 1"), ("beta", "six", "a number >= 0"), ("lr", -1.0, "a number > 0"),
    ("precision", "fp64", "one of fp32, bf16, fp16"), ("estimator", "zzz", "one of mws, mss"), ("seed", None, "a whole number from 0 to 4294967295"),
    ("latents", True, "a whole number >= 1"), ("factor_sizes", "abc", "a list of whole numbers")])
def test_checkpoint_config_entry_of_the_wrong_kind_is_named_in_one_line(tmp_path, capsys, entry, value,
                                                                         expected):
    code, out = run_train(tmp_path, "--steps", "2")
    state = load(out)
    state["config"][entry] = value
    torch.save(state, out)
    capsys.readouterr()
    for main, argv in ((train.main, ["--resume", "--out", out, "--steps", "3"]), (traverse.main, [out])):
        assert main(argv) == 1
        assert capsys.readouterr().err.strip() == (f"error: {out}: the checkpoint's config has {entry} "
                                                   f"{value!r} (expected {expected}); it cannot be used")


def test_an_evaluation_that_cannot_be_measured_is_reported_and_training_goes_on(tmp_path, capsys):
    code, out = run_train(tmp_path, "--model", "vae", "--eval-every", "2", "--eval-subset", "1",
                          "--final-eval", "1")
    assert code == 0 and load(out)["step"] == 6 and load(out)["evaluations"] == []
    err = capsys.readouterr().err
    assert "MIG not measured" in err and "take one value" in err and "Traceback" not in err
    final = load(out)["final"]  # one image: no factor varies, so only label-free metrics are tried
    assert final["samples"] == 1 and "mig_discrete" not in final["metrics"]


def test_a_signal_during_the_final_evaluation_skips_it_at_once(tmp_path, monkeypatch, capsys):
    def slow_metrics(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)  # the signal must cut this short
        raise AssertionError("not interrupted")

    monkeypatch.setattr(metrics, "evaluate", slow_metrics)
    before = signal.getsignal(signal.SIGTERM)
    start = time.perf_counter()
    code, out = run_train(tmp_path, "--model", "vae")
    assert code == 128 + signal.SIGTERM and time.perf_counter() - start < 30
    assert "traverse.py" in capsys.readouterr().err and signal.getsignal(signal.SIGTERM) == before
    state = load(out)
    assert state["step"] == 6 and "final" not in state


def test_resume_refuses_settings_that_define_the_run_in_one_line(tmp_path, capsys):
    assert run_train(tmp_path)[0] == 0
    before = (tmp_path / "ckpt.pt").read_bytes()
    capsys.readouterr()
    code, out = run_train(tmp_path, "--resume", "--latents", "4", "--seed", "3", "--steps", "8")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and (tmp_path / "ckpt.pt").read_bytes() == before
    assert err[0] == (f"error: --resume: --latents 4, --seed 3 cannot change on resume (the "
                      f"checkpoint {out} has latents 10, seed 0); leave it out to resume, or start "
                      "a new run")


def test_resumed_run_says_in_one_line_what_the_command_line_changed(tmp_path, capsys):
    assert run_train(tmp_path, "--steps", "2")[0] == 0
    capsys.readouterr()
    code, out = run_train(tmp_path, "--resume", "--steps", "4", "--lr", "5e-4", "--beta", "6")
    lines = capsys.readouterr().err.splitlines()
    assert code == 0 and lines[1] == "resuming at step 2 with changed settings: lr 0.001 -> 0.0005, steps 2 -> 4"
    state = load(out)  # the changed learning rate is the one Adam stepped with, and is kept
    assert state["config"]["lr"] == 5e-4 and state["optimizer"]["param_groups"][0]["lr"] == 5e-4
    assert state["config"]["beta"] == 6.0 and state["step"] == 4
    assert train.main(["--resume", "--out", out, "--steps", "5"]) == 0
    assert "resuming at step 4 with changed settings: steps 4 -> 5\n" in capsys.readouterr().err
    assert load(out)["config"]["lr"] == 5e-4  # left out: the checkpoint's value, not the default
    assert train.main(["--resume", "--out", out]) == 0
    assert "resuming at step 5 with the same settings\n" in capsys.readouterr().err


def test_run_config_settles_every_setting_once(tmp_path):
    dataset = data.load(TINY)
    _, args = train._parse_args(["--data", TINY, "--latents", "3", "--amp", "--epochs", "2",
                                 "--batch-size", "16", "--out", str(tmp_path / "c.pt")])
    config = train.run_config(args, dataset)
    assert config["latents"] == 3 and config["model"] == "betatc" and config["beta"] == 6.0
    assert config["precision"] == "bf16" and config["recon"] == "bce"  # --amp on the CPU; 1 channel
    assert config["steps"] == 48  # 2 epochs of 384 images in batches of 16
    assert config["channels"] == 1 and config["size"] == 64 and config["dataset_size"] == 384
    assert config["data_fingerprint"] == runtime.data_fingerprint(dataset)
    assert config["out"] == str(tmp_path / "c.pt") and runtime.config_problem(config) is None
    _, args = train._parse_args(["--precision", "fp16", "--out", str(tmp_path / "c.pt")])
    with pytest.raises(runtime.ArgumentError, match="fp16 needs CUDA"):
        train.run_config(args, dataset)


def write_images(path, images, factors=None):
    arrays = {"images": images} if factors is None else {"images": images, "factors": factors}
    np.savez(path, **arrays)
    return str(path)


def test_resume_refuses_other_data_naming_both(tmp_path, capsys):
    rng = np.random.default_rng(0)
    gray = write_images(tmp_path / "gray.npz", rng.integers(0, 256, (16, 64, 64, 1), dtype=np.uint8))
    colour = write_images(tmp_path / "colour.npz", rng.integers(0, 256, (16, 64, 64, 3), dtype=np.uint8))
    other = write_images(tmp_path / "other.npz", rng.integers(0, 256, (16, 64, 64, 1), dtype=np.uint8))
    small = ["--model", "vae", "--batch-size", "8", "--steps", "2", "--latents", "3"]
    assert run_train(tmp_path, "--data", gray, *small)[0] == 0
    before = (tmp_path / "ckpt.pt").read_bytes()
    capsys.readouterr()
    for data_path, differs in ((colour, "channels 3 here, 1 in the checkpoint"),
                               (other, "data_fingerprint ")):  # same shape and count: other images
        code, out = run_train(tmp_path, "--resume", "--data", data_path, "--steps", "3")
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and differs in err[0], err
        assert f"{data_path} is not the data of the checkpoint {out} ({gray})" in err[0]
        assert (tmp_path / "ckpt.pt").read_bytes() == before
    moved = tmp_path / "moved.npz"  # the same data in another place resumes, and is said
    moved.write_bytes(open(gray, "rb").read())
    assert run_train(tmp_path, "--resume", "--data", str(moved), "--steps", "3")[0] == 0
    assert f"data {gray} -> {moved}" in capsys.readouterr().err
    assert load(tmp_path / "ckpt.pt")["config"]["data"] == str(moved)


@pytest.mark.parametrize("model", ["vae", "betavae", "betatc"])
def test_fewer_images_than_a_batch_is_refused_in_one_line_for_every_objective(tmp_path, capsys,
                                                                              model):
    images = write_images(tmp_path / "five.npz", np.zeros((5, 64, 64, 1), np.uint8))
    code, out = run_train(tmp_path, "--data", images, "--model", model, "--batch-size", "8")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and not os.path.exists(out)
    assert err == [f"error: {images}: 5 images is fewer than --batch-size 8; pass --batch-size 5 "
                   "or less"]


def test_a_checkpoint_without_a_fingerprint_still_resumes(tmp_path):
    code, out = run_train(tmp_path, "--steps", "2")
    without_config_entry(out, "data_fingerprint")  # as written before fingerprints were kept
    assert train.main(["--resume", "--out", out, "--steps", "3"]) == 0
    assert load(out)["config"]["data_fingerprint"] == runtime.data_fingerprint(data.load(TINY))


def test_eval_protocol_and_factors_are_saved_used_and_kept_on_resume(tmp_path, capsys):
    code, out = run_train(tmp_path, "--eval-protocol", "dlib", "--factors", "scale,posX",
                          "--eval-every", "6", "--eval-subset", "100")
    assert code == 0
    assert "MIG on 384 images (dlib protocol; factors scale,posX): discrete" in capsys.readouterr().out
    state = load(out)
    assert state["config"]["eval_protocol"] == "dlib"
    assert state["config"]["eval_factors"] == ["scale", "posX"]
    dataset = data.load(TINY)
    model = runtime.model_from_checkpoint(state).eval()
    mu, logvar = runtime.encode_dataset(model, runtime.ImageSource(dataset.images, torch.device("cpu")))
    chosen = dataset.factors[:, [1, 3]]  # TINY's scale and posX, picked by hand
    expected = metrics.evaluate(mu, logvar, chosen, seed=0, protocol="dlib")
    assert_same_numbers(without_scored_factors(state["final"]["metrics"], ["scale", "posX"]), expected)
    # the periodic MIG at step 6 (the final weights): disentanglement_lib's MIG, 10,000 points
    # drawn with replacement from the 100 evaluated rows (drawn as evaluation_index documents)
    rows = np.sort(np.random.default_rng(0 + 1).choice(384, 100, replace=False))
    points = np.random.default_rng(0).integers(100, size=10_000)
    periodic = metrics.discrete_mig(mu[rows][points].astype(np.float64), chosen[rows][points], bins=20)
    assert abs(state["evaluations"][-1]["discrete_mig"] - periodic["mig"]) < 1e-9
    assert train.main(["--resume", "--out", out, "--steps", "7"]) == 0  # options left out: kept
    state = load(out)
    assert state["config"]["eval_protocol"] == "dlib"
    assert state["final"]["metrics"]["dci"]["protocol"] == "dlib"
    assert state["final"]["metrics"]["dci"]["factors"] == ["scale", "posX"]
    for key in ("eval_protocol", "eval_factors"):  # as written before these settings existed
        without_config_entry(out, key)
    assert runtime.load_checkpoint(out)["config"]["eval_protocol"] == "exact"
    assert train.main(["--resume", "--out", out, "--steps", "8"]) == 0
    final = load(out)["final"]["metrics"]
    assert final["mig_gaussian"]["protocol"] == "exact"
    assert final["mig_gaussian"]["factors"] == dataset.factor_names


def test_train_factors_unknown_or_unlabelled_exit_2_before_training(tmp_path, capsys):
    code, out = run_train(tmp_path, "--factors", "scale,colour")
    assert code == 2 and not os.path.exists(out)
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --factors: sprites has no factor colour; its factors are shape,scale,orientation,posX,posY"]
    np.save(tmp_path / "unlabelled.npy", data.load(TINY).images[:32, ..., 0])
    assert train.main(["--data", str(tmp_path / "unlabelled.npy"), "--batch-size", "16", "--steps", "2",
                       "--factors", "scale", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--factors scale" in err[0] and "no factor labels (unlabelled)" in err[0]
    assert not os.path.exists(out)
    assert_one_line_usage_error(train.main, ["--eval-protocol", "paper"], "train.py", "invalid choice",
                                capsys)
    assert_one_line_usage_error(train.main, ["--factors", "scale,"], "train.py", "empty name", capsys)


def test_data_path_is_kept_absolute_and_a_missing_one_says_where_it_came_from(tmp_path, monkeypatch,
                                                                            capsys):
    images = np.random.default_rng(1).integers(0, 256, (16, 64, 64, 1), dtype=np.uint8)
    (tmp_path / "run").mkdir()
    write_images(tmp_path / "run" / "own.npz", images)
    monkeypatch.chdir(tmp_path / "run")
    assert train.main(["--data", "own.npz", "--model", "vae", "--batch-size", "8", "--steps", "2",
                       "--latents", "3", "--out", "ckpt.pt"]) == 0
    out = str(tmp_path / "run" / "ckpt.pt")
    assert load(out)["config"]["data"] == str(tmp_path / "run" / "own.npz")
    monkeypatch.chdir(tmp_path)  # from another folder
    assert traverse.main([out, "--out", str(tmp_path / "pictures")]) == 0
    assert train.main(["--resume", "--out", out, "--steps", "3"]) == 0
    os.rename(tmp_path / "run" / "own.npz", tmp_path / "own-elsewhere.npz")
    capsys.readouterr()
    assert traverse.main([out]) == 1
    err = capsys.readouterr().err.strip()
    assert "comes from the checkpoint" in err and "--data" in err and len(err.splitlines()) == 1
    assert train.main(["--resume", "--out", out, "--data", "own-elsewhere.npz", "--steps", "4"]) == 0


def test_a_relative_data_path_of_an_older_checkpoint_is_found_beside_it(tmp_path, monkeypatch):
    images = np.random.default_rng(2).integers(0, 256, (16, 64, 64, 1), dtype=np.uint8)
    write_images(tmp_path / "own.npz", images)
    monkeypatch.chdir(tmp_path)
    assert train.main(["--data", "own.npz", "--model", "vae", "--batch-size", "8", "--steps", "2",
                       "--latents", "3", "--out", "ckpt.pt"]) == 0
    state = load(tmp_path / "ckpt.pt")
    state["config"]["data"] = "own.npz"  # as older versions stored it
    torch.save(state, tmp_path / "ckpt.pt")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert train.main(["--resume", "--out", str(tmp_path / "ckpt.pt"), "--steps", "3"]) == 0
    assert load(tmp_path / "ckpt.pt")["config"]["data"] == str(tmp_path / "own.npz")


def test_data_fingerprint_tells_images_apart_and_reads_a_sample():
    images = np.random.default_rng(3).integers(0, 256, (1000, 8, 8, 1), dtype=np.uint8)
    same = runtime.data_fingerprint(data.Dataset(images.copy()))
    assert same == runtime.data_fingerprint(data.Dataset(images)) and len(same) == 16
    changed = images.copy()
    changed[999, 0, 0, 0] ^= 1  # the last row is always hashed
    assert runtime.data_fingerprint(data.Dataset(changed)) != same
    assert runtime.data_fingerprint(data.Dataset(images[:999])) != same  # another count
    import hashlib  # the documented recipe, computed here independently
    rows = np.unique(np.linspace(0, 999, 64).round().astype(int))
    digest = hashlib.sha256(repr(images.shape).encode() + images[rows].tobytes()).hexdigest()
    assert same == digest[:16]


def test_nonfinite_loss_stops_and_keeps_the_last_good_state(tmp_path, monkeypatch, capsys):
    real, calls = losses.objective, []

    def poisoned(*args, step=0, **kwargs):  # the first batch at step index 3 gives a NaN loss
        loss, terms = real(*args, step=step, **kwargs)
        calls.append(step)
        return (loss * float("nan"), terms) if calls.count(3) == 1 and step == 3 else (loss, terms)

    monkeypatch.setattr(losses, "objective", poisoned)
    code, out = run_train(tmp_path, "--steps", "8")
    assert code == 1 and load(out)["step"] == 3
    assert "step 4" in capsys.readouterr().err
    calls.clear()
    code, out = run_train(tmp_path, "--steps", "8", "--skip-nonfinite", name="skip.pt")
    assert code == 0 and load(out)["step"] == 8 and load(out)["skipped"] == 1


def test_skip_nonfinite_gives_up_on_endless_nan(tmp_path, monkeypatch, capsys):
    real = losses.objective
    monkeypatch.setattr(losses, "objective", lambda *a, **k: (real(*a, **k)[0] * float("nan"), real(*a, **k)[1]))
    code, out = run_train(tmp_path, "--skip-nonfinite")
    assert code == 1 and "in a row" in capsys.readouterr().err and load(out)["step"] == 0


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    runtime.save_checkpoint(path, {"format": runtime.CHECKPOINT_FORMAT, "step": 1})

    def crash(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        runtime.save_checkpoint(path, {"step": 2})
    assert load(path)["step"] == 1 and os.listdir(tmp_path) == ["c.pt"]


def test_foreign_checkpoints_give_clear_errors(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    cases = {"random.pt": lambda p: p.write_bytes(os.urandom(300)),
             "other.pt": lambda p: torch.save({"weights": torch.zeros(2)}, p),
             "evil.pt": lambda p: torch.save({"x": Evil()}, p)}
    for name, make in cases.items():
        make(tmp_path / name)
        with pytest.raises(runtime.UserError, match=name):
            runtime.load_checkpoint(str(tmp_path / name))
    assert not (tmp_path / "pwned").exists()


def start_training(tmp_path, *extra):
    out = str(tmp_path / "ckpt.pt")
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), "--data", TINY,
                                "--batch-size", "16", "--steps", "100000", "--log-every", "1",
                                "--out", out, *extra], stderr=subprocess.PIPE, text=True, cwd=HERE)
    for line in process.stderr:  # wait until it is really training
        if line.startswith("step 3/"):
            return process, out
    raise AssertionError("training did not start: " + str(process.wait()))


def test_sigterm_saves_at_the_current_step_and_resumes(tmp_path):
    process, out = start_training(tmp_path)
    process.send_signal(signal.SIGTERM)
    rest = process.stderr.read()
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    stopped = int(rest.split("stopped at step ")[1].split("/")[0])
    assert load(out)["step"] == stopped >= 3
    assert run_train(tmp_path, "--resume", "--steps", str(stopped + 2))[0] == 0
    assert load(out)["step"] == stopped + 2


def test_sigkill_leaves_a_loadable_checkpoint(tmp_path):
    process, out = start_training(tmp_path, "--save-every", "2")
    for line in process.stderr:
        if line.startswith("step 8/"):
            break
    process.kill()
    process.wait(timeout=60)
    step = load(out)["step"]
    assert step >= 2 and step % 2 == 0
    assert run_train(tmp_path, "--resume", "--steps", str(step + 1))[0] == 0
    loss_steps = [s for s, name, _ in runtime.read_history(str(tmp_path / "ckpt.history.csv"))
                  if name == "loss"]
    assert loss_steps == list(range(1, step + 2))  # what it logged past its last save: once


def test_history_csv_rows_round_trip_and_a_row_cut_short_stays_apart(tmp_path):
    path = str(tmp_path / "run.history.csv")
    assert runtime.history_path(str(tmp_path / "run.pt")) == path
    runtime.append_history(path, 1, {"loss": 0.1, "kl_0": float("nan")})
    with open(path, "a") as f:
        f.write("2,lo")  # a run killed in the middle of a row
    runtime.append_history(path, 3, {"loss": 1e-300, "dci_disentanglement": 1 / 3})
    lines = open(path).read().splitlines()
    assert lines == ["step,name,value", "1,loss,0.1", "1,kl_0,nan", "2,lo", "3,loss,1e-300",
                     "3,dci_disentanglement,0.3333333333333333"]
    rows = runtime.read_history(path)
    assert [row[:2] for row in rows] == [(1, "loss"), (1, "kl_0"), (3, "loss"), (3, "dci_disentanglement")]
    assert rows[0][2] == 0.1 and math.isnan(rows[1][2]) and rows[2][2] == 1e-300 and rows[3][2] == 1 / 3
    runtime.rewrite_history(path, lambda step, name: step <= 1)
    assert open(path).read().splitlines() == lines[:3]
    assert runtime.flat_metrics({"dci": {"disentanglement": 0.5, "importance": [[1.0]], "protocol": "exact"},
                                 "sap_score": {"score": 0.25}, "dcimig": {"dcimig": 0.75},
                                 "irs": {"error": "no rows"}}) == \
        {"dci_disentanglement": 0.5, "sap_score": 0.25, "dcimig": 0.75}


def history_by_name(out):
    """{name: [(step, value), ...]} of the history CSV beside checkpoint `out`."""
    rows = runtime.read_history(runtime.history_path(out))
    by_name = {}
    for step, name, value in rows:
        by_name.setdefault(name, []).append((step, value))
    return by_name


def test_history_csv_of_a_killed_and_resumed_run_has_every_step_once(tmp_path):
    fp32 = ("--precision", "fp32", "--log-every", "1", "--final-eval", "100")
    assert run_train(tmp_path, *fp32, "--steps", "2")[0] == 0
    saved_at_2 = (tmp_path / "ckpt.pt").read_bytes()
    assert run_train(tmp_path, *fp32, "--resume", "--steps", "4")[0] == 0
    logged_to_4 = history_by_name(str(tmp_path / "ckpt.pt"))
    (tmp_path / "ckpt.pt").write_bytes(saved_at_2)  # killed at step 4, last saved at step 2,
    with open(tmp_path / "ckpt.history.csv", "a") as f:  # in the middle of writing a row
        f.write("4,kl_")
    code, out = run_train(tmp_path, *fp32, "--resume", "--steps", "5")
    assert code == 0
    header = (tmp_path / "ckpt.history.csv").read_text().splitlines()[0]
    by_name = history_by_name(out)
    assert header == "step,name,value"
    terms = ["loss", "recon", "kl", "mi", "tc", "dwkl"] + [f"kl_{j}" for j in range(10)]
    for name in terms:  # every step once; steps 3 and 4 again as they were (bit-exact resume)
        assert [s for s, _ in by_name[name]] == [1, 2, 3, 4, 5], name
        assert by_name[name][:4] == logged_to_4[name], name
    history = load(out)["history"]
    for i, entry in enumerate(history):  # the latents' KLs are the kl term's parts
        assert sum(by_name[f"kl_{j}"][i][1] for j in range(10)) == pytest.approx(entry["kl"], 1e-5)
        assert by_name["recon"][i][1] == entry["recon"]
    final = load(out)["final"]["metrics"]  # the final metrics at steps 2 and 5, once each
    assert by_name["dci_disentanglement"][-1] == (5, final["dci"]["disentanglement"])
    assert by_name["mig_discrete_mig"][-1] == (5, final["mig_discrete"]["mig"])
    assert [s for s, _ in by_name["sap_score"]] == [2, 5]
    assert run_train(tmp_path, *fp32, "--resume", "--steps", "5")[0] == 0  # measures again, once
    assert [s for s, _ in history_by_name(out)["sap_score"]] == [2, 5]
    assert run_train(tmp_path, *fp32, "--force", "--steps", "1")[0] == 0  # a new run: a new CSV
    assert [s for s, _ in history_by_name(out)["loss"]] == [1]


def test_tensorboard_has_the_scalars_and_the_traversal(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    code, out = run_train(tmp_path, "--steps", "4", "--eval-every", "2", "--eval-subset", "100",
                          "--final-eval", "100", "--tensorboard", str(tmp_path / "tb"))
    assert code == 0
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    by_name = history_by_name(out)
    assert set(tags["scalars"]) == set(by_name)  # the CSV's names: terms, kl_j, metrics
    assert {"loss", "kl_9", "mig_discrete_mig", "dci_disentanglement"} <= set(tags["scalars"])
    for name in ("loss", "kl_0", "dci_disentanglement"):
        logged = [(e.step, e.value) for e in events.Scalars(name)]
        assert logged == [(s, pytest.approx(v, rel=1e-6)) for s, v in by_name[name]], name
    assert tags["images"] == ["traversal"]
    pictures = events.Images("traversal")
    assert [p.step for p in pictures] == [2, 4, 4]  # each periodic evaluation, and the end
    with Image.open(io.BytesIO(pictures[-1].encoded_image_string)) as picture:
        assert picture.size == (10 * 66 + 2, 10 * 66 + 2)  # 10 latents x 10 values of 64 px
        assert len(np.unique(np.asarray(picture.convert("L")))) > 2  # decoded images, not blank


def test_tensorboard_without_the_package_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "tensorboard" else real_find_spec(name, *rest))
    argv = ["--data", TINY, "--out", str(tmp_path / "ckpt.pt"), "--tensorboard", str(tmp_path / "tb")]
    assert_one_line_usage_error(train.main, argv, "train.py", "pip install tensorboard", capsys)
    assert os.listdir(tmp_path) == []  # nothing trained, nothing written


def test_tensorboard_folder_that_cannot_be_written_is_one_line(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    (tmp_path / "a_file").write_text("")
    code, out = run_train(tmp_path, "--tensorboard", str(tmp_path / "a_file" / "tb"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("error: --tensorboard ") and "cannot write" in err[-1]
    assert os.listdir(tmp_path) == ["a_file"]  # before training: no checkpoint, no history


def torchrun(*argv, processes=2):
    """`torchrun --nproc_per_node 2 train.py ...` on the CPU (gloo), as a Popen."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(processes), os.path.join(HERE, "train.py"), "--device", "cpu", *argv]
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=HERE, env=environment)


@pytest.mark.parametrize("model", ["vae", "betatc"])
def test_torchrun_two_processes_equal_one_at_the_same_global_batch(tmp_path, model):
    # fp32: a bf16 run (auto on a CPU with native bf16) is not equal to 1e-5 across process counts
    argv = ["--data", TINY, "--model", model, "--precision", "fp32", "--batch-size", "16",
            "--steps", "20", "--log-every", "1",
            "--final-eval", "40", "--force"]
    process = torchrun(*argv, "--out", str(tmp_path / "ddp.pt"))
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    assert "Warning" not in err and err.count("training ") == 1 and out.count("done:") == 1
    assert train.main([*argv, "--device", "cpu", "--out", str(tmp_path / "one.pt")]) == 0
    ddp, one = load(tmp_path / "ddp.pt"), load(tmp_path / "one.pt")
    for step, (ddp_terms, one_terms) in enumerate(zip(ddp["history"], one["history"])):
        for term in ("loss", "recon", "kl"):  # every step of the trajectory, not only the first
            tolerance = dict(rel=1e-5) if step == 0 else dict(rel=1e-4, abs=1e-5)
            assert ddp_terms[term] == pytest.approx(one_terms[term], **tolerance), (step, term)
    assert len(ddp["history"]) == len(one["history"]) == 20
    assert ddp["final"]["samples"] == 40
    # Adam moves a weight by about lr whatever its gradient's size, so a weight whose gradient is
    # ~0 (beta-TCVAE's TC term on a tiny, near-collapsed model) goes either way on rounding noise
    # in the order of a sum: the weights agree to a few steps of lr 1e-3, the losses to 1e-5.
    atol = 1e-4 if model == "vae" else 3e-3
    for name, tensor in one["model"].items():
        assert torch.allclose(ddp["model"][name], tensor, rtol=1e-3, atol=atol), name


def test_torchrun_splits_pairs_whole_and_equals_one_process(tmp_path):
    """adagvae: each process takes whole pairs; the steps equal one process's (8 steps: later,
    float differences can flip a latent across the adaptive threshold and the runs part)."""
    argv = ["--data", TINY, "--model", "adagvae", "--precision", "fp32", "--batch-size", "16", "--steps", "8",
            "--log-every", "1", "--final-eval", "40", "--force"]
    process = torchrun(*argv, "--out", str(tmp_path / "ddp.pt"))
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    assert train.main([*argv, "--device", "cpu", "--out", str(tmp_path / "one.pt")]) == 0
    ddp, one = load(tmp_path / "ddp.pt"), load(tmp_path / "one.pt")
    for step_ddp, step_one in zip(ddp["history"], one["history"], strict=True):
        assert step_ddp["shared"] == step_one["shared"]
        for term in ("loss", "recon", "kl"):
            assert step_ddp[term] == pytest.approx(step_one[term], rel=1e-5, abs=1e-5), term
    csv_ddp = history_by_name(str(tmp_path / "ddp.pt"))
    csv_one = history_by_name(str(tmp_path / "one.pt"))
    for name in ("loss", "kl_0", "kl_9"):  # written once (first process); each process's KLs averaged
        assert [s for s, _ in csv_ddp[name]] == list(range(1, 9)), name
        values = [v for _, v in csv_one[name]]
        assert [v for _, v in csv_ddp[name]] == pytest.approx(values, rel=1e-5, abs=1e-6), name
    for name, tensor in one["model"].items():
        assert torch.allclose(ddp["model"][name], tensor, rtol=1e-3, atol=1e-4), name


def test_torchrun_sigterm_leaves_one_checkpoint_that_resumes_in_one_process(tmp_path):
    out = str(tmp_path / "ckpt.pt")
    process = torchrun("--data", TINY, "--model", "betatc", "--batch-size", "16", "--steps", "100000",
                       "--log-every", "1", "--out", out)
    for line in process.stderr:
        if line.startswith("step 3/"):
            break
    process.send_signal(signal.SIGTERM)
    err = process.communicate(timeout=120)[1]
    assert err.count("stopped at step") == 1, err[-2000:]
    stopped = int(err.split("stopped at step ")[1].split("/")[0])
    assert load(out)["step"] == stopped >= 3
    assert sorted(os.listdir(tmp_path)) == ["ckpt.history.csv", "ckpt.pt"]  # no temporary files
    resume = ("--resume", "--steps", str(stopped + 2), "--final-eval", "20", "--log-every", "1")
    assert run_train(tmp_path, *resume)[0] == 0
    assert load(out)["step"] == stopped + 2
    loss_steps = [step for step, _ in history_by_name(out)["loss"]]
    assert loss_steps == list(range(1, stopped + 3))  # the first process's rows, each step once


def test_torchrun_refuses_a_batch_that_does_not_divide(tmp_path):
    process = torchrun("--data", TINY, "--batch-size", "15", "--out", str(tmp_path / "c.pt"))
    err = process.communicate(timeout=120)[1]
    assert process.returncode != 0 and "--batch-size 15 does not divide into 2 processes" in err
    assert "Traceback" not in err.split("does not divide")[0][-500:]
    assert err.count("error: --batch-size 15") == 1  # said by the first process only


# ----------------------------------------------------------------------------- traverse

def test_traversal_labels_name_the_best_factor_and_mark_collapsed_latents():
    mean_kl = np.array([4.1, 0.004, 0.5])
    mi = np.array([[0.1, 0.82], [0.0, 0.001], [0.3, 0.2]])
    labels = traverse.latent_labels([0, 2, 1], mean_kl, mi, ["shape", "posX"])
    assert labels == ["z0  posX 0.82  KL 4.10", "z2  shape 0.30  KL 0.50", "z1  no factor  KL 0.00  collapsed"]
    assert traverse.latent_labels([1], mean_kl, None, None) == ["z1  KL 0.00  collapsed"]


@pytest.fixture(scope="module")
def traversed(tmp_path_factory):
    """A tiny beta-TCVAE checkpoint with a history and periodic MIGs; traverse.py --metrics --codes
    run on it (what it printed), and the whole dataset encoded here independently."""
    from contextlib import redirect_stdout
    folder = tmp_path_factory.mktemp("traverse")
    checkpoint = str(folder / "ckpt.pt")
    assert train.main(["--data", TINY, "--batch-size", "16", "--steps", "8", "--log-every", "2",
                       "--eval-every", "4", "--eval-subset", "100", "--final-eval", "40",
                       "--out", checkpoint]) == 0
    printed = io.StringIO()
    with redirect_stdout(printed):
        assert traverse.main([checkpoint, "--out", str(folder / "grids"), "--metrics", "--steps", "5",
                              "--range", "20", "--codes", str(folder / "codes.npz")]) == 0
    model = runtime.model_from_checkpoint(load(checkpoint)).eval()
    dataset = data.load(TINY)
    mu, logvar = runtime.encode_dataset(model, runtime.ImageSource(dataset.images, torch.device("cpu")))
    return dict(folder=folder, checkpoint=checkpoint, printed=printed.getvalue(), model=model,
                dataset=dataset, mu=mu, logvar=logvar)


def assert_same_numbers(saved, expected, where="metrics"):
    """JSON-loaded `saved` equals `expected` (dicts of floats and arrays) to 1e-9; None is NaN."""
    if isinstance(expected, dict):
        assert set(saved) == set(expected), where
        for key in expected:
            assert_same_numbers(saved[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, str):
        assert saved == expected, where
    else:
        saved = np.array(saved, dtype=np.float64)  # None -> nan
        assert np.allclose(saved, np.asarray(expected, np.float64), rtol=0, atol=1e-9, equal_nan=True), where


def without_scored_factors(result, names):
    """`result` (an evaluate_codes result, or its JSON) less each entry's "factors", after checking
    that every entry but the two label-free ones names exactly `names` there."""
    label_free = {"gaussian_total_correlation", "mutual_info_score"}
    for name, entry in result.items():
        assert entry.get("factors") == (None if name in label_free else list(names)), name
    return {name: {k: v for k, v in entry.items() if k != "factors"} for name, entry in result.items()}


def test_traverse_metrics_json_is_metrics_evaluate_on_the_whole_dataset(traversed):
    t = traversed
    report = json.loads((t["folder"] / "grids" / "metrics.json").read_text())
    expected = metrics.evaluate(t["mu"], t["logvar"], t["dataset"].factors, seed=0)
    assert report["images"] == 384 and report["factor_names"] == t["dataset"].factor_names
    assert report["protocol"] == "exact"
    assert_same_numbers(without_scored_factors(report["metrics"], t["dataset"].factor_names), expected)
    table = t["printed"].splitlines()
    assert table[0].startswith("metrics of ") and "384 images" in table[0]
    assert sorted(line.split()[0] for line in table[1:len(expected) + 1]) == sorted(expected)
    mig_line = next(line for line in table if line.startswith("mig_discrete"))
    assert mig_line.split()[1] == f"{expected['mig_discrete']['mig']:.3f}"
    with Image.open(t["folder"] / "grids" / "mi.png") as image:
        assert image.height == 28 + 22 * 10 + 4  # one row per latent
    with Image.open(t["folder"] / "grids" / "traversal.png") as image:  # 10 rows of 64 px, 5 columns
        assert image.size == (170 + 5 * 66 + 2, 10 * 66 + 2)


def test_traverse_dlib_json_has_disentanglement_lib_names(traversed):
    t = traversed
    flat = json.loads((t["folder"] / "grids" / "ckpt.dlib.json").read_text())
    report = json.loads((t["folder"] / "grids" / "metrics.json").read_text())["metrics"]
    dlib = {name for name, _, _ in metrics.DLIB_NAMES} | {"protocol"}
    assert set(flat) <= dlib | {k for k in flat if k.startswith("downstream_accuracy_")}
    assert {"discrete_mig", "dci_disentanglement", "beta_vae_score", "factor_vae_score", "sap_score",
            "modularity", "irs"} <= set(flat)
    assert flat["discrete_mig"] == report["mig_discrete"]["mig"]
    assert flat["dci_disentanglement"] == report["dci"]["disentanglement"]
    assert flat["modularity"] == report["modularity_explicitness"]["modularity"]


def test_traverse_codes_round_trip(traversed):
    t = traversed
    with np.load(t["folder"] / "codes.npz", allow_pickle=False) as codes:
        assert codes["mu"].dtype == codes["logvar"].dtype == np.float32
        assert np.array_equal(codes["mu"], t["mu"]) and np.array_equal(codes["logvar"], t["logvar"])
        assert codes["factors"].dtype == np.int64 and np.array_equal(codes["factors"], t["dataset"].factors)
        assert list(codes["factor_names"]) == t["dataset"].factor_names
        assert list(codes["factor_sizes"]) == t["dataset"].factor_sizes == [3, 2, 4, 4, 4]


def test_traversal_gif_frames_are_the_sweep_forward_and_back(traversed):
    t, steps, size = traversed, 5, 64
    with Image.open(t["folder"] / "grids" / "traversal.gif") as gif:
        assert gif.n_frames == 2 * steps - 2 and gif.info["loop"] == 0
        frames = []
        for k in range(gif.n_frames):
            gif.seek(k)
            frames.append(np.asarray(gif.convert("L")).astype(int))
    assert frames[0].shape == (traverse.GIF_HEADER + 2 * (traverse.GIF_LABEL + size + 2), 2 + 5 * (size + 2))
    mu, logvar = t["mu"].astype(np.float64), t["logvar"].astype(np.float64)
    order = np.argsort(-(0.5 * (mu ** 2 + np.exp(logvar) - 1 - logvar)).mean(0), kind="stable")
    sweep = torch.linspace(-20, 20, steps)  # --range 20
    with torch.inference_mode():  # decode every (latent, value) in one batch, as traverse.py does
        code = t["model"].encode(torch.from_numpy(t["dataset"].images[:1]).permute(0, 3, 1, 2).float() / 255)[0][0]
        codes = code.repeat(10, steps, 1)
        for cell, j in enumerate(order):
            codes[cell, :, j] = sweep
        expected = (torch.sigmoid(t["model"].decode(codes.reshape(10 * steps, 10))) * 255).round()
    expected = expected.reshape(10, steps, size, size).numpy()
    for cell in (0, 9):  # the most and the least informative latent
        top, left = traverse.gif_cell_origin(cell, size, columns=5)  # 10 latents: 2 rows of 5
        for k, frame in enumerate(frames):
            value = k if k < steps else 2 * steps - 2 - k
            assert np.array_equal(frame[top:top + size, left:left + size], expected[cell, value]), (cell, k)
        assert not np.array_equal(expected[cell, 0], expected[cell, -1])  # the check can tell values apart


def test_history_png_draws_the_csv_beside_the_checkpoint(traversed):
    state = load(traversed["checkpoint"])
    rows = runtime.read_history(runtime.history_path(traversed["checkpoint"]))
    series = traverse.history_series(rows)
    titles = ["loss", "recon", "kl", "mi", "tc", "dwkl", "kl per latent", "mig_discrete_mig"]
    assert [title for title, _ in series] == titles  # final metrics (one point each) left out
    assert series[1][1] == [("", [2, 4, 6, 8], [h["recon"] for h in state["history"]])]
    latents = series[6][1]
    assert [label for label, _, _ in latents] == [str(j) for j in range(10)]
    kl_sums = np.sum([values for _, _, values in latents], axis=0)  # the latents' KLs add up to kl
    assert np.allclose(kl_sums, [h["kl"] for h in state["history"]], rtol=1e-5, atol=1e-7)
    mig = series[7][1][0]  # periodic at 4; the final evaluation's at 8 (over the periodic one)
    assert mig[1] == [4, 8] and mig[2][1] == state["final"]["metrics"]["mig_discrete"]["mig"]
    assert mig[2][0] == state["evaluations"][0]["discrete_mig"]
    width, height = traverse.PANEL_WIDTH, traverse.PANEL_HEIGHT
    with Image.open(traversed["folder"] / "grids" / "history.png") as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB")).astype(int)
    assert pixels.shape == (3 * height, 3 * width, 3)  # 8 panels, 3 to a row
    gray = pixels.mean(axis=2)
    for i in range(9):  # the title strip of each panel has text; the empty slot is blank
        top, left = i // 3 * height, i % 3 * width
        assert (gray[top + 2:top + 16, left + 56:left + 120] < 128).any() == (i < 8), i
    assert (gray[2 * height:, 2 * width:] == 255).all()
    panel = pixels[2 * height:3 * height, 0:width]  # kl per latent: a line in each colour
    for colour in traverse.LINE_COLOURS:
        assert (np.abs(panel - colour).sum(axis=2) == 0).any(), colour
    before_csv = traverse.history_series(traverse.checkpoint_rows(state))  # a run without a CSV
    assert [title for title, _ in before_csv] == titles[:6] + ["discrete_mig"]


def test_traverse_old_checkpoint_with_single_valued_factors(traversed, tmp_path, capsys):
    state = load(traversed["checkpoint"])
    for key in ("seed", "data_limit", "factor_names", "factor_sizes", "precision", "dataset_name", "beta"):
        del state["config"][key]
    for key in ("history", "evaluations", "final"):
        del state[key]
    torch.save(state, tmp_path / "old.pt")
    capsys.readouterr()
    argv = [str(tmp_path / "old.pt"), "--out", str(tmp_path / "g"), "--stats-subset", "1", "--steps", "2"]
    assert traverse.main(argv) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "left out" in err[0]
    assert all(name in err[0] for name in traversed["dataset"].factor_names)
    assert sorted(os.listdir(tmp_path / "g")) == ["reconstructions.png", "samples.png", "traversal.gif",
                                                  "traversal.png"]  # no history: no history.png
    del state["config"]["arch"]
    torch.save(state, tmp_path / "old.pt")
    assert traverse.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "arch" in err[0] and "old.pt" in err[0]


def test_traversal_labels_say_no_factor_when_none_varies():
    labels = traverse.latent_labels([1, 0], np.array([0.005, 2.0]), np.zeros((2, 0)), [])
    assert labels == ["z1  no factor  KL 2.00", "z0  no factor  KL 0.01  collapsed"]


def test_traverse_metrics_without_factors_are_label_free(traversed, tmp_path, capsys):
    images = traversed["dataset"].images[::6]  # 64 images, no factors
    np.save(tmp_path / "unlabelled.npy", images[..., 0])
    argv = [traversed["checkpoint"], "--data", str(tmp_path / "unlabelled.npy"), "--metrics",
            "--steps", "2", "--out", str(tmp_path / "g")]
    assert traverse.main(argv) == 0
    report = json.loads((tmp_path / "g" / "metrics.json").read_text())
    mu, logvar = runtime.encode_dataset(traversed["model"], runtime.ImageSource(images, torch.device("cpu")))
    assert_same_numbers(report["metrics"], metrics.evaluate(mu, logvar))
    assert set(report["metrics"]) == {"gaussian_total_correlation", "mutual_info_score"}
    assert not (tmp_path / "g" / "mi.png").exists() and "label-free" in capsys.readouterr().out


@pytest.mark.parametrize("protocol", ["exact", "dlib"])
def test_traverse_factors_scores_those_columns_under_the_protocol(traversed, tmp_path, capsys, protocol):
    t = traversed
    argv = [t["checkpoint"], "--metrics", "--factors", "posX, shape", "--protocol", protocol,
            "--steps", "2", "--out", str(tmp_path / "g")]
    assert traverse.main(argv) == 0
    report = json.loads((tmp_path / "g" / "metrics.json").read_text())
    # TINY's columns: shape, scale, orientation, posX, posY; picked here by hand, in the order named
    chosen = t["dataset"].factors[:, [3, 0]]
    expected = metrics.evaluate(t["mu"], t["logvar"], chosen, seed=0, protocol=protocol)
    assert report["protocol"] == protocol and report["factor_names"] == ["posX", "shape"]
    assert_same_numbers(without_scored_factors(report["metrics"], ["posX", "shape"]), expected)
    assert {entry["protocol"] for entry in report["metrics"].values()} == {protocol}
    assert ("mig_gaussian" in report["metrics"]) == (protocol == "exact")
    printed = capsys.readouterr().out
    assert f"{protocol} protocol, factors posX,shape" in printed.splitlines()[0]
    with Image.open(tmp_path / "g" / "mi.png") as image:  # a column per factor scored
        assert image.width == 48 + 2 * 56 + 4


def test_traverse_factors_unknown_or_unlabelled_and_protocol_without_metrics_exit_2(traversed, tmp_path,
                                                                                   capsys):
    argv = [traversed["checkpoint"], "--metrics", "--factors", "scale,colour", "--out", str(tmp_path)]
    assert traverse.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --factors: sprites has no factor colour; its factors are "
                   "shape,scale,orientation,posX,posY"]
    assert not os.listdir(tmp_path)  # refused before any encoding or drawing
    np.save(tmp_path / "unlabelled.npy", traversed["dataset"].images[:8, ..., 0])
    argv = [traversed["checkpoint"], "--data", str(tmp_path / "unlabelled.npy"), "--factors", "scale",
            "--out", str(tmp_path / "g")]
    assert traverse.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no factor labels (unlabelled)" in err[0] and "--factors" in err[0]
    assert_one_line_usage_error(traverse.main, ["c.pt", "--protocol", "dlib"], "traverse.py",
                                "--protocol is for --metrics", capsys)
    assert_one_line_usage_error(traverse.main, ["c.pt", "--factors", "scale,,posX"], "traverse.py",
                                "empty name", capsys)
    assert_one_line_usage_error(traverse.main, ["c.pt", "--factors", "posX,posX"], "traverse.py",
                                "posX named more than once", capsys)


@pytest.mark.parametrize("argv,message", [
    (["c.pt", "--steps", "1"], "--steps"), (["c.pt", "--range", "0"], "--range"),
    (["c.pt", "--range", "nan"], "--range"), (["c.pt", "--stats-subset", "0"], "--stats-subset"),
    (["c.pt", "--image", "-1"], "--image"), (["c.pt", "--bogus"], "--bogus"),
    (["c.pt", "--device", "tpu"], "invalid choice"), ([], "checkpoint"),
    (["c.pt", "--seed", "-1"], "--seed -1: a seed must be a whole number from 0 to 4,294,967,295"),
    (["c.pt", "--seed", str(2**64)], "a seed must be")])
def test_traverse_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    assert_one_line_usage_error(traverse.main, argv, "traverse.py", message, capsys)
    assert traverse.parse_args(["c.pt", "--mig"]).metrics  # the former name of --metrics


def test_traverse_bad_image_and_codes_path_exit_1_with_one_line(traversed, tmp_path, capsys):
    for extra, message in ((["--image", "384"], "--image 384"),
                           (["--codes", str(tmp_path / "missing" / "c.npz")], "--codes")):
        assert traverse.main([traversed["checkpoint"], "--out", str(tmp_path), *extra]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]


def test_traverse_rejects_a_foreign_file(tmp_path, capsys):
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    assert traverse.main([str(tmp_path / "x.pt")]) == 1
    assert "x.pt" in capsys.readouterr().err
    assert traverse.main([str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}: is a folder, not a checkpoint file"


def read_scores(folder):
    """scores.csv in `folder`: (header names, float64 table)."""
    path = os.path.join(folder, "scores.csv")
    with open(path) as f:
        header = f.readline().strip().split(",")
    return header, np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)


def test_traverse_score_is_the_elbo_of_the_models_forward_at_one_sample(tmp_path, capsys):
    code, checkpoint = run_train(tmp_path, "--model", "vae")
    assert code == 0
    assert traverse.main([checkpoint, "--score", TINY, "--out", str(tmp_path / "s"), "--seed", "5"]) == 0
    header, table = read_scores(tmp_path / "s")
    dataset = data.load(TINY)
    assert header == ["index", "neg_elbo", "recon", "kl"] + dataset.factor_names
    assert len(table) == len(dataset) == 384 and np.array_equal(table[:, 0], np.arange(384))
    assert np.array_equal(table[:, 4:], dataset.factors)
    assert np.allclose(table[:, 1], table[:, 2] + table[:, 3], rtol=0, atol=2e-6)
    # independently: the model's forward on one batch with numpy's noise of seed 5, float64 formulas
    model = runtime.model_from_checkpoint(load(checkpoint)).eval()
    x = torch.from_numpy(dataset.images[:100]).permute(0, 3, 1, 2).double() / 255
    noise = np.random.default_rng(5).standard_normal((100, model.latents))
    with torch.no_grad():
        logits, mu, logvar, _ = (t.double() for t in model(x.float(), torch.from_numpy(noise).float()))
        at_mean = model.decode(mu.float()).double()
    bce = lambda logits: (logits.clamp(min=0) - logits * x + torch.log1p(torch.exp(-logits.abs()))).sum((1, 2, 3))
    kl = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(1)
    assert np.allclose(table[:100, 2], bce(logits).numpy(), rtol=1e-5, atol=1e-3)
    assert np.allclose(table[:100, 3], kl.numpy(), rtol=1e-5, atol=1e-4)
    assert np.abs(table[:100, 2] - bce(at_mean).numpy()).max() > 1  # a sample, not the posterior mean
    picture = np.asarray(Image.open(tmp_path / "s" / "scores.png"))
    assert picture.shape == (2 * 66 + 2, 8 * 66 + 2, 3)  # 2 rows x 8 images, PAD 2
    lowest, highest = np.argmin(table[:, 1]), np.argmax(table[:, 1])
    assert np.array_equal(picture[2:66, 2:66, 0], dataset.images[lowest, :, :, 0])
    assert np.array_equal(picture[68:132, 2:66, 0], dataset.images[highest, :, :, 0])
    assert traverse.main([checkpoint, "--score", TINY, "--out", str(tmp_path / "t"), "--seed", "6"]) == 0
    other = read_scores(tmp_path / "t")[1]
    assert np.allclose(other[:, 3], table[:, 3], atol=2e-6) and not np.allclose(other[:, 2], table[:, 2])


def test_traverse_score_refusals_and_pair_models(tmp_path, capsys):
    code, pairs = run_train(tmp_path, "--model", "adagvae", name="pairs.pt")
    assert code == 0  # a pair model scores single images with its encoder and decoder
    assert traverse.main([pairs, "--score", TINY + ",exclude=shape=0", "--out", str(tmp_path)]) == 0
    assert read_scores(tmp_path)[1].shape == (256, 9)
    capsys.readouterr()
    colour = "shapes:hues=1,scales=1,orientations=2"
    assert traverse.main([pairs, "--score", colour]) == 1
    assert capsys.readouterr().err.strip() == (f"error: --score {colour}: images are 64x64x3, the "
                                               "model was trained on 64x64x1")
    code, autoencoder = run_train(tmp_path, "--model", "ae", name="ae.pt")
    assert code == 0
    capsys.readouterr()
    assert traverse.main([autoencoder, "--score", TINY]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no ELBO" in err[0]
    assert_one_line_usage_error(traverse.main, [pairs, "--score", TINY, "--metrics"], "traverse.py",
                                "--score PATH scores the data PATH alone", capsys)


# examples/anomaly.py

_anomaly_spec = importlib.util.spec_from_file_location("anomaly", os.path.join(HERE, "examples", "anomaly.py"))
anomaly = importlib.util.module_from_spec(_anomaly_spec)
_anomaly_spec.loader.exec_module(anomaly)


def test_roc_auc_against_hand_values_with_ties_and_pair_counts():
    # positives 2 and 3, negatives 1 and 2: pairs (2,1) 1, (2,2) a tie 0.5, (3,1) 1, (3,2) 1 -> 3.5 / 4
    assert anomaly.roc_auc([1, 2, 2, 3], [False, True, False, True]) == 0.875
    assert anomaly.roc_auc([5, 5, 5], [True, False, False]) == 0.5  # all tied
    assert anomaly.roc_auc([0.1, 0.2, 0.9], [False, False, True]) == 1.0
    assert anomaly.roc_auc([0.9, 0.2, 0.1], [False, False, True]) == 0.0
    # positives 1, 1, 4 against negatives 1, 2: (1,1) 0.5 twice, (1,2) 0 twice, (4,*) 1 twice -> 3 / 6
    assert anomaly.roc_auc([1, 4, 1, 1, 2], [True, True, True, False, False]) == 0.5
    rng = np.random.default_rng(0)  # many ties: every (positive, negative) pair counted by brute force
    scores = rng.integers(0, 6, 300).astype(float)
    positive = rng.random(300) < 0.3
    pairs = scores[positive][:, None] - scores[~positive][None, :]
    brute = ((pairs > 0).sum() + 0.5 * (pairs == 0).sum()) / pairs.size
    assert abs(anomaly.roc_auc(scores, positive) - brute) < 1e-12
    for scores, positive in [([1, 2], [True, True]), ([1, np.nan], [True, False]), ([1, 2], [True])]:
        with pytest.raises(ValueError):
            anomaly.roc_auc(scores, positive)


def test_anomaly_example_refuses_bad_arguments_in_one_line(capsys):
    for argv, message in [(["--steps", "0"], "--steps 0"), (["--held-out", "star"], "--held-out"),
                          (["--grid", "sprites:positions=8"], "--grid")]:
        assert_one_line_usage_error(anomaly.main, argv, "anomaly.py", message, capsys)


# ----------------------------------------------------------------------------- examples

def test_bench_and_the_examples_report_a_bad_argument_in_one_line(capsys):
    import bench
    assert_one_line_usage_error(bench.main, ["--only", "nothing"], "bench.py", "invalid choice", capsys)
    assert_one_line_usage_error(bench.main, ["--eval-steps", "0"], "bench.py", "--eval-steps", capsys)
    assert bench.main(["--only", "evaluation", "--checkpoint", "nosuch.pt"]) == 1  # a bad file: one line
    assert capsys.readouterr().err.strip() == "error: nosuch.pt: no such checkpoint file"
    for script in ("metric_properties.py", "reproduce.py"):
        run = subprocess.run([sys.executable, os.path.join(HERE, "examples", script), "table", "--bogus"],
                             capture_output=True, text=True, cwd=HERE)
        err = run.stderr.strip().splitlines()
        assert run.returncode == 2 and len(err) == 1 and err[0].startswith(f"{script}: error:"), run.stderr
        assert "--bogus" in err[0] and err[0].endswith("(see --help)")

def test_metric_properties_runs_where_torch_is_not_installed(tmp_path):
    script = os.path.join(HERE, "examples", "metric_properties.py")
    blocked = ("import runpy, sys; sys.modules['torch'] = None  # 'import torch' now fails\n"
               f"sys.argv = [{script!r}, '--data', 'sprites:positions=8,orientations=10,scales=6', "
               f"'--out', {str(tmp_path)!r}]\nrunpy.run_path(sys.argv[0], run_name='__main__')")
    run = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, cwd=HERE)
    assert run.returncode == 0, run.stderr[-2000:]
    table = json.load(open(tmp_path / "metric_properties.json"))
    assert table["rows"] == 3 * 6 * 10 * 8 * 8 and table["table"]["perfect"]["DCI dis."] > 0.9
    probe = subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None; import torch"],
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr  # the block is real


def imported_modules(path):
    import ast
    tree = ast.parse(open(path).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_commands_share_runtime_and_import_no_name_from_train():
    commands = ["traverse.py", "bench.py", "examples/reproduce.py", "examples/metric_properties.py",
                "examples/anomaly.py"]
    for command in commands:
        assert "train" not in imported_modules(os.path.join(HERE, command)), command
    assert "runtime" in imported_modules(os.path.join(HERE, "train.py"))
    toolkit = {"data", "losses", "metrics", "models", "h5", "train", "traverse", "bench", "runtime"}
    assert imported_modules(os.path.join(HERE, "runtime.py")) & toolkit == {"data", "losses", "metrics",
                                                                           "models"}


def test_study_refuses_a_seed_out_of_range_in_one_line(tmp_path, capsys):
    assert_one_line_usage_error(reproduce.main, ["run", "--seeds", "0", "-1", "--out", str(tmp_path),
                                                 "--dry-run"], "reproduce.py", "--seeds -1", capsys)


# the study runner, examples/reproduce.py

_spec = importlib.util.spec_from_file_location("reproduce", os.path.join(HERE, "examples", "reproduce.py"))
reproduce = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reproduce)
STUDY_DATA = "sprites:positions=2,orientations=2,scales=2"  # 3 x 2 x 2 x 2 x 2 = 48 images


def study_argv(out, *extra):
    """vae, and betatc at betas 1 and 2: three runs of two steps (beta does not multiply the vae)."""
    return ["run", "--data", STUDY_DATA, "--models", "vae", "betatc", "--betas", "1", "2", "--seeds", "0",
            "--steps", "2", "--out", out, *extra,
            "--", "--device", "cpu", "--batch-size", "8", "--latents", "3"]


def study_grid(*argv):
    args, passthrough = reproduce.parse_args(["run", *argv])
    return reproduce.grid(args, passthrough)


def run_reproduce(*argv, **options):
    return subprocess.run([sys.executable, os.path.join(HERE, "examples", "reproduce.py"), *argv],
                          capture_output=True, text=True, cwd=HERE, **options)


def test_study_grid_counts_names_and_commands():
    runs = study_grid("--betas", "1", "2", "--seeds", "0", "1", "2")
    names = [run["name"] for run in runs]
    assert len(runs) == len(set(names)) == 5 * 3 + 2 * 2 * 3  # betas multiply betavae and betatc only
    assert "sprites-ae-seed0-5000" in names and not any(n.startswith("sprites-vae-beta") for n in names)
    betatc = runs[names.index("sprites-betatc-beta2-seed1-5000")]
    assert reproduce.train_arguments(betatc) == [
        "--data", "sprites", "--model", "betatc", "--beta", "2", "--seed", "1", "--steps", "5000",
        "--arch", "conv", "--batch-size", "64", "--lr", "1e-3", "--precision", "auto", "--latents", "10",
        "--out", os.path.join("runs", "sprites-betatc-beta2-seed1-5000.pt")]
    # the README recipe keeps the previous release's names, however it is spelled; so does --device
    default = [run["name"] for run in study_grid()]
    assert [run["name"] for run in study_grid("--set", "lr=0.001")] == default
    assert [run["name"] for run in study_grid("--", "--device", "cpu", "--log-every", "5")] == default
    # any other option: a short hash, the same in either order or spelling, and in the command
    a = study_grid("--models", "vae", "--seeds", "0", "--", "--lr", "5e-4", "--estimator", "mss")
    b = study_grid("--models", "vae", "--seeds", "0", "--set", "estimator=mss", "--set", "lr=0.0005")
    assert a[0]["name"] == b[0]["name"] and len(a[0]["name"]) == len("sprites-vae-seed0-5000-") + 6
    assert a[0]["name"].startswith("sprites-vae-seed0-5000-") and a[0]["options"]["lr"] == "5e-4"
    # an axis for one objective multiplies that objective only
    runs = study_grid("--models", "vae", "factorvae", "--seeds", "0", "--set", "factorvae:gamma=10,35")
    assert [run["options"].get("gamma") for run in runs] == [None, "10", "35"]
    assert len({run["name"] for run in runs}) == 3


@pytest.mark.parametrize("argv,message", [
    (["--set", "beta=1,2"], "--betas"), (["--set", "lr"], "NAME=VALUE"), (["--set", "gan:gamma=1"], "gan"),
    (["--models", "vae", "--set", "factorvae:gamma=1"], "not among --models"),
    (["--", "--final-eval", "100"], "whole dataset"), (["--", "--resume"], "--resume"),
    (["--", "5"], "'5'"), (["--workers", "0"], "--workers"), (["--models", "gan"], "invalid choice"),
    (["--set", "foo=1"], "run sprites-ae-seed0-5000-"), (["--set", "foo=1"], "unrecognized arguments: --foo 1"),
    (["--set", "lr=abc"], "invalid float value: 'abc'"), (["--", "--gamma", "-1"], "must be finite numbers >= 0"),
    (["--set", "lr=1,2", "--set", "lr=3"], "given twice")])
def test_study_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        reproduce.parse_args(["run", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]


def test_study_workers_get_gpus_round_robin_and_a_share_of_the_cores(monkeypatch):
    envs = [reproduce.worker_environment(slot, 4, ["2", "5"], 16) for slot in range(4)]
    assert [env["CUDA_VISIBLE_DEVICES"] for env in envs] == ["2", "5", "2", "5"]
    assert {(env["OMP_NUM_THREADS"], env["MKL_NUM_THREADS"]) for env in envs} == {("4", "4")}
    assert reproduce.worker_environment(1, 2, [], 16)["OMP_NUM_THREADS"] == "8"
    assert reproduce.worker_environment(0, 3, [], 2)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert reproduce.visible_gpus(None, {}) == ["4", "6"] and reproduce.visible_gpus("0,3", {}) == ["0", "3"]
    assert reproduce.visible_gpus("0,3", {"device": "cpu"}) == []


def test_study_two_workers_finish_every_run_then_a_rerun_skips_them(tmp_path, capsys):
    out = str(tmp_path / "study")
    first = run_reproduce(*study_argv(out, "--workers", "2"))
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"2 worker(s): CPU, {max(1, reproduce.cpu_cores() // 2)} thread(s) each" in first.stdout
    runs = study_grid(*study_argv(out)[1:])
    assert first.stdout.count("python train.py") == len(runs) == 3
    for run in runs:
        state = load(run["out"])
        assert reproduce.run_state(run["out"]) == "finished" and state["step"] == 2
        assert (state["config"]["model"], state["config"]["seed"]) == (run["options"]["model"], 0)
        assert state["config"]["batch_size"] == 8 and state["config"]["latents"] == 3
    assert load(runs[2]["out"])["config"]["beta"] == 2.0
    table = open(os.path.join(out, "table.md")).read().splitlines()
    assert len(table) == 2 + 3 and all(f"| {reproduce.data_label(STUDY_DATA)} |" in row for row in table[2:])
    before = {path: os.stat(path).st_mtime_ns for path in (run["out"] for run in runs)}
    logs = {name: open(os.path.join(out, "logs", name)).read()
            for name in os.listdir(os.path.join(out, "logs"))}
    capsys.readouterr()
    assert reproduce.main(study_argv(out, "--workers", "2")) == 0
    second = capsys.readouterr().out
    assert "3 runs in" in second and "3 finished (skipped)" in second
    assert "python train.py" not in second and "worker(s)" not in second
    assert {path: os.stat(path).st_mtime_ns for path in before} == before
    assert {name: open(os.path.join(out, "logs", name)).read() for name in logs} == logs


def test_study_ctrl_c_stops_every_worker_and_their_runs_resume(tmp_path, capsys):
    out = tmp_path / "study"
    argv = ["run", "--data", STUDY_DATA, "--models", "ae", "vae", "--seeds", "0", "--steps", "100000",
            "--workers", "2", "--out", str(out)]
    train_options = ["--", "--device", "cpu", "--batch-size", "8", "--latents", "3", "--log-every", "1"]
    runner = subprocess.Popen([sys.executable, os.path.join(HERE, "examples", "reproduce.py"), *argv,
                               *train_options], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=HERE)
    deadline = time.time() + 120
    while time.time() < deadline:  # until both runs are training
        logs = list(out.glob("logs/*.log"))
        if len(logs) == 2 and all("step 2/" in log.read_text() for log in logs):
            break
        time.sleep(0.2)
    runner.send_signal(signal.SIGINT)
    output = runner.communicate(timeout=120)[0]
    assert runner.returncode == 128 + signal.SIGINT, output
    assert output.count("(checkpoint saved)") == 2 and "FAILED" not in output
    checkpoints = sorted(out.glob("*.pt"))
    assert len(checkpoints) == 2
    for path in checkpoints:
        assert load(path)["step"] >= 2 and "final" not in load(path)
        assert reproduce.run_state(str(path)) == "unfinished"
    capsys.readouterr()
    assert reproduce.main([*argv, "--dry-run", *train_options]) == 0
    listing = capsys.readouterr().out
    assert listing.count("unfinished  python train.py") == listing.count("--resume") == 2


def test_study_slurm_script_has_a_train_command_per_task_and_skips_finished_runs(tmp_path, monkeypatch,
                                                                                  capsys):
    out = str(tmp_path / "study")
    monkeypatch.chdir(HERE)  # the script runs from the folder it was written in
    assert reproduce.main(study_argv(out, "--slurm", "--gres", "gpu:1", "--time", "0:10:00",
                                     "--sbatch", "account=lab", "--setup", "echo ready")) == 0
    path = os.path.join(out, "study.sbatch")
    assert f"sbatch {path}" in capsys.readouterr().out
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    script = open(path).read()
    runs = study_grid(*study_argv(out)[1:])
    arms = [line.strip() for line in script.splitlines() if line.strip()[:1].isdigit()]
    assert "#SBATCH --array=0-2\n" in script and len(arms) == len(runs) == 3
    assert script.index("set -eo pipefail") < script.index("echo ready") < script.index("set -u\n")
    for line in ("#SBATCH --gres=gpu:1", "#SBATCH --time=0:10:00", "#SBATCH --account=lab", "echo ready"):
        assert line + "\n" in script
    for index, (arm, run) in enumerate(zip(arms, runs)):
        assert arm.startswith(f"{index}) ") and arm.count("train.py") == 1
        assert "python train.py " + " ".join(reproduce.train_arguments(run)) + ")" in arm
    # task 0 finished: skipped; task 1 unfinished: --resume; task 2 missing: --force. A stand-in
    # `python` prints the train.py command instead of training, and runs the state check for real.
    fake_checkpoint(runs[0]["out"], "vae", 0, {"samples": 48}, size=48, step=2)
    fake_checkpoint(runs[1]["out"], "betatc", 0, None, size=48, step=1)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").write_text(
        f'#!/bin/bash\nif [ "$1" = train.py ]; then echo "TRAIN $*"; else exec {sys.executable} "$@"; fi\n')
    (tmp_path / "bin" / "python").chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    tasks = [subprocess.Popen(["bash", path], stdout=subprocess.PIPE, text=True, cwd="/",
                              env=dict(env, SLURM_ARRAY_TASK_ID=str(i))) for i in range(3)]
    outputs = [task.communicate(timeout=120)[0] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0, 0]
    assert "finished, skipped" in outputs[0] and "TRAIN" not in outputs[0]
    for output, run, mode in ((outputs[1], runs[1], "--resume"), (outputs[2], runs[2], "--force")):
        assert f"TRAIN train.py {' '.join(reproduce.train_arguments(run))} {mode}\n" in output


def fake_checkpoint(path, model, seed, final, beta=6.0, data="sprites", size=100, step=5000):
    """A checkpoint as train.py saves it, reduced to what the table reads (no weights); `final`
    None: an unfinished run."""
    config = {"model": model, "beta": beta, "gamma": None, "lr": 0.001, "latents": 10, "seed": seed,
              "data": data, "steps": 5000, "dataset_size": size, "dataset_name": data, "arch": "conv",
              "channels": 1, "size": 64, "batch_size": 64, "recon": "bce",
              "factor_names": ["shape", "posX"], "factor_sizes": [3, 32]}
    state = {"format": runtime.CHECKPOINT_FORMAT, "config": config, "step": step, "model": {}, "optimizer": {}}
    torch.save(state if final is None else {**state, "final": final}, path)


def test_study_table_reads_both_checkpoint_layouts_into_medians_and_ranges(tmp_path):
    def new(gaussian, discrete, dci, sap):
        return {"step": 5000, "samples": 100, "metrics": {
            "mig_gaussian": {"mig": gaussian, "gaps": [gaussian, 0.0]}, "mig_discrete": {"mig": discrete},
            "dci": {"disentanglement": dci, "importance": [[1.0, 0.0]]},
            "sap_score": {"score": sap} if sap is not None else {"error": "one factor"}}}

    for seed, values in enumerate([(0.5, 0.2, 0.9, 0.04), (0.1, 0.4, 0.7, None), (0.3, 0.0, 0.8, 0.06)]):
        fake_checkpoint(tmp_path / f"tc6-{seed}.pt", "betatc", seed, new(*values))
    for seed, mig in enumerate([0.2, 0.6]):  # the current release's layout
        fake_checkpoint(tmp_path / f"tc2-{seed}.pt", "betatc", seed, beta=2.0, final={
            "samples": 100, "gaussian_mig": {"mig": mig, "gaps": [mig]}, "discrete_mig": {"mig": mig / 2}})
    fake_checkpoint(tmp_path / "vae-0.pt", "vae", 0, new(0.05, 0.1, 0.5, 0.01))
    fake_checkpoint(tmp_path / "vae-1.pt", "vae", 1, new(0.15, 0.1, 0.5, 0.01), beta=4.0)  # beta: ignored
    fake_checkpoint(tmp_path / "vae-1z-copy.pt", "vae", 1, new(0.9, 0.9, 0.9, 0.9))  # named after: left out
    fake_checkpoint(tmp_path / "subset.pt", "betatc", 3, dict(new(0.9, 0.9, 0.9, 0.9), samples=50))
    fake_checkpoint(tmp_path / "shapes.pt", "betavae", 0, new(0.25, 0.2, 0.5, 0.01), data="shapes")
    torch.save({"format": "disentangle-checkpoint-1", "config": {"dataset_size": 100}, "step": 3},
               tmp_path / "running.pt")
    (tmp_path / "junk.pt").write_bytes(os.urandom(200))

    assert reproduce.main(["table", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[0] == ("| data | objective | settings | seeds | mig_gaussian | mig_discrete | "
                        "dci.disentanglement | sap_score |")
    assert table[2:] == [
        "| shapes | beta-VAE | beta 6 | 1 | 0.250 [0.250, 0.250] | 0.200 [0.200, 0.200] | "
        "0.500 [0.500, 0.500] | 0.010 [0.010, 0.010] |",
        "| sprites | VAE |  | 2 | 0.100 [0.050, 0.150] | 0.100 [0.100, 0.100] | "
        "0.500 [0.500, 0.500] | 0.010 [0.010, 0.010] |",
        "| sprites | beta-TCVAE | beta 2 | 2 | 0.400 [0.200, 0.600] | 0.200 [0.100, 0.300] |  |  |",
        "| sprites | beta-TCVAE | beta 6 | 3 | 0.300 [0.100, 0.500] | 0.200 [0.000, 0.400] | "
        "0.800 [0.700, 0.900] | 0.050 [0.040, 0.060] (2 seeds) |"]
    report = json.loads((tmp_path / "table.json").read_text())
    assert sorted(report["not_counted"]) == ["junk.pt", "running.pt", "subset.pt", "vae-1z-copy.pt"]
    tc6 = report["rows"][3]
    assert tc6["seeds"] == [0, 1, 2] and tc6["checkpoints"] == ["tc6-0.pt", "tc6-1.pt", "tc6-2.pt"]
    assert tc6["metrics"]["mig_gaussian"] == {"median": 0.3, "min": 0.1, "max": 0.5,
                                              "values": [0.5, 0.1, 0.3]}
    assert tc6["metrics"]["sap_score"]["values"] == [0.04, None, 0.06]
    for name, colour in (("mig-sprites.png", "#d95f02"), ("mig-shapes.png", "#1b9e77"),
                         ("mig_vs_beta-sprites.png", "#1b9e77")):
        with Image.open(tmp_path / name) as image:
            rgb = tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
            colours = {colour for _, colour in image.convert("RGB").getcolors(1 << 20)}
            assert image.width > 200 and image.height > 200 and rgb in colours
    assert not (tmp_path / "mig_vs_beta-shapes.png").exists()  # one beta there: no curve


def test_study_state_and_table_errors(tmp_path, capsys):
    assert reproduce.run_state(str(tmp_path / "none.pt")) == "missing"
    fake_checkpoint(tmp_path / "unlabelled.pt", "vae", 0, {"step": 5000})  # nothing to measure
    assert reproduce.run_state(str(tmp_path / "unlabelled.pt")) == "finished"
    (tmp_path / "empty").mkdir()
    assert reproduce.main(["table", "--out", str(tmp_path / "empty")]) == 1
    assert reproduce.main(["table", "--out", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert "no finished checkpoints" in err[0] and "nowhere: no such folder" in err[1]


def test_checkpoint_save_over_the_size_limit_is_one_error_and_leaves_nothing(tmp_path):
    # a file-size limit stands in for a full disk: torch.save straight into the file would raise
    # torch's own 'unexpected pos' RuntimeError; the checkpoint must be a WriteError naming it
    code = f"""
import resource, signal, sys, torch
sys.path.insert(0, {HERE!r})
import data, runtime
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    runtime.save_checkpoint({str(tmp_path / "ckpt.pt")!r}, {{"weights": torch.zeros(100_000)}})
except data.WriteError as error:
    print("WriteError", error)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("WriteError") and "ckpt.pt" in result.stdout
    assert os.listdir(tmp_path) == []


def test_study_on_unlabelled_data_runs_and_tables_without_mig_figures(tmp_path):
    # celebA-like data has no factors: the table has its rows and says why there is no MIG figure
    images = np.random.default_rng(0).integers(0, 256, (16, 64, 64, 1), dtype=np.uint8)
    np.savez(tmp_path / "plain.npz", images=images)
    out = str(tmp_path / "study")
    argv = ["run", "--data", str(tmp_path / "plain.npz"), "--models", "vae", "--seeds", "0",
            "--steps", "2", "--out", out, "--", "--device", "cpu", "--batch-size", "8",
            "--latents", "3"]
    result = run_reproduce(*argv)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "(no MIG figures: the data has no factors)" in result.stdout
    table = open(os.path.join(out, "table.md")).read().splitlines()
    assert len(table) == 3 and table[2].startswith("| plain |")  # header, rule, the one run
    assert not [name for name in os.listdir(out) if name.startswith("mig-")]


def test_study_datasets_with_one_file_stem_are_two_runs(tmp_path):
    # d1/x.npz and d2/x.npz share the label 'x'; their real paths must keep the runs apart
    for folder, count in (("d1", 16), ("d2", 24)):
        os.makedirs(tmp_path / folder)
        images = np.zeros((count, 64, 64, 1), dtype=np.uint8)
        np.savez(tmp_path / folder / "x.npz", images=images)
    first, second = (str(tmp_path / folder / "x.npz") for folder in ("d1", "d2"))
    runs = study_grid("--data", first, second, "--models", "vae", "--seeds", "0")
    assert len(runs) == 2 and runs[0]["out"] != runs[1]["out"]
    assert all(os.path.basename(run["out"]).startswith("x-vae-seed0-5000-") for run in runs)
    assert study_grid("--data", first, "--models", "vae", "--seeds", "0")[0]["out"] == runs[0]["out"]


def test_sbatch_values_with_blanks_are_double_quoted():
    assert reproduce.sbatch_quote("/my runs/logs/%x-%A_%a.log") == '"/my runs/logs/%x-%A_%a.log"'
    assert reproduce.sbatch_quote("/runs/logs/x.log") == "/runs/logs/x.log"
    assert reproduce.sbatch_quote(4) == "4"
    with pytest.raises(runtime.ArgumentError, match="double quote"):
        reproduce.sbatch_quote('a"b')


# the study table's codes, UDR, table.csv and disentanglement_lib-named results

def udr_checkpoint(path, model, seed, weights_seed, mig=None, data_name=STUDY_DATA):
    """A finished checkpoint of a 3-latent conv net on 48 images, with real untrained weights
    (torch seed `weights_seed`; the last encoder layer scaled by 30 so its latents are active) and,
    with `mig`, final metrics: both MIGs, dcimig, irs and downstream (None: unlabelled data)."""
    config = {**runtime.CONFIG_DEFAULTS, "model": model, "arch": "conv", "latents": 3, "channels": 1,
              "size": 64, "data": data_name, "batch_size": 8, "lr": 1e-3, "steps": 2, "recon": "bce",
              "dataset_size": 48, "seed": seed, "factor_names": [] if mig is None else ["shape", "scale"]}
    torch.manual_seed(weights_seed)
    net = runtime.build_model(config)
    with torch.no_grad():
        net.encoder[13].weight.mul_(30)
    scores = {} if mig is None else {
        "mig_gaussian": {"mig": mig, "gaps": [mig, 0.0]}, "mig_discrete": {"mig": mig / 2},
        "dcimig": {"dcimig": mig / 4, "gaps": [0.1]}, "irs": {"score": 0.5},
        "downstream": {"sample_efficiency": 0.75, "mean_test_accuracy": [0.4, 0.5]}}
    final = {"step": 2, "samples": 48,
             "metrics": {name: dict(result, protocol="exact") for name, result in scores.items()}}
    runtime.save_checkpoint(str(path), {"format": runtime.CHECKPOINT_FORMAT, "config": config, "step": 2,
                                        "model": net.state_dict(), "optimizer": {}, "final": final})


def udr_study(folder):
    """betatc seeds 0 and 1 with the same weights, vae seeds 0 and 1 with others: {file: MIG}."""
    migs = {"tc-0.pt": 0.3, "tc-1.pt": 0.1, "vae-0.pt": 0.2, "vae-1.pt": 0.4}
    for (file, mig), weights in zip(migs.items(), (0, 0, 1, 2)):
        udr_checkpoint(folder / file, "betatc" if file.startswith("tc") else "vae",
                       int(file[-4]), weights, mig)
    return migs


def test_study_table_stores_codes_of_one_fixed_sample_and_scores_udr(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(reproduce, "CODE_ROWS", 20)  # 20 of the 48 images: a drawn sample
    migs = udr_study(tmp_path)
    assert reproduce.main(["table", "--out", str(tmp_path)]) == 0
    assert "stored the codes of a fixed sample" in capsys.readouterr().out
    dataset = data.load(STUDY_DATA)
    codes = {file: dict(np.load(tmp_path / file.replace(".pt", ".codes.npz"))) for file in migs}
    rows = codes["tc-0.pt"]["rows"]
    assert len(rows) == 20 == len(np.unique(rows)) and np.all(np.diff(rows) > 0) and rows.max() < 48
    for file, stored in codes.items():  # every run, whatever its seed, encoded the same images
        assert np.array_equal(stored["rows"], rows)
        assert str(stored["fingerprint"]) == runtime.data_fingerprint(dataset)
        model = runtime.model_from_checkpoint(load(str(tmp_path / file))).eval()
        with torch.no_grad():
            mu, logvar = (t.double().numpy() for t in model.encode(runtime.to_float(
                torch.from_numpy(dataset.images[rows]))))
        assert stored["mu"].shape == (20, 3) and np.allclose(stored["mu"], mu, atol=1e-5)
        kl = np.mean(0.5 * (mu ** 2 + np.exp(logvar) - 1 - logvar), axis=0)
        assert np.allclose(stored["kl"], kl, rtol=1e-4) and kl.max() > 0.01  # active latents
    expected = metrics.udr([codes[file]["mu"] for file in migs], [codes[file]["kl"] for file in migs])
    expected = dict(zip(migs, expected["scores"]))
    assert expected["tc-0.pt"] == expected["tc-1.pt"] and max(expected.values()) > 0
    report = json.loads((tmp_path / "table.json").read_text())
    for row in report["rows"]:
        for file, value in zip(row["checkpoints"], row["metrics"]["udr"]["values"]):
            assert value == pytest.approx(expected[file], abs=1e-12)
    header = (tmp_path / "table.md").read_text().splitlines()[0]
    assert header.startswith("| data | objective | settings | seeds | mig_gaussian | mig_discrete | udr |")
    assert all(f"| {name} |" in header for name in ("dcimig", "irs", "downstream.sample_efficiency"))
    ranking = (tmp_path / "ranking.md").read_text()
    by_udr = sorted(migs, key=lambda file: -expected[file])
    assert f"| 1 | {by_udr[0]} | {expected[by_udr[0]]:.3f} | vae-1.pt | 0.400 |" in ranking
    assert "Spearman rank correlation of UDR and mig_gaussian over the 4 runs: " in ranking

    # a second table reuses the codes; a run trained again (other weights) is encoded again
    before = {file: os.stat(tmp_path / file.replace(".pt", ".codes.npz")).st_mtime_ns for file in migs}
    udr_checkpoint(tmp_path / "vae-1.pt", "vae", 1, 3, 0.4)
    assert reproduce.main(["table", "--out", str(tmp_path)]) == 0
    after = {file: os.stat(tmp_path / file.replace(".pt", ".codes.npz")).st_mtime_ns for file in migs}
    assert [file for file in migs if after[file] != before[file]] == ["vae-1.pt"]
    again = np.load(tmp_path / "vae-1.codes.npz")
    assert np.array_equal(again["rows"], rows) and not np.allclose(again["mu"], codes["vae-1.pt"]["mu"])


def test_study_table_csv_has_a_row_per_run_and_dlib_named_results(tmp_path):
    migs = udr_study(tmp_path)
    assert reproduce.main(["table", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "table.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert sorted(row["checkpoint"] for row in table) == sorted(migs)
    for row in table:
        config = load(str(tmp_path / row["checkpoint"]))["config"]
        assert row["model"] == config["model"] and int(row["seed"]) == config["seed"]
        assert float(row["lr"]) == 1e-3 and int(row["latents"]) == 3 and row["gamma"] == ""
        assert json.loads(row["factor_names"]) == ["shape", "scale"]
        assert float(row["mig_gaussian"]) == migs[row["checkpoint"]]
        assert float(row["dcimig"]) == migs[row["checkpoint"]] / 4 and float(row["irs"]) == 0.5
        assert float(row["downstream.sample_efficiency"]) == 0.75 and 0 <= float(row["udr"]) <= 1
    for file, mig in migs.items():
        results = json.loads((tmp_path / file.replace(".pt", ".dlib.json")).read_text())
        assert results == {"gaussian_mig": mig, "discrete_mig": mig / 2, "dcimig": mig / 4, "irs": 0.5,
                           "downstream_sample_efficiency": 0.75, "protocol": "exact"}


def test_study_rank_correlation_and_ranking_against_hand_computed_values():
    # ranks (4, 2, 3, 1) and (3, 4, 2, 1): d^2 sums to 6, rho = 1 - 6 * 6 / (4 * 15) = 0.4
    assert reproduce.spearman([0.9, 0.5, 0.7, 0.1], [0.3, 0.4, 0.2, 0.1]) == pytest.approx(0.4)
    # ties share their mean rank: (1, 2.5, 2.5, 4) against (1, 2, 3, 4) correlate 4.5 / sqrt(4.5 * 5)
    assert reproduce.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(3 / math.sqrt(10))
    assert math.isnan(reproduce.spearman([1, 1, 1], [1, 2, 3]))

    def runs(udrs, migs, factor_names=("shape",)):
        return [{"file": f"r{i}.pt", "config": {"factor_names": list(factor_names)},
                 "metrics": {"udr": u, **({"mig_gaussian": m} if m is not None else {})}}
                for i, (u, m) in enumerate(zip(udrs, migs))]

    lines, entry = reproduce.ranking(runs([0.9, 0.5, 0.7, 0.1], [0.3, 0.4, 0.2, 0.1]), "sprites")
    assert lines[4] == "| 1 | r0.pt | 0.900 | r1.pt | 0.400 |"
    assert lines[-1] == ("Spearman rank correlation of UDR and mig_gaussian over the 4 runs: 0.400. UDR's "
                         "top run (r0.pt) is number 2 by mig_gaussian: in its top three.")
    assert entry["spearman"] == pytest.approx(0.4) and entry["udr_top_run_mig_rank"] == 2
    # MIG ranks (1, 4, 2, 3): d^2 sums to 9 + 4 + 1 + 4 = 18, rho = 1 - 6 * 18 / 60 = -0.8
    lines, _ = reproduce.ranking(runs([0.9, 0.5, 0.7, 0.1], [0.1, 0.4, 0.2, 0.3]), "sprites")
    assert lines[-1].endswith("runs: -0.800. UDR's top run (r0.pt) is number 4 by mig_gaussian: not in its "
                              "top three.")
    lines, entry = reproduce.ranking(runs([0.2, 0.6], [None, None], ()), "celeba")
    assert lines[-1] == "No ranking by MIG: the data has no factors."
    assert entry["by_udr"] == [("r1.pt", 0.6), ("r0.pt", 0.2)]


def test_study_table_ranks_unlabelled_runs_by_udr_alone(tmp_path, capsys):
    images = np.random.default_rng(0).integers(0, 256, (48, 64, 64, 1), dtype=np.uint8)
    np.savez(tmp_path / "plain.npz", images=images)
    for seed in (0, 1):
        udr_checkpoint(tmp_path / f"vae-{seed}.pt", "vae", seed, seed, data_name=str(tmp_path / "plain.npz"))
    assert reproduce.main(["table", "--out", str(tmp_path)]) == 0
    assert "No ranking by MIG: the data has no factors." in capsys.readouterr().out
    header, _, row = (tmp_path / "table.md").read_text().splitlines()
    assert header.endswith("| seeds | udr |") and row.startswith("| plain | VAE |")
    assert json.loads((tmp_path / "vae-0.dlib.json").read_text()) == {}  # no metric measured
