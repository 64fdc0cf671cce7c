"""Train an autoencoder for disentanglement and save a checkpoint. Needs torch, numpy, pillow.

    python train.py                                   # beta-TCVAE, beta 6, built-in sprites
    python train.py --model betavae --beta 4 --data dsprites.npz --steps 30000 --out runs/bvae.pt
    python train.py --resume --out runs/bvae.pt --steps 60000   # continue a run
    torchrun --nproc_per_node 4 train.py --batch-size 256 ...   # one run over 4 processes (DDP)

Batches are drawn by index from the uint8 image array and converted on the fly (no DataLoader).
The checkpoint (--out) is written atomically every --save-every steps, before every evaluation, at
the end, and when the run is interrupted (Ctrl-C, SIGTERM) or stopped by a non-finite loss;
`torch.load(path, weights_only=True)` reads it. Under torchrun every process takes its slice of the
same global batch, the codes of the whole batch are gathered for the objectives that compare samples
(beta-TCVAE, FactorVAE, DIP-VAE), and only rank 0 prints, saves and evaluates.

This file is also the runtime that traverse.py and bench.py share; those names form its public part
(the banner "shared runtime" below): UserError, ArgumentParser, HelpFormatter, report_errors,
resolve_device, check_dataset, to_float, ImageSource, encoding_precision, encode_dataset,
evaluation_index, evaluate_codes, plain, CHECKPOINT_FORMAT, save_checkpoint, load_checkpoint,
build_model, model_from_checkpoint, argument_problem, and main. Everything else (names with a
leading underscore) is the training command's own.
"""
import argparse
import contextlib
import io
import math
import os
import pickle
import random
import signal
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist

import data
import losses
import metrics
import models

# ============================================================================= shared runtime

CHECKPOINT_FORMAT = "disentangle-checkpoint-1"


class UserError(Exception):
    """A problem with the user's input or files: printed as one line, exit code 1."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line ("PROG: error: ... (see --help)"), exit code 2."""

    def error(self, message):
        # under torchrun every process parses the same arguments: only the first says what is wrong
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n" if _first_process() else None)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where there is one worth showing (not None, not a flag's False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def report_errors(work, debug=False):
    """Run work(): a problem with the user's input is one line on stderr and exit code 1."""
    try:
        return work()
    except KeyboardInterrupt as error:
        print(f"\ninterrupted{': ' + str(error) if str(error) else ''}", file=sys.stderr)
        return 130
    except (UserError, data.DataError) as error:
        if debug:
            raise
        if _first_process():  # under torchrun every process meets the same problem: say it once
            print(f"error: {error}", file=sys.stderr)
        return 1


def resolve_device(name, local_rank=0):
    """'auto' | 'cpu' | 'cuda' -> torch.device (cuda:local_rank under torchrun); UserError without CUDA."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available to torch")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def check_dataset(dataset, arch, source):
    """(channels, size) of the dataset's images, or UserError if `arch` cannot take them."""
    n, height, width, channels = dataset.images.shape
    if height != width:
        raise UserError(f"{source}: images are {height}x{width}; the {arch} architecture needs square images")
    if arch == "conv" and height != 64:
        raise UserError(f"{source}: images are {height}x{width}; the conv architecture needs 64x64 "
                        "(or use --arch mlp)")
    if channels not in (1, 3):
        raise UserError(f"{source}: images have {channels} channels; 1 or 3 are supported")
    return channels, height


def to_float(batch):
    """uint8 (B, H, W, C) tensor -> float NCHW in [0, 1], channels-last in memory."""
    return batch.permute(0, 3, 1, 2).float().div_(255)


