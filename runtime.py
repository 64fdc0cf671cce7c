"""What the commands share: train.py, traverse.py, bench.py and the examples import this file.

    errors       UserError, ArgumentError, ArgumentParser, HelpFormatter, report_errors,
                 check_seed
    processes    rank, world_size, first_process (torchrun), resolve_device,
                 reuse_freed_memory
    data         check_dataset, data_source, load_checkpoint_data, data_fingerprint, to_float,
                 ImageSource
    encoding     encoding_precision, Progress, encode_dataset, score_dataset, evaluation_index,
                 evaluate_codes (LABEL_FREE, parse_factor_names, factor_columns: --factors)
    pictures     to_pixels, tile, traversal (traverse.py's traversal.png, train.py's TensorBoard)
    checkpoints  CHECKPOINT_FORMAT, plain, save_checkpoint, load_checkpoint (with its config
                 check), build_model, model_from_checkpoint
    history      history_path, append_history, read_history, rewrite_history, flat_metrics: the
                 run's history CSV beside its checkpoint (step,name,value)

A problem with the user's input or files is a UserError (or data.DataError): report_errors prints
it as one line and returns exit code 1; ArgumentParser prints a bad argument as one line, exit 2.
Needs torch, numpy, pillow and the toolkit's leaf modules data.py, losses.py, metrics.py and
models.py; nothing here calls code hidden in another file.
"""
import argparse
import ctypes
import hashlib
import io
import math
import numbers
import os
import pickle
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import data
import losses
import metrics
import models

CHECKPOINT_FORMAT = "disentangle-checkpoint-1"
MAX_SEED = 2**32 - 1  # the largest seed numpy's RandomState and torch.cuda.manual_seed take


# ============================================================================= errors

class UserError(Exception):
    """A problem with the user's input or files: printed as one line, exit code 1."""


class ArgumentError(UserError):
    """Arguments that parse but cannot be used together (say, with the checkpoint being resumed):
    printed as one line, exit code 2, as argparse's own errors."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line ("PROG: error: ... (see --help)"), exit code 2."""

    def error(self, message):
        # under torchrun every process parses the same arguments: only the first says what is wrong
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n" if first_process() else None)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where there is one worth showing (not None, not a flag's False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def report_errors(work, debug=False):
    """Run work(): a problem with the user's input is one line on stderr and exit code 1 (2 for an
    ArgumentError; with `debug`, the traceback instead); Ctrl-C is one line and exit code 130."""
    try:
        return work()
    except KeyboardInterrupt as error:
        print(f"\ninterrupted{': ' + str(error) if str(error) else ''}", file=sys.stderr)
        return 130
    except (UserError, data.DataError) as error:
        if debug:
            raise
        if first_process():  # under torchrun every process meets the same problem: say it once
            print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ArgumentError) else 1


def check_seed(parser, seed, option="--seed"):
    """parser.error (one line, exit 2) unless NumPy and torch both take `seed`: 0..2**32-1."""
    if not 0 <= seed <= MAX_SEED:
        parser.error(f"{option} {seed}: a seed must be a whole number from 0 to {MAX_SEED:,}")


# ========================================================================= processes and devices

def rank():
    """This process's rank under torchrun once its process group exists; 0 otherwise."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size():
    """The number of processes in the process group (1 without torchrun)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def started_by_torchrun():
    """Whether torchrun started this process (it sets TORCHELASTIC_RUN_ID, and RANK)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def first_process():
    """Rank 0, also before the process group exists."""
    return rank() == 0 and (not started_by_torchrun() or os.environ.get("RANK", "0") == "0")


def resolve_device(name, local_rank=0):
    """'auto' | 'cpu' | 'cuda' -> torch.device (cuda:local_rank under torchrun); UserError for
    'cuda' without a CUDA GPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available to torch")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def reuse_freed_memory():
    """Have glibc keep the memory that tensors free for the next ones to use: blocks up to 32 MB
    from its heap (not each its own mapping) and the heap never trimmed. Otherwise what a training
    step frees goes back to the system and the next step faults it in again, zeroed, page by page:
    the MLP's step (batch 64) took 23,000 page faults, 150 with this, and ran 1.4x faster on a
    2-core EPYC VM. Memory is then not handed back before the process ends (its peak stays). For
    the commands (train.py, bench.py) at their start; returns False where the C library has no
    mallopt or refuses (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold = -1  # glibc's <malloc.h>
    m_mmap_threshold = -3
    return bool(mallopt(m_mmap_threshold, 32 * 2**20) and mallopt(m_trim_threshold, 2**31 - 1))


# ============================================================================= data

def check_dataset(dataset, arch, source):
    """(channels, size) of the dataset's images, or UserError if `arch` cannot take them."""
    _, height, width, channels = dataset.images.shape
    if height != width:
        raise UserError(f"{source}: images are {height}x{width}; the {arch} architecture needs "
                        "square images")
    if arch == "conv" and height != 64:
        raise UserError(f"{source}: images are {height}x{width}; the conv architecture needs 64x64 "
                        "(or use --arch mlp)")
    if channels not in (1, 3):
        raise UserError(f"{source}: images have {channels} channels; 1 or 3 are supported")
    return channels, height


