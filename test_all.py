"""The test suite: pytest test_all.py (a few minutes on 2 CPU cores, no downloads, no GPU)."""
import colorsys
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
import zipfile
from collections import Counter

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
    assert 12 <= w <= 18  # heart ~15 px across
    centres = [extent(im[0, 5, 0, x, 0])[2:] for x in range(8)]
    cols = [c for _, c in centres]
    assert abs(cols[0] - 16) <= 1 and abs(cols[-1] - 48) <= 1 and np.all(np.diff(cols) > 0)
    assert len({r for r, _ in centres}) == 1  # posX leaves the rows alone
    rows = [extent(im[0, 5, 0, 0, y])[2] for y in range(8)]
    assert abs(rows[0] - 16) <= 1 and abs(rows[-1] - 48) <= 1 and np.all(np.diff(rows) > 0)


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
    with pytest.raises(DataError, match="number"):
        data.load("sprites:positions=many")
    with pytest.raises(DataError, match="built-in.*sprites.*must exist"):
        data.load("spritez")
    assert data.load("sprites:positions=1,orientations=1,scales=1,shapes=1").factors.shape == (1, 0)


def test_limit_takes_a_sorted_random_subset():
    full = data.load("sprites:positions=2,orientations=2,scales=2")
    part = data.load("sprites:positions=2,orientations=2,scales=2", limit=10, seed=3)
    rows = np.sort(np.random.default_rng(3).choice(len(full), 10, replace=False))
    assert np.array_equal(part.images, full.images[rows]) and np.array_equal(part.factors, full.factors[rows])
    assert len(data.load("sprites:positions=2,orientations=2,scales=2", limit=10 ** 6)) == len(full)


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


# --------------------------------------------------------------------------------------------
# folders and zips of images

def test_image_folder_zip_and_cache(tmp_path, monkeypatch, capsys):
    images = rng_images(5, 64, 64, 3)
    folder = tmp_path / "pics"
    folder.mkdir()
    for i, im in enumerate(images):
        save_png(folder / f"{i:03d}.png", im)
    (folder / "readme.txt").write_text("ignored")
    ds = data.load(folder)
    assert np.array_equal(ds.images, images) and ds.factors is None
    assert isinstance(ds.images, np.memmap) and os.path.exists(tmp_path / "pics.64x64.npy")

    def no_decoding(*args):
        raise AssertionError("decoded again")
    with monkeypatch.context() as m:
        m.setattr(data, "_decode_image", no_decoding)
        again = data.load(folder)  # the cache, memory-mapped
        assert isinstance(again.images, np.memmap) and np.array_equal(again.images, images)
    with zipfile.ZipFile(tmp_path / "pics.zip", "w") as zf:
        for i, im in enumerate(images[::-1]):  # stored out of order: read sorted by name
            buf = io.BytesIO()
            save_png(buf, im)
            zf.writestr(f"pics/{4 - i:03d}.png", buf.getvalue())
    cache_dir = tmp_path / "elsewhere"
    ds = data.load(tmp_path / "pics.zip", cache_dir=cache_dir)
    assert np.array_equal(ds.images, images) and os.listdir(cache_dir) == ["pics.64x64.npy"]

    (tmp_path / "pics.64x64.npy").write_bytes(b"garbage")  # a corrupt cache is rebuilt
    assert np.array_equal(data.load(folder).images, images)
    np.save(tmp_path / "pics.64x64.npy", images[:3])  # so is one of the wrong shape
    assert np.array_equal(data.load(folder).images, images)
    later = os.path.getmtime(tmp_path / "pics.64x64.npy") + 100
    os.utime(folder, (later, later))  # and one older than its source
    capsys.readouterr()
    assert np.array_equal(data.load(folder).images, images)
    assert "older than its source: rebuilding" in capsys.readouterr().err
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp.npy")]


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
    assert os.path.exists(tmp_path / "img_align_celeba.64x64-crop148.npy")


def test_unreadable_image_is_named(tmp_path):
    (tmp_path / "pics").mkdir()
    save_png(tmp_path / "pics" / "good.png", rng_images(1, 8, 8, 3)[0])
    (tmp_path / "pics" / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="bad.png"):
        data.load(tmp_path / "pics")
    assert not os.path.exists(tmp_path / "pics.64x64.npy")


# --------------------------------------------------------------------------------------------
# MATLAB files and cars3d