class ImageSource:
    """Draws batches of the uint8 images by index; holds them on the GPU when they fit."""

    def __init__(self, images, device):
        self.images, self.device, self.on_device = images, device, None
        if device.type == "cuda":
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
    mu_out, logvar_out = np.empty((rows, model.latents), np.float32), np.empty((rows, model.latents), np.float32)
    progress = _Progress(rows, 0, 1, every=max(rows // 10, 1), what=what) if what else None
    was_training = model.training
    model.eval()
    with torch.inference_mode(), torch.autocast(source.device.type, dtype=dtype or torch.bfloat16,
                                                enabled=dtype is not None):
        for start in range(0, rows, batch_size):
            end = min(start + batch_size, rows)
            mu, logvar = model.encode(source.batch(index[start:end]))
            mu_out[start:end], logvar_out[start:end] = mu.float().cpu(), logvar.float().cpu()
            if progress:
                progress.update(end, {})
    model.train(was_training)
    if progress:
        progress.close()
    return mu_out, logvar_out


def evaluation_index(dataset, samples, seed):
    """All rows, or a fixed random subset of `samples` rows: sorted int64 (rows,), for evaluation."""
    if samples == 0 or samples >= len(dataset):
        return np.arange(len(dataset))
    return np.sort(np.random.default_rng(seed + 1).choice(len(dataset), samples, replace=False))


def evaluate_codes(mu, logvar, dataset, index, seed, only_mig=False):
    """metrics.evaluate (or just the discrete MIG) on the encoded rows; factors that take a single
    value in these rows are left out. Returns (result, note): note is '' or one line saying what was
    left out or why nothing could be measured; a metric that fails holds {"error": reason}."""
    factors = None if dataset.factors is None else dataset.factors[index]
    note = ""
    if factors is not None:
        varies = factors.min(0) != factors.max(0)
        if not varies.all():
            constant = [name for name, v in zip(dataset.factor_names, varies) if not v]
            note = f"factor(s) {', '.join(constant)} take one value in the {len(factors):,} evaluated images: left out"
            factors = factors[:, varies] if varies.any() else None
    if only_mig:
        if factors is None:
            return {}, note or "no labelled factors"
        return {"mig_discrete": metrics.discrete_mig(mu, factors)}, note
    return metrics.evaluate(mu, logvar, factors, seed=seed), note


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
    """Write atomically: a crash mid-save leaves the previous checkpoint intact."""
    folder = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(temp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


# What a checkpoint's config must hold; entries added since the first release (or safe to assume)
# have a default here, so older or hand-edited checkpoints still load. Anything else must be there.
_REQUIRED_CONFIG = ("model", "arch", "latents", "channels", "size", "data", "batch_size", "lr",
                    "steps", "recon", "dataset_size")
_CONFIG_DEFAULTS = {"beta": 6.0, "alpha": 1.0, "gamma": None, "estimator": "mws", "capacity": None,
                    "capacity_steps": 100_000, "lambda_od": None, "lambda_d": None, "seed": 0,
                    "data_limit": None, "precision": "fp32", "dataset_name": "", "factor_names": [],
                    "factor_sizes": []}


def load_checkpoint(path):
    """Read a checkpoint of this toolkit (weights only, no pickle) with its config completed from
    the defaults above; UserError naming the file and what is wrong otherwise."""
    if os.path.isdir(path):
        raise UserError(f"{path}: is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint file")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only refused it, or it is no pickle at all
        raise UserError(f"{path}: not a checkpoint of this toolkit (not a torch file of tensors and "
                        "plain containers)") from error
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
    missing = [k for k in _REQUIRED_CONFIG if k not in state["config"]]
    if missing:
        raise UserError(f"{path}: the checkpoint's config lacks {', '.join(missing)} (written by "
                        "another version of this toolkit?); it cannot be used")
    state["config"] = {**_CONFIG_DEFAULTS, **state["config"]}
    problem = _config_problem(state["config"])
    if problem:
        raise UserError(f"{path}: the checkpoint's config has {problem}; it cannot be used")
    return state


def _config_problem(config):
    """The first config entry that training or drawing could not use, as "NAME VALUE (expected
    ...)", or None: a hand-edited or foreign checkpoint then fails in one line, not in a traceback."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    whole = lambda v: isinstance(v, int) and not isinstance(v, bool)
    many = lambda kind: lambda v: isinstance(v, (list, tuple)) and all(kind(x) for x in v)
    choices = {"model": losses.OBJECTIVES, "arch": models.ARCHS, "recon": ("bce", "mse"),
               "estimator": ("mws", "mss"), "precision": ("fp32", "bf16", "fp16"), "channels": (1, 3)}
    kinds = [(("latents", "size", "batch_size", "steps", "dataset_size"), lambda v: whole(v) and v >= 1,
              "a whole number >= 1"), (("seed",), whole, "a whole number"),
             (("capacity_steps",), lambda v: whole(v) and v >= 0, "a whole number >= 0"),
             (("data_limit",), lambda v: v is None or whole(v) and v >= 2, "none or a whole number >= 2"),
             (("lr",), lambda v: number(v) and v > 0, "a number > 0"),
             (("beta", "alpha"), lambda v: number(v) and v >= 0, "a number >= 0"),
             (("gamma", "capacity", "lambda_od", "lambda_d"), lambda v: v is None or number(v) and v >= 0,
              "none or a number >= 0"), (("data", "dataset_name"), lambda v: isinstance(v, str), "a string"),
             (("factor_names",), many(lambda n: isinstance(n, str)), "a list of names"),
             (("factor_sizes",), many(whole), "a list of whole numbers")]
    kinds += [((name,), lambda v, allowed=allowed: v in allowed, "one of " + ", ".join(map(str, allowed)))
              for name, allowed in choices.items()]
    for names, valid, description in kinds:
        for name in names:
            if not valid(config[name]):
                return f"{name} {config[name]!r} (expected {description})"
    return None


def build_model(config):
    """The freshly initialised model a run's config describes (its arch, latents, channels, size
    and objective), on the CPU; the conv net channels-last, as oneDNN's convolutions run fastest."""
    model = models.build_model(config["arch"], config["latents"], config["channels"], config["size"],
                               deterministic=config["model"] == "ae")
    return model.to(memory_format=torch.channels_last) if config["arch"] == "conv" else model


def model_from_checkpoint(state, path="checkpoint"):
    """The model of a loaded checkpoint (on the CPU, in training mode), with its weights."""
    try:
        model = build_model(state["config"])
        model.load_state_dict(state["model"])
    except (RuntimeError, ValueError) as error:  # torch's first line is a header: say what does not fit
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        raise UserError(f"{path}: model weights do not fit the model in its config: "
                        f"{lines[min(1, len(lines) - 1)][:300]}") from error
    return model


# ============================================================================= the command line

RUN_DEFINING = ("model", "beta", "alpha", "gamma", "lambda_od", "lambda_d", "estimator", "capacity",
                "capacity_steps", "arch", "latents", "batch_size", "lr", "seed", "recon", "data_limit")
BATCH_OBJECTIVES = ("betatc", "factorvae", "dipvae1", "dipvae2")  # they compare samples in a batch
MAX_SKIPPED_IN_A_ROW = 100  # --skip-nonfinite gives up when the run itself has diverged
LOGGED_TERMS = """logged terms (progress line and the checkpoint's history; batch means, nats):
  loss    the objective minimised          recon  reconstruction loss per image
  kl      KL(q(z|x) || p(z)) summed over latents
  mi, tc, dwkl  betatc: index-code mutual information, total correlation, dimension-wise KL
          (without the MWS estimator's constant offsets, so ~0 for a collapsed model)
  capacity      betavae with --capacity: the target KL C at this step
  tc            factorvae: the discriminator's total-correlation estimate
  discriminator_loss, discriminator_accuracy   factorvae: how well it tells q(z) from prod q(z_j)
  dip     dipvae1/dipvae2: the covariance penalty before its lambdas
  mig     with --eval-every: the discrete MIG of the means on --eval-subset images"""


def _make_parser(suppress_defaults=False):
    p = ArgumentParser(
        prog="train.py", description="Train an autoencoder for disentangled representations and save a checkpoint.",
        epilog="Example: python train.py --model betatc --beta 6 --data dsprites.npz --steps 30000\n\n"
               + LOGGED_TERMS,
        argument_default=argparse.SUPPRESS if suppress_defaults else None,
        formatter_class=lambda prog: _RawEpilogFormatter(prog))
    d = (lambda value: argparse.SUPPRESS) if suppress_defaults else (lambda value: value)
    _objective_options(p.add_argument_group("objective"), d)
    _data_options(p.add_argument_group("model and data"), d)
    _optimisation_options(p.add_argument_group("optimisation"), d)
    _output_options(p.add_argument_group("output"), d)
    return p


def _objective_options(g, d):
    """--model and its weights; d(value) is the default (argparse.SUPPRESS when finding explicit ones)."""
    g.add_argument("--model", choices=losses.OBJECTIVES, default=d("betatc"),
                   help="ae: reconstruction only; vae: ELBO (Kingma & Welling 2014); betavae: "
                        "beta-weighted KL (Higgins et al. 2017); betatc: KL split into MI, total "
                        "correlation and dimension-wise KL (Chen et al. 2018); factorvae: VAE + "
                        "gamma TC from a discriminator (Kim & Mnih 2018); dipvae1/dipvae2: VAE + "
                        "penalty on the covariance of the means / of q(z) (Kumar et al. 2018)")
    g.add_argument("--beta", type=float, default=d(6.0),
                   help="weight of the KL (betavae) or of the total correlation (betatc)")
    g.add_argument("--alpha", type=float, default=d(1.0), help="betatc: weight of the index-code MI")
    g.add_argument("--gamma", type=float, default=d(None),
                   help="betatc: weight of the dimension-wise KL (default 1); betavae with "
                        "--capacity: weight of |KL - C| (default 1000); factorvae: weight of the TC "
                        f"(default {losses.FACTORVAE_GAMMA:g}, as Kim & Mnih's dSprites figures)")
    g.add_argument("--lambda-od", type=float, default=d(None),
                   help="dipvae: weight of the off-diagonal covariance penalty (default "
                        f"{losses.DIP_LAMBDA_OD:g}, in Locatello et al.'s grid)")
    g.add_argument("--lambda-d", type=float, default=d(None),
                   help="dipvae: weight of the diagonal penalty (default 10 x lambda-od for "
                        "dipvae1, lambda-od for dipvae2, as Kumar et al.)")
    g.add_argument("--estimator", choices=("mws", "mss"), default=d("mws"),
                   help="betatc: minibatch-weighted or minibatch-stratified sampling")
    g.add_argument("--capacity", type=float, default=d(None),
                   help="betavae: Burgess et al.'s target KL in nats (e.g. 25); enables "
                        "recon + gamma |KL - C| with C rising linearly from 0")
    g.add_argument("--capacity-steps", type=int, default=d(100_000),
                   help="steps over which the capacity C rises to --capacity")
    g.add_argument("--recon", choices=("auto", "bce", "mse"), default=d("auto"),
                   help="reconstruction loss; auto: bce for 1-channel images, mse for colour")


def _data_options(g, d):
    g.add_argument("--data", default=d("sprites"),
                   help="a built-in dataset (sprites, shapes; options as sprites:positions=8) or a "
                        "file/folder: dSprites .npz/.hdf5, 3dshapes .h5, images folder or .zip, ...")
    g.add_argument("--data-limit", type=int, default=d(None),
                   help="keep a random subset of this many images (chosen with --seed)")
    g.add_argument("--arch", choices=models.ARCHS, default=d("conv"),
                   help="conv: Burgess et al. 2018 conv net (64x64); mlp: Chen et al.'s MLP")
    g.add_argument("--latents", type=int, default=d(10), help="number of latent dimensions")


def _optimisation_options(g, d):
    g.add_argument("--batch-size", type=int, default=d(64),
                   help="images per step (the global batch: under torchrun it is split between processes)")
    g.add_argument("--lr", type=float, default=d(1e-3), help="Adam learning rate")
    g.add_argument("--steps", type=int, default=d(5000), help="total optimizer steps")
    g.add_argument("--epochs", type=float, default=d(None), help="train for this many passes "
                   "over the data instead of --steps")
    g.add_argument("--seed", type=int, default=d(0), help="seed for weights, batches and noise")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d("auto"),
                   help="auto: cuda when available, else cpu")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=d("auto"),
                   help="auto: mixed precision on CUDA (bf16, or fp16 with a GradScaler), fp32 on "
                        "the CPU; losses are always computed in fp32")
    g.add_argument("--amp", dest="amp", action="store_true", default=d(None),
                   help="mixed precision (bf16 on CPU; bf16/fp16 on CUDA)")
    g.add_argument("--no-amp", dest="amp", action="store_false", default=d(None), help="plain fp32")
    g.add_argument("--compile", action="store_true", default=d(False), help="torch.compile the model")
    g.add_argument("--skip-nonfinite", action="store_true", default=d(False),
                   help="skip batches whose loss or gradient is not finite (counted) instead of "
                        "stopping")


