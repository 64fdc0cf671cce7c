"""The autoencoder objectives and their terms: seven unsupervised, two weakly supervised. Needs torch only.

    loss, terms = objective("betatc", x, logits, mu, logvar, z, beta=6, dataset_size=len(data))

Every term is returned per sample, shape (B,) or (B, D), except two batch statistics, the DIP-VAE
penalty and the discriminator's loss; `objective` averages over the batch and adds those once.
  ae         recon                                    (plain autoencoder)
  vae        recon + KL                               (Kingma & Welling 2014)
  betavae    recon + beta KL                          (Higgins et al. 2017)
             recon + gamma |KL - C(step)|             (Burgess et al. 2018, with `capacity`)
  betatc     recon + alpha MI + beta TC + gamma DWKL  (Chen et al. 2018)
  factorvae  recon + KL + gamma TC, TC from a discriminator on z  (Kim & Mnih 2018)
  dipvae1    recon + KL + lambda_od sum_{i!=j} C_ij^2 + lambda_d sum_i (C_ii - 1)^2,
             C = Cov[mu(x)] on the batch                          (Kumar et al. 2018)
  dipvae2    the same with C = Cov[mu(x)] + E[diag exp(logvar(x))], the covariance of z under q(z)
  adagvae    recon + beta KL on pairs of images, the latents the pair seems to share aggregated
  mlvae      (Locatello et al. 2020, Ada-GVAE and Ada-ML-VAE; see `aggregate_pair`)
All losses are computed in float32, also when the model runs under autocast. Every log-density is
finite for any finite logvar, forward and backward (see `log_normal`).

FactorVAE trains a second network, the discriminator (models.build_discriminator), with its own
Adam (DISCRIMINATOR_LR, DISCRIMINATOR_BETAS); one training step, as in Kim & Mnih's Algorithm 1:

    logits, mu, logvar, z = model(x)
    loss, terms = objective("factorvae", x, logits, mu, logvar, z, tc_logits=discriminator(z))
    optimizer.zero_grad(); loss.backward(); optimizer.step()         # the VAE's parameters only
    z_joint = z.detach()                                              # no gradient into the encoder
    d_loss = discriminator_loss(discriminator(z_joint), discriminator(permute_dims(z_joint)))
    d_optimizer.zero_grad(); d_loss.backward(); d_optimizer.step()   # clears what loss left there

The VAE step must come first: the discriminator's update changes the weights that tc_logits' graph
holds. Kim & Mnih permute the codes of a second, independent batch; disentanglement_lib (the code
behind Locatello et al.'s study) permutes the same batch's z, as above, which costs no second
encoder pass and no second draw from the data. Both estimate the same TC; we recommend the latter.

Ada-GVAE and ML-VAE (Locatello et al. 2020) train on pairs of images that share some factors of
variation, unsaid which. Both halves of a batch are encoded; the latents whose posteriors differ
least are aggregated (`aggregate_pair`), the codes sampled from the aggregated posteriors:

    mu, logvar = model.encode(x)                  # x: [first images; second images], (2P, C, H, W)
    mu1, logvar1, mu2, logvar2 = aggregate_pair(mu[:P], logvar[:P], mu[P:], logvar[P:], "adagvae")
    z = torch.cat([mu1, mu2]) + torch.randn_like(mu) * torch.cat([logvar1, logvar2]).mul(0.5).exp()
    loss, terms = objective("adagvae", x, model.decode(z), mu, logvar, z, beta=beta)

`objective` takes the encoder's own posteriors and aggregates them again itself (the same
deterministic rule, so the KL it weighs is that of the posteriors z was drawn from).

Where we deliberately differ from published code: the minibatch-stratified (mss) weights put the
sample's own posterior q(z_i|x_i) on the diagonal w_ii = 1/N and the next sample's on
w_i,i+1 = (N - M)/(N M), as Chen et al.'s paper defines them; their reference code (vae_quant.py)
writes 1/N into column 0 and (N - M)/(N M) into column 1 of every row instead, which gives sample
0's posterior the weight 1/N in every row, not the sample's own. Do not "fix" it back.
"""
import math

import torch
import torch.nn.functional as F

OBJECTIVES = ("ae", "vae", "betavae", "betatc", "factorvae", "dipvae1", "dipvae2")
PAIR_OBJECTIVES = ("adagvae", "mlvae")  # weakly supervised: a batch is pairs of images
LOG_2PI = math.log(2 * math.pi)
LOG_2 = math.log(2)

