"""Disentanglement metrics on plain arrays: every score papers report. Needs numpy only.

Every function takes codes, (N, D) float rows (one per data point, e.g. the encoder's means), and
all but the label-free two take integer factors, (N, K) class labels; each returns a dict of plain
floats and small numpy arrays.

discrete_mig       Locatello et al. 2019 (disentanglement_lib): MIG with each code dimension binned.
gaussian_mig       Chen et al. 2018 (beta-TCVAE): MIG from the encoder's Gaussian posteriors, on a
                   1-D grid (to ~1e-5 nats), not by Monte Carlo.
beta_vae_score     Higgins et al. 2017: which factor was held fixed, told by a linear classifier.
factor_vae_score   Kim & Mnih 2018: the same, by a majority vote on the least varying code.
dci                Eastwood & Williams 2018: disentanglement, completeness, informativeness.
sap_score          Kumar et al. 2018: gap between the two codes that best predict each factor.
modularity_explicitness  Ridgeway & Mozer 2018.
gaussian_total_correlation, mutual_info_score  disentanglement_lib's label-free scores.
evaluate           all of the above that apply, in one dict.

The MIGs return `mig` (float), `gaps` (K,), `mi` (D, K) in nats, `entropy` (K,) of the factors in
nats, and `mi_normalized` (D, K) = mi / entropy. MIG is the mean over factors of the gap between the
two largest normalised MI values (with one latent, the gap is that latent's normalised MI).
A factor with a single value raises ValueError naming it (data.py drops constant factors before they
get here). Where a metric draws samples, it draws rows of the given data (no new images are
rendered) with numpy's default_rng(seed): the same seed gives the same numbers.
"""
import math

import numpy as np

# -----------------------------------------------------------------------------
# shared helpers


def _check_rows(name, array, n=None):
    array = np.asarray(array)
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"{name} must have shape (N, D) with N > 0, got {array.shape}")
    if n is not None and array.shape[0] != n:
        raise ValueError(f"{name} has {array.shape[0]} rows, expected {n} (one per data point)")
    return array


def _check_finite(name, array):
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")


def _relabel(column):
    """Map arbitrary labels to 0..V-1; returns (labels, V)."""
    if np.issubdtype(column.dtype, np.integer) and column.min() >= 0 and column.max() < 4 * len(column):
        present = np.bincount(column) > 0  # O(N), no sort: the usual case of class indices
        if present.all():
            return column, len(present)
        lookup = np.cumsum(present) - 1
        return lookup[column], int(present.sum())
    values, labels = np.unique(column, return_inverse=True)
    return labels.reshape(-1), len(values)


def _prepare_factors(factors, n):
    """Labels 0..V-1 per factor, their sizes and empirical entropies (nats)."""
    factors = _check_rows("factors", factors, n)
    labels, sizes, entropy = [], [], []
    for k in range(factors.shape[1]):
        lab, size = _relabel(factors[:, k])
        if size < 2:
            raise ValueError(f"factor {k} takes a single value; the metrics need at least two")
        p = np.bincount(lab, minlength=size) / n
        labels.append(lab)
        sizes.append(size)
        entropy.append(-np.sum(p * np.log(p)))
    return labels, sizes, np.array(entropy)


def _result(mi, entropy):
    mi_normalized = mi / entropy
    ranked = -np.sort(-mi_normalized, axis=0)
    gaps = ranked[0] - ranked[1] if len(ranked) > 1 else ranked[0]
    return {"mig": float(np.mean(gaps)), "gaps": gaps, "mi": mi, "entropy": entropy,
            "mi_normalized": mi_normalized}


# -----------------------------------------------------------------------------
# discrete MIG (Locatello et al.)


def _discretize(code, bins):
    """Bin index 0..bins-1, equal to disentanglement_lib's
    np.digitize(code, np.histogram(code, bins)[1][:-1]) - 1 (so the maximum lands in the last bin)."""
    edges = np.histogram_bin_edges(code, bins)
    scaled = (code - edges[0]) * (bins / (edges[-1] - edges[0]))
    index = np.clip(scaled, 0, bins - 1).astype(np.int32)
    # the arithmetic guess can be one bin off at an edge; settle it against the edges themselves,
    # which is twice as fast as the binary search of np.digitize
    lower = np.append(edges[:-1], np.inf)
    index += code >= lower[index + 1]
    index -= code < lower[index]
    return index


def _mi_from_counts(table):
    """Mutual information (nats) of a contingency table of counts, as sklearn's mutual_info_score."""
    n = table.sum()
    rows, cols = table.sum(1, keepdims=True), table.sum(0, keepdims=True)
    nz = table > 0
    outer = (rows * cols)[nz]
    joint = table[nz]
    return max(float(np.sum(joint / n * np.log(joint * n / outer))), 0.0)


def _discrete_mi(codes, labels, sizes, bins):
    """(D, K) discrete MI in nats between each binned code dimension and each factor."""
    labels = [lab.astype(np.int32) for lab in labels]  # int32 index arithmetic is ~2x faster
    mi = np.zeros((codes.shape[1], len(sizes)))
    for j, code in enumerate(np.ascontiguousarray(codes.T)):
        binned = _discretize(code, bins)
        for k, (lab, size) in enumerate(zip(labels, sizes)):
            table = np.bincount(binned * size + lab, minlength=bins * size).reshape(bins, size)
            mi[j, k] = _mi_from_counts(table)
    return mi


