"""The four autoencoder objectives and their terms. Needs torch only.

    loss, terms = objective("betatc", x, logits, mu, logvar, z, beta=6, dataset_size=len(data))

Every term is returned per sample, shape (B,) or (B, D); `objective` averages over the batch.
  ae       recon                                   (plain autoencoder)
  vae      recon + KL                              (Kingma & Welling 2014)
  betavae  recon + beta KL                         (Higgins et al. 2017)
           recon + gamma |KL - C(step)|            (Burgess et al. 2018, with `capacity`)
  betatc   recon + alpha MI + beta TC + gamma DWKL (Chen et al. 2018)
All losses are computed in float32, also when the model runs under autocast.
With the minibatch-weighted estimator (mws, Chen et al.'s w = 1/(B N)) the logged mi, tc and dwkl
carry constant offsets (tc: +(D-1) log N); they do not change the gradients. mss weights sum to 1.
"""
import math

import torch
import torch.nn.functional as F

OBJECTIVES = ("ae", "vae", "betavae", "betatc")
LOG_2PI = math.log(2 * math.pi)


def recon_loss(logits, x, kind="bce"):
    """Reconstruction loss summed over pixels, (B,). bce: Bernoulli with logits; mse: sigmoid(logits)."""
    logits, x = logits.float(), x.float()
    if kind == "bce":
        per_pixel = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    elif kind == "mse":
        per_pixel = (torch.sigmoid(logits) - x) ** 2
    else:
        raise ValueError(f"unknown reconstruction loss {kind!r}; choose bce or mse")
    return per_pixel.flatten(1).sum(1)


def kl_normal(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, 1)) per dimension, (B, D)."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu * mu + logvar.exp() - 1 - logvar)


def log_normal(x, mu, logvar):
    return -0.5 * (LOG_2PI + logvar + (x - mu) ** 2 * torch.exp(-logvar))


def log_importance_weights(batch_size, dataset_size, estimator):
    """log w (B, B): how sample j of the batch stands in for the dataset when estimating q(z_i)."""
    if estimator == "mws":
        return torch.full((batch_size, batch_size), -math.log(batch_size * dataset_size))
    if estimator != "mss":
        raise ValueError(f"unknown estimator {estimator!r}; choose mws or mss")
    if batch_size < 2:
        raise ValueError("the mss estimator needs a batch of at least 2")
    m = batch_size - 1  # the other samples stand in for the N - 1 other data points
    weights = torch.full((batch_size, batch_size), 1.0 / m, dtype=torch.float64)
    index = torch.arange(batch_size)
    weights[index, index] = 1.0 / dataset_size
    weights[index, (index + 1) % batch_size] = (dataset_size - m) / (dataset_size * m)
    return weights.log().float()


class _BatchLogDensities(torch.autograd.Function):
    """log q(z_i) and sum_d log q(z_i,d) from the B x B x D matrix L[i,j,d] = log q(z_i,d | x_j).

    One D x B x B buffer holds exp(L - shift) for the dimension-wise marginals; the joint needs
    only a B x B sum. Each shift is a per-dimension bound on L (the Gaussian's peak), so exp
    cannot overflow and no row maximum is needed; a row that underflows is redone exactly.
    Backward reads the buffer and recomputes z_i - mu_j one B x B dimension at a time.
    """

    @staticmethod
    def forward(ctx, z, mu, logvar, log_w):
        inv_var, peak = torch.exp(-logvar), -0.5 * (LOG_2PI + logvar)  # (B, D), indexed by j
        shift = peak.max(0).values                                         # (D,): L[:, :, d] <= shift[d]
        buffer = z.t()[:, :, None] - mu.t()[:, None, :]                    # (D, B_i, B_j): z_i - mu_j
        buffer.square_().mul_(-0.5 * inv_var.t()[:, None, :]).add_((peak - shift).t()[:, None, :])
        joint = buffer.sum(0).add_(log_w + shift.sum())                    # log w_ij + sum_d L[i,j,d]
        log_qz = torch.logsumexp(joint, dim=1)
        if log_w.dim():
            buffer.add_(log_w)
        row_sums = buffer.exp_().sum(2)                                     # (D, B)
        log_offset = shift[:, None].repeat(1, z.shape[0])
        for d in torch.nonzero((row_sums < 1e-30).any(1)).flatten().tolist():
            exact = _log_density_slice(z, mu, logvar, d) - shift[d] + (log_w if log_w.dim() else 0)
            row_max = exact.max(1, keepdim=True).values
            buffer[d] = torch.exp(exact - row_max)
            row_sums[d] = buffer[d].sum(1)
            log_offset[d] += row_max[:, 0]
        log_marginals = row_sums.log() + log_offset + (0 if log_w.dim() else log_w)
        joint_weight = torch.exp(joint - log_qz[:, None])                 # softmax over j
        ctx.save_for_backward(z, mu, inv_var, buffer, row_sums, joint_weight)
        return log_qz, log_marginals.sum(0)

    @staticmethod
    def backward(ctx, grad_qz, grad_prod):
        z, mu, inv_var, buffer, row_sums, joint_weight = ctx.saved_tensors
        joint_weight = joint_weight * grad_qz[:, None]
        row_scale = grad_prod[None, :] / row_sums
        grads = [torch.empty_like(z), torch.empty_like(mu), torch.empty_like(mu)]
        for d in range(z.shape[1]):
            weight = torch.addcmul(joint_weight, buffer[d], row_scale[d, :, None])  # dOut / dL[i,j,d]
            diff = z[:, d, None] - mu[None, :, d]
            weighted_diff = weight * diff
            grads[0][:, d] = -(weighted_diff * inv_var[None, :, d]).sum(1)
            grads[1][:, d] = weighted_diff.sum(0) * inv_var[:, d]
            grads[2][:, d] = 0.5 * ((weighted_diff.mul_(diff)).sum(0) * inv_var[:, d] - weight.sum(0))
        return grads[0], grads[1], grads[2], None