def test_read_mat_compressed_fixture():
    path = os.path.join(FIXTURES, "cars", "car_002_mesh.mat")
    im = data._read_mat(path, "im")
    assert im.shape == (16, 16, 3, 24, 4) and im.dtype == np.uint8 and np.array_equal(im, car_im(2))
    assert np.allclose(data._read_mat(path, "mesh"), np.arange(15).reshape(5, 3) / 7)
    with pytest.raises(DataError, match="car_002_mesh.mat.*no variable 'x'"):
        data._read_mat(path, "x")


@pytest.mark.parametrize("order", ["<", ">"])
def test_read_mat_uncompressed_by_hand(order):
    small = np.array([[1, -2], [3, 4]], np.int16)
    counts = np.arange(24).reshape(2, 3, 4) * 10
    raw = mat_v5([("small", small, 10, "i2"), ("counts", counts, 6, "u1")], order)  # double as uint8
    got = data._read_mat(raw, "counts")
    assert got.dtype == np.float64 and np.array_equal(got, counts)
    assert np.array_equal(data._read_mat(raw, "small"), small)


def test_cars3d_folder_tar_and_uncompressed(tmp_path):
    want = expected_cars([car_im(k) for k in (1, 2, 3)])
    ds = data.load(os.path.join(FIXTURES, "cars"), cache_dir=tmp_path / "cache")
    assert ds.factor_names == ["elevation", "azimuth", "object"] and ds.factor_sizes == [4, 24, 3]
    assert ds.factors.tolist() == [list(p) for p in itertools.product(range(4), range(24), range(3))]
    assert np.array_equal(ds.images, want) and isinstance(ds.images, np.memmap)

    with tarfile.open(tmp_path / "nips2015-analogy-data.tar.gz", "w:gz") as tar:
        tar.add(os.path.join(FIXTURES, "cars", "car_003_mesh.mat"), "data/cars/car_003_mesh.mat")
        tar.add(os.path.join(FIXTURES, "make_fixtures.py"), "data/other.py")
        tar.add(os.path.join(FIXTURES, "cars", "car_001_mesh.mat"), "data/cars/car_001_mesh.mat")
    ds = data.load(tmp_path / "nips2015-analogy-data.tar.gz")
    assert np.array_equal(ds.images, expected_cars([car_im(1), car_im(3)]))
    assert os.path.exists(tmp_path / "nips2015-analogy-data.cars3d-64x64.npy")

    (tmp_path / "plain").mkdir()
    for k in (1, 2):
        (tmp_path / "plain" / f"car_{k:03d}_mesh.mat").write_bytes(mat_v5([("im", car_im(k), 9, "u1")]))
    assert np.array_equal(data.load(tmp_path / "plain").images, expected_cars([car_im(1), car_im(2)]))


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
            assert np.array_equal(data._read_mat(bad, "im"), car_im(1))
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


# ----------------------------------------------------------------------------- data: the HDF5 reader

FIX = FIXTURES
_spec = importlib.util.spec_from_file_location("make_h5_fixtures", os.path.join(FIX, "make_h5_fixtures.py"))
mk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mk)  # numpy only at import time; h5py is imported inside its main()
BASIC = ["basic_earliest.h5", "basic_latest.h5"]


def expected():
    out = {}
    for name, (arr, _) in mk.arrays().items():
        out[name] = mk.fill_expected() if name == "fill_chunked" else arr
    return out


def _same(got, want):
    assert isinstance(got, np.ndarray)
    assert got.dtype == want.dtype.newbyteorder("=") and got.dtype.isnative
    assert got.shape == want.shape
    assert np.array_equal(got, want)