def _output_options(g, d):
    g.add_argument("--out", default=d("ckpt.pt"), help="checkpoint path")
    g.add_argument("--resume", action="store_true", default=d(False),
                   help="continue the run saved in --out (model, optimizer, step, RNGs)")
    g.add_argument("--force", action="store_true", default=d(False),
                   help="overwrite an existing checkpoint at --out")
    g.add_argument("--save-every", type=int, default=d(500), help="checkpoint every N steps")
    g.add_argument("--log-every", type=int, default=d(100),
                   help="progress line every N steps when the output is not a terminal")
    g.add_argument("--eval-every", type=int, default=d(0),
                   help="every N steps, log the discrete MIG of the means on up to "
                        "--eval-subset labelled images (0: only at the end)")
    g.add_argument("--eval-subset", type=int, default=d(10_000),
                   help="images used by the periodic MIG")
    g.add_argument("--final-eval", type=int, default=d(0),
                   help="images used by the final evaluation (every metric of metrics.evaluate): "
                        "0 for the whole dataset, or a fixed random subset of N (resuming a "
                        "finished run only redoes this evaluation)")
    g.add_argument("--debug", action="store_true", default=d(False), help="show tracebacks")


class _RawEpilogFormatter(HelpFormatter):
    """Keep the epilog's line breaks (the table of logged terms)."""

    def _fill_text(self, text, width, indent):
        return "".join(indent + line for line in text.splitlines(keepends=True))