# Kim & Mnih 2018 (Appendix A): the discriminator's Adam; their VAE used lr 1e-4, betas (0.9, 0.999).
DISCRIMINATOR_LR = 1e-4
DISCRIMINATOR_BETAS = (0.5, 0.9)
# gamma 35: Kim & Mnih's 2D Shapes (dSprites) figures; they and Locatello et al. (2019) sweep
# gamma in {10, 20, 30, 40, 50, 100}, and 3D Shapes was shown at other values.
FACTORVAE_GAMMA = 35.0
# lambda_od 10, inside Locatello et al.'s grid {1, 2, 5, 10, 20, 50} for both DIP-VAEs, with Kumar et
# al.'s ratios: lambda_d = 10 lambda_od for DIP-VAE-I (so 100), lambda_d = lambda_od for DIP-VAE-II.
DIP_LAMBDA_OD = 10.0
DIP_DIAGONAL_RATIO = {"dipvae1": 10.0, "dipvae2": 1.0}
# Below this log-variance sigma^(1/2) < e^-87.5: every nonzero float32 difference, scaled by
# 1/sigma, overflows anyway, and zero stays zero, so clamping here changes no result (log_normal).
LOGVAR_FLOOR = -350.0


def recon_loss(logits, x, kind="bce"):
    """Reconstruction loss in nats, summed over pixels: (B, C, H, W) logits and x -> (B,) float32.

    bce: Bernoulli likelihood with logits; mse: squared error of sigmoid(logits) against x in
    [0, 1]. Raises ValueError for another kind.
    """
    logits, x = logits.float(), x.float()
    if kind == "bce":
        per_pixel = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    elif kind == "mse":
        per_pixel = (torch.sigmoid(logits) - x) ** 2
    else:
        raise ValueError(f"unknown reconstruction loss {kind!r}; choose bce or mse")
    return per_pixel.flatten(1).sum(1)


def kl_normal(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, 1)) in nats per dimension: (B, D) -> (B, D) float32."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu * mu + logvar.exp() - 1 - logvar)


def _inverse_root_std(logvar):
    """sigma^(-1/2) = exp(-logvar / 4), finite for any finite logvar (clamped at LOGVAR_FLOOR).

    (x - mu) * s * s is (x - mu) / sigma without an intermediate overflow: both factors stay
    below e^87.5, so 0 * s * s is 0, where (x - mu)^2 * exp(-logvar) is 0 * inf = NaN once
    logvar < -88.7 in float32.
    """
    return torch.exp(-0.25 * logvar.clamp(min=LOGVAR_FLOOR))


def log_normal(x, mu, logvar):
    """log N(x; mu, exp(logvar)) in nats, elementwise with broadcasting, in the inputs' dtype.

    Finite, forward and backward, for any finite logvar wherever the float64 value lies in the
    dtype's range (x == mu at logvar -200 gives -0.5 (log 2 pi - 200), not NaN).
    """
    root = _inverse_root_std(logvar)
    scaled = (x - mu) * root * root  # (x - mu) / sigma
    return -0.5 * (LOG_2PI + logvar + scaled * scaled)


def log_importance_weights(batch_size, dataset_size, estimator):
    """log w (B, B) float32: how sample j of the batch stands in for the dataset when estimating q(z_i).

    mws: Chen et al.'s minibatch-weighted sampling, w_ij = 1/(B N) (rows sum to 1/N). mss: their
    minibatch-stratified sampling, rows sum to 1: w_ii = 1/N (the sample's own posterior),
    w_i,i+1 = (N - M)/(N M), the others 1/M, with M = B - 1 (see the module docstring on where
    this differs from their code). Raises ValueError for another estimator or, for mss, B < 2.
    """
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


# Rows of the B x B matrices that _BatchLogDensities handles at once on the CPU: a block of 2^19
# elements (2 MB in float32, 1 MB per core on two) stays in cache through the dozen passes made
# over it, where the whole matrix (16 MB at B = 2048, D of them) would go to memory and back on
# each pass. Measured at B = 2048 on a 2-core EPYC: 2^19 the fastest of 2^16 .. 2^20, whole
# matrices 1.6x slower.
BLOCK_ELEMENTS = 2**19