FINGERPRINT_ROWS = 64  # images hashed by data_fingerprint, evenly spread over the dataset


def data_source(name, beside=None):
    """What a checkpoint stores as --data: the absolute path of a file or folder that exists (so
    the run is found from any folder), else the name as given (a built-in such as "sprites:...").
    A relative name not found here is looked for in the folder of the file `beside` (the
    checkpoint that stored it)."""
    if os.path.exists(name):
        return os.path.abspath(name)
    if beside is not None and not os.path.isabs(name):
        found = os.path.join(os.path.dirname(os.path.abspath(beside)), name)
        if os.path.exists(found):
            return found
    return name


def load_checkpoint_data(config, path):
    """The dataset a checkpoint's config names (its data, data_limit and seed; a relative name is
    also looked for beside the checkpoint `path`). A name found nowhere is a UserError saying that
    it came from the checkpoint and that --data reads the data from elsewhere."""
    try:
        return data.load(data_source(config["data"], beside=path), limit=config["data_limit"],
                         seed=config["seed"])
    except data.DataError as error:
        raise UserError(f"{error} (the name {config['data']!r} comes from the checkpoint {path}; "
                        "--data reads the data from elsewhere)") from error


def data_fingerprint(dataset):
    """A cheap identity of a dataset's images: 16 hex digits of the SHA-256 of their shape and of
    FINGERPRINT_ROWS images evenly spread over the rows (first and last included). Reads those
    rows only (a memory-mapped dataset stays on disk). Equal data gives equal fingerprints; other
    images give another one unless they agree in every hashed row."""
    images = dataset.images
    rows = np.unique(np.linspace(0, len(images) - 1, FINGERPRINT_ROWS).round().astype(np.int64))
    digest = hashlib.sha256(repr(tuple(images.shape)).encode())
    digest.update(np.ascontiguousarray(images[rows]).tobytes())
    return digest.hexdigest()[:16]


def to_float(batch):
    """uint8 (B, H, W, C) tensor -> float NCHW in [0, 1], channels-last in memory."""
    return batch.permute(0, 3, 1, 2).float().div_(255)


class ImageSource:
    """Draws batches of the uint8 images by index; holds them on the GPU when they fit, except
    images drawn when indexed (data.DrawnImages: the dSprites variants), which stay on the CPU."""

    def __init__(self, images, device):
        self.images = images
        self.device = device
        self.on_device = None
        if device.type == "cuda" and not isinstance(images, data.DrawnImages):
            free, _ = torch.cuda.mem_get_info(device)
            if images.nbytes < 0.5 * free:
                self.on_device = torch.from_numpy(np.ascontiguousarray(images)).to(device)

    def __len__(self):
        return len(self.images)

    def batch(self, index):
        """index: int64 numpy array (B,) -> float NCHW batch (B, C, H, W) on the device."""
        if self.on_device is not None:
            return to_float(self.on_device[torch.from_numpy(index).to(self.device)])
        batch = torch.from_numpy(self.images[index])
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return to_float(batch)


# ============================================================================= pictures

TILE_PAD = 2  # pixels between the images of a tiled grid