def argument_problem(argv):
    """The one line train.py would print for these arguments and exit 2 on, or None if they parse
    and pass its checks (the study runner checks every run's arguments before starting any)."""
    with contextlib.redirect_stderr(io.StringIO()) as said, contextlib.redirect_stdout(io.StringIO()):
        try:
            _parse_args(argv)
        except SystemExit as stop:
            return said.getvalue().strip() or f"exit {stop.code}"
    return None


def _parse_args(argv=None):
    parser = _make_parser()
    args = parser.parse_args(argv)
    args.explicit = set(vars(_make_parser(suppress_defaults=True).parse_args(argv)))
    weights = [args.beta, args.alpha] + [w for w in (args.gamma, args.lambda_od, args.lambda_d) if w is not None]
    checks = [
        (not all(math.isfinite(w) and w >= 0 for w in weights),
         "--beta, --alpha, --gamma, --lambda-od and --lambda-d must be finite numbers >= 0"),
        (args.latents < 1, "--latents must be at least 1"),
        (args.batch_size < 1, "--batch-size must be positive"),
        (args.batch_size < 2 and args.model in BATCH_OBJECTIVES,
         f"--batch-size must be at least 2 for {args.model}: it compares the samples of a batch"),
        (args.steps < 1, "--steps must be positive"),
        (args.epochs is not None and args.epochs <= 0, "--epochs must be positive"),
        (not args.lr > 0 or not math.isfinite(args.lr), "--lr must be a positive number"),
        (args.capacity is not None and not (math.isfinite(args.capacity) and args.capacity >= 0),
         "--capacity must be a finite number >= 0"),
        (args.capacity_steps < 0, "--capacity-steps must be >= 0"),
        (args.data_limit is not None and args.data_limit < 2, "--data-limit must be at least 2"),
        (min(args.save_every, args.log_every, args.eval_subset) < 1,
         "--save-every, --log-every and --eval-subset must be positive"),
        (args.eval_every < 0 or args.final_eval < 0, "--eval-every and --final-eval must be >= 0"),
        (args.resume and args.force, "--resume continues --out and --force overwrites it: pick one"),
        (args.capacity is not None and args.model != "betavae", "--capacity is for --model betavae"),
        (("lambda_od" in args.explicit or "lambda_d" in args.explicit) and not args.model.startswith("dipvae"),
         "--lambda-od and --lambda-d are for --model dipvae1 or dipvae2"),
    ]
    for failed, message in checks:
        if failed:
            parser.error(message)
    if args.amp is not None and "precision" not in args.explicit:
        args.precision = "amp" if args.amp else "fp32"  # "amp" is resolved once the device is known
    return parser, args