def discrete_mig(codes, factors, bins=20):
    """MIG with each code dimension binned into `bins` equal-width bins over its range."""
    codes = _check_rows("codes", codes)
    _check_finite("codes", codes)
    labels, sizes, entropy = _prepare_factors(factors, len(codes))
    return _result(_discrete_mi(codes, labels, sizes, bins), entropy)


# -----------------------------------------------------------------------------
# Gaussian MIG (Chen et al.)
#
# Every q(z_j) and q(z_j | v_k = v) is a 1-D mixture of Gaussians, so its entropy is a 1-D integral,
# which a grid does exactly up to discretisation error, in O(N + G log G) instead of Chen et al.'s
# O(N * samples). Density on a uniform grid of spacing h <= min(sigma) / points_per_sigma: group the
# components into buckets of sigma within a factor bucket_ratio; per bucket, deposit each component
# onto the grid (np.bincount) and convolve with the bucket's Gaussian kernel by FFT. A component of
# variance s^2 in a bucket with kernel variance s_b^2 <= s^2 is deposited as a 3-point distribution
# at cells (c - m, c, c + m) with exactly the mean and variance of N(mu, s^2 - s_b^2); m = round(
# sqrt(3 v)) (v = that leftover variance in cells^2) makes it 3-point Gauss-Hermite, so the 4th
# cumulant is nearly right too. What is left are density errors of at most a few 1e-3, shaped like
# odd or even derivatives of the component, which leave an isolated Gaussian's entropy unchanged to
# first order (log q is quadratic and mean and variance are exact). The rectangle rule on a smooth
# density sampled at >= 4 points per sigma is exact to ~exp(-2 pi^2 16). Measured against direct
# quadrature (sigmas 0.001..1, overlapping components): entropy and MI errors ~1e-5 nats.
# The grid spans every component to +-8 sigma, so the FFT's wrap-around moves ~1e-15 of the mass.


def _fast_size(n):
    """Smallest 2^a 3^b 5^c >= n: sizes that numpy's FFT does quickly."""
    best = 1 << max(n - 1, 0).bit_length()
    for p3 in (1, 3, 9, 27, 81):
        for p5 in (1, 5, 25, 125):
            size = p3 * p5
            while size < n:
                size *= 2
            best = min(best, size)
    return best


def _row_entropies(density_counts, counts, h):
    """Entropy (nats) of each row of a grid density given as counts per cell (rows sum to counts)."""
    p = np.maximum(density_counts, 0) / counts[:, None]
    logp = np.log(np.where(p > 0, p, 1.0) / h)
    return -np.sum(p * logp, axis=1)