def to_pixels(logits):
    """Model output logits (B, C, H, W) -> uint8 numpy (B, H, W, C), 0..255."""
    return (torch.sigmoid(logits.float()) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def tile(images, columns, background=255):
    """uint8 (N, H, W, C) -> one RGB PIL image of them, `columns` to a row, TILE_PAD pixels
    apart."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    pad = TILE_PAD
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), background, np.uint8)
    for i, image in enumerate(images):
        top = pad + (i // columns) * (h + pad)
        left = pad + (i % columns) * (w + pad)
        grid[top:top + h, left:left + w] = image if c == 3 else image.repeat(3, axis=2)
    return Image.fromarray(grid)


def traversal_codes(code, order, values):
    """(len(order) * len(values), D): `code` repeated; in block r, latent order[r] takes each
    value."""
    codes = code.repeat(len(order) * len(values), 1)
    for row, j in enumerate(order):
        codes[row * len(values):(row + 1) * len(values), j] = values
    return codes


@torch.inference_mode()
def traversal(model, source, image, order, values):
    """The latent traversal of one image: uint8 numpy (len(order) * len(values), H, W, C), the
    decodings of the code (posterior mean) of row `image` of `source` (an ImageSource) with latent
    order[r] set to each of `values` (a 1-D float tensor) in block r (Higgins et al. 2017's
    figures; traverse.py's traversal.png, train.py's TensorBoard image)."""
    code = model.encode(source.batch(np.array([image])))[0][0].float()
    return to_pixels(model.decode(traversal_codes(code, order, values.to(code.device))))


# ======================================================================= encoding and evaluating

class Progress:
    """One live line on a terminal; a line every `every` steps otherwise (nothing if not live).
    `total` steps of `batch_size` images from step `start`; `what` names the work (else "step")."""

    def __init__(self, total, start, batch_size, every, live=True, what=None):
        self.total = total
        self.batch_size = batch_size
        self.every = every
        self.what = what
        self.enabled = live
        self.tty = sys.stderr.isatty()
        self.start_step = start
        self.last_step = start
        self.start_time = time.perf_counter()
        self.last_print = 0.0

    def rate(self, step):
        """Images per second since the start."""
        seconds = max(time.perf_counter() - self.start_time, 1e-9)
        return (step - self.start_step) * self.batch_size / seconds

    def update(self, step, terms, force=False):
        """Show `step` and the terms (name -> float) if a line is due (or `force`)."""
        now = time.perf_counter()
        if self.tty:
            due = now - self.last_print >= 0.5
        else:
            due = step // self.every > self.last_step // self.every
        if not self.enabled or not (force or due or step == self.total):
            return
        self.last_print = now
        self.last_step = step
        rate = self.rate(step)
        eta = (self.total - step) * self.batch_size / max(rate, 1e-9)
        head = f"{self.what}: {step:,}/{self.total:,}" if self.what else f"step {step}/{self.total}"
        text = (f"{head}  {rate:,.0f} img/s  ETA {eta // 60:.0f}m{eta % 60:02.0f}s  "
                + "  ".join(f"{k} {v:.4g}" for k, v in terms.items()))
        print(("\r" + text + "\033[K") if self.tty else text, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)

    def close(self):
        if self.enabled and self.tty:
            print(file=sys.stderr)


def encoding_precision(device):
    """The fastest autocast dtype for encoding on `device` (None: fp32). On the CPU bf16 only where
    oneDNN runs it natively (AVX-512 or AMX: ~3x faster than fp32); elsewhere, as on AVX2-only
    CPUs, it is emulated and ~8x slower than fp32. On CUDA bf16, or fp16 on older GPUs."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    native = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    return torch.bfloat16 if torch.backends.mkldnn.is_available() and native() else None


def encode_dataset(model, source, index=None, batch_size=256, dtype="auto", what=None):
    """Posterior means and log-variances, each float32 numpy (len(index), latents), of the images
    at `index` (int64 rows; all if None). `dtype`: the autocast dtype, None for fp32, "auto" for
    `encoding_precision` (bf16 moves the MIG by < 0.005: README). `what`: a name for a progress
    line on stderr (count, img/s, ETA)."""
    index = np.arange(len(source)) if index is None else index
    dtype = encoding_precision(source.device) if dtype == "auto" else dtype
    rows = len(index)
    mu_out = np.empty((rows, model.latents), np.float32)
    logvar_out = np.empty((rows, model.latents), np.float32)
    progress = Progress(rows, 0, 1, every=max(rows // 10, 1), what=what) if what else None
    was_training = model.training
    model.eval()
    autocast = torch.autocast(source.device.type, dtype=dtype or torch.bfloat16,
                              enabled=dtype is not None)
    with torch.inference_mode(), autocast:
        for start in range(0, rows, batch_size):
            end = min(start + batch_size, rows)
            mu, logvar = model.encode(source.batch(index[start:end]))
            mu_out[start:end] = mu.float().cpu()
            logvar_out[start:end] = logvar.float().cpu()
            if progress:
                progress.update(end, {})
    model.train(was_training)
    if progress:
        progress.close()
    return mu_out, logvar_out


def score_dataset(model, source, recon, seed=0, index=None, batch_size=256, what=None):
    """Each image's negative ELBO and its two terms: three float64 numpy arrays (len(index),) in
    nats per image, (neg_elbo, recon, kl), neg_elbo = recon + kl, for the images at `index` (int64
    rows; all if None), in fp32 under inference_mode, one batch in memory at a time.

    The ELBO is estimated as training's objective computes it (Kingma & Welling 2014, eq. 10):
    kl = KL(q(z|x) || N(0, I)), analytic (losses.kl_normal, summed over latents); recon =
    losses.recon_loss(model.decode(z), x, recon) at ONE sample z = mu + eps * exp(logvar / 2),
    eps standard normal from numpy's default_rng(seed), drawn in row order (a row's sample does
    not depend on batch_size). `recon` "bce" is -log p(x|z) of a Bernoulli decoder in nats; "mse"
    is the summed squared error training minimised, not a likelihood (so then neg_elbo is
    training's recon + kl, not a bound in nats). A pair model (adagvae, mlvae) scores single
    images with its encoder and decoder, as a VAE. `what`: a name for a progress line on stderr.
    Raises ValueError for a deterministic model (the AE: it has no posterior, so no ELBO)."""
    if model.deterministic:
        raise ValueError("an autoencoder (model ae) has no posterior q(z|x), so no ELBO to score")
    index = np.arange(len(source)) if index is None else index
    rows = len(index)
    terms = np.empty((2, rows), np.float64)
    noise = np.random.default_rng(seed)
    progress = Progress(rows, 0, 1, every=max(rows // 10, 1), what=what) if what else None
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, rows, batch_size):
            end = min(start + batch_size, rows)
            x = source.batch(index[start:end]).float()
            eps = torch.from_numpy(noise.standard_normal((end - start, model.latents)))
            logits, mu, logvar, _ = model(x, noise=eps.float().to(x.device))
            terms[0, start:end] = losses.recon_loss(logits, x, recon).double().cpu()
            terms[1, start:end] = losses.kl_normal(mu, logvar).double().sum(1).cpu()
            if progress:
                progress.update(end, {})
    model.train(was_training)
    if progress:
        progress.close()
    return terms[0] + terms[1], terms[0], terms[1]


def evaluation_index(dataset, samples, seed):
    """All rows, or a fixed random subset of `samples` rows (`samples` 0: all): sorted int64
    (rows,), for evaluation; the subset is drawn with default_rng(seed + 1)."""
    if samples == 0 or samples >= len(dataset):
        return np.arange(len(dataset))
    return np.sort(np.random.default_rng(seed + 1).choice(len(dataset), samples, replace=False))


# metrics.evaluate's entries that need no factors (the label-free scores): every other entry of an
# evaluate_codes result names the factors it scored
LABEL_FREE = ("gaussian_total_correlation", "mutual_info_score")


def parse_factor_names(text):
    """argparse type of --factors: "scale, posX" -> ["scale", "posX"] (blanks around a name
    dropped). argparse.ArgumentTypeError (one line, exit 2) for an empty name or one given twice."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty name; give factor names "
                                         "separated by commas, such as scale,posX")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"{', '.join(twice)} named more than once")
    return names


def factor_columns(dataset, names):
    """The columns of dataset.factors (N, K) that the factor `names` (a list of str, in the order
    given; None: every factor) pick: a list of int, [] for unlabelled data when `names` is None.
    Raises ArgumentError (one line naming --factors, exit 2) when the data is unlabelled or lacks
    a name; the line lists the names it has."""
    if names is None:
        return [] if dataset.factors is None else list(range(dataset.factors.shape[1]))
    if dataset.factors is None:
        raise ArgumentError(f"--factors {','.join(names)}: {dataset.name} has no factor labels "
                            "(unlabelled); leave --factors out")
    unknown = [name for name in names if name not in dataset.factor_names]
    if unknown:
        raise ArgumentError(f"--factors: {dataset.name} has no factor {', '.join(unknown)}; its "
                            f"factors are {','.join(dataset.factor_names)}")
    return [dataset.factor_names.index(name) for name in names]


def evaluate_codes(mu, logvar, dataset, index, seed, only_mig=False, protocol="exact",
                   factor_names=None):
    """metrics.evaluate(protocol=`protocol`) (or just its discrete MIG) of the encoded rows
    `index` of `dataset`, scoring the factors `factor_names` (factor_columns; None: all) less any
    that takes a single value in these rows. Each entry says its "protocol" and, but for the
    LABEL_FREE ones, the "factors" it scored (names, in column order). Returns (result, note):
    note is '' or one line saying what was left out or why nothing could be measured; a metric
    that fails holds {"error": reason}. Raises ArgumentError as factor_columns, ValueError as
    metrics.evaluate."""
    columns = factor_columns(dataset, factor_names)
    names = [dataset.factor_names[c] for c in columns]
    factors = dataset.factors[index][:, columns] if columns else None
    note = ""
    if factors is not None:
        varies = factors.min(0) != factors.max(0)
        if not varies.all():
            constant = [name for name, v in zip(names, varies) if not v]
            note = (f"factor(s) {', '.join(constant)} take one value in the {len(factors):,} "
                    "evaluated images: left out")
            names = [name for name, v in zip(names, varies) if v]
            factors = factors[:, varies] if varies.any() else None
    if only_mig:
        if factors is None:
            return {}, note or "no labelled factors"
        result = {"mig_discrete": _protocol_mig(mu, factors, seed, protocol)}
    else:
        result = metrics.evaluate(mu, logvar, factors, seed=seed, protocol=protocol)
    for name, entry in result.items():
        if name not in LABEL_FREE:
            entry["factors"] = names
    return result, note


def _protocol_mig(mu, factors, seed, protocol):
    """The mig_discrete entry of metrics.evaluate(mu, None, factors, seed, protocol) alone: on
    every row (exact), or on metrics.DLIB_POINTS rows drawn with replacement by
    default_rng(seed) (dlib), 20 bins either way."""
    if protocol not in metrics.PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(metrics.PROTOCOLS)}, got "
                         f"{protocol!r}")
    if protocol == "dlib":
        points = np.random.default_rng(seed).integers(len(mu), size=metrics.DLIB_POINTS)
        mu = np.asarray(mu)[points]
        factors = factors[points]
    mu = np.asarray(mu, dtype=np.float64)  # as evaluate measures it
    return dict(metrics.discrete_mig(mu, factors, bins=20), protocol=protocol)


# ============================================================================= checkpoints

def plain(value):
    """numpy values -> Python lists/floats so the checkpoint loads with weights_only=True."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    return value


def save_checkpoint(path, state):
    """torch.save `state` to `path` atomically (data.write_atomically): a crash mid-save leaves
    the previous file intact, a link is written through to its target, and a full disk is one
    line (data.WriteError, naming the file) with nothing half-written left behind. The state is
    serialised in memory first: torch.save straight into a file on a full disk raises its own
    'unexpected pos' error instead of the OSError that says the disk is full."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data.write_atomically(path, lambda f: f.write(buffer.getbuffer()), nbytes=buffer.tell())


# What a checkpoint's config must hold; entries added since the first release (or safe to assume)
# have a default here, so older or hand-edited checkpoints still load. Anything else must be there.
REQUIRED_CONFIG = ("model", "arch", "latents", "channels", "size", "data", "batch_size", "lr",
                   "steps", "recon", "dataset_size")
CONFIG_DEFAULTS = {
    "beta": 6.0,
    "alpha": 1.0,
    "gamma": None,
    "estimator": "mws",
    "capacity": None,
    "capacity_steps": 100_000,
    "k": None,
    "lambda_od": None,
    "lambda_d": None,
    "seed": 0,
    "data_limit": None,
    "precision": "fp32",
    "dataset_name": "",
    "factor_names": [],
    "factor_sizes": [],
    "data_fingerprint": "",  # "": written before fingerprints; --resume then skips that check
    "eval_protocol": "exact",  # written before protocols: every evaluation was exact
    "eval_factors": None,  # None: every factor scored
}


def _whole(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _names(value):
    return isinstance(value, (list, tuple)) and all(isinstance(name, str) for name in value)


def _wholes(value):
    return isinstance(value, (list, tuple)) and all(_whole(size) for size in value)


# One check per config entry: (name, test of its value, what is expected).
_CONFIG_CHECKS = (
    ("model", lambda v: v in losses.OBJECTIVES + losses.PAIR_OBJECTIVES,
     "one of " + ", ".join(losses.OBJECTIVES + losses.PAIR_OBJECTIVES)),
    ("arch", lambda v: v in models.ARCHS, "one of " + ", ".join(models.ARCHS)),
    ("latents", lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    ("channels", lambda v: v in (1, 3), "one of 1, 3"),
    ("size", lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    ("batch_size", lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    ("steps", lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    ("dataset_size", lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    ("seed", lambda v: _whole(v) and 0 <= v <= MAX_SEED, f"a whole number from 0 to {MAX_SEED}"),
    ("capacity_steps", lambda v: _whole(v) and v >= 0, "a whole number >= 0"),
    ("k", lambda v: v is None or _whole(v) and v >= 0, "none or a whole number >= 0"),
    ("data_limit", lambda v: v is None or _whole(v) and v >= 2, "none or a whole number >= 2"),
    ("lr", lambda v: _number(v) and v > 0, "a number > 0"),
    ("beta", lambda v: _number(v) and v >= 0, "a number >= 0"),
    ("alpha", lambda v: _number(v) and v >= 0, "a number >= 0"),
    ("gamma", lambda v: v is None or _number(v) and v >= 0, "none or a number >= 0"),
    ("capacity", lambda v: v is None or _number(v) and v >= 0, "none or a number >= 0"),
    ("lambda_od", lambda v: v is None or _number(v) and v >= 0, "none or a number >= 0"),
    ("lambda_d", lambda v: v is None or _number(v) and v >= 0, "none or a number >= 0"),
    ("recon", lambda v: v in ("bce", "mse"), "one of bce, mse"),
    ("estimator", lambda v: v in ("mws", "mss"), "one of mws, mss"),
    ("precision", lambda v: v in ("fp32", "bf16", "fp16"), "one of fp32, bf16, fp16"),
    ("data", lambda v: isinstance(v, str), "a string"),
    ("dataset_name", lambda v: isinstance(v, str), "a string"),
    ("data_fingerprint", lambda v: isinstance(v, str), "a string"),
    ("factor_names", _names, "a list of names"),
    ("factor_sizes", _wholes, "a list of whole numbers"),
    ("eval_protocol", lambda v: v in metrics.PROTOCOLS, "one of " + ", ".join(metrics.PROTOCOLS)),
    ("eval_factors", lambda v: v is None or _names(v) and len(v) > 0,
     "none or a list of factor names"),
)


def config_problem(config):
    """The first config entry that training or drawing could not use, as "NAME VALUE (expected
    ...)", or None: a hand-edited or foreign checkpoint then fails in one line, not a traceback."""
    for name, valid, expected in _CONFIG_CHECKS:
        if not valid(config[name]):
            return f"{name} {config[name]!r} (expected {expected})"
    return None


def load_checkpoint(path):
    """Read a checkpoint of this toolkit (weights only, no pickle) with its config completed from
    CONFIG_DEFAULTS and checked by config_problem; UserError naming the file and what is wrong
    otherwise. Returns the state dict save_checkpoint wrote (train.py's _Run.state)."""
    if os.path.isdir(path):
        raise UserError(f"{path}: is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint file")
    try:
        with warnings.catch_warnings():  # torch warns of pickle protocols of files it then refuses
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only refused it, or it is no pickle at all
        raise UserError(f"{path}: not a checkpoint of this toolkit (not a torch file of tensors "
                        "and plain containers)") from error
    except Exception as error:  # only torch.load is inside: whatever else it raises (EOFError,
        # KeyError, RuntimeError, ...) means the same
        raise UserError(f"{path}: not a readable checkpoint (truncated, or not a file that "
                        f"torch.save wrote: {type(error).__name__})") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a checkpoint of this toolkit (expected format "
                        f"{CHECKPOINT_FORMAT!r}); it may come from another program or version")
    missing = [k for k in ("model", "optimizer", "step", "config") if k not in state]
    if missing or not isinstance(state["config"], dict):
        raise UserError(f"{path}: checkpoint lacks {', '.join(missing) or 'a config dict'}")
    missing = [k for k in REQUIRED_CONFIG if k not in state["config"]]
    if missing:
        raise UserError(f"{path}: the checkpoint's config lacks {', '.join(missing)} (written by "
                        "another version of this toolkit?); it cannot be used")
    state["config"] = {**CONFIG_DEFAULTS, **state["config"]}
    problem = config_problem(state["config"])
    if problem:
        raise UserError(f"{path}: the checkpoint's config has {problem}; it cannot be used")
    return state


def build_model(config):
    """The freshly initialised model a run's config describes (its arch, latents, channels, size
    and objective), on the CPU; the conv net channels-last, as oneDNN's convolutions run fastest."""
    model = models.build_model(config["arch"], config["latents"], config["channels"],
                               config["size"], deterministic=config["model"] == "ae")
    return model.to(memory_format=torch.channels_last) if config["arch"] == "conv" else model


def model_from_checkpoint(state, path="checkpoint"):
    """The model of a loaded checkpoint (on the CPU, in training mode), with its weights;
    UserError naming `path` if the weights do not fit the model its config describes."""
    try:
        model = build_model(state["config"])
        model.load_state_dict(state["model"])
    except (RuntimeError, ValueError) as error:
        # torch's first line is a header: say the first line that names what does not fit
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        lines = lines or [type(error).__name__]
        raise UserError(f"{path}: model weights do not fit the model in its config: "
                        f"{lines[min(1, len(lines) - 1)][:300]}") from error
    return model


# ============================================================================= the run's history

HISTORY_HEADER = "step,name,value\n"


def history_path(checkpoint):
    """Where a run's history CSV lies: beside its checkpoint, named after it less .pt
    (runs/bvae.pt -> runs/bvae.history.csv; runs/bvae.ckpt -> runs/bvae.ckpt.history.csv)."""
    return checkpoint.removesuffix(".pt") + ".history.csv"


def append_history(path, step, values):
    """Append one row `step,name,value` per entry of `values` ({name: float}) to the CSV at `path`
    (created with its header if absent), in one write, and close the file: a run killed later
    keeps every row written before (a row cut short by a kill mid-write is ended first, so it
    stays one line that read_history skips). Values are written as repr(float) (read back
    exactly; nan and inf as such). UserError naming the file if it cannot be written."""
    text = "".join(f"{step},{name},{float(value)!r}\n" for name, value in values.items())
    try:
        with open(path, "a+b") as f:  # writes go to the end, wherever it was read
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                head = HISTORY_HEADER
            else:
                f.seek(size - 1)
                head = "" if f.read(1) == b"\n" else "\n"
            f.write((head + text).encode())
    except OSError as error:
        raise UserError(f"cannot write the run's history {path}: {error.strerror or error}") \
            from error


def read_history(path):
    """The rows of a history CSV as a list of (step int, name str, value float), in file order;
    lines that are not three fields that parse (the header, a row cut short) are skipped.
    UserError naming the file if it cannot be read."""
    rows = []
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as error:
        raise UserError(f"cannot read the run's history {path}: {error.strerror or error}") \
            from error
    for line in lines:
        fields = line.split(",")
        try:
            if len(fields) == 3:
                rows.append((int(fields[0]), fields[1], float(fields[2])))
        except ValueError:
            continue
    return rows


def rewrite_history(path, keep):
    """Rewrite the CSV at `path` (atomically: data.write_atomically) with only the rows for which
    keep(step, name) is true; a missing file becomes one with just the header."""
    rows = read_history(path) if os.path.exists(path) else []
    text = HISTORY_HEADER + "".join(f"{step},{name},{value!r}\n" for step, name, value in rows
                                    if keep(step, name))
    data.write_atomically(path, lambda f: f.write(text.encode()))


def flat_metrics(result):
    """metrics.evaluate's result (or a part of it) as one flat {name: float}, for the history:
    each number of an entry as ENTRY_KEY (dci_disentanglement, mig_discrete_mig), a "score" or a
    key equal to the entry's name as the entry's name alone (sap_score, dcimig); arrays, text and
    metrics that failed are left out."""
    flat = {}
    for entry, values in result.items():
        for key, value in values.items():
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                flat[entry if key in ("score", entry) else f"{entry}_{key}"] = float(value)
    return flat
