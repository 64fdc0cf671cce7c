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
dcimig             Sepliarskaia et al. 2019: each latent's MI gap credited to one factor.
irs                Suter et al. 2019: interventional robustness, as disentanglement_lib.
gaussian_total_correlation, mutual_info_score  disentanglement_lib's label-free scores.
udr                Duan et al. 2020: unsupervised ranking of several models by their agreement.
downstream         Locatello et al. 2019: factor prediction from 10 .. 10,000 labelled rows.
evaluate           all of the above that apply to one model, in one dict: protocol="exact" (every
                   row, our estimators) or "dlib" (disentanglement_lib's unsupervised-study
                   settings: sampled points, gradient-boosted trees, LinearSVC); dlib_names()
                   flattens a result under disentanglement_lib's names.

The MIGs return `mig` (float), `gaps` (K,), `mi` (D, K) in nats, `entropy` (K,) of the factors in
nats, and `mi_normalized` (D, K) = mi / entropy. MIG is the mean over factors of the gap between the
two largest normalised MI values (with one latent, the gap is that latent's normalised MI).
A factor with a single value raises ValueError naming it (data.py drops constant factors before they
get here). Where a metric draws samples, it draws rows of the given data (no new images are
rendered) with numpy's default_rng(seed): the same seed gives the same numbers.
"""
import itertools
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


def _inner(a, b):
    """a.T @ b for tall a (n, p) and b (n, q), by einsum: through BLAS such skinny products run
    single-threaded at best, and with OpenBLAS's threads on a busy machine up to 30 times slower."""
    return np.einsum("ni,nj->ij", a, b)


def _times(a, w):
    """a @ w for tall a (n, p) and small w (p, q), by einsum (see _inner)."""
    return np.einsum("ni,ij->nj", a, w)


def _check_finite(name, array):
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")


def _relabel(column):
    """Map arbitrary labels to 0..V-1; returns (labels, V)."""
    if np.issubdtype(column.dtype, np.integer) and column.min() >= 0 and column.max() < 4 * len(column):
        column = column.astype(np.int64)  # any integer dtype (uint64 does not index)
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
    if factors.shape[1] == 0:
        raise ValueError(f"factors has shape {factors.shape}: no factor varies, so the data is "
                         "unlabelled and only the label-free metrics apply (pass factors=None)")
    if not (np.issubdtype(factors.dtype, np.integer) or np.issubdtype(factors.dtype, np.bool_)):
        if not np.all(np.isfinite(factors)):
            raise ValueError("factors contains non-finite values (nan or inf)")
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


def _lbfgs(objective, w, iterations, memory=10, tolerance=1e-5):
    """Minimise a smooth convex objective(w) -> (value, gradient) by L-BFGS with a backtracking
    (Armijo) line search; stops when the largest gradient entry is below `tolerance` or no step
    lowers the value. Returns the last w."""
    value, grad = objective(w)
    steps, changes = [], []
    for _ in range(iterations):
        if np.max(np.abs(grad)) < tolerance:
            break
        direction = -grad
        alphas = []
        for s, y in reversed(list(zip(steps, changes))):  # the two-loop recursion
            alpha = np.sum(s * direction) / np.sum(s * y)
            direction -= alpha * y
            alphas.append(alpha)
        if steps:
            s, y = steps[-1], changes[-1]
            direction *= np.sum(s * y) / np.sum(y * y)
        else:
            direction /= max(1.0, np.sqrt(np.sum(grad * grad)))
        for (s, y), alpha in zip(zip(steps, changes), reversed(alphas)):
            direction += s * (alpha - np.sum(y * direction) / np.sum(s * y))
        slope = np.sum(grad * direction)
        for t in 0.5 ** np.arange(40):
            new_value, new_grad = objective(w + t * direction)
            if new_value <= value + 1e-4 * t * slope:
                break
        else:
            break  # no further progress in double precision
        s, y = t * direction, new_grad - grad
        if np.sum(s * y) > 1e-12 * np.sqrt(np.sum(s * s) * np.sum(y * y)):
            steps, changes = (steps + [s])[-memory:], (changes + [y])[-memory:]
        w, value, grad = w + s, new_value, new_grad
    return w


def _fit_logistic(x, labels, classes, iterations=500):
    """Multinomial logistic regression on (n, D) inputs: weights (D + 1, classes), the bias row last.

    Minimises the mean cross-entropy + ||W||^2 / (2n) over the weights (not the bias): scikit-learn's
    LogisticRegression at its defaults (C = 1; with two classes the penalty is doubled, which makes
    the two-column fit equal to scikit-learn's one-column binary fit), by L-BFGS to a gradient below
    1e-5: O(n D classes) per iteration, so a factor of a thousand values costs seconds.
    """
    n = len(x)
    x = np.hstack([x, np.ones((n, 1))])
    rows = np.arange(n)
    penalty = (2.0 if classes == 2 else 1.0) / n
    mask = np.ones((x.shape[1], 1))
    mask[-1] = 0  # the bias is not penalised

    def objective(w):
        logits = _times(x, w)
        top = logits.max(1, keepdims=True)
        log_total = top + np.log(np.sum(np.exp(logits - top), 1, keepdims=True))
        p = np.exp(logits - log_total)
        value = np.mean(log_total[:, 0] - logits[rows, labels]) + 0.5 * penalty * np.sum(mask * w * w)
        p[rows, labels] -= 1  # the cross-entropy's gradient with respect to the logits
        return value, _inner(x, p) / n + penalty * mask * w

    w = np.zeros((x.shape[1], classes))
    w[-1] = np.log(np.maximum(np.bincount(labels, minlength=classes) / n, 1 / n))  # class frequencies
    return _lbfgs(objective, w, iterations)


def _predict_logistic(x, w):
    return _softmax(_times(x, w[:-1]) + w[-1])


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
    covariance = _inner(residual, residual) / len(x) + shrinkage * np.eye(x.shape[1])
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


def beta_vae_score(codes, factors, samples=10_000, batch=64, seed=0, standardize=True):
    """BetaVAE disentanglement score (Higgins et al. 2017), as disentanglement_lib computes it.

    codes (N, D) float, factors (N, K) int. Each of `samples` training points picks a factor
    uniformly and draws `batch` pairs of rows that share that factor's value (the first row uniform
    over the data, the second uniform among rows with its value; on a full factor grid this is
    disentanglement_lib's sampling); its feature is the mean over the pairs of |code_a - code_b|
    (D,), its label the factor. A multinomial logistic regression (NumPy, on features standardised
    with the training points' mean and deviation, which disentanglement_lib does not do: it makes
    the score independent of the codes' scale; standardize=False is disentanglement_lib's raw
    features) learns the label; `samples // 2` new points test
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
    if standardize:
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


def factor_vae_score(codes, factors, samples=10_000, batch=64, seed=0, variance_points=None):
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
    The scale is taken on all rows, or on `variance_points` rows drawn with replacement (the first
    draw of default_rng(seed)), as disentanglement_lib does with 10,000.
    """
    _check_count("samples", samples, 2)
    _check_count("batch", batch, 2)
    codes, labels, sizes = _labelled(codes, factors)
    groups = _value_groups(factors, labels, sizes, "the FactorVAE score")
    rng = np.random.default_rng(seed)
    sample = codes if variance_points is None else codes[rng.integers(len(codes), size=variance_points)]
    std = sample.std(0, ddof=1) if len(sample) > 1 else np.zeros(codes.shape[1])
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
# gradient-boosted trees (DCI's importances as disentanglement_lib fits them)
#
# scikit-learn's GradientBoostingClassifier at its defaults: log-loss; per stage one regression tree
# per class on the negative gradient (one tree for two classes); 100 stages of depth-3 trees split by
# Friedman's MSE (the largest squared-error reduction), leaves set by one Newton step ((K-1)/K of it
# for K > 2 classes) and shrunk by 0.1; a feature's importance is the squared-error reduction of its
# splits summed over all trees, normalised. Here every tree of every factor grows at once, one level
# at a time: each code is cut into GBT_BINS quantile bins (between its distinct values when it has
# fewer, which is then exact), and the residual sums and row counts per (code, bin, tree, node) come
# from one matrix product of the rows' one-hot bins with the residuals; a right child's histogram is
# its parent's less its sibling's.

GBT_BINS = 64  # at most 256 (bins are uint8)
GBT_STAGES, GBT_DEPTH, GBT_RATE = 100, 3, 0.1


def _quantile_bins(train, test, bins):
    """(n, D) and (m, D) bin indices: per code, thresholds midway between distinct training values
    (at `bins` quantiles when there are more); bin b holds threshold[b - 1] < x <= threshold[b]."""
    train_bins = np.empty(train.shape, np.uint8)
    test_bins = np.empty(test.shape, np.uint8)
    for j in range(train.shape[1]):
        values = np.unique(train[:, j])
        if len(values) > bins:
            values = np.unique(np.quantile(train[:, j], np.linspace(0, 1, bins), method="nearest"))
        thresholds = (values[:-1] + values[1:]) / 2
        train_bins[:, j] = np.searchsorted(thresholds, train[:, j], side="left")
        test_bins[:, j] = np.searchsorted(thresholds, test[:, j], side="left")
    return train_bins, test_bins


def _node_histograms(onehot_bins, bin_counts, residual, node, level, parent):
    """(D, B, trees, 2^level) residual sums and row counts of every node of the level, from
    onehot_bins (D * B, n) float32, bin_counts (D, B) and the (n, trees) float32 residuals."""
    codes, bins = bin_counts.shape
    trees = residual.shape[1]
    if level == 0:
        sums = (onehot_bins @ residual).reshape(codes, bins, trees, 1)
        return sums, np.broadcast_to(bin_counts[:, :, None, None], sums.shape)
    halves = 2 ** (level - 1)
    left = np.empty((len(node), 2, halves, trees), np.float32)  # rows in each left child
    for h in range(halves):
        left[:, 1, h] = node == 2 * h
        left[:, 0, h] = residual * left[:, 1, h]
    product = (onehot_bins @ left.reshape(len(node), -1)).reshape(codes, bins, 2, halves, trees)
    left_sums, left_counts = product[:, :, 0].swapaxes(2, 3), product[:, :, 1].swapaxes(2, 3)
    sums = np.stack([left_sums, parent[0] - left_sums], -1).reshape(codes, bins, trees, 2 * halves)
    counts = np.stack([left_counts, parent[1] - left_counts], -1).reshape(codes, bins, trees, 2 * halves)
    return sums, counts


def _best_splits(sums, counts):
    """Per (tree, node): code, bin s and squared-error reduction of the best split 'bin <= s'
    (the first in code, bin order when tied); a reduction of 0 where no split separates rows."""
    left_sum = np.cumsum(sums, 1, dtype=np.float64)
    left_count = np.cumsum(counts, 1, dtype=np.float64)
    right_sum, right_count = left_sum[:, -1:] - left_sum, left_count[:, -1:] - left_count
    valid = (left_count > 0.5) & (right_count > 0.5)
    product = np.where(valid, left_count * right_count * left_count[:, -1:], 1.0)
    gain = np.where(valid, (left_sum * right_count - right_sum * left_count) ** 2 / product, 0.0)
    codes, bins, trees, nodes = gain.shape
    flat = gain.reshape(codes * bins, trees, nodes)
    best = np.argmax(flat, 0)
    return best // bins, best % bins, np.take_along_axis(flat, best[None], 0)[0]


def _descend(node, bins, code, cut, split):
    """Each row's child: 2 node + 1 when its node splits and its bin of the split's code is > cut."""
    trees, nodes = code.shape
    at = np.arange(trees, dtype=np.int32) * nodes + node  # (rows, trees) index of (tree, node)
    threshold = np.where(split, cut, 255).ravel()[at]  # a bin is never > 255: no split
    rows = np.arange(len(bins), dtype=np.int32)[:, None] * bins.shape[1]
    value = np.take(bins, rows + code.ravel()[at])
    return 2 * node + (value > threshold)


def _grow_trees(onehot_bins, bin_counts, train_bins, test_bins, residual):
    """One depth-GBT_DEPTH tree per residual column: leaf of every training and test row per tree
    (trees, 2^depth leaves) and the (trees, D) squared-error reduction of the splits on each code."""
    node = np.zeros(residual.shape, np.int32)
    node_test = np.zeros((len(test_bins), residual.shape[1]), np.int32)
    gains = np.zeros((residual.shape[1], train_bins.shape[1]))
    residual = residual.astype(np.float32)
    histograms = None
    for level in range(GBT_DEPTH):
        histograms = _node_histograms(onehot_bins, bin_counts, residual, node, level, histograms)
        code, cut, reduction = _best_splits(*histograms)
        split = reduction > 1e-12
        np.add.at(gains, (np.arange(len(gains))[:, None], code), np.where(split, reduction, 0.0))
        node = _descend(node, train_bins, code, cut, split)
        node_test = _descend(node_test, test_bins, code, cut, split)
    return node, node_test, gains


def _gbt_probabilities(raw, groups):
    """Per factor's columns: softmax (several classes) or sigmoid (two classes, one column)."""
    p = np.empty_like(raw)
    for columns in groups:
        if columns.stop - columns.start == 1:
            p[:, columns] = 1 / (1 + np.exp(-raw[:, columns]))
        else:
            p[:, columns] = _softmax(raw[:, columns])
    return p


def _gbt_targets(labels, sizes):
    """(n, trees) targets (one-hot, or the label itself for two classes), column groups, initial raw
    scores (log prior, or log-odds for two classes) and the Newton step's scale per tree."""
    targets, groups, init, scale, start = [], [], [], [], 0
    for lab, size in zip(labels, sizes):
        prior = np.clip(np.bincount(lab, minlength=size) / len(lab), 1e-16, 1 - 1e-16)
        if size == 2:
            targets.append(lab[:, None].astype(np.float64))
            init.append([math.log(prior[1] / prior[0])])
            scale.append([1.0])
        else:
            targets.append(np.eye(size)[lab])
            init.append(np.log(prior))
            scale.append(np.full(size, (size - 1) / size))
        width = targets[-1].shape[1]
        groups.append(slice(start, start + width))
        start += width
    return np.hstack(targets), groups, np.concatenate(init), np.concatenate(scale)


def _gbt_fit(train, test, labels, sizes):
    """Boosted trees per factor on the same codes: raw scores of the training and test rows
    (n, trees), (m, trees), the factors' column groups, and the (trees, D) split gains."""
    train_bins, test_bins = _quantile_bins(train, test, GBT_BINS)
    n, codes = train.shape
    onehot_bins = np.zeros((codes * GBT_BINS, n), np.float32)
    onehot_bins[np.arange(codes) * GBT_BINS + train_bins, np.arange(n)[:, None]] = 1
    bin_counts = onehot_bins.sum(1).reshape(codes, GBT_BINS)
    targets, groups, init, scale = _gbt_targets(labels, sizes)
    raw, raw_test = np.tile(init, (n, 1)), np.tile(init, (len(test), 1))
    gains = np.zeros((targets.shape[1], codes))
    leaves = 2 ** GBT_DEPTH
    trees = np.arange(targets.shape[1]) * leaves
    for _ in range(GBT_STAGES):
        p = _gbt_probabilities(raw, groups)
        residual = targets - p
        node, node_test, stage_gains = _grow_trees(onehot_bins, bin_counts, train_bins, test_bins,
                                                            residual)
        gains += stage_gains
        leaf = (trees + node).ravel()
        numerator = np.bincount(leaf, residual.ravel(), len(trees) * leaves)
        denominator = np.bincount(leaf, (p * (1 - p)).ravel(), len(trees) * leaves)
        value = np.where(np.abs(denominator) < 1e-150, 0.0,
                         numerator / np.where(denominator == 0, 1.0, denominator))
        value *= np.repeat(scale, leaves)
        raw += GBT_RATE * value[trees + node]
        raw_test += GBT_RATE * value[trees + node_test]
    return raw, raw_test, groups, gains


def _gbt_predict(raw, columns):
    if columns.stop - columns.start == 1:
        return (raw[:, columns.start] > 0).astype(np.int64)
    return np.argmax(raw[:, columns], 1)


def _gbt_importance(x_train, x_test, labels_train, labels_test, sizes):
    """(D, K) importances (each column sums to 1, or 0 without any split) and the train and test
    accuracy per factor of gradient-boosted trees on the codes."""
    raw, raw_test, groups, gains = _gbt_fit(x_train, x_test, labels_train, sizes)
    importance = np.zeros((x_train.shape[1], len(sizes)))
    accuracy_train, accuracy_test = [], []
    for k, columns in enumerate(groups):
        total = gains[columns].sum(0)
        importance[:, k] = total / total.sum() if total.sum() > 0 else 0.0
        accuracy_train.append(np.mean(_gbt_predict(raw, columns) == labels_train[k]))
        accuracy_test.append(np.mean(_gbt_predict(raw_test, columns) == labels_test[k]))
    return importance, accuracy_train, accuracy_test



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


def _lda_importance(x_train, x_test, labels_train, labels_test, sizes):
    """(D, K) importances of a linear discriminant per factor (|weights| centred over values, mean
    over values, each column scaled to sum 1), and its train and test accuracy per factor."""
    importance = np.zeros((x_train.shape[1], len(sizes)))
    accuracy_train, accuracy_test = [], []
    for k, size in enumerate(sizes):
        w, b = _fit_lda(x_train, labels_train[k], size)
        accuracy_train.append(_accuracy(_times(x_train, w) + b, labels_train[k]))
        accuracy_test.append(_accuracy(_times(x_test, w) + b, labels_test[k]))
        present = np.isfinite(b)
        weights = np.abs(w[:, present] - w[:, present].mean(1, keepdims=True)).mean(1)
        importance[:, k] = weights / weights.sum() if weights.sum() > 0 else 0.0
    return importance, accuracy_train, accuracy_test


def _present_classes(labels_train, labels_test):
    """Training labels renumbered over the values they hold (as scikit-learn's classes_), test
    labels mapped the same way (-1 for a value the training rows lack), and the class count."""
    values, train = np.unique(labels_train, return_inverse=True)
    position = np.clip(np.searchsorted(values, labels_test), 0, len(values) - 1)
    test = np.where(values[position] == labels_test, position, -1)
    return train.reshape(-1), test, len(values)


def _given_importance(importance, shape):
    importance = np.asarray(importance, dtype=np.float64)
    if importance.shape != shape:
        raise ValueError(f"importance must have shape (codes, factors) = {shape}, "
                         f"got {importance.shape}")
    _check_finite("importance", importance)
    if importance.min() < 0:
        raise ValueError("importance must be >= 0")
    return importance


def dci(codes, factors, importance="linear", seed=0):
    """Disentanglement, completeness and informativeness (Eastwood & Williams 2018).

    codes (N, D) float, factors (N, K) int. importance[j, k] >= 0 says how much code j matters for
    predicting factor k. Disentanglement is the mean over codes of 1 - the entropy (base K) of the
    code's importance over factors, weighted by the code's share of all importance; completeness
    the mean over factors of 1 - the entropy (base D) over codes, weighted by the factor's share:
    disentanglement_lib's formulas. The classifiers train on TRAIN_POINTS rows and are tested on
    TEST_POINTS others, drawn with default_rng(seed) (disentanglement_lib's 10,000 and 5,000).
    importance="linear" (default): a linear discriminant analysis per factor on standardised codes
    (a linear classifier, as the Lasso of Eastwood & Williams), in closed form: importance = the
    mean over the factor's values of |weight of code j| (weights centred over values), each column
    scaled to sum 1. importance="gbt": gradient-boosted trees per factor, disentanglement_lib's
    choice (scikit-learn's GradientBoostingClassifier at its defaults, written here in NumPy on
    GBT_BINS quantile bins per code; its feature_importances_); its cost grows with the number of
    factor values (one tree per value and stage): dSprites' 3 + 6 + 40 + 32 + 32 take ~20 s of one
    core on 10,000 rows, where scikit-learn takes many minutes.
    An array (D, K): your own importances (informativeness then from the linear discriminant).
    `informativeness_train` / `_test`: the classifier's accuracy on its training and test rows,
    averaged over factors (disentanglement_lib's convention: accuracy, not error). Returns those
    four floats in [0, 1], `importance` (D, K) and `importance_kind`. Raises ValueError for bad
    shapes, non-finite codes or importance, a negative importance, an unknown kind, or a factor
    with a single value in the training rows (named).
    """
    codes, labels, sizes = _labelled(codes, factors)
    importance = "linear" if importance is None else importance
    kind = importance if isinstance(importance, str) else "given"
    if kind not in ("linear", "gbt", "given"):
        raise ValueError(f"importance must be 'linear', 'gbt' or an array, got {importance!r}")
    train, test = _split(len(codes), seed)
    labels_train = [_two_values(lab[train], k, "training rows of DCI") for k, lab in enumerate(labels)]
    labels_test = [lab[test] for lab in labels]
    if kind == "gbt":
        renumbered = [_present_classes(a, b) for a, b in zip(labels_train, labels_test)]
        fitted, accuracy_train, accuracy_test = _gbt_importance(
            codes[train], codes[test], [r[0] for r in renumbered], [r[1] for r in renumbered],
            [r[2] for r in renumbered])
    else:
        x_train, x_test = _standardize(codes[train], codes[test])
        fitted, accuracy_train, accuracy_test = _lda_importance(x_train, x_test, labels_train,
                                                                labels_test, sizes)
    if kind == "given":
        fitted = _given_importance(importance, fitted.shape)
    disentanglement, completeness = _disentanglement_completeness(fitted)
    return {"disentanglement": disentanglement, "completeness": completeness,
            "informativeness_train": float(np.mean(accuracy_train)),
            "informativeness_test": float(np.mean(accuracy_test)), "importance": fitted,
            "importance_kind": kind}


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


def _svm_objective(w, b, x, sign, cost):
    """Per problem (columns): 0.5 (w^2 + b^2) + sum_i cost_i max(0, 1 - sign_i (w x_i + b))^2."""
    margin = np.maximum(1 - sign * (x * w + b), 0)
    return 0.5 * (w * w + b * b) + np.sum(cost * margin ** 2, 0), margin


def _fit_svm_1d(x, sign, cost, iterations=50):
    """Linear SVMs on one feature each, liblinear's L2-regularised squared-hinge primal with the
    bias penalised as a feature of value 1 (scikit-learn's LinearSVC), solved exactly by Newton
    steps with backtracking: x, sign (+-1) and cost (C times the class weight) are (n, problems);
    returns w, b (problems,)."""
    w, b = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    value, margin = _svm_objective(w, b, x, sign, cost)
    for _ in range(iterations):
        active = cost * (margin > 0) * 2
        pull = active * margin * sign  # minus the loss's derivative with respect to the score
        grad_w, grad_b = w - np.sum(pull * x, 0), b - np.sum(pull, 0)
        h_ww, h_wb, h_bb = 1 + np.sum(active * x * x, 0), np.sum(active * x, 0), 1 + np.sum(active, 0)
        det = h_ww * h_bb - h_wb ** 2
        step_w, step_b = (h_bb * grad_w - h_wb * grad_b) / det, (h_ww * grad_b - h_wb * grad_w) / det
        decrement = grad_w * step_w + grad_b * step_b
        if np.max(decrement) < 1e-12:
            break
        t = np.ones_like(w)
        for _ in range(30):
            new_value, new_margin = _svm_objective(w - t * step_w, b - t * step_b, x, sign, cost)
            failed = new_value > value - 0.25 * t * decrement
            if not failed.any():
                break
            t = np.where(failed, t / 2, t)
        w, b, value, margin = w - t * step_w, b - t * step_b, new_value, new_margin
    return w, b


def _single_code_svm_accuracy(train_codes, train_labels, test_codes, test_labels, classes, c=0.01):
    """(D,) held-out accuracy of disentanglement_lib's SAP classifier on each code alone:
    LinearSVC(C=0.01, class_weight="balanced"), one-vs-rest over the classes (liblinear weighs
    only the positive class then), or one machine for two classes."""
    counts = np.bincount(train_labels, minlength=classes)
    weight = len(train_labels) / (classes * counts)  # "balanced"
    targets = [1] if classes == 2 else range(classes)
    scores = []
    for target in targets:
        positive = train_labels == target
        sign = np.where(positive, 1.0, -1.0)[:, None]
        if classes == 2:
            cost = c * weight[train_labels][:, None]
        else:
            cost = np.where(positive, c * weight[target], c)[:, None]
        w, b = _fit_svm_1d(train_codes, np.broadcast_to(sign, train_codes.shape),
                           np.broadcast_to(cost, train_codes.shape))
        scores.append(test_codes * w + b)
    if classes == 2:
        predicted = (scores[0] > 0).astype(np.int64)
    else:
        predicted = np.argmax(np.stack(scores), 0)
    return np.mean(predicted == test_labels[:, None], 0)


def sap_score(codes, factors, continuous=False, seed=0, classifier="lda"):
    """Separated Attribute Predictability (Kumar et al. 2018).

    codes (N, D) float, factors (N, K) int. score_matrix[j, k] says how well code j alone predicts
    factor k; the score is the mean over factors of the gap between the two best codes (with one
    code, its own entry). continuous=True: the squared correlation of code and factor value over all
    rows (0 for a code of variance <= 1e-12), as disentanglement_lib. continuous=False (the default,
    for class-valued factors): the accuracy on TEST_POINTS held-out rows of a classifier of the
    factor from the one code, trained on TRAIN_POINTS rows (drawn with default_rng(seed)). The
    classifier is a 1-D linear discriminant (nearest class mean, priors included): thresholds on the
    code as in Kumar et al.; disentanglement_lib's one-vs-rest linear SVM (C = 0.01) cannot single
    out the middle values of a many-valued factor on one axis, so it underrates a perfect code;
    classifier="svm" is that SVM (LinearSVC(C=0.01, class_weight="balanced") on the raw code, solved
    exactly in NumPy), for numbers comparable with disentanglement_lib's.
    Returns `score` (float) and `score_matrix` (D, K), values in [0, 1]. Raises ValueError for bad
    shapes, non-finite codes, an unknown classifier or a factor with a single value (named).
    """
    codes, labels, sizes = _labelled(codes, factors)
    if classifier not in ("lda", "svm"):
        raise ValueError(f"classifier must be 'lda' or 'svm', got {classifier!r}")
    fit = _single_code_accuracy if classifier == "lda" else _single_code_svm_accuracy
    if continuous:
        values = np.asarray(factors, dtype=np.float64)
        centred_codes, centred_values = codes - codes.mean(0), values - values.mean(0)
        covariance = _inner(centred_codes, centred_values) / max(len(codes) - 1, 1)
        code_var = np.sum(centred_codes ** 2, 0) / max(len(codes) - 1, 1)
        value_var = np.sum(centred_values ** 2, 0) / max(len(codes) - 1, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            matrix = covariance ** 2 / np.outer(code_var, value_var)
        matrix[code_var <= 1e-12] = 0.0
    else:
        train, test = _split(len(codes), seed)
        columns = []
        for k, lab in enumerate(labels):
            lab_train = _two_values(lab[train], k, "training rows of SAP")
            lab_train, lab_test, size = _present_classes(lab_train, lab[test])
            columns.append(fit(codes[train], lab_train, codes[test], lab_test, size))
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


def modularity_explicitness(codes, factors, bins=20, seed=0, modularity_rows="all"):
    """Modularity and explicitness (Ridgeway & Mozer 2018), after disentanglement_lib's definitions.

    codes (N, D) float, factors (N, K) int. Modularity: from the discrete MI (nats) of every code,
    binned into `bins` equal-width bins over its range, with every factor, over all N rows (the MI of
    discrete_mig), each code scores 1 - (sum over factors of MI^2 - its largest MI^2) / (largest *
    (K - 1)) and a code with no MI at all (a constant code) scores 0, as disentanglement_lib: so
    collapsed codes pull the mean down. Equal to disentanglement_lib's modularity on the same codes
    (disentanglement_lib passes it only its training rows; we use every row, which has less noise;
    modularity_rows="train" uses the explicitness training rows, as disentanglement_lib).
    Explicitness: per factor, a multinomial logistic regression (NumPy, L2 as scikit-learn's default)
    on all standardised codes, trained on TRAIN_POINTS rows drawn with default_rng(seed); its
    one-vs-rest ROC-AUC averaged over the factor's values, on those rows (`explicitness_train`) and
    on TEST_POINTS others (`explicitness_test`), averaged over factors; chance is 0.5. Returns the
    three floats in [0, 1]. Raises ValueError for bad shapes, non-finite codes or a factor with a
    single value (named).
    """
    codes, labels, sizes = _labelled(codes, factors)
    if modularity_rows not in ("all", "train"):
        raise ValueError(f"modularity_rows must be 'all' or 'train', got {modularity_rows!r}")
    train, test = _split(len(codes), seed)
    rows = slice(None) if modularity_rows == "all" else train
    modularity = _modularity(_discrete_mi(codes[rows], [lab[rows] for lab in labels], sizes, bins))
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
# DCIMIG (Sepliarskaia et al.) and IRS (Suter et al.)


def dcimig(codes, factors, bins=20):
    """DCIMIG of Sepliarskaia et al. 2019 ("How to Not Measure Disentanglement", arXiv 1910.05587).

    codes (N, D) float, factors (N, K) int. From the discrete MI (nats) of every code, binned into
    `bins` equal-width bins over its range, with every factor over all N rows (as discrete_mig):
    each code's gap is its largest MI less its second largest (its largest with one factor) and is
    credited to the factor of its largest MI; each factor keeps the largest gap credited to it (0 if
    none); DCIMIG = the sum of those over the sum of the factors' entropies, in [0, 1]. Returns
    `dcimig` (float), `gaps` (K,) in nats, `mi` (D, K) and `entropy` (K,). Raises ValueError for bad
    shapes, non-finite codes or a factor with a single value (named).
    """
    codes, labels, sizes = _labelled(codes, factors)
    entropy = _prepare_factors(factors, len(codes))[2]
    mi = _discrete_mi(codes, labels, sizes, bins)
    return _dcimig_from_mi(mi, entropy)


def _dcimig_from_mi(mi, entropy):
    ranked = -np.sort(-mi, axis=1)
    code_gaps = ranked[:, 0] - ranked[:, 1] if mi.shape[1] > 1 else ranked[:, 0]
    gaps = np.zeros(mi.shape[1])
    np.maximum.at(gaps, np.argmax(mi, axis=1), code_gaps)
    return {"dcimig": float(gaps.sum() / entropy.sum()), "gaps": gaps, "mi": mi, "entropy": entropy}


def _histogram_bins(column, bins):
    """disentanglement_lib's histogram discretizer of one column (equal-width bins over its range)."""
    return _discretize(column.astype(np.float64), bins)


def irs(codes, factors, diff_quantile=0.99, factor_bins=20):
    """Interventional robustness score (Suter et al. 2019), as disentanglement_lib computes it.

    codes (N, D) float, factors (N, K) int. Codes constant over the rows are dropped. For each kept
    code j and factor k: the mean over k's values v of the `diff_quantile` quantile (linear
    interpolation) of |z_j - E[z_j | v_k = v]| over the rows with that value, divided by the code's
    largest |z_j - mean z_j|; irs_matrix = 1 - that ratio. A code's score is its row's maximum; the
    score is their mean weighted by the largest deviations (plain mean if all are 0). As in
    disentanglement_lib, each factor is first cut into `factor_bins` equal-width bins of its values
    (the same classes when it has at most that many values); factor_bins=None keeps the values.
    Returns `score` (float, 0 when every code is constant), `irs_matrix` (kept codes, K),
    `active_dims` (indices of the kept codes) and `max_deviations`. Raises ValueError for bad shapes,
    non-finite codes, diff_quantile outside [0, 1] or a factor with a single value (named).
    """
    codes, labels, sizes = _labelled(codes, factors)
    if not 0 <= diff_quantile <= 1:
        raise ValueError(f"diff_quantile must be in [0, 1], got {diff_quantile!r}")
    if factor_bins is not None:
        labels = [_relabel(_histogram_bins(lab, factor_bins))[0] for lab in labels]
    active = np.flatnonzero(codes.var(0) > 0)
    latents = codes[:, active]
    max_deviations = np.max(np.abs(latents - latents.mean(0)), 0)
    deviation = np.zeros((len(active), len(labels)))
    for k, lab in enumerate(labels):
        order = np.argsort(lab, kind="stable")
        bounds = np.flatnonzero(np.diff(lab[order])) + 1
        groups = np.split(latents[order], bounds)
        for group in groups:
            spread = np.abs(group - group.mean(0))
            deviation[:, k] += np.quantile(spread, diff_quantile, axis=0)
        deviation[:, k] /= len(groups)
    if len(active) == 0:
        return {"score": 0.0, "irs_matrix": deviation, "active_dims": active,
                "max_deviations": max_deviations}
    irs_matrix = 1 - deviation / max_deviations[:, None]
    best = irs_matrix.max(1)
    score = np.average(best, weights=max_deviations) if max_deviations.sum() > 0 else best.mean()
    return {"score": float(score), "irs_matrix": irs_matrix, "active_dims": active,
            "max_deviations": max_deviations}


# -----------------------------------------------------------------------------
# UDR (Duan et al.): model selection without labels


def _ranks(column):
    """Ranks 1..n of a column, ties given their mean rank (as scipy's rankdata)."""
    order = np.argsort(column, kind="stable")
    ordered = column[order]
    first = np.r_[True, ordered[1:] != ordered[:-1]]
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(column)]
    ranks = np.empty(len(column))
    ranks[order] = ((starts + ends + 1) / 2)[group]
    return ranks


def _abs_correlation(a, b):
    """|Pearson correlation| (D, D) of every column of a with every column of b (0 for a constant);
    of ranks, this is |Spearman correlation|."""
    ra, rb = a - a.mean(0), b - b.mean(0)
    scale = np.outer(np.sqrt(np.sum(ra * ra, 0)), np.sqrt(np.sum(rb * rb, 0)))
    return np.abs(np.divide(_inner(ra, rb), scale, out=np.zeros(scale.shape), where=scale > 0))


def _lasso_matrix(a, b, alpha=0.1, iterations=10_000):
    """|coefficients| (D, D) of scikit-learn's Lasso(alpha=0.1) regressing each column of b on all
    of a (mean squared error / 2 + alpha * L1, intercept fitted): coordinate descent on the centred
    Gram matrix, to changes below 1e-12."""
    a, b = a - a.mean(0), b - b.mean(0)
    gram, target = _inner(a, a) / len(a), _inner(a, b) / len(a)
    w = np.zeros(target.shape)
    for _ in range(iterations):
        largest = 0.0
        for j in range(len(w)):
            if gram[j, j] == 0:
                continue
            rho = target[j] - gram[j] @ w + gram[j, j] * w[j]
            new = np.sign(rho) * np.maximum(np.abs(rho) - alpha, 0) / gram[j, j]
            largest = max(largest, np.max(np.abs(new - w[j])))
            w[j] = new
        if largest < 1e-12:
            break
    return np.abs(w)


def _relative_strength(matrix):
    """Duan et al.'s score of a (D_a, D_b) similarity matrix: the mean over columns and over rows of
    max^2 / sum (0 where a sum is 0), averaged; 0 for an empty matrix."""
    if matrix.size == 0:
        return 0.0

    def side(m):
        total = m.sum(0)
        return np.mean(np.divide(m.max(0) ** 2, total, out=np.zeros(len(total)), where=total > 0))

    return float((side(matrix) + side(matrix.T)) / 2)


def udr(codes, kl, correlation="spearman", kl_threshold=0.01):
    """Unsupervised disentanglement ranking (Duan et al. 2020), as disentanglement_lib's udr_sklearn.

    codes: a list of M >= 2 arrays (N, D), the mean codes of M models on the same N inputs (same
    rows in the same order); kl (M, D): each model's mean KL per latent (nats). Each model's codes
    are standardised and its latents of KL <= kl_threshold zeroed and left out. For each ordered
    pair (i, j), i != j: a similarity matrix of model i's latents (rows) and model j's (columns),
    |Spearman correlation| ("spearman") or |Lasso coefficients| of j's latents on i's ("lasso",
    alpha 0.1); its relative strength (the mean over rows and columns of max^2 / sum, averaged) is
    pairwise[i, j]. Model j's score is the median over i != j of pairwise[i, j]. Identical models
    score 1, unrelated ones near 0; no labels are needed. Returns `scores` (M,), `pairwise` (M, M)
    with a zero diagonal and `active` (M, D) bool. Raises ValueError for fewer than two models,
    different shapes, non-finite values or an unknown correlation.
    """
    if correlation not in ("spearman", "lasso"):
        raise ValueError(f"correlation must be 'spearman' or 'lasso', got {correlation!r}")
    if len(codes) < 2:
        raise ValueError(f"codes must hold at least 2 models, got {len(codes)}")
    codes = [_check_rows(f"codes[{m}]", c).astype(np.float64) for m, c in enumerate(codes)]
    for m, c in enumerate(codes):
        _check_finite(f"codes[{m}]", c)
        if c.shape != codes[0].shape:
            raise ValueError(f"codes[{m}] has shape {c.shape}, codes[0] {codes[0].shape}: the models "
                             "must encode the same rows with the same number of latents")
    kl = np.asarray(kl, dtype=np.float64)
    if kl.shape != (len(codes), codes[0].shape[1]):
        raise ValueError(f"kl must have shape (models, latents) = {(len(codes), codes[0].shape[1])}, "
                         f"got {kl.shape}")
    _check_finite("kl", kl)
    active = kl > kl_threshold
    scaled = [np.where(on, (c - c.mean(0)) / np.where(c.std(0) > 0, c.std(0), 1), 0)
              for c, on in zip(codes, active)]
    similarity = _abs_correlation if correlation == "spearman" else _lasso_matrix
    if correlation == "spearman":
        scaled = [np.stack([_ranks(column) for column in c.T], 1) for c in scaled]
    pairwise = np.zeros((len(codes), len(codes)))
    for i, j in itertools.permutations(range(len(codes)), 2):
        matrix = similarity(scaled[i], scaled[j])
        pairwise[i, j] = _relative_strength(matrix[np.ix_(active[i], active[j])])
    scores = np.array([np.median(np.delete(pairwise[:, j], j)) for j in range(len(codes))])
    return {"scores": scores, "pairwise": pairwise, "active": active}


# -----------------------------------------------------------------------------
# what codes are for: downstream prediction (Locatello et al. 2019)


def downstream(codes, factors, train_sizes=(10, 100, 1000, 10000), seed=0, test_points=TEST_POINTS):
    """Test accuracy of predicting each factor from the codes with few labels (Locatello et al.
    2019, section 4's downstream study).

    codes (N, D) float, factors (N, K) int. With default_rng(seed), `test_points` rows are held out
    and the training rows of every size are drawn from the rest (the smaller sets inside the larger
    ones); per factor and size, a multinomial logistic regression (as scikit-learn's default, C = 1)
    on codes standardised with the training rows' mean and deviation predicts the factor on the
    held-out rows (a training set with one value predicts it everywhere). Sizes larger than the
    N - test_points rows left are skipped and listed in `skipped_sizes`. Returns `train_sizes` (S,)
    int, `test_accuracy` (K, S) and `mean_test_accuracy` (S,) in [0, 1], and `sample_efficiency` =
    mean accuracy at 100 / at 10,000 rows (None unless both sizes were measured). Raises ValueError
    for bad shapes, non-finite codes, a size < 1, N <= test_points, or a factor with a single value.
    """
    codes, labels, sizes = _labelled(codes, factors)
    for size in train_sizes:
        _check_count("train_sizes entries", size, 1)
    if len(codes) <= test_points:
        raise ValueError(f"codes: downstream holds out {test_points} test rows and needs more rows than "
                         f"that, got {len(codes)}")
    order = np.random.default_rng(seed).permutation(len(codes))
    test, pool = order[:test_points], order[test_points:]
    measured = sorted(s for s in set(train_sizes) if s <= len(pool))
    accuracy = np.zeros((len(labels), len(measured)))
    for s, size in enumerate(measured):
        x_train, x_test = _standardize(codes[pool[:size]], codes[test])
        for k, lab in enumerate(labels):
            accuracy[k, s] = _logistic_accuracy(x_train, lab[pool[:size]], x_test, lab[test])
    mean = accuracy.mean(0)
    efficiency = (float(mean[measured.index(100)] / mean[measured.index(10000)])
                  if 100 in measured and 10000 in measured and mean[measured.index(10000)] > 0 else None)
    return {"train_sizes": np.array(measured, np.int64), "test_accuracy": accuracy,
            "mean_test_accuracy": mean, "sample_efficiency": efficiency,
            "skipped_sizes": sorted(s for s in set(train_sizes) if s > len(pool))}


def _logistic_accuracy(x_train, labels_train, x_test, labels_test):
    train, test, classes = _present_classes(labels_train, labels_test)
    if classes == 1:
        return float(np.mean(test == 0))
    w = _fit_logistic(x_train, train, classes)
    return _accuracy(_predict_logistic(x_test, w), test)


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
    centred = codes - codes.mean(0)
    covariance = _inner(centred, centred) / (len(codes) - 1)
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


PROTOCOLS = ("exact", "dlib")
DLIB_POINTS = 10_000  # disentanglement_lib's num_train of MIG, IRS and the unsupervised scores


def _checked_inputs(mu, logvar, factors):
    """mu (N, D) float64, logvar (N, D) or None, factors (N, K) or None, each checked by name."""
    mu = _check_rows("mu", mu).astype(np.float64, copy=False)
    _check_finite("mu", mu)
    if logvar is not None:
        logvar = np.asarray(logvar)
        if logvar.shape != mu.shape:
            raise ValueError(f"logvar has shape {logvar.shape}, mu {mu.shape}: they must be the same")
        _check_finite("logvar", logvar)
    if factors is not None:
        factors = _check_rows("factors", factors, len(mu))
        if factors.shape[1] == 0 or not np.issubdtype(factors.dtype, np.integer):
            _prepare_factors(factors, len(mu))  # raises for no column or non-finite values
    return mu, logvar, factors


def _exact_runs(mu, logvar, factors, seed):
    """{name: function of no arguments}: every metric on every row, with its defaults."""
    runs = {"gaussian_total_correlation": lambda: gaussian_total_correlation(mu),
            "mutual_info_score": lambda: mutual_info_score(mu)}
    if factors is None:
        return runs
    mig = {}

    def mig_discrete():
        mig.update(discrete_mig(mu, factors))
        return mig

    runs.update(beta_vae_score=lambda: beta_vae_score(mu, factors, seed=seed),
                factor_vae_score=lambda: factor_vae_score(mu, factors, seed=seed),
                dci=lambda: dci(mu, factors, seed=seed),
                sap_score=lambda: sap_score(mu, factors, seed=seed),
                modularity_explicitness=lambda: modularity_explicitness(mu, factors, seed=seed),
                mig_discrete=mig_discrete,
                mig_gaussian=lambda: gaussian_mig(mu, _given("logvar", logvar), factors, seed=seed),
                dcimig=lambda: (_dcimig_from_mi(mig["mi"], mig["entropy"]) if mig
                                else dcimig(mu, factors)),
                irs=lambda: irs(mu, factors, factor_bins=None),
                downstream=lambda: downstream(mu, factors, seed=seed))
    return runs


def _dlib_runs(mu, factors, seed):
    """{name: function of no arguments}: disentanglement_lib's unsupervised-study settings."""
    points = np.random.default_rng(seed).integers(len(mu), size=DLIB_POINTS)
    sampled = mu[points]
    runs = {"gaussian_total_correlation": lambda: gaussian_total_correlation(sampled),
            "mutual_info_score": lambda: mutual_info_score(sampled)}
    if factors is None:
        return runs
    sampled_factors = factors[points]
    mig = {}

    def mig_discrete():
        mig.update(discrete_mig(sampled, sampled_factors, bins=20))
        return mig

    runs.update(beta_vae_score=lambda: beta_vae_score(mu, factors, 10_000, 64, seed, standardize=False),
                factor_vae_score=lambda: factor_vae_score(mu, factors, 10_000, 64, seed,
                                                          variance_points=10_000),
                dci=lambda: dci(mu, factors, importance="gbt", seed=seed),
                sap_score=lambda: sap_score(mu, factors, seed=seed, classifier="svm"),
                modularity_explicitness=lambda: modularity_explicitness(mu, factors, 20, seed,
                                                                        modularity_rows="train"),
                mig_discrete=mig_discrete,
                dcimig=lambda: (_dcimig_from_mi(mig["mi"], mig["entropy"]) if mig
                                else dcimig(sampled, sampled_factors)),
                irs=lambda: irs(sampled, sampled_factors, 0.99, factor_bins=20),
                downstream=lambda: downstream(mu, factors, seed=seed))
    return runs


def evaluate(mu, logvar, factors=None, seed=0, protocol="exact"):
    """Every metric that applies to the encoder's posterior means `mu` (N, D) float and
    log-variances `logvar` (N, D) (used by mig_gaussian only; None leaves that entry as an error),
    with integer `factors` (N, K) of any integer dtype, or None for unlabelled data.

    protocol="exact": every metric with its defaults on every row (the classifiers on 10,000 +
    5,000 drawn rows), `seed` for every draw. protocol="dlib": the settings of disentanglement_lib's
    unsupervised study (Locatello et al. 2019) on the mean representation: discrete MIG, DCIMIG,
    IRS (factors in 20 bins) and the label-free scores on 10,000 rows drawn with replacement by
    default_rng(seed); the BetaVAE score on raw (unstandardised) features; the FactorVAE score's
    scale from 10,000 drawn rows; DCI from gradient-boosted trees; SAP by LinearSVC(C=0.01);
    modularity on the explicitness training rows; no mig_gaussian (not one of theirs).
    Returns {metric name: that function's dict + "protocol": the protocol}: with factors,
    `beta_vae_score`, `factor_vae_score`, `dci`, `sap_score`, `modularity_explicitness`,
    `mig_discrete`, `mig_gaussian` (exact only), `dcimig`, `irs`, `downstream`, and the label-free
    `gaussian_total_correlation` and `mutual_info_score` (the only two without factors). A metric
    that these data cannot serve (say a factor value with a single row) gets {"error": "<one line>",
    "protocol": ...} and the others are still computed; dlib_names() flattens the result.
    Raises ValueError naming the argument for non-finite or non-2-D mu, logvar of another shape,
    factors with another row count or no column, or an unknown protocol.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    mu, logvar, factors = _checked_inputs(mu, logvar, factors)
    if protocol == "exact":
        runs = _exact_runs(mu, logvar, factors, seed)
    else:
        runs = _dlib_runs(mu, factors, seed)
    results = {}
    for name, run in runs.items():
        try:
            results[name] = dict(run(), protocol=protocol)
        except ValueError as e:
            message = (str(e).splitlines() or [type(e).__name__])[0]
            results[name] = {"error": message, "protocol": protocol}
    return results


def _given(name, value):
    if value is None:
        raise ValueError(f"no {name} given")
    return value


# (name in disentanglement_lib's results, metric, key): scores a results table can hold as they are
DLIB_NAMES = [
    ("beta_vae_score", "beta_vae_score", "score"),
    ("factor_vae_score", "factor_vae_score", "score"),
    ("discrete_mig", "mig_discrete", "mig"),
    ("dci_disentanglement", "dci", "disentanglement"),
    ("dci_completeness", "dci", "completeness"),
    ("dci_informativeness_test", "dci", "informativeness_test"),
    ("sap_score", "sap_score", "score"),
    ("modularity", "modularity_explicitness", "modularity"),
    ("explicitness_test", "modularity_explicitness", "explicitness_test"),
    ("irs", "irs", "score"),
    ("gaussian_total_correlation", "gaussian_total_correlation", "score"),
    ("mutual_info_score", "mutual_info_score", "score"),
    ("gaussian_mig", "mig_gaussian", "mig"),
    ("dcimig", "dcimig", "dcimig"),
    ("downstream_sample_efficiency", "downstream", "sample_efficiency"),
]


def dlib_names(result):
    """evaluate()'s result as one flat {name: float} dict under disentanglement_lib's names
    (discrete_mig, dci_disentanglement, beta_vae_score, factor_vae_score, sap_score, modularity,
    irs, ...; ours that it lacks: gaussian_mig, dcimig, downstream_sample_efficiency and
    downstream_accuracy_<size>), plus "protocol". Metrics that returned an error are left out."""
    flat = {}
    for name, metric, key in DLIB_NAMES:
        value = result.get(metric, {}).get(key)
        if value is not None:
            flat[name] = float(value)
    down = result.get("downstream", {})
    for size, accuracy in zip(down.get("train_sizes", []), down.get("mean_test_accuracy", [])):
        flat[f"downstream_accuracy_{int(size)}"] = float(accuracy)
    protocols = {entry.get("protocol") for entry in result.values()}
    if len(protocols) == 1:
        flat["protocol"] = protocols.pop()
    return flat