def _grid_entropies(mu, var, labels, sizes, points_per_sigma, bucket_ratio, max_grid):
    """Entropy of the mixture over all rows, and of each factor value's mixture, for one latent."""
    n = len(mu)
    span = lambda v: (np.min(mu - 8 * np.sqrt(v)), np.max(mu + 8 * np.sqrt(v)))
    lo, hi = span(var)
    h = math.sqrt(var.min()) / points_per_sigma
    if (hi - lo) / h > max_grid:
        # Too fine a grid. Add the same noise N(0, tau^2) to every component, just enough to reach
        # points_per_sigma: the result is then the exact MI of z + noise, which by data processing
        # is a lower bound on the MI of z, losing only structure finer than tau (points_per_sigma /
        # max_grid of the span, 3e-5 by default; the grid size then ends up near max_grid).
        h = (hi - lo) / max_grid
        var = var + max((points_per_sigma * h) ** 2 - var.min(), 0.0)
        lo, hi = span(var)
        h = (hi - lo) / max_grid
    size = _fast_size(int(math.ceil((hi - lo) / h)) + 2)

    # sigma buckets; the kernel sits h^2/4 below the narrowest member so that every leftover variance
    # is >= 1/4 cell^2, which keeps all three deposit weights non-negative (a positive density)
    log_sigma = 0.5 * np.log(var)
    bucket = np.floor((log_sigma - log_sigma.min()) / math.log(bucket_ratio)).astype(np.int64)
    order = np.argsort(bucket, kind="stable")
    bounds = np.flatnonzero(np.diff(bucket[order])) + 1
    starts, ends = np.r_[0, bounds], np.r_[bounds, n]
    kernel_var = np.minimum.reduceat(var[order], starts) - h * h / 4

    position = (mu[order] - lo) / h + 1
    cell = np.rint(position).astype(np.int64)
    offset = position - cell
    leftover = (var[order] - np.repeat(kernel_var, ends - starts)) / (h * h)
    step = np.maximum(np.rint(np.sqrt(3 * leftover)), 1).astype(np.int64)
    second = (offset ** 2 + leftover) / step ** 2
    weights = (0.5 * (second - offset / step), 1 - second, 0.5 * (second + offset / step))

    angular = 2 * np.pi * np.fft.rfftfreq(size, d=h)
    kernels = [np.exp(-0.5 * angular ** 2 * kv) for kv in kernel_var]
    marginal, conditional = None, []
    for lab, values in zip(labels, sizes):
        lab = lab[order]
        spectrum = np.zeros((values, size // 2 + 1), dtype=np.complex128)
        for start, end, kernel in zip(starts, ends, kernels):
            rows = slice(start, end)
            base = lab[rows] * size + cell[rows]
            deposit = np.zeros(values * size)
            for shift, w in zip((-step[rows], 0, step[rows]), weights):
                deposit += np.bincount(base + shift, w[rows], minlength=values * size)
            spectrum += np.fft.rfft(deposit.reshape(values, size), axis=1) * kernel
        density = np.fft.irfft(spectrum, n=size, axis=1)
        counts = np.bincount(lab, minlength=values).astype(np.float64)
        conditional.append(_row_entropies(density, counts, h))
        if marginal is None:
            marginal = _row_entropies(density.sum(0, keepdims=True), np.array([n], float), h)[0]
    return marginal, conditional


def _log_mixture(points, mu, var):
    """log of (1/M) sum_m N(points; mu_m, var_m), in chunks of points."""
    out = np.empty(len(points))
    chunk = max(1, (1 << 22) // len(mu))
    for start in range(0, len(points), chunk):
        x = points[start:start + chunk, None]
        logpdf = -0.5 * ((x - mu) ** 2 / var + np.log(2 * np.pi * var))
        top = logpdf.max(1, keepdims=True)
        out[start:start + chunk] = (top + np.log(np.mean(np.exp(logpdf - top), 1, keepdims=True)))[:, 0]
    return out


def _sampled_entropies(mu, var, labels, sizes, rng, samples):
    """Chen et al.'s estimator: one z per row, H = -mean log q(z) over up to `samples` of them."""
    z = mu + np.sqrt(var) * rng.standard_normal(len(mu))

    def entropy(rows):
        picked = rows if len(rows) <= samples else rng.choice(rows, samples, replace=False)
        return -np.mean(_log_mixture(z[picked], mu[rows], var[rows]))

    marginal = entropy(np.arange(len(mu)))
    conditional = [np.array([entropy(np.flatnonzero(lab == v)) for v in range(values)])
                   for lab, values in zip(labels, sizes)]
    return marginal, conditional


def gaussian_mig(mu, logvar, factors, seed=0, method="grid", samples=10000,
                 points_per_sigma=4, bucket_ratio=1.1, max_grid=2 ** 17):
    """MIG of Chen et al. 2018 from posterior means and log-variances, both (N, D).

    I(z_j; v_k) = H(q(z_j)) - sum_v p(v) H(q(z_j | v_k = v)), each q a mixture of the rows' Gaussian
    posteriors, normalised by the factor's entropy. Negative MI (numerical noise) is clipped to 0,
    so gaps are >= 0. Chen et al. scored dSprites without its shape factor; pass the factors to score.
    method="grid" (default) integrates each mixture's entropy on a grid: deterministic, `seed` unused,
    independent of row order; within ~1e-5 nats of direct quadrature in the tests (notes above).
    method="sample" is Chen et al.'s Monte Carlo estimator (one z per row, log q(z) by log-sum-exp
    over the rows, averaged over up to `samples` rows per mixture, drawn with `seed`); O(samples * N)
    per latent, so meant for cross-checks on small N.
    """
    mu = _check_rows("mu", mu).astype(np.float64, copy=False)
    logvar = _check_rows("logvar", logvar, len(mu)).astype(np.float64, copy=False)
    if mu.shape != logvar.shape:
        raise ValueError(f"mu {mu.shape} and logvar {logvar.shape} differ in shape")
    _check_finite("mu", mu)
    _check_finite("logvar", logvar)
    if method not in ("grid", "sample"):
        raise ValueError(f"method must be 'grid' or 'sample', got {method!r}")
    if points_per_sigma < 1 or bucket_ratio <= 1:
        raise ValueError("points_per_sigma must be >= 1 and bucket_ratio > 1")
    labels, sizes, entropy = _prepare_factors(factors, len(mu))
    var = np.exp(logvar)
    rng = np.random.default_rng(seed)
    mi = np.zeros((mu.shape[1], len(sizes)))
    for j in range(mu.shape[1]):
        if method == "grid":
            marginal, conditional = _grid_entropies(mu[:, j], var[:, j], labels, sizes,
                                                    points_per_sigma, bucket_ratio, max_grid)
        else:
            marginal, conditional = _sampled_entropies(mu[:, j], var[:, j], labels, sizes, rng, samples)
        for k, (lab, values) in enumerate(zip(labels, sizes)):
            p = np.bincount(lab, minlength=values) / len(mu)
            mi[j, k] = max(marginal - np.dot(p, conditional[k]), 0.0)
    return _result(mi, entropy)


# -----------------------------------------------------------------------------
# shared by the classifier-based metrics
#
# Like disentanglement_lib, these train on 10,000 points and test on 5,000 new ones; here the points
# are rows of the given data (train and test disjoint; all rows split 2:1 when there are fewer).

TRAIN_POINTS, TEST_POINTS = 10_000, 5_000
COLLAPSED_STD = 0.05  # FactorVAE score: codes of smaller standard deviation are dropped (disentanglement_lib)
HESSIAN_ROWS = 1_000  # logistic regression: rows that the Newton steps' Hessian is estimated on


def _labelled(codes, factors):
    """float64 codes (N, D), factor labels 0..V-1 and factor sizes, checked."""
    codes = _check_rows("codes", codes).astype(np.float64, copy=False)
    _check_finite("codes", codes)
    labels, sizes, _ = _prepare_factors(factors, len(codes))
    return codes, labels, sizes


def _check_count(name, value, low):
    if not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _split(n, seed):
    """Disjoint random train and test rows: TRAIN_POINTS and TEST_POINTS of them, or all split 2:1."""
    rng = np.random.default_rng(seed)
    if n >= TRAIN_POINTS + TEST_POINTS:
        rows, train = rng.choice(n, TRAIN_POINTS + TEST_POINTS, replace=False), TRAIN_POINTS
    else:
        rows, train = rng.permutation(n), (2 * n) // 3
    return rows[:train], rows[train:]


def _two_values(labels, k, rows):
    """labels, checked to hold at least two values (the classifiers need them)."""
    if np.all(labels == labels[0]):
        raise ValueError(f"factor {k} takes a single value in the {len(labels)} {rows}; "
                         "it needs more rows or more values")
    return labels


def _standardize(train, test):
    mean, std = train.mean(0), train.std(0)
    std[std == 0] = 1
    return (train - mean) / std, (test - mean) / std


def _value_groups(factors, labels, sizes, metric):
    """Per factor: rows sorted by value, where each value's rows start, and how many there are."""
    groups = []
    for k, (lab, size) in enumerate(zip(labels, sizes)):
        counts = np.bincount(lab, minlength=size)
        order = np.argsort(lab.astype(np.uint16) if size < 2 ** 16 else lab, kind="stable")
        starts = np.cumsum(counts) - counts
        if counts.min() < 2:
            value = np.asarray(factors)[order[starts[counts.argmin()]], k]
            raise ValueError(f"factor {k} value {value} has a single row; {metric} draws rows that "
                             "share a factor's value and needs at least 2 rows per value")
        groups.append((order, starts, counts))
    return groups


def _rows_sharing(rng, group, values):
    """For each entry of `values` (an array of value labels), a random row with that value."""
    order, starts, counts = group
    offset = (rng.random(values.shape) * counts[values]).astype(np.int64)
    return order[starts[values] + np.minimum(offset, counts[values] - 1)]


def _softmax(logits):
    logits = logits - logits.max(1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True)


def _softmax_hessian(x, p, penalty):
    """Hessian of the mean cross-entropy + penalty / 2 ||W||^2, over W's entries in (class, feature) order."""
    m, d = x.shape
    c = p.shape[1]
    a = (p[:, :, None] * x[:, None, :]).reshape(m, c * d).astype(np.float32)  # only steers the steps
    h = -(a.T @ a).astype(np.float64)
    classes = np.arange(c)
    h.reshape(c, d, c, d)[classes, :, classes, :] += (a.T @ x.astype(np.float32)).reshape(c, d, d)
    h /= m
    h[np.diag_indices(c * d)] += penalty
    return h


def _fit_logistic(x, labels, classes, iterations=50):
    """Multinomial logistic regression on (n, D) inputs: weights (D + 1, classes), the bias row last.

    Minimises the mean cross-entropy + ||W||^2 / (2n), scikit-learn's default (C = 1; here the bias
    is penalised too, so the optimum is unique), by Newton steps with a backtracking line search. The
    Hessian is estimated on the first HESSIAN_ROWS rows (callers pass rows in random order), the
    gradient on all of them, so the iteration still converges to the exact optimum.
    """
    n = len(x)
    x = np.hstack([x, np.ones((n, 1))])
    onehot = np.eye(classes)[labels]
    penalty = 1.0 / n

    def objective(w):
        logits = x @ w
        top = logits.max(1, keepdims=True)
        log_total = top + np.log(np.sum(np.exp(logits - top), 1, keepdims=True))
        loss = np.mean(log_total[:, 0] - np.sum(onehot * logits, 1)) + 0.5 * penalty * np.sum(w * w)
        return loss, np.exp(logits - log_total)

    w = np.zeros((x.shape[1], classes))
    loss, p = objective(w)
    for _ in range(iterations):
        grad = x.T @ (p - onehot) / n + penalty * w
        hessian = _softmax_hessian(x[:HESSIAN_ROWS], p[:HESSIAN_ROWS], penalty)
        step = np.linalg.solve(hessian, grad.T.ravel()).reshape(classes, -1).T
        decrement = np.sum(grad * step)
        if decrement < 1e-8:  # the loss is then within ~1e-8 of its minimum
            break
        for t in 0.5 ** np.arange(30):
            new_loss, new_p = objective(w - t * step)
            if new_loss <= loss - 0.25 * t * decrement:
                break
        else:
            break  # no further progress in double precision
        w, loss, p = w - t * step, new_loss, new_p
    return w


def _predict_logistic(x, w):
    return _softmax(x @ w[:-1] + w[-1])


def _fit_lda(x, labels, classes, shrinkage=1e-6):
    """Linear discriminant analysis: class logits x @ W + b, W (D, classes), b (classes,).

    Gaussian classes with one shared covariance (the pooled within-class covariance + shrinkage * I,
    so that a code that is constant within every class, as a perfect code is, stays invertible);
    classes absent from the rows get a bias of -inf.
    """
    counts = np.bincount(labels, minlength=classes)
    means = np.stack([np.bincount(labels, column, minlength=classes) for column in x.T], 1)
    means /= np.maximum(counts, 1)[:, None]
    residual = x - means[labels]
    covariance = residual.T @ residual / len(x) + shrinkage * np.eye(x.shape[1])
    w = np.linalg.solve(covariance, means.T)
    with np.errstate(divide="ignore"):
        b = np.log(counts / len(x)) - 0.5 * np.sum(means.T * w, 0)
    return w, b


def _accuracy(scores, labels):
    return float(np.mean(np.argmax(scores, 1) == labels))


def _roc_auc(probabilities, labels):
    """Mean over classes of the one-vs-rest ROC-AUC (ties count half), over the classes that have
    both positive and negative rows; scikit-learn's roc_auc_score with average="macro"."""
    aucs = []
    for c, score in enumerate(probabilities.T):
        positive = score[labels == c]
        negatives = len(labels) - len(positive)
        if len(positive) == 0 or negatives == 0:
            continue
        ordered = np.sort(score)
        below, up_to = np.searchsorted(ordered, positive, "left"), np.searchsorted(ordered, positive, "right")
        ranks = (below + up_to + 1) / 2  # 1-based ranks, ties averaged
        aucs.append((ranks.sum() - len(positive) * (len(positive) + 1) / 2) / (len(positive) * negatives))
    return float(np.mean(aucs))


# -----------------------------------------------------------------------------
# BetaVAE score (Higgins et al.) and FactorVAE score (Kim & Mnih)


def _beta_vae_points(rng, codes, labels, groups, points, batch, chunk=1024):
    """`points` training points: a factor k each, and the mean |code_a - code_b| over `batch` pairs
    of rows that share factor k's value (row a uniform, row b uniform among rows with a's value)."""
    fixed = rng.integers(len(labels), size=points)
    features = np.empty((points, codes.shape[1]))
    for k, (lab, group) in enumerate(zip(labels, groups)):
        chosen = np.flatnonzero(fixed == k)
        for start in range(0, len(chosen), chunk):
            rows = chosen[start:start + chunk]
            first = rng.integers(len(codes), size=(len(rows), batch))
            second = _rows_sharing(rng, group, lab[first])
            features[rows] = np.abs(np.take(codes, first, 0) - np.take(codes, second, 0)).mean(1)
    return features, fixed


def beta_vae_score(codes, factors, samples=10_000, batch=64, seed=0):
    """BetaVAE disentanglement score (Higgins et al. 2017), as disentanglement_lib computes it.

    codes (N, D) float, factors (N, K) int. Each of `samples` training points picks a factor
    uniformly and draws `batch` pairs of rows that share that factor's value (the first row uniform
    over the data, the second uniform among rows with its value; on a full factor grid this is
    disentanglement_lib's sampling); its feature is the mean over the pairs of |code_a - code_b|
    (D,), its label the factor. A multinomial logistic regression (NumPy, on features standardised
    with the training points' mean and deviation, which disentanglement_lib does not do: it makes
    the score independent of the codes' scale) learns the label; `samples // 2` new points test
    it. Random draws use default_rng(seed).
    Returns `score` = `eval_accuracy` (held-out accuracy) and `train_accuracy`, fractions in [0, 1];
    chance is 1 / K. Raises ValueError for bad shapes, non-finite codes, a factor with a single value
    or a factor value held by a single row (named: "factor 2 value 7").
    """
    _check_count("samples", samples, 2)
    _check_count("batch", batch, 1)
    codes, labels, sizes = _labelled(codes, factors)
    groups = _value_groups(factors, labels, sizes, "the BetaVAE score")
    rng = np.random.default_rng(seed)
    codes = (codes - codes.mean(0)).astype(np.float32)  # half the memory traffic of random row reads
    train_x, train_y = _beta_vae_points(rng, codes, labels, groups, samples, batch)
    test_x, test_y = _beta_vae_points(rng, codes, labels, groups, samples // 2, batch)
    train_x, test_x = _standardize(train_x, test_x)
    w = _fit_logistic(train_x, train_y, len(sizes))
    train_accuracy = _accuracy(_predict_logistic(train_x, w), train_y)
    eval_accuracy = _accuracy(_predict_logistic(test_x, w), test_y)
    return {"score": eval_accuracy, "train_accuracy": train_accuracy, "eval_accuracy": eval_accuracy}


def _factor_vae_votes(rng, codes, labels, groups, points, batch, chunk=512):
    """(K, D) votes: per training point, its factor and the code of least variance within `batch`
    rows that share one value of that factor (the value of a uniformly drawn row)."""
    fixed = np.bincount(rng.integers(len(labels), size=points), minlength=len(labels))
    votes = np.zeros((len(labels), codes.shape[1]), np.int64)
    for k, (lab, group) in enumerate(zip(labels, groups)):
        for start in range(0, fixed[k], chunk):
            m = min(chunk, fixed[k] - start)
            values = lab[rng.integers(len(codes), size=m)]
            rows = np.take(codes, _rows_sharing(rng, group, np.repeat(values[:, None], batch, 1)), 0)
            spread = np.sum((rows - rows.mean(1, keepdims=True)) ** 2, 1)  # variance * (batch - 1)
            votes[k] += np.bincount(np.argmin(spread, 1), minlength=codes.shape[1])
    return votes


def factor_vae_score(codes, factors, samples=10_000, batch=64, seed=0):
    """FactorVAE disentanglement score (Kim & Mnih 2018), as disentanglement_lib computes it.

    codes (N, D) float, factors (N, K) int. Codes whose standard deviation over all N rows is below
    COLLAPSED_STD (0.05, disentanglement_lib's threshold) are dropped; the others are scaled by that
    deviation. Each of `samples` training points picks a factor uniformly, then `batch` rows that
    share one value of it (the value of a uniformly drawn row; rows drawn uniformly among those with
    that value), and votes for the kept code of least variance within them. The classifier maps
    each code to the factor with most votes; `samples // 2` new points test it. Random draws use
    default_rng(seed). Returns `score` = `eval_accuracy` and `train_accuracy` (fractions of points
    classified right; chance is 1 / K) and `active_dims`, the indices (int array) of the kept
    codes; with none kept, all scores are 0. Raises ValueError for bad shapes, non-finite codes, a
    factor with a single value or a factor value held by a single row (named: "factor 2 value 7").
    disentanglement_lib estimates the scale on 10,000 sampled points; here it is taken on all rows.
    """
    _check_count("samples", samples, 2)
    _check_count("batch", batch, 2)
    codes, labels, sizes = _labelled(codes, factors)
    groups = _value_groups(factors, labels, sizes, "the FactorVAE score")
    std = codes.std(0, ddof=1) if len(codes) > 1 else np.zeros(codes.shape[1])
    active = np.flatnonzero(std >= COLLAPSED_STD)
    if len(active) == 0:
        return {"score": 0.0, "train_accuracy": 0.0, "eval_accuracy": 0.0, "active_dims": active}
    codes = (codes[:, active] - codes[:, active].mean(0)) / std[active]
    codes = codes.astype(np.float32)  # half the memory traffic of the random row reads
    rng = np.random.default_rng(seed)
    train_votes = _factor_vae_votes(rng, codes, labels, groups, samples, batch)
    test_votes = _factor_vae_votes(rng, codes, labels, groups, samples // 2, batch)
    classifier = np.argmax(train_votes, 0)  # the factor each kept code stands for
    right = lambda votes: float(votes[classifier, np.arange(len(active))].sum() / votes.sum())
    eval_accuracy = right(test_votes)
    return {"score": eval_accuracy, "train_accuracy": right(train_votes), "eval_accuracy": eval_accuracy,
            "active_dims": active}


# -----------------------------------------------------------------------------
# DCI (Eastwood & Williams)


def _one_minus_entropy(weights, base):
    """1 - entropy (log base `base`) of each row of `weights` normalised to sum 1, as
    disentanglement_lib (which adds 1e-11 to every entry first); 1 when base is 1."""
    if base == 1:
        return np.ones(len(weights))
    p = weights + 1e-11
    p = p / p.sum(1, keepdims=True)
    return 1 + np.sum(p * np.log(p), 1) / math.log(base)


def _disentanglement_completeness(importance):
    weights = importance if importance.sum() > 0 else np.ones_like(importance)
    weights = weights / weights.sum()
    disentanglement = np.sum(_one_minus_entropy(importance, importance.shape[1]) * weights.sum(1))
    completeness = np.sum(_one_minus_entropy(importance.T, importance.shape[0]) * weights.sum(0))
    return float(disentanglement), float(completeness)


def dci(codes, factors, importance=None, seed=0):
    """Disentanglement, completeness and informativeness (Eastwood & Williams 2018).

    codes (N, D) float, factors (N, K) int. `importance` (D, K), >= 0, says how much each code
    matters for predicting each factor. Disentanglement is the mean over codes of 1 - the entropy
    (base K) of the code's importance over factors, weighted by the code's share of all importance;
    completeness the mean over factors of 1 - the entropy (base D) over codes, weighted by the
    factor's share: exactly disentanglement_lib's formulas, so pass your own regressor's importance
    to get theirs. Without one, it comes from a linear discriminant analysis per factor (a linear
    classifier, as the Lasso of Eastwood & Williams), fitted in closed form on TRAIN_POINTS random
    rows of standardised codes: importance[j, k] = the mean over the factor's values of |weight of
    code j| (weights centred over values), each column scaled to sum 1 (as scikit-learn's
    feature_importances_ are). disentanglement_lib uses scikit-learn's gradient-boosted trees
    instead, which a NumPy-only file cannot have at their cost; a logistic regression is not used
    either, as its L2 penalty forbids the large weights that split a 40-valued factor on one code.
    `informativeness_train` / `_test` are that classifier's accuracy on its training rows and on
    TEST_POINTS other rows, averaged over factors (disentanglement_lib's convention: accuracy, not
    error). The rows are drawn with default_rng(seed). Returns those four floats in [0, 1] and
    `importance` (D, K). Raises ValueError for bad shapes, non-finite codes or importance, a
    negative importance, or a factor with a single value (named).
    """
    codes, labels, sizes = _labelled(codes, factors)
    train, test = _split(len(codes), seed)
    x_train, x_test = _standardize(codes[train], codes[test])
    fitted = np.zeros((codes.shape[1], len(sizes)))
    accuracy_train, accuracy_test = [], []
    for k, (lab, size) in enumerate(zip(labels, sizes)):
        w, b = _fit_lda(x_train, _two_values(lab[train], k, "training rows of DCI"), size)
        accuracy_train.append(_accuracy(x_train @ w + b, lab[train]))
        accuracy_test.append(_accuracy(x_test @ w + b, lab[test]))
        present = np.isfinite(b)
        weights = np.abs(w[:, present] - w[:, present].mean(1, keepdims=True)).mean(1)
        fitted[:, k] = weights / weights.sum() if weights.sum() > 0 else 0.0
    if importance is None:
        importance = fitted
    else:
        importance = np.asarray(importance, dtype=np.float64)
        if importance.shape != fitted.shape:
            raise ValueError(f"importance must have shape (codes, factors) = {fitted.shape}, "
                             f"got {importance.shape}")
        _check_finite("importance", importance)
        if importance.min() < 0:
            raise ValueError("importance must be >= 0")
    disentanglement, completeness = _disentanglement_completeness(importance)
    return {"disentanglement": disentanglement, "completeness": completeness,
            "informativeness_train": float(np.mean(accuracy_train)),
            "informativeness_test": float(np.mean(accuracy_test)), "importance": importance}


# -----------------------------------------------------------------------------
# SAP score (Kumar et al.)


def _single_code_accuracy(train_codes, train_labels, test_codes, test_labels, classes):
    """(D,) held-out accuracy of a 1-D linear discriminant on each code alone: class means, one
    within-class variance, so each value wins an interval between thresholds."""
    counts = np.bincount(train_labels, minlength=classes)
    means = np.stack([np.bincount(train_labels, c, minlength=classes) for c in train_codes.T], 1)
    means /= np.maximum(counts, 1)[:, None]  # (classes, D)
    within = np.mean((train_codes - means[train_labels]) ** 2, 0)
    total = train_codes.var(0)
    # a code constant within classes: nearest class mean (the limit); a constant code: the prior
    within = np.where(total > 0, np.maximum(within, 1e-12 * total), 1.0)
    with np.errstate(divide="ignore"):
        prior = np.log(counts / len(train_labels))
    logits = (test_codes[:, :, None] * means.T - 0.5 * means.T ** 2) / within[:, None] + prior
    return np.mean(np.argmax(logits, 2) == test_labels[:, None], 0)


def sap_score(codes, factors, continuous=False, seed=0):
    """Separated Attribute Predictability (Kumar et al. 2018).

    codes (N, D) float, factors (N, K) int. score_matrix[j, k] says how well code j alone predicts
    factor k; the score is the mean over factors of the gap between the two best codes (with one
    code, its own entry). continuous=True: the squared correlation of code and factor value over all
    rows (0 for a code of variance <= 1e-12), as disentanglement_lib. continuous=False (the default,
    for class-valued factors): the accuracy on TEST_POINTS held-out rows of a classifier of the
    factor from the one code, trained on TRAIN_POINTS rows (drawn with default_rng(seed)). The
    classifier is a 1-D linear discriminant (nearest class mean, priors included): thresholds on the
    code as in Kumar et al.; disentanglement_lib's one-vs-rest linear SVM (C = 0.01) cannot single
    out the middle values of a many-valued factor on one axis, so it underrates a perfect code.
    Returns `score` (float) and `score_matrix` (D, K), values in [0, 1]. Raises ValueError for bad
    shapes, non-finite codes or a factor with a single value (named).
    """
    codes, labels, sizes = _labelled(codes, factors)
    if continuous:
        values = np.asarray(factors, dtype=np.float64)
        centred_codes, centred_values = codes - codes.mean(0), values - values.mean(0)
        covariance = centred_codes.T @ centred_values / max(len(codes) - 1, 1)
        code_var = np.sum(centred_codes ** 2, 0) / max(len(codes) - 1, 1)
        value_var = np.sum(centred_values ** 2, 0) / max(len(codes) - 1, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            matrix = covariance ** 2 / np.outer(code_var, value_var)
        matrix[code_var <= 1e-12] = 0.0
    else:
        train, test = _split(len(codes), seed)
        columns = [_single_code_accuracy(codes[train], _two_values(lab[train], k, "training rows of SAP"),
                                         codes[test], lab[test], size)
                   for k, (lab, size) in enumerate(zip(labels, sizes))]
        matrix = np.stack(columns, 1)
    ranked = -np.sort(-matrix, axis=0)
    gaps = ranked[0] - ranked[1] if len(ranked) > 1 else ranked[0]
    return {"score": float(np.mean(gaps)), "score_matrix": matrix}


# -----------------------------------------------------------------------------
# modularity and explicitness (Ridgeway & Mozer)


def _modularity(mi):
    """Mean over codes of 1 - (sum of squared MI - max) / (max * (K - 1)); 0 for a code with no MI."""
    squared = mi ** 2
    top = squared.max(1)
    deviation = (squared.sum(1) - top) / np.where(top > 0, top * max(mi.shape[1] - 1, 1), 1.0)
    return float(np.mean(np.where(top > 0, 1 - deviation, 0.0)))


def modularity_explicitness(codes, factors, bins=20, seed=0):
    """Modularity and explicitness (Ridgeway & Mozer 2018), after disentanglement_lib's definitions.

    codes (N, D) float, factors (N, K) int. Modularity: from the discrete MI (nats) of every code,
    binned into `bins` equal-width bins over its range, with every factor, over all N rows (the MI of
    discrete_mig), each code scores 1 - (sum over factors of MI^2 - its largest MI^2) / (largest *
    (K - 1)) and a code with no MI at all (a constant code) scores 0, as disentanglement_lib: so
    collapsed codes pull the mean down. Equal to disentanglement_lib's modularity on the same codes
    (disentanglement_lib passes it only its training rows; we use every row, which has less noise).
    Explicitness: per factor, a multinomial logistic regression (NumPy, L2 as scikit-learn's default)
    on all standardised codes, trained on TRAIN_POINTS rows drawn with default_rng(seed); its
    one-vs-rest ROC-AUC averaged over the factor's values, on those rows (`explicitness_train`) and
    on TEST_POINTS others (`explicitness_test`), averaged over factors; chance is 0.5. Returns the
    three floats in [0, 1]. Raises ValueError for bad shapes, non-finite codes or a factor with a
    single value (named).
    """
    codes, labels, sizes = _labelled(codes, factors)
    modularity = _modularity(_discrete_mi(codes, labels, sizes, bins))
    train, test = _split(len(codes), seed)
    x_train, x_test = _standardize(codes[train], codes[test])
    auc_train, auc_test = [], []
    for k, (lab, size) in enumerate(zip(labels, sizes)):
        w = _fit_logistic(x_train, _two_values(lab[train], k, "training rows of explicitness"), size)
        _two_values(lab[test], k, "test rows of explicitness")  # else no ROC-AUC is defined
        auc_train.append(_roc_auc(_predict_logistic(x_train, w), lab[train]))
        auc_test.append(_roc_auc(_predict_logistic(x_test, w), lab[test]))
    return {"modularity": modularity, "explicitness_train": float(np.mean(auc_train)),
            "explicitness_test": float(np.mean(auc_test))}


# -----------------------------------------------------------------------------
# label-free scores (disentanglement_lib's unsupervised metrics)


def gaussian_total_correlation(codes):
    """Total correlation (nats) of the Gaussian with the codes' covariance (disentanglement_lib's
    unsupervised metrics): KL(N(0, C) || N(0, diag C)) = (sum_j log C_jj - log det C) / 2.

    codes (N, D) float, N >= 2; the covariance (ddof 1) is taken over all rows. A constant code is
    left out (it is independent of the others; disentanglement_lib would return nan). Returns
    `score` >= 0, 0 for uncorrelated codes. Raises ValueError for bad shapes, non-finite codes, or a
    singular covariance (a correlation eigenvalue below 1e-10: one code a linear function of others,
    the total correlation infinite).
    """
    codes = _check_rows("codes", codes).astype(np.float64, copy=False)
    _check_finite("codes", codes)
    if len(codes) < 2:
        raise ValueError("codes: the total correlation needs at least 2 rows")
    covariance = np.atleast_2d(np.cov(codes, rowvar=False))
    keep = np.diag(covariance) > 0
    scale = np.sqrt(np.diag(covariance)[keep])
    correlation = covariance[np.ix_(keep, keep)] / np.outer(scale, scale)
    eigenvalues = np.linalg.eigvalsh(correlation)  # their log-sum is log det C - sum log C_jj
    if len(eigenvalues) and eigenvalues.min() < 1e-10:
        raise ValueError("codes: the covariance is singular (a code is, to rounding, a linear function "
                         "of others), so the Gaussian total correlation is infinite")
    return {"score": float(max(-0.5 * np.sum(np.log(eigenvalues)), 0.0))}


def mutual_info_score(codes, bins=20):
    """Mean discrete mutual information (nats) between pairs of different codes (disentanglement_lib's
    unsupervised metrics): each code binned into `bins` equal-width bins over its range (as in
    discrete_mig), the MI of every pair from their joint histogram over all rows, averaged over the
    D (D - 1) ordered pairs. codes (N, D) float, D >= 2. Returns `score` >= 0 (0: pairwise
    independent codes). Raises ValueError for bad shapes, non-finite codes or a single code.
    """
    codes = _check_rows("codes", codes)
    _check_finite("codes", codes)
    if codes.shape[1] < 2:
        raise ValueError("codes: the mutual information score needs at least 2 code dimensions")
    binned = [_discretize(code, bins) for code in np.ascontiguousarray(codes.T)]
    total = 0.0
    for i, j in zip(*np.triu_indices(len(binned), 1)):
        table = np.bincount(binned[i] * bins + binned[j], minlength=bins * bins).reshape(bins, bins)
        total += 2 * _mi_from_counts(table)
    return {"score": total / (len(binned) * (len(binned) - 1))}


# -----------------------------------------------------------------------------
# every metric at once


def evaluate(mu, logvar, factors=None, seed=0):
    """Every metric that applies to the encoder's posterior means `mu` (N, D) and log-variances
    `logvar` (N, D) (used by mig_gaussian only; None leaves that entry as an error), with integer
    `factors` (N, K) or None for unlabelled data.

    Returns {metric name: that function's dict}: with factors, `beta_vae_score`, `factor_vae_score`,
    `dci`, `sap_score`, `modularity_explicitness`, `gaussian_total_correlation`,
    `mutual_info_score`, `mig_discrete` (discrete_mig) and `mig_gaussian` (gaussian_mig); without,
    the two label-free ones. Each metric runs with its defaults and `seed`. A metric that raises
    ValueError on these codes (say a factor value with a single row) gets {"error": "<one line>"}
    and the others are still computed.
    """
    mu = np.asarray(mu, dtype=np.float64)
    runs = {}
    if factors is not None:
        factors = np.asarray(factors)
        runs.update(beta_vae_score=lambda: beta_vae_score(mu, factors, seed=seed),
                    factor_vae_score=lambda: factor_vae_score(mu, factors, seed=seed),
                    dci=lambda: dci(mu, factors, seed=seed),
                    sap_score=lambda: sap_score(mu, factors, seed=seed),
                    modularity_explicitness=lambda: modularity_explicitness(mu, factors, seed=seed))
    runs.update(gaussian_total_correlation=lambda: gaussian_total_correlation(mu),
                mutual_info_score=lambda: mutual_info_score(mu))
    if factors is not None:
        runs["mig_discrete"] = lambda: discrete_mig(mu, factors)
        runs["mig_gaussian"] = lambda: gaussian_mig(mu, _given("logvar", logvar), factors, seed=seed)
    results = {}
    for name, run in runs.items():
        try:
            results[name] = run()
        except ValueError as e:
            results[name] = {"error": (str(e).splitlines() or [type(e).__name__])[0]}
    return results


def _given(name, value):
    if value is None:
        raise ValueError(f"no {name} given")
    return value