def _row_blocks(batch_size, device):
    """Slices of rows that cover range(batch_size): blocks of BLOCK_ELEMENTS // B rows on the CPU,
    one block on a GPU (whose launches cost more than its memory traffic)."""
    rows = batch_size if device.type != "cpu" else max(1, BLOCK_ELEMENTS // batch_size)
    return [slice(start, min(start + rows, batch_size)) for start in range(0, batch_size, rows)]


class _BatchLogDensities(torch.autograd.Function):
    """log q(z_i) and sum_d log q(z_i,d) from the B x B x D matrix L[i,j,d] = log q(z_i,d | x_j).

    L is never held whole: it is formed for one block of rows i (`_row_blocks`) and one
    dimension d at a time, in the same few scratch matrices (a new one every time would cost its
    page faults), forward and again in backward (cheaper than keeping B x B x D floats). Each
    block adds L[:, :, d] to the block's joint log-density and sums exp(L[i, :, d] - shift[d])
    over j for the dimension-wise marginals; shift[d] is the Gaussians' highest peak in
    dimension d, a bound on L, so exp cannot overflow and no row maximum is needed. A block whose
    row sums underflow is redone with each row's maximum subtracted. (z_i - mu_j) / sigma_j is
    formed as (z_i - mu_j) * r_j * r_j with r = _inverse_root_std, so no product is ever 0 * inf,
    in the forward or the backward.
    """

    @staticmethod
    def forward(ctx, z, mu, logvar, log_w):
        batch, dims = z.shape
        z_t, mu_t = z.t().contiguous(), mu.t().contiguous()    # (D, B): a row per dimension
        root_t = _inverse_root_std(logvar).t().contiguous()
        peak = -0.5 * (LOG_2PI + logvar)
        shift = peak.max(0).values                             # (D,): L[:, :, d] <= shift[d]
        peak_t = (peak - shift).t().contiguous()
        joint_offset = log_w + shift.sum()
        joint_weight = z.new_empty(batch, batch)               # the joint, then its softmax over j
        row_sums = z.new_empty(dims, batch)
        row_max = z.new_zeros(dims, batch)                     # subtracted in underflowed blocks
        redone = set()
        blocks = _row_blocks(batch, z.device)
        scratch = z.new_empty(2, blocks[0].stop, batch)
        for block, rows in enumerate(blocks):
            joint = joint_weight[rows]
            shifted, exp = scratch[:, :len(joint)]
            for d in range(dims):
                _shifted_log_density(z_t, mu_t, root_t, peak_t, log_w, rows, d, shifted, joint)
                torch.sum(_exp_normal(shifted, exp), 1, out=row_sums[d, rows])
                if (row_sums[d, rows] < 1e-30).any():          # exp underflowed: redo exactly
                    torch.amax(shifted, 1, out=row_max[d, rows])
                    shifted.sub_(row_max[d, rows, None])
                    torch.sum(_exp_normal(shifted, exp), 1, out=row_sums[d, rows])
                    redone.add((block, d))
            joint.add_(joint_offset[rows] if log_w.dim() else joint_offset)
        log_qz = _logsumexp_rows(joint_weight)
        joint_weight = _exp_normal(joint_weight.sub_(log_qz[:, None]))  # softmax over j
        log_marginals = row_sums.log() + row_max + shift[:, None] + (0 if log_w.dim() else log_w)
        ctx.redone = redone
        ctx.save_for_backward(z_t, mu_t, root_t, peak_t, log_w, joint_weight, row_sums, row_max)
        return log_qz, log_marginals.sum(0)

    @staticmethod
    def backward(ctx, grad_qz, grad_prod):
        z_t, mu_t, root_t, peak_t, log_w, joint_weight, row_sums, row_max = ctx.saved_tensors
        row_scale = grad_prod[None, :] / row_sums
        grad_z = torch.empty_like(z_t)
        column_sums = z_t.new_zeros(3, *z_t.shape)             # over i, for mu and logvar
        blocks = _row_blocks(z_t.shape[1], z_t.device)
        scratch = z_t.new_empty(4, blocks[0].stop, z_t.shape[1])
        for block, rows in enumerate(blocks):
            joint = joint_weight[rows] * grad_qz[rows, None]
            density, weight, diff, weighted = scratch[:, :len(joint)]
            for d in range(len(z_t)):
                _shifted_log_density(z_t, mu_t, root_t, peak_t, log_w, rows, d, density)
                if (block, d) in ctx.redone:
                    density.sub_(row_max[d, rows, None])
                _exp_normal(density, density)
                torch.addcmul(joint, density, row_scale[d, rows, None], out=weight)  # dOut/dL
                r = root_t[d]
                torch.sub(z_t[d, rows, None], mu_t[d], out=diff)
                torch.mul(weight, diff, out=weighted).mul_(r).mul_(r)  # W_ij (z_i - mu_j) / s_j
                grad_z[d, rows] = -torch.mul(weighted, r, out=density).mul_(r).sum(1)
                column_sums[0, d] += weighted.sum(0)
                column_sums[1, d] += weighted.mul_(diff).mul_(r).mul_(r).sum(0)
                column_sums[2, d] += weight.sum(0)
        grad_mu = column_sums[0] * root_t * root_t             # sum_i W_ij (z_i - mu_j) / var_j
        # column_sums[1]: sum_i W_ij (z_i - mu_j)^2 / var_j; [2]: sum_i W_ij
        grad_logvar = 0.5 * (column_sums[1] - column_sums[2])
        return grad_z.t(), grad_mu.t(), grad_logvar.t(), None


def _exp_normal(x, out=None):
    """exp(x) (into `out`, which may be x), 0 where that is below 1.002 times the smallest normal
    float (where torch.set_flush_denormal(True), which train.py sets, gives 0, and a hair above):
    the CPU's exp takes a path 10-100x slower for every x below log(tiny), -87.3 in float32, and
    most of the estimator's terms lie far below it, so x is clamped above it first."""
    log_tiny = math.log(torch.finfo(x.dtype).tiny)
    out = torch.clamp(x, min=log_tiny + 0.001, out=out).exp_()
    return F.threshold_(out, math.exp(log_tiny + 0.002), 0.0)


def _logsumexp_rows(x):
    """torch.logsumexp(x, dim=1) of a (B, B) matrix, its exp through _exp_normal."""
    top = x.max(1, keepdim=True).values
    top.masked_fill_(top.isinf(), 0.0)  # a row of -inf gives -inf, as torch.logsumexp does
    return _exp_normal(x - top).sum(1).log_().add_(top[:, 0])


def _shifted_log_density(z_t, mu_t, root_t, peak_t, log_w, rows, d, out, joint=None):
    """L[rows, :, d] - shift[d] (+ log w[rows] for mss weights) into `out` (R, B): the block's
    log-densities for the dimension-wise marginal. With `joint` (R, B), L[rows, :, d] - shift[d]
    is first added to it (copied into it for d = 0)."""
    r = root_t[d]
    torch.sub(z_t[d, rows, None], mu_t[d], out=out).mul_(r).mul_(r)  # (z_i - mu_j) / sigma_j
    out.square_().mul_(-0.5).add_(peak_t[d])
    if joint is not None and d == 0:
        joint.copy_(out)
    elif joint is not None:
        joint.add_(out)
    if log_w.dim():
        out.add_(log_w[rows])


def tc_terms(z, mu, logvar, dataset_size, estimator="mws"):
    """Index-code MI, total correlation and dimension-wise KL in nats per sample (Chen et al. 2018).

    z, mu, logvar: (B, D); returns (mi, tc, dwkl), each (B,), float32 (float64 for float64 inputs).
    log q(z_i) = logsumexp_j (log w_ij + sum_d L[i,j,d]) and log prod_d q(z_i,d) =
    sum_d logsumexp_j (log w_ij + L[i,j,d]), with w the minibatch-weighted (mws) or
    minibatch-stratified (mss) sampling weights of `log_importance_weights`. This is Chen et
    al.'s estimator as published: with mws the three terms carry constant offsets, +log N,
    +(D-1) log N and -D log N (what a collapsed model, q(z|x) = p(z), gets); they do not change
    gradients, and `objective` logs the terms without them (`estimator_offsets`). Raises
    ValueError if dataset_size < B or for an unknown estimator.
    """
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    z, mu, logvar = z.to(dtype), mu.to(dtype), logvar.to(dtype)
    if dataset_size < z.shape[0]:
        raise ValueError(f"dataset_size {dataset_size} is smaller than the batch {z.shape[0]}")
    log_w = log_importance_weights(z.shape[0], dataset_size, estimator).to(z.device, dtype)
    log_w = log_w[0, 0] if estimator == "mws" else log_w  # a constant: added once, not B x B times
    with torch.autocast(z.device.type, enabled=False):
        log_qz, log_prod_qzd = _BatchLogDensities.apply(z, mu, logvar, log_w)
        log_qz_given_x = log_normal(z, mu, logvar).sum(1)
        log_pz = log_normal(z, torch.zeros_like(z), torch.zeros_like(z)).sum(1)
    return log_qz_given_x - log_qz, log_qz - log_prod_qzd, log_prod_qzd - log_pz


def estimator_offsets(estimator, dataset_size, latents):
    """The constants in `tc_terms`' (mi, tc, dwkl): (log N, (D-1) log N, -D log N) for mws, zeros for mss.

    Chen et al.'s mws weight 1/(B N) makes log q(z) too low by log N and log prod_d q(z_d) by
    D log N, so a collapsed model (q(z|x) = p(z) for every x) gets mi = log N, tc = (D-1) log N,
    dwkl = -D log N where every term is 0; the mss weights sum to 1 per row and carry none. The
    three offsets sum to 0, so mi + tc + dwkl (an estimate of the KL) is unchanged.
    """
    if estimator == "mss":
        return 0.0, 0.0, 0.0
    log_n = math.log(dataset_size)
    return log_n, (latents - 1) * log_n, -latents * log_n


def permute_dims(z, generator=None):
    """Each column of z (B, D) permuted independently across the batch: (B, D), same dtype.

    Samples of prod_j q(z_j) from samples of q(z) (Kim & Mnih 2018, Algorithm 1): every column
    keeps its values, the rows' joint is broken. Gradients flow through (a gather); detach z for
    the discriminator's update. `generator` (a torch.Generator on any device) makes it
    reproducible; without it torch's global generator on z's device is used.
    """
    device = generator.device if generator is not None else z.device
    keys = torch.rand(z.shape, generator=generator, device=device)
    return z.gather(0, keys.argsort(0).to(z.device))


def discriminator_loss(logits_joint, logits_permuted):
    """The FactorVAE discriminator's loss in nats, a 0-dim float32 tensor (Kim & Mnih 2018).

    logits_joint (B, 2): the discriminator on samples of q(z), class 0; logits_permuted (B', 2):
    on permute_dims' samples of prod_j q(z_j), class 1. Returns
    0.5 * (CE(logits_joint, 0) + CE(logits_permuted, 1)), each cross-entropy a batch mean: the
    negative of Kim & Mnih's (1/2B) sum [log D(z) + log(1 - D(z_perm))]. Raises ValueError for a
    shape other than (B, 2).
    """
    joint = _two_logits(logits_joint, "logits_joint")
    permuted = _two_logits(logits_permuted, "logits_permuted")
    with torch.autocast(joint.device.type, enabled=False):
        joint_loss = F.cross_entropy(joint, joint.new_zeros(len(joint), dtype=torch.long))
        permuted_loss = F.cross_entropy(permuted, permuted.new_ones(len(permuted), dtype=torch.long))
    return 0.5 * (joint_loss + permuted_loss)


def discriminator_accuracy(logits_joint, logits_permuted):
    """The fraction of samples the discriminator classifies right, a 0-dim float32 tensor in [0, 1].

    Same inputs as `discriminator_loss`; a tie counts as wrong. 0.5 means it cannot tell q(z)
    from prod_j q(z_j) (no total correlation left that it can see); near 1 means it can.
    """
    joint = _two_logits(logits_joint, "logits_joint")
    permuted = _two_logits(logits_permuted, "logits_permuted")
    right = (joint[:, 0] > joint[:, 1]).sum() + (permuted[:, 1] > permuted[:, 0]).sum()
    return right.float() / (len(joint) + len(permuted))


def _two_logits(logits, name):
    if logits.dim() != 2 or logits.shape[1] != 2:
        raise ValueError(f"{name} must have shape (B, 2), got {tuple(logits.shape)}")
    return logits.float()


def dip_terms(mu, logvar=None):
    """Kumar et al.'s (2018) DIP penalty, unweighted: (off_diagonal, diagonal), 0-dim float32 tensors.

    mu, logvar: (B, D). C (D, D) is the covariance on the batch of the posterior means, Cov[mu]
    (DIP-VAE-I), or with logvar that plus E[diag exp(logvar)] (DIP-VAE-II): the covariance of z
    under the batch's aggregate posterior (1/B) sum_b N(mu_b, diag exp(logvar_b)). Cov[mu] uses
    the 1/B (mean-centred, biased) estimator, as disentanglement_lib does: with it C is exactly that
    mixture's covariance (the law of total covariance); 1/(B-1) would scale Cov[mu] by B/(B-1).
    Returns sum_{i!=j} C_ij^2 and sum_i (C_ii - 1)^2. Raises ValueError for B < 2.
    """
    if mu.shape[0] < 2:
        raise ValueError("the DIP-VAE penalty needs a batch of at least 2 to estimate a covariance")
    mu = mu.float()
    with torch.autocast(mu.device.type, enabled=False):  # keep the matrix product in float32
        centred = mu - mu.mean(0)
        covariance = centred.t() @ centred / mu.shape[0]
        if logvar is not None:
            covariance = covariance + torch.diag(logvar.float().exp().mean(0))
        diagonal = torch.diagonal(covariance)
        off_diagonal = (covariance - torch.diag(diagonal)).square().sum()  # no cancellation
        return off_diagonal, (diagonal - 1).square().sum()


def capacity_at(step, capacity, capacity_steps):
    """Burgess et al.'s target KL in nats: rises linearly from 0 to `capacity` over `capacity_steps`."""
    return capacity * min(1.0, step / capacity_steps) if capacity_steps > 0 else capacity


def pair_kl(mu1, logvar1, mu2, logvar2):
    """KL(q1 || q2) in nats per latent between two diagonal Gaussians: four (P, D) -> (P, D).

    q1 = N(mu1, exp(logvar1)), q2 = N(mu2, exp(logvar2)); 0.5 (r - 1 - log r + (mu1 - mu2)^2 / v2)
    with r = v1 / v2, formed as expm1 - log so that near-equal posteriors keep their small KL.
    Float32 (float64 for float64 inputs). Locatello et al. 2020's delta_j, in their direction:
    the first image's posterior against the second's (disentanglement_lib computes twice this;
    a common factor does not move the threshold).
    """
    mu1, logvar1, mu2, logvar2 = _same_float(mu1, logvar1, mu2, logvar2)
    log_ratio = logvar1 - logvar2
    scaled = (mu1 - mu2) * torch.exp(-0.5 * logvar2)
    return 0.5 * (torch.expm1(log_ratio) - log_ratio + scaled * scaled)


def shared_latents(mu1, logvar1, mu2, logvar2):
    """Which latents a pair is taken to share: four (P, D) -> (P, D) bool, no gradient.

    Locatello et al. 2020's adaptive rule: latent j of pair p is shared when
    pair_kl[p, j] < tau_p = (min_j pair_kl[p, j] + max_j pair_kl[p, j]) / 2, strictly below
    (as disentanglement_lib's two equal-width bins: a KL at the midpoint falls in the upper bin).
    So a pair whose latents all differ equally (or D = 1) shares none.
    """
    with torch.no_grad():
        kl = pair_kl(mu1, logvar1, mu2, logvar2)
        threshold = 0.5 * (kl.min(1, keepdim=True).values + kl.max(1, keepdim=True).values)
        return kl < threshold


def aggregate_pair(mu1, logvar1, mu2, logvar2, method="adagvae"):
    """A pair's posteriors with the shared latents replaced by their aggregate (Locatello et al. 2020).

    mu1, logvar1 (P, D): the first images' posteriors; mu2, logvar2 (P, D): their partners'.
    Returns (mu1, logvar1, mu2, logvar2), each (P, D) float32 (float64 for float64 inputs), with
    gradients through the values (not through the choice of `shared_latents`). Where a latent is
    shared both images get the same Gaussian N(m, v):
      adagvae  the average of the two Gaussians' means and of their variances (the Group-VAE
               aggregation): m = (mu1 + mu2) / 2, v = (v1 + v2) / 2
      mlvae    the normalised product q1^(1/2) q2^(1/2), i.e. the product of the two Gaussians
               with twice its variance: 1 / v = (1 / v1 + 1 / v2) / 2, m = v (mu1 / v1 + mu2 / v2) / 2
               (the product's own mean, v twice the product's variance v1 v2 / (v1 + v2))
    We follow disentanglement_lib's ML-VAE variance, twice the product's: it is the code behind
    the paper's figures, and it keeps both rules idempotent: a pair of equal posteriors keeps
    them, where the plain product would halve every shared variance, making a latent's KL to
    the prior grow by being shared. Idempotence also means that aggregating an aggregated pair
    changes nothing. Raises ValueError for another method or inputs not of one (P, D) shape.
    """
    mu1, logvar1, mu2, logvar2, _ = _aggregate(mu1, logvar1, mu2, logvar2, method)
    return mu1, logvar1, mu2, logvar2


def _aggregate(mu1, logvar1, mu2, logvar2, method):
    """aggregate_pair's four tensors and shared_latents' (P, D) mask."""
    if method not in PAIR_OBJECTIVES:
        raise ValueError(f"unknown aggregation {method!r}; choose adagvae or mlvae")
    shapes = {tuple(t.shape) for t in (mu1, logvar1, mu2, logvar2)}
    if len(shapes) != 1 or mu1.dim() != 2:
        raise ValueError(f"a pair's posteriors must be four tensors of one (P, D) shape, got {sorted(shapes)}")
    mu1, logvar1, mu2, logvar2 = _same_float(mu1, logvar1, mu2, logvar2)
    shared = shared_latents(mu1, logvar1, mu2, logvar2)
    if method == "adagvae":
        mean = 0.5 * (mu1 + mu2)
        logvar = torch.logaddexp(logvar1, logvar2) - LOG_2
    else:
        mean = torch.lerp(mu2, mu1, torch.sigmoid(logvar2 - logvar1))  # weights v2 / (v1 + v2), v1 / (v1 + v2)
        logvar = LOG_2 - torch.logaddexp(-logvar1, -logvar2)
    return (torch.where(shared, mean, mu1), torch.where(shared, logvar, logvar1),
            torch.where(shared, mean, mu2), torch.where(shared, logvar, logvar2), shared)


def _same_float(*tensors):
    """The tensors in float64 if the first is float64, else float32 (also from bf16 under autocast)."""
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    return tuple(t.to(dtype) for t in tensors)


def _paired_posteriors(mu, logvar, method, images):
    """(2P, D) posteriors of [first images; second images] -> aggregated (2P, D) twice, and the
    batch mean of the number of latents taken as shared per pair (0-dim). `images`: how many
    images were reconstructed, which must be 2P too."""
    if images != len(mu):
        raise ValueError(f"{method}: {images} images for {len(mu)} codes; pass the pairs' images "
                         "and codes in the same order")
    if mu.shape[0] % 2:
        raise ValueError(f"{method} trains on pairs: the batch must be [first images; second "
                         f"images], an even number of rows, got {mu.shape[0]}")
    pairs = mu.shape[0] // 2
    mu1, logvar1, mu2, logvar2, shared = _aggregate(mu[:pairs], logvar[:pairs], mu[pairs:],
                                                    logvar[pairs:], method)
    return torch.cat([mu1, mu2]), torch.cat([logvar1, logvar2]), shared.sum(1).float().mean()


def objective(name, x, logits, mu, logvar, z, beta=6.0, alpha=1.0, gamma=None, dataset_size=None,
              recon="bce", estimator="mws", capacity=None, capacity_steps=100_000, step=0,
              lambda_od=None, lambda_d=None, tc_logits=None):
    """The loss to minimise (a 0-dim float32 tensor, the batch mean) and a dict of batch-mean floats.

    x, logits (B, C, H, W); mu, logvar, z (B', D); `name` one of OBJECTIVES or PAIR_OBJECTIVES
    (the module docstring gives each formula). The reconstruction is averaged over its B rows and
    the code terms over their B' rows, separately: with one process B' = B; under data-parallel
    training each process passes its own images and the whole batch's codes, gathered with
    gradients, so the terms that compare samples (betatc, factorvae, the DIP-VAEs) see the whole
    batch and the averaged gradients equal one process's. adagvae and mlvae take each process's
    own pairs (B' = B = 2P, rows [first images; second images], row p pairs with row P + p): mu,
    logvar the encoder's posteriors, z a sample of `aggregate_pair`'s; the loss is the mean over
    the 2P images of recon + beta KL(aggregate || N(0, I)), as disentanglement_lib's
    0.5 (first half's mean + second half's mean). Hyperparameters:
      beta, alpha        betavae's, adagvae's and mlvae's KL weight; betatc's TC and MI weights
      gamma              betatc's dimension-wise KL weight (default 1), betavae-with-capacity's
                         |KL - C| weight (default 1000), factorvae's TC weight (FACTORVAE_GAMMA)
      dataset_size       N, for betatc's estimator (`estimator`, mws or mss)
      capacity, capacity_steps, step    Burgess et al.'s schedule (`capacity_at`)
      lambda_od, lambda_d               the DIP-VAEs' weights (DIP_LAMBDA_OD, DIP_DIAGONAL_RATIO)
      tc_logits          factorvae: the discriminator's (B, 2) logits on this z, not detached
                         (column 0: "a sample of q(z)", 1: "of prod_j q(z_j)")
    terms, in nats per image and unweighted: recon and kl (adagvae, mlvae: the aggregated
    posteriors' kl), and per objective capacity (betavae with capacity), mi, tc, dwkl (betatc,
    without the mws estimator's constant `estimator_offsets`, which do not change the gradient),
    tc (factorvae: the batch mean of tc_logits[:, 0] - tc_logits[:, 1]), dip (the DIP-VAEs'
    ||C - I||_F^2 before its weights, a batch statistic added once), shared (adagvae, mlvae: the
    mean number of latents per pair taken as shared). One device sync. Raises ValueError for an
    unknown name, no dataset_size (betatc) or tc_logits (factorvae), or pairs of unequal halves.
    """
    if name not in OBJECTIVES + PAIR_OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of "
                         f"{', '.join(OBJECTIVES + PAIR_OBJECTIVES)}")
    recon_term = recon_loss(logits, x, recon)
    if name in PAIR_OBJECTIVES:
        mu, logvar, shared = _paired_posteriors(mu, logvar, name, images=len(recon_term))
    kl = kl_normal(mu, logvar).sum(1)
    terms = {"recon": recon_term.mean(), "kl": kl.mean()}
    if name in PAIR_OBJECTIVES:
        terms["shared"] = shared
    if name == "ae":
        penalty = torch.zeros((), device=kl.device)
    elif name == "vae":
        penalty = kl.mean()
    elif name == "betavae" and capacity is not None:
        penalty = _capacity(kl, gamma, capacity_at(step, capacity, capacity_steps), terms)
    elif name in ("betavae",) + PAIR_OBJECTIVES:
        penalty = beta * kl.mean()
    elif name == "betatc":
        penalty = _betatc(mu, logvar, z, beta, alpha, gamma, dataset_size, estimator, terms)
    elif name == "factorvae":
        gamma = FACTORVAE_GAMMA if gamma is None else gamma
        penalty = kl.mean() + _factorvae(kl, tc_logits, gamma, terms)
    else:
        penalty = kl.mean() + _dip(name, mu, logvar, lambda_od, lambda_d, terms)
    loss = recon_term.mean() + penalty
    values = torch.stack([t.detach().float() for t in terms.values()]).tolist()  # one device sync
    return loss, dict(zip(terms, values))


