"""The test suite: pytest test_all.py (a few minutes on 2 CPU cores, no downloads, no GPU)."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
import losses
import metrics
import models
import train
import traverse

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
def test_tc_gradients_match_autograd_reference(estimator):
    z, mu, logvar = (torch.tensor(a, requires_grad=True) for a in random_posterior(6, 3, seed=1))
    log_w = losses.log_importance_weights(6, 50, estimator).double()
    log_w = log_w[0, 0] if estimator == "mws" else log_w
    assert torch.autograd.gradcheck(
        lambda a, b, c: losses._BatchLogDensities.apply(a, b, c, log_w), (z, mu, logvar))


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


@pytest.mark.parametrize("name", losses.OBJECTIVES)
@pytest.mark.parametrize("estimator", ["mws", "mss"])
def test_objectives_match_reference(name, estimator):
    rng = np.random.default_rng(3)
    z, mu, logvar = random_posterior(10, 4, seed=3)
    logits, x = rng.normal(size=(10, 1, 8, 8)), (rng.random((10, 1, 8, 8)) > 0.5).astype(float)
    p = 1 / (1 + np.exp(-logits))
    recon = -(x * np.log(p) + (1 - x) * np.log(1 - p)).reshape(10, -1).sum(1)
    kl = (0.5 * (mu ** 2 + np.exp(logvar) - 1 - logvar)).sum(1)
    mi, tc, dwkl = reference_tc(z, mu, logvar, 500, estimator)
    beta, alpha, gamma = 3.0, 0.5, 2.0
    expected = {"ae": recon.mean(), "vae": (recon + kl).mean(), "betavae": (recon + beta * kl).mean(),
                "betatc": (recon + alpha * mi + beta * tc + gamma * dwkl).mean()}[name]
    t = [torch.tensor(a) for a in (x, logits, mu, logvar, z)]
    loss, terms = losses.objective(name, *t, beta=beta, alpha=alpha, gamma=gamma, dataset_size=500,
                                   estimator=estimator)
    assert loss.dtype == torch.float32 and abs(loss.item() - expected) < 1e-4 * max(1, abs(expected))
    assert abs(terms["recon"] - recon.mean()) < 1e-3 and abs(terms["kl"] - kl.mean()) < 1e-4
    if name == "betatc":
        assert abs(terms["tc"] - tc.mean()) < 1e-4 and abs(terms["mi"] - mi.mean()) < 1e-4


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


def test_losses_are_float32_under_autocast():
    z, mu, logvar = (torch.tensor(a, dtype=torch.bfloat16) for a in random_posterior(8, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = losses.objective("betatc", torch.rand(8, 1, 4, 4), torch.zeros(8, 1, 4, 4,
                                   dtype=torch.bfloat16), mu, logvar, z, dataset_size=100)
    assert loss.dtype == torch.float32


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
    log_w = losses.log_importance_weights(6, 100, estimator).double()
    log_w = log_w[0, 0] if estimator == "mws" else log_w
    assert torch.autograd.gradcheck(lambda a, b, c: losses._BatchLogDensities.apply(a, b, c, log_w),
                                    (z, mu, logvar))