def _check_output(args):
    folder = os.path.dirname(os.path.abspath(args.out))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise UserError(f"--out {args.out}: cannot create folder {folder}: {error.strerror}")
    if not os.access(folder, os.W_OK):
        raise UserError(f"--out {args.out}: folder {folder} is not writable")
    if os.path.isdir(args.out):
        raise UserError(f"--out {args.out}: is a folder; give a file path such as {args.out}/ckpt.pt")
    if args.resume and not os.path.exists(args.out):
        raise UserError(f"--resume: there is no checkpoint at {args.out} to continue")
    if os.path.exists(args.out) and not (args.resume or args.force):
        raise UserError(f"--out {args.out} already exists; pass --resume to continue it or "
                        "--force to overwrite it")


def _merge_resumed_config(parser, args, config):
    """On --resume, the run-defining options come from the checkpoint; given ones must agree."""
    for name in RUN_DEFINING:
        if name in args.explicit and getattr(args, name) != config[name]:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)} does not match the "
                         f"checkpoint's {config[name]}; leave it out to resume, or start a new run")
        setattr(args, name, config[name])
    if "data" not in args.explicit:  # --data may point at the same dataset in another place
        args.data = config["data"]
    if "steps" not in args.explicit and "epochs" not in args.explicit:
        args.steps = config["steps"]
    if "precision" not in args.explicit and "amp" not in args.explicit:
        args.precision = config["precision"]  # continue as it was trained


# ============================================================================= processes and devices

def _rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _first_process():
    """Rank 0, also before the process group exists (torchrun sets RANK and TORCHELASTIC_RUN_ID)."""
    return _rank() == 0 and ("TORCHELASTIC_RUN_ID" not in os.environ or os.environ.get("RANK", "0") == "0")


def _world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _start_processes(args, parser):
    """Under torchrun (RANK set): join the process group (NCCL on CUDA, gloo on the CPU) and
    return this process's device; otherwise just the device."""
    if "RANK" not in os.environ:
        return resolve_device(args.device)
    world, local_rank = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if args.batch_size % world:
        parser.error(f"--batch-size {args.batch_size} does not divide into {world} processes; "
                     f"use a multiple of {world}")
    device = resolve_device(args.device, local_rank)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if device.type == "cuda" and torch.cuda.device_count() < local_world:
        raise UserError(f"torchrun started {local_world} processes on this machine but it has "
                        f"{torch.cuda.device_count()} CUDA GPU(s): one GPU per process; use "
                        "--nproc_per_node <= the GPU count, or --device cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _gather(tensor):
    """The rows of every process, in rank order, with gradients flowing back to each (B, ...)."""
    if _world_size() == 1:
        return tensor
    from torch.distributed._functional_collectives import all_gather_single  # autograd-aware
    return all_gather_single(tensor.contiguous(), 0, dist.group.WORLD).wait()


def _resolve_precision(precision, device):
    """(autocast dtype or None, whether a GradScaler is needed). "auto" is AMP on CUDA and fp32
    elsewhere; "amp" (--amp) is AMP on CUDA and bf16 elsewhere."""
    if precision in ("auto", "amp"):
        if device.type != "cuda":
            return (torch.bfloat16 if precision == "amp" else None), False
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs CUDA; use bf16 on the CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision], precision == "fp16"


# ============================================================================= the run

class _BatchSampler:
    """Random batches without replacement, epoch after epoch; its state is saved for --resume."""

    def __init__(self, size, batch_size, seed):
        self.size, self.batch_size = size, batch_size
        self.rng = np.random.default_rng(seed)
        self.new_epoch()

    def new_epoch(self):
        self.epoch_start_state = self.rng.bit_generator.state
        self.order, self.position = self.rng.permutation(self.size), 0

    def next(self):
        if self.position + self.batch_size > self.size:  # drop the ragged end of each epoch
            self.new_epoch()
        index = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return index

    def state_dict(self):
        return {"epoch_start_state": self.epoch_start_state, "position": self.position}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["epoch_start_state"]
        self.new_epoch()
        self.position = state["position"]