@pytest.mark.parametrize("fname", BASIC)
@pytest.mark.parametrize("name", list(expected()))
def test_reads_match(fname, name):
    want = expected()[name]
    with data.H5File(os.path.join(FIX, fname)) as f:
        ds = f[name]
        assert ds.shape == want.shape and ds.dtype == want.dtype.newbyteorder("=")
        _same(ds[()], want)
        if want.ndim == 0:
            return
        n = want.shape[0]
        for key in [slice(None), slice(1, n - 1), slice(n // 2, n + 5), slice(0, n, 3), 0, n - 1, -1, -n,
                    (slice(1, 3), Ellipsis), (Ellipsis, 0), [0, n - 1]]:
            _same(ds[key], want[key])
        if want.ndim >= 2:
            m = want.shape[1]
            for key in [(n - 1, m - 1), (-1, slice(1, m)), (slice(None, None, 2), slice(1, None, 3)), (1, 2, ...)]:
                _same(ds[key], want[key])
        with pytest.raises(IndexError):
            ds[n]


def test_attributes_and_index_kinds():
    with data.H5File(os.path.join(FIX, "basic_latest.h5")) as f:
        assert f["chunked_gzip"].chunks == (7, 4, 3) and f["contig_i32"].chunks is None
        assert f["compact_u8"].chunks is None and f["scalar_f64"].shape == ()
        kinds = {n: f[n]._index for n in ["single_plain", "single_gzip", "implicit", "fa_plain", "fa_paged",
                                          "ea_plain", "ea_gzip", "bt2_plain", "bt2_gzip", "compact_u8"]}
        assert kinds == {"single_plain": "single", "single_gzip": "single", "implicit": "implicit",
                         "fa_plain": "farray", "fa_paged": "farray", "ea_plain": "earray", "ea_gzip": "earray",
                         "bt2_plain": "btree2", "bt2_gzip": "btree2", "compact_u8": "compact"}
    with data.H5File(os.path.join(FIX, "basic_earliest.h5")) as f:
        ds = f["deep_btree"]
        assert ds._index == "btree1" and len(ds._chunkmap()) == 3000
        assert f._readmax(ds._addr, 8)[5] >= 1  # root node level: the tree really is deeper than one node


@pytest.mark.parametrize("fname", BASIC)
def test_groups(fname):
    with data.H5File(os.path.join(FIX, fname)) as f:
        assert "a" in f and "a/b/c/data" in f and "a/b/nope" not in f and "nope" not in f
        assert f["a"]["b"].keys() == ["c"] and f["a/b"]["c/data"].shape == (3, 4)
        assert f["many"].keys() == ["d%02d" % i for i in range(40)]
        for i in (0, 17, 39):
            _same(f["many"]["d%02d" % i][()], np.array([i, i * i], np.int32))
        assert set(f.keys()) == {k.split("/")[0] for k in expected()}
        with pytest.raises(KeyError):
            f["a/b/missing"]


@pytest.mark.parametrize("fname", BASIC)
def test_fill_values(fname):
    with data.H5File(os.path.join(FIX, fname)) as f:
        d = f["fill_chunked"]
        assert len(d._chunkmap()) == 2  # only the two written chunks exist
        assert (d[5:15] == mk.FILL).all() and d[7, 3] == mk.FILL
        _same(f["fill_contig"][1:3], np.full((2, 5), 2.5))


def _flip(tmp_path, fname, name, at):
    src = os.path.join(FIX, fname)
    with data.H5File(src) as f:
        (addr, n, _), = list(f[name]._chunkmap().values())[:1]
    b = bytearray(open(src, "rb").read())
    b[addr + at(n)] ^= 0x5A
    p = tmp_path / fname
    p.write_bytes(bytes(b))
    return p


@pytest.mark.parametrize("fname", BASIC)
def test_fletcher32(tmp_path, fname):
    with data.H5File(os.path.join(FIX, fname)) as f:
        _same(f["fletcher"][()], expected()["fletcher"])
    for name in ["fletcher", "fletcher_gzip"]:
        p = _flip(tmp_path, fname, name, lambda n: n // 3)
        with data.H5File(p) as f, pytest.raises(DataError, match=f"{fname}.*'{name}'.*fletcher32"):
            f[name][()]


def test_fletcher32_matches_plain_loop():
    # HDF5's definition, word by word: 16-bit words with the first byte high, an odd last byte as the
    # high byte, both running sums mod 65535 (the files above also check it against libhdf5's output).
    for n in [0, 1, 5, 6, 1001, 4096]:
        payload = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
        s1 = s2 = 0
        for i in range(0, n, 2):
            s1 = (s1 + (payload[i] << 8 | (payload[i + 1] if i + 1 < n else 0))) % 65535
            s2 = (s2 + s1) % 65535
        assert data._h5_fletcher32(payload) == (s1, s2)


def test_unsupported_filter_and_deflate_corruption(tmp_path):
    with data.H5File(os.path.join(FIX, "lzf.h5")) as f:
        assert f["images"].shape == (4, 4, 4)
        with pytest.raises(DataError, match=r"lzf\.h5: dataset 'images' uses filter 32000 \(lzf\)"):
            f["images"][()]
    p = _flip(tmp_path, "basic_earliest.h5", "chunked_gzip", lambda n: n // 2)
    with data.H5File(p) as f, pytest.raises(DataError, match="chunked_gzip"):
        f["chunked_gzip"][()]


def test_load_dsprites():
    imgs, classes, _ = mk.dsprites_arrays()
    ds = data._load_hdf5(os.path.join(FIX, "dsprites_small.h5"))
    assert ds.name == "dsprites" and ds.factor_names == ["shape", "scale", "orientation", "posX", "posY"]
    assert ds.factor_sizes == [3, 2, 2, 4, 2]
    _same(ds.images, imgs[..., None] * np.uint8(255))
    _same(ds.factors, classes[:, 1:])
    sub = data._load_hdf5(os.path.join(FIX, "dsprites_small.h5"), limit=10, seed=4)
    rows = np.sort(np.random.default_rng(4).choice(len(imgs), 10, replace=False))
    _same(sub.images, imgs[rows][..., None] * np.uint8(255))
    _same(sub.factors, classes[rows, 1:])
    assert sub.factor_sizes == [3, 2, 2, 4, 2]


def test_load_3dshapes():
    images, _, idx = mk.shapes3d_arrays()
    ds = data._load_hdf5(os.path.join(FIX, "3dshapes_small.h5"))
    assert ds.name == "3dshapes" and ds.factor_sizes == [10, 10, 10, 8, 4, 15]
    assert ds.factor_names == ["floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation"]
    _same(ds.images, images)
    _same(ds.factors, idx.astype(np.int64))
    sub = data._load_hdf5(os.path.join(FIX, "3dshapes_small.h5"), limit=7, seed=2)
    rows = np.sort(np.random.default_rng(2).choice(len(images), 7, replace=False))
    _same(sub.images, images[rows])
    _same(sub.factors, idx[rows].astype(np.int64))
    with pytest.raises(DataError, match="3dshapes_offgrid.h5.*scale"):
        data._load_hdf5(os.path.join(FIX, "3dshapes_offgrid.h5"))


def test_load_generic_and_unknown():
    ds = data._load_hdf5(os.path.join(FIX, "generic_images.h5"))
    assert ds.images.shape == (12, 8, 8, 1) and ds.factors.dtype == np.int64 and ds.factor_sizes == [5, 5]
    with pytest.raises(DataError, match=r"unknown\.h5.*foo \(10,\) float64"):
        data._load_hdf5(os.path.join(FIX, "unknown.h5"))
    with pytest.raises(DataError, match="not an HDF5 file"):
        data._load_hdf5(os.path.join(FIX, "make_h5_fixtures.py"))


def _read_all(path):
    with data.H5File(path) as f:
        return {n: d[()] for n, d in data._h5_datasets(f._root).items()}


@pytest.mark.parametrize("fname", ["basic_earliest.h5", "basic_latest.h5", "dsprites_small.h5"])
def test_fuzz_truncate_and_flip(tmp_path, fname):
    src = os.path.join(FIX, fname)
    good, raw = _read_all(src), open(src, "rb").read()
    rng = np.random.default_rng(0)
    p = tmp_path / fname
    for cut in rng.integers(0, len(raw), 30):
        p.write_bytes(raw[:cut])
        try:
            got = _read_all(p)
        except DataError:
            continue
        for n, a in got.items():  # whatever still reads must be exactly right
            assert np.array_equal(a, good[n]) and a.dtype == good[n].dtype
    for at in rng.integers(0, len(raw), 30):
        b = bytearray(raw)
        b[at] ^= 1 << int(rng.integers(8))
        p.write_bytes(bytes(b))
        try:
            got = _read_all(p)  # a flipped raw-raw byte may legitimately change values; only DataError may escape
        except DataError:
            continue
        assert all(isinstance(a, np.ndarray) for a in got.values())


def test_bad_keys():
    with data.H5File(os.path.join(FIX, "basic_latest.h5")) as f:
        ds = f["contig_i32"]
        with pytest.raises(IndexError):
            ds[1, 2, 3]
        with pytest.raises(IndexError):
            ds[::-1]
        with pytest.raises(TypeError):
            ds["x"]


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
    assert 0 <= state["final"]["discrete_mig"]["mig"] <= 1 and state["final"]["samples"] == 384
    model = train.model_from_checkpoint(state)
    assert model(torch.rand(2, 1, 64, 64))[0].shape == (2, 1, 64, 64)


@pytest.mark.parametrize("extra", [["--model", "ae"], ["--model", "betavae", "--capacity", "5"],
                                   ["--model", "betatc", "--estimator", "mss", "--arch", "mlp"]])
def test_every_objective_trains(tmp_path, extra):
    code, out = run_train(tmp_path, *extra)
    assert code == 0 and load(out)["step"] == 6
    assert all(math.isfinite(v) for h in load(out)["history"] for v in h.values())


def test_resume_equals_uninterrupted_bit_for_bit(tmp_path):
    assert run_train(tmp_path, "--steps", "12", name="whole.pt")[0] == 0
    assert run_train(tmp_path, "--steps", "5", name="split.pt")[0] == 0
    assert run_train(tmp_path, "--steps", "12", "--resume", name="split.pt")[0] == 0
    whole, split = load(tmp_path / "whole.pt"), load(tmp_path / "split.pt")
    assert split["step"] == 12
    for key, tensor in whole["model"].items():
        assert torch.equal(tensor, split["model"][key]), key
    for a, b in zip(whole["optimizer"]["state"].values(), split["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


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


def test_traversal_labels_name_the_best_factor_and_mark_collapsed_latents():
    mean_kl = np.array([4.1, 0.004, 0.5])
    mi = np.array([[0.1, 0.82], [0.0, 0.001], [0.3, 0.2]])
    labels = traverse.latent_labels([0, 2, 1], mean_kl, mi, ["shape", "posX"])
    assert labels == ["z0  posX 0.82  KL 4.10", "z2  shape 0.30  KL 0.50", "z1  no factor  KL 0.00  collapsed"]
    assert traverse.latent_labels([1], mean_kl, None, None) == ["z1  KL 0.00  collapsed"]


def test_existing_checkpoint_is_not_overwritten(tmp_path, capsys):
    assert run_train(tmp_path)[0] == 0
    before = (tmp_path / "ckpt.pt").read_bytes()
    assert run_train(tmp_path)[0] == 1
    assert "--resume" in capsys.readouterr().err and (tmp_path / "ckpt.pt").read_bytes() == before
    assert run_train(tmp_path, "--force")[0] == 0


@pytest.mark.parametrize("argv,message", [
    (["--beta", "-1"], "--beta"), (["--batch-size", "1"], "at least 2"), (["--steps", "0"], "--steps"),
    (["--latents", "0"], "--latents"), (["--model", "gan"], "invalid choice"), (["--lr", "0"], "--lr"),
    (["--capacity", "5"], "betavae"), (["--resume", "--force"], "pick one")])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("train.py: error:") or message in err[-1]


def test_resume_rejects_a_different_latent_count(tmp_path, capsys):
    assert run_train(tmp_path)[0] == 0
    with pytest.raises(SystemExit) as exit_info:
        run_train(tmp_path, "--resume", "--latents", "4", "--steps", "8")
    assert exit_info.value.code == 2 and "latents" in capsys.readouterr().err


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
    train.save_checkpoint(path, {"format": train.CHECKPOINT_FORMAT, "step": 1})

    def crash(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        train.save_checkpoint(path, {"step": 2})
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
        with pytest.raises(train.UserError, match=name):
            train.load_checkpoint(str(tmp_path / name))
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


# ----------------------------------------------------------------------------- traverse

def test_traverse_writes_grids_and_mig_matching_metrics(tmp_path):
    code, out = run_train(tmp_path, "--steps", "20")
    assert code == 0
    assert traverse.main([out, "--out", str(tmp_path / "grids"), "--mig", "--steps", "7"]) == 0
    for name in ("traversal", "reconstructions", "samples", "mi"):
        with Image.open(tmp_path / "grids" / f"{name}.png") as image:
            image.load()
            assert image.width > 100 and image.height > 100
    with Image.open(tmp_path / "grids" / "traversal.png") as image:  # 10 rows of 64 px, 7 columns
        assert image.height == 10 * 66 + 2 and image.width >= 7 * 66 + 2
    report = json.loads((tmp_path / "grids" / "metrics.json").read_text())
    state = load(out)
    dataset = data.load(TINY)
    mu, logvar = train.encode_dataset(train.model_from_checkpoint(state),
                                      train.ImageSource(dataset.images, torch.device("cpu")))
    assert report["discrete"]["mig"] == pytest.approx(metrics.discrete_mig(mu, dataset.factors)["mig"], abs=1e-9)
    assert report["gaussian"]["mig"] == pytest.approx(
        metrics.gaussian_mig(mu, logvar, dataset.factors)["mig"], abs=1e-9)


def test_traverse_rejects_a_foreign_file(tmp_path, capsys):
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    assert traverse.main([str(tmp_path / "x.pt")]) == 1
    assert "x.pt" in capsys.readouterr().err
