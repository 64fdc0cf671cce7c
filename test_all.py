"""The test suite: pytest test_all.py (a few minutes on 2 CPU cores, no downloads, no GPU)."""
import json
import math
import os
import signal
import subprocess
import sys
import time
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
    real = losses.objective

    def poisoned(*args, step=0, **kwargs):
        loss, terms = real(*args, step=step, **kwargs)
        return (loss * float("nan"), terms) if step == 3 else (loss, terms)

    monkeypatch.setattr(losses, "objective", poisoned)
    code, out = run_train(tmp_path, "--steps", "8")
    assert code == 1 and load(out)["step"] == 3
    assert "step 4" in capsys.readouterr().err
    code, out = run_train(tmp_path, "--steps", "8", "--skip-nonfinite", name="skip.pt")
    assert code == 0 and load(out)["step"] == 8 and load(out)["skipped"] == 1


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