class _Run:
    """Everything a training run carries from step to step, and its checkpoint."""

    def __init__(self, args, dataset, device, config):
        self.args, self.dataset, self.device, self.config = args, dataset, device, config
        self.autocast_dtype, needs_scaler = _resolve_precision(config["precision"], device)  # resolved
        self.model = build_model(config).to(device)
        fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=args.lr, **fast)
        self.scaler = torch.amp.GradScaler(device.type, enabled=needs_scaler)
        self.discriminator = self.discriminator_optimizer = None
        if args.model == "factorvae":  # Kim & Mnih's discriminator, with its own Adam
            self.discriminator = models.build_discriminator(args.latents).to(device)
            self.discriminator_optimizer = torch.optim.Adam(
                self.discriminator.parameters(), lr=losses.DISCRIMINATOR_LR,
                betas=losses.DISCRIMINATOR_BETAS, **fast)
        self.sampler = _BatchSampler(len(dataset), args.batch_size, args.seed)
        world, rank = _world_size(), _rank()  # this process's slice of every global batch
        self.local = slice(rank * args.batch_size // world, (rank + 1) * args.batch_size // world)
        self.step, self.history, self.evaluations, self.skipped = 0, [], [], 0
        self.hyper = dict(beta=args.beta, alpha=args.alpha, gamma=args.gamma, dataset_size=len(dataset),
                          recon=config["recon"], estimator=args.estimator, capacity=args.capacity,
                          capacity_steps=args.capacity_steps, lambda_od=args.lambda_od,
                          lambda_d=args.lambda_d)
        # what the step calls: DDP wrappers under torchrun (they average the gradients), compiled on request
        self.step_model, self.step_discriminator = self.model, self.discriminator
        if _world_size() > 1:
            wrap = lambda m: torch.nn.parallel.DistributedDataParallel(m, device_ids=None if device.type == "cpu" else [device])
            self.step_model = wrap(self.model)
            if self.discriminator is not None:
                self.step_discriminator = wrap(self.discriminator)
        if args.compile:
            self.step_model = torch.compile(self.step_model)
        self.source = ImageSource(dataset.images, device)

    def state(self, final=None):
        """The checkpoint: plain containers and tensors only (weights_only=True loads it)."""
        state = {"format": CHECKPOINT_FORMAT, "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                 "step": self.step, "config": self.config, "sampler": self.sampler.state_dict(),
                 "history": self.history, "evaluations": self.evaluations, "skipped": self.skipped,
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}
        if self.device.type == "cuda":
            state["rng"]["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.discriminator is not None:
            state["discriminator"] = self.discriminator.state_dict()
            state["discriminator_optimizer"] = self.discriminator_optimizer.state_dict()
        if final is not None:
            state["final"] = final
        return state

    def restore(self, state):
        """Continue from a checkpoint written by state(); any world size can read it."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state.get("scaler") or self.scaler.state_dict())
        if self.discriminator is not None:
            self.discriminator.load_state_dict(state["discriminator"])
            self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if self.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.step, self.history = state["step"], state["history"]
        self.evaluations, self.skipped = state["evaluations"], state.get("skipped", 0)

    def save(self, final=None):
        if _rank() == 0:
            save_checkpoint(self.args.out, self.state(final))

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                              enabled=self.autocast_dtype is not None)


def _build_run(parser, args, device):
    """Load the data (and the checkpoint on --resume) and make the run ready for its first step."""
    _check_output(args)
    resumed = load_checkpoint(args.out) if args.resume else None
    if resumed:
        _merge_resumed_config(parser, args, resumed["config"])
    dataset = data.load(args.data, limit=args.data_limit, seed=args.seed)
    channels, size = check_dataset(dataset, args.arch, args.data)
    if resumed and resumed["config"]["dataset_size"] != len(dataset):
        raise UserError(f"{args.data}: has {len(dataset)} images, the checkpoint was trained on "
                        f"{resumed['config']['dataset_size']}")
    if args.model in BATCH_OBJECTIVES and len(dataset) < args.batch_size:
        raise UserError(f"{args.data}: {len(dataset)} images is fewer than --batch-size {args.batch_size}")
    if args.epochs is not None:
        args.steps = max(1, round(args.epochs * len(dataset) / args.batch_size))
    autocast_dtype, _ = _resolve_precision(args.precision, device)
    config = {name: getattr(args, name) for name in RUN_DEFINING + ("data", "steps")}
    config.update(recon=args.recon if args.recon != "auto" else ("bce" if channels == 1 else "mse"),
                  channels=channels, size=size, dataset_size=len(dataset), dataset_name=dataset.name,
                  factor_names=dataset.factor_names, factor_sizes=dataset.factor_sizes,
                  precision={None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype])
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    run = _Run(args, dataset, device, config)
    if resumed:
        run.restore(resumed)
    return run, resumed


def _train_step(run, x, noise):
    """Forward, objective, backward, the non-finite check and the optimizer steps. Returns the
    batch-mean terms (averaged over processes) and whether they and the gradient were finite (if
    not, no optimizer stepped)."""
    args = run.args
    with run.autocast():
        logits, mu, logvar, z = run.step_model(x, noise)
    mu, logvar, z = _gather(mu), _gather(logvar), _gather(z)  # the whole global batch
    tc_logits = _fixed_discriminator(run.discriminator, z.float()) if run.discriminator is not None else None
    loss, terms = losses.objective(args.model, x, logits, mu, logvar, z, step=run.step,
                                   tc_logits=tc_logits, **run.hyper)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    # what the step checks and logs, read from the device in one go
    measured = {"loss": loss.detach().float()}
    if run.discriminator is not None:
        measured.update(_discriminator_step(run, z.detach().float()))
    if not run.scaler.is_enabled():  # the GradScaler skips non-finite gradients itself
        measured["gradient_norm"] = torch.nn.utils.get_total_norm(
            [p.grad for p in run.model.parameters() if p.grad is not None])
    values = dict(zip(measured, torch.stack([v.float() for v in measured.values()]).tolist()))
    finite = math.isfinite(values.pop("gradient_norm", 0.0))
    terms = _mean_over_processes({"loss": values.pop("loss"), **terms, **values}, run.device)
    finite = finite and all(math.isfinite(v) for v in terms.values())
    if finite:
        run.scaler.step(run.optimizer)
        run.scaler.update()
        if run.discriminator is not None:
            run.discriminator_optimizer.step()
    return terms, finite


def _fixed_discriminator(discriminator, z):
    """FactorVAE's TC estimate for the model's loss: the discriminator on z with its weights held
    fixed, so the gradient reaches z (the encoder) and not the discriminator."""
    weights = {name: weight.detach() for name, weight in discriminator.named_parameters()}
    return torch.func.functional_call(discriminator, weights, (z,))


def _discriminator_step(run, z):
    """FactorVAE: the discriminator learns to tell z from its dimension-wise permutation (z is
    detached: this step does not train the encoder). Its optimizer steps with the model's."""
    permuted = losses.permute_dims(z)  # of the whole batch, the same on every process
    run.discriminator_optimizer.zero_grad(set_to_none=True)
    logits_joint, logits_permuted = run.step_discriminator(
        torch.cat([z[run.local], permuted[run.local]])).chunk(2)
    loss = losses.discriminator_loss(logits_joint, logits_permuted)
    loss.backward()
    accuracy = losses.discriminator_accuracy(logits_joint, logits_permuted)
    return {"discriminator_loss": loss.detach(), "discriminator_accuracy": accuracy.detach()}


def _mean_over_processes(terms, device):
    """Average the logged terms over processes (one all-reduce; identity in one process)."""
    if _world_size() == 1:
        return terms
    values = torch.tensor(list(terms.values()), dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(terms, (values / _world_size()).tolist()))


def _any_process_stopping(stop, device):
    """True on every process as soon as one was signalled, so that all stop at the same step."""
    if _world_size() == 1:
        return stop.signal is not None
    flag = torch.tensor([float(stop.signal is not None)], device=device)
    dist.all_reduce(flag)
    return bool(flag.item())


def _nonfinite_stop(run, step_terms, skipped_in_a_row):
    """Stop the run on a non-finite loss or gradient (after saving the last good state)."""
    described = "  ".join(f"{k}={v:.4g}" for k, v in step_terms.items())
    in_a_row = f", {skipped_in_a_row} batches in a row" if skipped_in_a_row > 1 else ""
    run.save()  # the weights are still those of the last good step
    raise UserError(f"step {run.step + 1}: the loss or its gradient is not finite{in_a_row} "
                    f"({described}); saved the last good state (step {run.step}) to "
                    f"{run.args.out}. Lower --lr, or pass --skip-nonfinite to skip such batches")


def _log(run, window, progress, terms):
    """Add a step's terms to the window; every --log-every steps, average it into the history."""
    for k, v in terms.items():
        window[k] = window.get(k, 0.0) + v
    window["n"] = window.get("n", 0) + 1
    if run.step % run.args.log_every == 0 or run.step == run.args.steps:
        run.history.append({"step": run.step, "img_per_s": progress.rate(run.step),
                            **{k: v / window["n"] for k, v in window.items() if k != "n"}})
        window.clear()


def _periodic_mig(run):
    """--eval-every: the discrete MIG of the means on --eval-subset images (rank 0; saved first)."""
    run.save()  # a failing or interrupted evaluation never costs the steps before it
    if _rank() != 0:
        return None
    index = evaluation_index(run.dataset, run.args.eval_subset, run.args.seed)
    mu, logvar = encode_dataset(run.model, run.source, index)
    try:
        result, note = evaluate_codes(mu, logvar, run.dataset, index, run.args.seed, only_mig=True)
    except ValueError as error:
        result, note = {}, str(error)
    if "mig_discrete" not in result:
        print(f"\nstep {run.step}: MIG not measured: {note}", file=sys.stderr)
        return None
    mig = float(result["mig_discrete"]["mig"])
    run.evaluations.append({"step": run.step, "discrete_mig": mig, "samples": len(mu)})
    return mig


# ============================================================================= train, then evaluate

def train(parser, args):
    """Build or restore the run, train it to --steps, save, evaluate; returns the exit code."""
    device = _start_processes(args, parser)
    run, resumed = _build_run(parser, args, device)
    if _rank() == 0:
        world = f" over {_world_size()} processes" if _world_size() > 1 else ""
        print(f"training {args.model} ({args.arch}, {args.latents} latents) on {data.describe(run.dataset)}: "
              f"{args.steps:,} steps of {args.batch_size}{world}, {device.type} "
              f"{run.config['precision']}, recon {run.config['recon']}", file=sys.stderr)
        if run.step >= args.steps:
            print(f"the checkpoint is already at step {run.step:,} of {args.steps:,}: measuring only",
                  file=sys.stderr)
    with _StopRequest() as stop:
        progress = _loop(run, stop)
        return _finish(run, stop, progress, resumed)


def _loop(run, stop):
    """The training loop, until --steps or a signal; returns its progress meter (for the rate)."""
    args, device = run.args, run.device
    progress = _Progress(args.steps, run.step, args.batch_size, args.log_every, live=_rank() == 0)
    window, skipped_in_a_row = {}, 0
    while run.step < args.steps and not _any_process_stopping(stop, device):
        # this process's slice of the global batch, and of the global reparameterisation noise
        index = run.sampler.next()
        noise = torch.randn(args.batch_size, args.latents, device=device)[run.local]
        terms, finite = _train_step(run, run.source.batch(index[run.local]), noise)
        # a non-finite loss or gradient: skip the batch (--skip-nonfinite) or stop
        if not finite:
            run.skipped, skipped_in_a_row = run.skipped + 1, skipped_in_a_row + 1
            if not args.skip_nonfinite or skipped_in_a_row > MAX_SKIPPED_IN_A_ROW:
                _nonfinite_stop(run, terms, skipped_in_a_row)
            continue
        run.step, skipped_in_a_row = run.step + 1, 0
        # the history, a periodic MIG, the progress line, a checkpoint
        _log(run, window, progress, terms)
        if args.eval_every and run.step % args.eval_every == 0 and run.dataset.factors is not None:
            mig = _periodic_mig(run)
            if mig is not None:
                terms["mig"] = mig
        progress.update(run.step, terms, force=run.step == args.steps)
        if run.step % args.save_every == 0 and run.step < args.steps:
            run.save()
    progress.close()
    return progress


def _finish(run, stop, progress, resumed):
    """Save; unless stopped, evaluate every metric on rank 0 and save again with the results."""
    args = run.args
    run.save()  # the weights are safe before the (possibly long) final evaluation
    if stop.signal is not None:
        if _rank() == 0:
            print(f"{signal.Signals(stop.signal).name}: stopped at step {run.step}/{args.steps}; "
                  f"checkpoint saved to {args.out}. Continue with: python train.py --resume "
                  f"--out {args.out}", file=sys.stderr)
        return 128 + stop.signal
    if _rank() != 0:
        return 0
    final = {"step": run.step, "img_per_s": progress.rate(run.step), "skipped": run.skipped}
    if run.step == progress.start_step and resumed and "final" in resumed:  # nothing trained: keep the speed
        final["img_per_s"] = resumed["final"]["img_per_s"]
    summary = f"done: {run.step:,} step{'' if run.step == 1 else 's'}" + (
        f", {final['img_per_s']:,.0f} img/s" if final["img_per_s"] > 0 else " (none trained now)")
    try:
        with stop.raising():  # a signal now skips the evaluation at once: the weights are saved
            summary += _final_evaluation(run, final)
    except _Interrupted as interrupted:
        print(f"\n{signal.Signals(interrupted.signum).name}: the final evaluation was skipped; the "
              f"trained weights are saved in {args.out}. Measure them with: python traverse.py "
              f"{args.out} --metrics", file=sys.stderr)
        return 128 + interrupted.signum
    run.save(final)
    print(summary + f"; saved {args.out}")
    return 0


def _final_evaluation(run, final):
    """Encode the evaluated images and store metrics.evaluate in `final`; returns the summary."""
    index = evaluation_index(run.dataset, run.args.final_eval, run.args.seed)
    rows = len(index)
    start = time.perf_counter()
    mu, logvar = encode_dataset(run.model, run.source, index, what=f"encoding {rows:,} images")
    print(f"encoded in {time.perf_counter() - start:.0f} s; computing the metrics", file=sys.stderr)
    result, note = evaluate_codes(mu, logvar, run.dataset, index, run.args.seed)
    final.update(samples=rows, metrics=plain(result), evaluation_seconds=time.perf_counter() - start)
    if note:
        print(note, file=sys.stderr)
    errors = [f"{name}: {entry['error']}" for name, entry in result.items() if "error" in entry]
    if errors:
        print("not measured: " + "; ".join(errors), file=sys.stderr)
    migs = [f"{label} {result[name]['mig']:.3f}" for name, label in
            (("mig_discrete", "discrete"), ("mig_gaussian", "gaussian")) if "mig" in result.get(name, {})]
    return f", MIG on {rows:,} images: {', '.join(migs)}" if migs else f", evaluated {rows:,} images"


class _Interrupted(Exception):
    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks, so it can save before leaving; inside
    `raising()` (the final evaluation, after the save) a signal interrupts at once instead."""

    def __enter__(self):
        self.signal, self.raise_now = None, False
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exception):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.raise_now:
            raise _Interrupted(signum)
        if self.signal is not None:  # a second Ctrl-C: leave at once (the last save stays)
            raise KeyboardInterrupt("a second signal: left without saving; --out keeps its last "
                                    "save, if the run had saved yet")
        self.signal = signum

    @contextlib.contextmanager
    def raising(self):
        self.raise_now = True
        try:
            yield
        finally:
            self.raise_now = False


class _Progress:
    """One live line on a terminal; a line every `every` steps otherwise (nothing if not live)."""

    def __init__(self, total, start, batch_size, every, live=True, what=None):
        self.total, self.batch_size, self.every, self.what = total, batch_size, every, what
        self.enabled, self.tty = live, sys.stderr.isatty()
        self.start_step, self.start_time, self.last_print, self.last_step = start, time.perf_counter(), 0.0, start

    def rate(self, step):
        return (step - self.start_step) * self.batch_size / max(time.perf_counter() - self.start_time, 1e-9)

    def update(self, step, terms, force=False):
        now = time.perf_counter()
        due = now - self.last_print >= 0.5 if self.tty else step // self.every > self.last_step // self.every
        if not self.enabled or not (force or due or step == self.total):
            return
        self.last_print, self.last_step = now, step
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


def main(argv=None):
    parser, args = _parse_args(argv)
    torch.set_flush_denormal(True)  # denormal weights halve the CPU's speed otherwise
    try:
        return report_errors(lambda: train(parser, args), args.debug)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