def _log_density_slice(z, mu, logvar, d):
    """L[:, :, d] = log N(z_i,d; mu_j,d, exp(logvar_j,d)), (B, B)."""
    return log_normal(z[:, d, None], mu[None, :, d], logvar[None, :, d])


def tc_terms(z, mu, logvar, dataset_size, estimator="mws"):
    """Index-code MI, total correlation and dimension-wise KL per sample, each (B,) (Chen et al.).

    log q(z_i) = logsumexp_j (log w_ij + sum_d L[i,j,d]) and log prod_d q(z_i,d) =
    sum_d logsumexp_j (log w_ij + L[i,j,d]), with w the minibatch-weighted (mws) or
    minibatch-stratified (mss) sampling weights of `log_importance_weights`.
    """
    z, mu, logvar = z.float(), mu.float(), logvar.float()
    log_w = log_importance_weights(z.shape[0], dataset_size, estimator).to(z.device)
    log_w = log_w[0, 0] if estimator == "mws" else log_w  # a constant: added once, not B x B times
    if dataset_size < z.shape[0]:
        raise ValueError(f"dataset_size {dataset_size} is smaller than the batch {z.shape[0]}")
    with torch.autocast(z.device.type, enabled=False):
        log_qz, log_prod_qzd = _BatchLogDensities.apply(z, mu, logvar, log_w)
        log_qz_given_x = log_normal(z, mu, logvar).sum(1)
        log_pz = log_normal(z, torch.zeros_like(z), torch.zeros_like(z)).sum(1)
    return log_qz_given_x - log_qz, log_qz - log_prod_qzd, log_prod_qzd - log_pz


def capacity_at(step, capacity, capacity_steps):
    """Burgess et al.'s target KL: rises linearly from 0 to `capacity` over `capacity_steps`."""
    return capacity * min(1.0, step / capacity_steps) if capacity_steps > 0 else capacity


def objective(name, x, logits, mu, logvar, z, beta=6.0, alpha=1.0, gamma=None, dataset_size=None,
              recon="bce", estimator="mws", capacity=None, capacity_steps=100_000, step=0):
    """The loss to minimise (batch mean) and a dict of batch-mean floats for logging.

    gamma defaults to 1 (betatc's dimension-wise KL weight) or 1000 (betavae with a capacity).
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    recon_term = recon_loss(logits, x, recon)
    kl = kl_normal(mu, logvar).sum(1)
    terms = {"recon": recon_term.mean(), "kl": kl.mean()}
    if name == "ae":
        loss = recon_term.mean()
    elif name == "vae":
        loss = (recon_term + kl).mean()
    elif name == "betavae" and capacity is None:
        loss = (recon_term + beta * kl).mean()
    elif name == "betavae":
        gamma = 1000.0 if gamma is None else gamma
        target = capacity_at(step, capacity, capacity_steps)
        loss = recon_term.mean() + gamma * (kl.mean() - target).abs()
        terms["capacity"] = torch.tensor(target, device=kl.device)
    else:
        if dataset_size is None:
            raise ValueError("betatc needs dataset_size, the number of images in the dataset")
        gamma = 1.0 if gamma is None else gamma
        mi, tc, dwkl = tc_terms(z, mu, logvar, dataset_size, estimator)
        loss = (recon_term + alpha * mi + beta * tc + gamma * dwkl).mean()
        terms.update(mi=mi.mean(), tc=tc.mean(), dwkl=dwkl.mean())
    values = torch.stack([t.detach().float() for t in terms.values()]).tolist()  # one device sync
    return loss, dict(zip(terms, values))