def _capacity(kl, gamma, target, terms):
    """Burgess et al.: gamma |KL - C| with C the schedule's target at this step."""
    terms["capacity"] = torch.tensor(target, device=kl.device)
    return (1000.0 if gamma is None else gamma) * (kl.mean() - target).abs()


def _dip(name, mu, logvar, lambda_od, lambda_d, terms):
    """Kumar et al.: lambda_od sum_{i!=j} C_ij^2 + lambda_d sum_i (C_ii - 1)^2."""
    lambda_od = DIP_LAMBDA_OD if lambda_od is None else lambda_od
    lambda_d = DIP_DIAGONAL_RATIO[name] * lambda_od if lambda_d is None else lambda_d
    off_diagonal, diagonal = dip_terms(mu, logvar if name == "dipvae2" else None)
    terms["dip"] = off_diagonal + diagonal
    return lambda_od * off_diagonal + lambda_d * diagonal


def _betatc(mu, logvar, z, beta, alpha, gamma, dataset_size, estimator, terms):
    if dataset_size is None:
        raise ValueError("betatc needs dataset_size, the number of images in the dataset")
    gamma = 1.0 if gamma is None else gamma
    mi, tc, dwkl = tc_terms(z.float(), mu.float(), logvar.float(), dataset_size, estimator)  # float32, as every term
    offsets = estimator_offsets(estimator, dataset_size, z.shape[1])
    terms.update(mi=mi.mean() - offsets[0], tc=tc.mean() - offsets[1], dwkl=dwkl.mean() - offsets[2])
    return (alpha * mi + beta * tc + gamma * dwkl).mean()


def _factorvae(kl, tc_logits, gamma, terms):
    if tc_logits is None:
        raise ValueError("factorvae needs tc_logits, the discriminator's (B, 2) logits on z")
    tc_logits = _two_logits(tc_logits, "tc_logits")
    if len(tc_logits) != len(kl):
        raise ValueError(f"tc_logits has {len(tc_logits)} rows for a batch of {len(kl)}")
    tc = tc_logits[:, 0] - tc_logits[:, 1]  # (B,): log D(z) / (1 - D(z)), the density-ratio trick
    terms["tc"] = tc.mean()
    return gamma * tc.mean()
