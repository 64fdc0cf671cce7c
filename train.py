"""Train an autoencoder for disentanglement and save a checkpoint. Needs torch, numpy, pillow.

    python train.py                                   # beta-TCVAE, beta 6, built-in sprites
    python train.py --model betavae --beta 4 --data dsprites.npz --steps 30000 --out runs/bvae.pt
    python train.py --resume --out runs/bvae.pt --steps 60000   # continue a run
    torchrun --nproc_per_node 4 train.py --batch-size 256 ...   # one run over 4 processes (DDP)

Batches are drawn by index from the uint8 image array and converted on the fly (no DataLoader).
The checkpoint (--out) is written atomically every --save-every steps, before every evaluation, at
the end, and when the run is interrupted (Ctrl-C, SIGTERM) or stopped by a non-finite loss;
`torch.load(path, weights_only=True)` reads it. Beside it, the run's history grows as a CSV in
long format (ckpt.pt: ckpt.history.csv; see --help); --tensorboard DIR logs the same to
TensorBoard. Under torchrun every process takes its slice of the same global batch, the codes of
the whole batch are gathered for the objectives that compare samples (beta-TCVAE, FactorVAE,
DIP-VAE), and only rank 0 prints, saves, evaluates and writes the logs.

Ada-GVAE and ML-VAE (--model adagvae | mlvae, Locatello et al. 2020) train on pairs of images whose
factors differ in --k of them (data.PairSampler, drawn with replacement from a seeded generator
whose state the checkpoint keeps): --batch-size counts pairs, a step encodes both images of every
pair, aggregates the latents the pair seems to share (losses.aggregate_pair), samples z from the
aggregate and decodes. Under torchrun each process takes its slice of the pairs, whole.

The file reads top to bottom: the command line; `run_config`, the one place where a run's settings
are decided (from the command line, the data and the checkpoint being resumed); processes and
precision; the run state; the training and discriminator steps; the loop; the finish. What the
commands share (errors, devices, encoding, evaluation, the checkpoint format) is in runtime.py.
`python train.py --check-runs` reads a JSON list of argument lists on stdin and prints a JSON list
of the line each would be refused with (null where it is accepted): examples/reproduce.py checks a
study's runs this way before starting any.
"""
import argparse
import contextlib
import importlib.util
import io
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import data
import losses
import metrics
import models
import runtime
from runtime import UserError

# The run's settings and their defaults; a checkpoint's config holds every one. Their options
# default to None ("not given"): run_config fills in these defaults, or on --resume the
# checkpoint's values, so an option left out never replaces what the checkpoint holds.
SETTINGS = {
    "model": "betatc",
    "beta": 6.0,
    "alpha": 1.0,
    "gamma": None,  # None: the objective's own default (losses.py)
    "lambda_od": None,
    "lambda_d": None,
    "estimator": "mws",
    "capacity": None,
    "capacity_steps": 100_000,
    "k": None,  # adagvae/mlvae: factors that differ within a pair (None: 1; 0: random per pair)
    "recon": "auto",
    "data": "sprites",
    "data_limit": None,
    "arch": "conv",
    "latents": 10,
    "batch_size": 64,
    "lr": 1e-3,
    "steps": 5000,
    "seed": 0,
    "precision": "auto",
    "eval_protocol": "exact",  # of --eval-every and the final evaluation (metrics.PROTOCOLS)
    "eval_factors": None,  # --factors: the factor names they score (None: every factor)
}
# Settings a resumed run cannot change: they define the model, or which images it sees.
FIXED_ON_RESUME = ("model", "arch", "latents", "data_limit", "seed", "k")
# Options of this invocation only: part of the config the loop reads, not of the checkpoint's.
PER_INVOCATION = ("out", "device", "compile", "skip_nonfinite", "save_every", "log_every",
                  "eval_every", "eval_subset", "final_eval")
BATCH_OBJECTIVES = ("betatc", "factorvae", "dipvae1", "dipvae2")  # they compare samples in a batch
MAX_SKIPPED_IN_A_ROW = 100  # --skip-nonfinite gives up when the run itself has diverged
TRAVERSAL_RANGE = 3.0  # --tensorboard's traversal: each latent over 10 values in [-3, 3], as
TRAVERSAL_STEPS = 10   # traverse.py's defaults
LOGGED_TERMS = """logged terms (progress line and the checkpoint's history; batch means, nats):
  loss    the objective minimised          recon  reconstruction loss per image
  kl      KL(q(z|x) || p(z)) summed over latents
  mi, tc, dwkl  betatc: index-code mutual information, total correlation, dimension-wise KL
          (without the MWS estimator's constant offsets, so ~0 for a collapsed model)
  capacity      betavae with --capacity: the target KL C at this step
  tc            factorvae: the discriminator's total-correlation estimate
  discriminator_loss, discriminator_accuracy   factorvae: how well it tells q(z) from prod q(z_j)
  dip     dipvae1/dipvae2: the covariance penalty before its lambdas
  shared  adagvae/mlvae: latents per pair taken as shared (kl is the aggregated posteriors')
  mig     with --eval-every: the discrete MIG of the means on --eval-subset images

the history CSV beside --out (ckpt.pt: ckpt.history.csv), long format `step,name,value`,
appended at every log point (a killed run keeps what it logged; --resume drops the rows past the
checkpoint's step and continues it; a new run starts it anew):
  every logged term above, as averaged for the checkpoint's history
  kl_0 .. kl_{D-1}  each latent's KL(q(z_j|x) || N(0, 1)), batch mean in nats (adagvae/mlvae:
                    of the encoder's posteriors, before aggregation)
  metrics           of --eval-every and of the final evaluation, named ENTRY_KEY after
                    metrics.evaluate's entries (mig_discrete_mig, dci_disentanglement; a "score"
                    as its entry: sap_score); the final values replace a periodic one at its
                    step"""


# ============================================================================= the command line

class _Formatter(runtime.HelpFormatter):
    """Keep the epilog's line breaks (the table of logged terms); show the SETTINGS defaults."""

    def _fill_text(self, text, width, indent):
        return "".join(indent + line for line in text.splitlines(keepends=True))

    def _get_help_string(self, action):
        default = SETTINGS.get(action.dest)
        flag = action.nargs == 0  # --amp, --no-amp: their dest is --precision's
        if not flag and default is not None and "default" not in action.help:
            shown = f"{default:g}" if isinstance(default, float) else default
            return f"{action.help} (default: {shown})"
        return super()._get_help_string(action)


def _make_parser():
    p = runtime.ArgumentParser(
        prog="train.py",
        description="Train an autoencoder for disentangled representations and save a checkpoint.",
        epilog="Example: python train.py --model betatc --beta 6 --data dsprites.npz --steps 30000"
               "\n\n" + LOGGED_TERMS,
        formatter_class=_Formatter)
    _objective_options(p.add_argument_group("objective"))
    _data_options(p.add_argument_group("model and data"))
    _optimisation_options(p.add_argument_group("optimisation"))
    _output_options(p.add_argument_group("output"))
    return p


def _objective_options(g):
    g.add_argument("--model", choices=losses.OBJECTIVES + losses.PAIR_OBJECTIVES,
                   help="ae: reconstruction only; vae: ELBO (Kingma & Welling 2014); betavae: "
                        "beta-weighted KL (Higgins et al. 2017); betatc: KL split into MI, total "
                        "correlation and dimension-wise KL (Chen et al. 2018); factorvae: VAE + "
                        "gamma TC from a discriminator (Kim & Mnih 2018); dipvae1/dipvae2: VAE + "
                        "penalty on the covariance of the means / of q(z) (Kumar et al. 2018); "
                        "adagvae/mlvae: beta-VAE on pairs of images that share factors, the "
                        "latents a pair seems to share aggregated (Locatello et al. 2020)")
    g.add_argument("--beta", type=float,
                   help="weight of the KL (betavae, adagvae, mlvae) or of the total correlation "
                        "(betatc)")
    g.add_argument("--alpha", type=float, help="betatc: weight of the index-code MI")
    g.add_argument("--gamma", type=float,
                   help="betatc: weight of the dimension-wise KL (default 1); betavae with "
                        "--capacity: weight of |KL - C| (default 1000); factorvae: weight of the "
                        f"TC (default {losses.FACTORVAE_GAMMA:g}, as Kim & Mnih's dSprites "
                        "figures)")
    g.add_argument("--lambda-od", type=float,
                   help="dipvae: weight of the off-diagonal covariance penalty (default "
                        f"{losses.DIP_LAMBDA_OD:g}, in Locatello et al.'s grid)")
    g.add_argument("--lambda-d", type=float,
                   help="dipvae: weight of the diagonal penalty (default 10 x lambda-od for "
                        "dipvae1, lambda-od for dipvae2, as Kumar et al.)")
    g.add_argument("--estimator", choices=("mws", "mss"),
                   help="betatc: minibatch-weighted or minibatch-stratified sampling")
    g.add_argument("--capacity", type=float,
                   help="betavae: Burgess et al.'s target KL in nats (e.g. 25); enables "
                        "recon + gamma |KL - C| with C rising linearly from 0")
    g.add_argument("--capacity-steps", type=int,
                   help="steps over which the capacity C rises to --capacity")
    g.add_argument("--k", type=int,
                   help="adagvae/mlvae: how many factors differ between the two images of a "
                        "pair; 0: uniform in 1..K-1 for each pair, K the factors (default 1)")
    g.add_argument("--recon", choices=("auto", "bce", "mse"),
                   help="reconstruction loss; auto: bce for 1-channel images, mse for colour")


def _data_options(g):
    g.add_argument("--data",
                   help="a built-in dataset (sprites, shapes; options as sprites:positions=8) or a "
                        "file/folder: dSprites .npz/.hdf5, 3dshapes .h5, images folder or .zip, "
                        "...; the checkpoint keeps a path as an absolute one")
    g.add_argument("--data-limit", type=int,
                   help="keep a random subset of this many images (chosen with --seed)")
    g.add_argument("--arch", choices=models.ARCHS,
                   help="conv: Burgess et al. 2018 conv net (64x64); mlp: Chen et al.'s MLP")
    g.add_argument("--latents", type=int, help="number of latent dimensions")


def _optimisation_options(g):
    g.add_argument("--batch-size", type=int,
                   help="images per step, pairs for adagvae/mlvae (the global batch: under "
                        "torchrun it is split between processes)")
    g.add_argument("--lr", type=float, help="Adam learning rate")
    g.add_argument("--steps", type=int, help="total optimizer steps")
    g.add_argument("--epochs", type=float,
                   help="train for this many passes over the data instead of --steps")
    g.add_argument("--seed", type=int,
                   help=f"seed for weights, batches and noise (0 to {runtime.MAX_SEED})")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available, else cpu")
    g.add_argument("--precision", choices=("auto", "mixed", "fp32", "bf16", "fp16"),
                   help="auto: mixed on CUDA and on CPUs with native bf16, else fp32; mixed: bf16 "
                        "autocast (fp16 with a GradScaler on GPUs without bf16); losses are "
                        "always computed in fp32; fp32 is bit-reproducible across machines")
    g.add_argument("--amp", dest="precision", action="store_const", const="mixed",
                   help="the same as --precision mixed")
    g.add_argument("--no-amp", dest="precision", action="store_const", const="fp32",
                   help="the same as --precision fp32")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--skip-nonfinite", action="store_true",
                   help="skip batches whose loss or gradient is not finite (counted) instead of "
                        "stopping")


def _output_options(g):
    g.add_argument("--out", default="ckpt.pt",
                   help="checkpoint path; the run's history goes beside it as a CSV "
                        "(ckpt.pt: ckpt.history.csv), see below")
    g.add_argument("--resume", action="store_true",
                   help="continue the run saved in --out (model, optimizer, step, RNGs); options "
                        "left out keep the checkpoint's values")
    g.add_argument("--force", action="store_true",
                   help="overwrite an existing checkpoint at --out")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps")
    g.add_argument("--log-every", type=int, default=100,
                   help="progress line every N steps when the output is not a terminal")
    g.add_argument("--eval-every", type=int, default=0,
                   help="every N steps, log the discrete MIG of the means on up to "
                        "--eval-subset labelled images (0: only at the end)")
    g.add_argument("--eval-subset", type=int, default=10_000,
                   help="images used by the periodic MIG")
    g.add_argument("--final-eval", type=int, default=0,
                   help="images used by the final evaluation (every metric of metrics.evaluate): "
                        "0 for the whole dataset, or a fixed random subset of N (resuming a "
                        "finished run only redoes this evaluation)")
    g.add_argument("--eval-protocol", choices=metrics.PROTOCOLS,
                   help="how --eval-every and the final evaluation measure: exact (every metric "
                        "on every row) or dlib (disentanglement_lib's settings, Locatello et al. "
                        "2019: MIG on 10,000 drawn rows, DCI from gradient-boosted trees, ...)")
    g.add_argument("--factors", dest="eval_factors", metavar="NAME,...",
                   type=runtime.parse_factor_names,
                   help="score only these factors in --eval-every and the final evaluation (as "
                        "the data names them; e.g. scale,orientation,posX,posY leaves sprites' "
                        "shape out, as Chen et al. 2018 scored dSprites; default: every factor)")
    g.add_argument("--tensorboard", metavar="DIR",
                   help="also log the terms and metrics as TensorBoard scalars and the traversal "
                        "of image 0 as an image at each evaluation, into DIR (needs the "
                        "tensorboard package: pip install tensorboard)")
    g.add_argument("--debug", action="store_true", help="show tracebacks")


def _parse_args(argv=None):
    """(parser, args): the command line, with every check that needs no data or checkpoint."""
    parser = _make_parser()
    args = parser.parse_args(argv)
    for message in _argument_problems(args):
        parser.error(message)
    if args.seed is not None:
        runtime.check_seed(parser, args.seed)
    return parser, args


def _argument_problems(args):
    """The messages of the checks the arguments fail (options not given are None: unchecked)."""
    model = args.model or SETTINGS["model"]
    weights = [w for w in (args.beta, args.alpha, args.gamma, args.lambda_od, args.lambda_d)
               if w is not None]
    checks = [
        (not all(math.isfinite(w) and w >= 0 for w in weights),
         "--beta, --alpha, --gamma, --lambda-od and --lambda-d must be finite numbers >= 0"),
        (_below(args.latents, 1), "--latents must be at least 1"),
        (_below(args.batch_size, 1), "--batch-size must be positive"),
        (_below(args.batch_size, 2) and model in BATCH_OBJECTIVES,
         f"--batch-size must be at least 2 for {model}: it compares the samples of a batch"),
        (_below(args.steps, 1), "--steps must be positive"),
        (args.epochs is not None and not args.epochs > 0, "--epochs must be positive"),
        (args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)),
         "--lr must be a positive number"),
        (args.capacity is not None and not (math.isfinite(args.capacity) and args.capacity >= 0),
         "--capacity must be a finite number >= 0"),
        (_below(args.capacity_steps, 0), "--capacity-steps must be >= 0"),
        (_below(args.k, 0), "--k must be >= 0 (0: a random k for each pair)"),
        (args.k is not None and model not in losses.PAIR_OBJECTIVES,
         "--k is for --model adagvae or mlvae"),
        (_below(args.data_limit, 2), "--data-limit must be at least 2"),
        (min(args.save_every, args.log_every, args.eval_subset) < 1,
         "--save-every, --log-every and --eval-subset must be positive"),
        (args.eval_every < 0 or args.final_eval < 0, "--eval-every and --final-eval must be >= 0"),
        (args.resume and args.force,
         "--resume continues --out and --force overwrites it: pick one"),
        (args.capacity is not None and model != "betavae", "--capacity is for --model betavae"),
        ((args.lambda_od is not None or args.lambda_d is not None)
         and not model.startswith("dipvae"),
         "--lambda-od and --lambda-d are for --model dipvae1 or dipvae2"),
        (args.tensorboard is not None and importlib.util.find_spec("tensorboard") is None,
         "--tensorboard needs the tensorboard package, which is not installed: "
         "pip install tensorboard"),
    ]
    return [message for failed, message in checks if failed]


def _below(value, least):
    return value is not None and value < least


def argument_problem(argv):
    """The one line train.py would print for these arguments and exit 2 on, or None if they parse
    and pass the checks that need no data (what --check-runs answers for each argument list)."""
    said = io.StringIO()
    with contextlib.redirect_stderr(said), contextlib.redirect_stdout(io.StringIO()):
        try:
            _parse_args(argv)
        except SystemExit as stop:
            return said.getvalue().strip() or f"exit {stop.code}"
    return None


def _check_runs():
    """--check-runs: a JSON list of argument lists on stdin -> a JSON list of problems on stdout."""
    try:
        runs = json.load(sys.stdin)
    except ValueError as error:
        print(f"train.py --check-runs: stdin is not a JSON list of argument lists: {error}",
              file=sys.stderr)
        return 2
    print(json.dumps([argument_problem(argv) for argv in runs]))
    return 0


def _check_output(args):
    folder = os.path.dirname(os.path.abspath(args.out))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise UserError(f"--out {args.out}: cannot create folder {folder}: {error.strerror}")
    if not os.access(folder, os.W_OK):
        raise UserError(f"--out {args.out}: folder {folder} is not writable")
    if os.path.isdir(args.out):
        raise UserError(f"--out {args.out}: is a folder; give a file path such as "
                        f"{args.out}/ckpt.pt")
    if args.resume and not os.path.exists(args.out):
        raise UserError(f"--resume: there is no checkpoint at {args.out} to continue")
    if os.path.exists(args.out) and not (args.resume or args.force):
        raise UserError(f"--out {args.out} already exists; pass --resume to continue it or "
                        "--force to overwrite it")


# ============================================================================= the run's config

def run_config(args, dataset, resumed=None, device=torch.device("cpu")):
    """The run's config: one dict that the run state and the loop read, and whose SETTINGS part
    (with what the data says: channels, size, dataset_size, dataset_name, factor_names,
    factor_sizes, data_fingerprint) the checkpoint keeps. `args`: the parsed command line (a
    setting not given is None); `dataset`: the loaded data; `resumed`: the checkpoint being
    continued (load_checkpoint's dict) or None. A given option replaces the checkpoint's value;
    FIXED_ON_RESUME settings and other data are refused (runtime.ArgumentError, exit 2); so is
    fp16 off CUDA. Precision is resolved here, once, to fp32, bf16 or fp16."""
    previous = resumed["config"] if resumed else SETTINGS
    given = {name: getattr(args, name) for name in SETTINGS if getattr(args, name) is not None}
    if resumed:
        _refuse_fixed_settings(given, previous, args.out)
    config = {**{name: previous[name] for name in SETTINGS}, **given}
    if "data" in given or not resumed:
        config["data"] = runtime.data_source(config["data"])
    else:  # where load_checkpoint_data found it
        config["data"] = runtime.data_source(config["data"], beside=args.out)
    channels, size = runtime.check_dataset(dataset, config["arch"], config["data"])
    config.update(_data_identity(dataset, channels, size))
    if resumed:
        _refuse_other_data(config, previous, args.out)
    if config["recon"] == "auto":
        config["recon"] = "bce" if channels == 1 else "mse"
    if args.epochs is not None:
        config["steps"] = max(1, round(args.epochs * len(dataset) / config["batch_size"]))
    requested = given.get("precision", "auto" if resumed is None else previous["precision"])
    config["precision"] = _resolve_precision(requested, device)
    config["precision_requested"] = requested
    if config["batch_size"] % runtime.world_size():
        raise runtime.ArgumentError(f"--batch-size {config['batch_size']} does not divide into "
                                    f"{runtime.world_size()} processes; use a multiple of it")
    # every objective draws batches without replacement, but for the pairs (drawn with it)
    pairs = config["model"] in losses.PAIR_OBJECTIVES
    if not pairs and len(dataset) < config["batch_size"]:
        raise UserError(f"{config['data']}: {len(dataset)} images is fewer than --batch-size "
                        f"{config['batch_size']}; pass --batch-size {len(dataset)} or less")
    _settle_pairs(config, dataset)
    runtime.factor_columns(dataset, config["eval_factors"])  # before training: names it has?
    config.update({name: getattr(args, name) for name in PER_INVOCATION})
    return config


def _settle_pairs(config, dataset):
    """adagvae/mlvae: k (default 1) must leave a factor shared, and the data must have factors;
    UserError (unlabelled data) or ArgumentError (k) otherwise. Other objectives keep k None."""
    if config["model"] not in losses.PAIR_OBJECTIVES:
        return
    if dataset.factors is None:
        raise UserError(f"{config['data']}: has no factors (unlabelled); --model "
                        f"{config['model']} trains on pairs that share factors, which need them")
    varying = sum(size > 1 for size in dataset.factor_sizes)
    if varying < 2:
        raise UserError(f"{config['data']}: pairs need at least 2 factors that vary, it has "
                        f"{varying}")
    config["k"] = 1 if config["k"] is None else config["k"]
    if config["k"] >= varying:
        raise runtime.ArgumentError(
            f"--k {config['k']}: {config['data']} has {varying} factors that vary; k must be 0 "
            f"(random) or 1..{varying - 1}, so that a pair shares a factor")


def _data_identity(dataset, channels, size):
    """What the config records of the data, to tell it apart from other data on --resume."""
    return {
        "channels": channels,
        "size": size,
        "dataset_size": len(dataset),
        "dataset_name": dataset.name,
        "factor_names": list(dataset.factor_names),
        "factor_sizes": [int(s) for s in dataset.factor_sizes],
        "data_fingerprint": runtime.data_fingerprint(dataset),
    }


def _refuse_fixed_settings(given, previous, out):
    """ArgumentError naming every FIXED_ON_RESUME option given with another value than `out`'s."""
    changed = [name for name in FIXED_ON_RESUME if name in given and given[name] != previous[name]]
    if changed:
        options = ", ".join(f"--{name.replace('_', '-')} {given[name]}" for name in changed)
        held = ", ".join(f"{name} {previous[name]}" for name in changed)
        raise runtime.ArgumentError(
            f"--resume: {options} cannot change on resume (the checkpoint {out} has {held}); "
            "leave it out to resume, or start a new run")


def _refuse_other_data(config, previous, out):
    """ArgumentError if the data is not the checkpoint's: shape, channels, factors, fingerprint.
    What an older checkpoint does not hold (no fingerprint, no factor names) is not compared."""
    compared = ["size", "channels", "dataset_size"]
    if previous["factor_names"]:
        compared += ["factor_names", "factor_sizes"]
    if previous["data_fingerprint"]:
        compared.append("data_fingerprint")
    differ = [name for name in compared if config[name] != previous[name]]
    if differ:
        said = "; ".join(f"{name} {config[name]} here, {previous[name]} in the checkpoint"
                         for name in differ)
        raise runtime.ArgumentError(
            f"--resume: {config['data']} is not the data of the checkpoint {out} "
            f"({previous['data']}): {said}; resume on that data, or start a new run")


def _resolve_precision(requested, device):
    """auto | mixed | fp32 | bf16 | fp16 -> fp32 | bf16 | fp16 on `device`. auto: mixed on CUDA and
    on CPUs that run bf16 natively (AVX-512 BF16 or AMX: its MIGs fell within fp32's seed spread
    in the README's study), fp32 on other CPUs (emulated bf16 is ~7x slower); mixed: bf16 (fp16
    on CUDA GPUs without bf16)."""
    cuda = device.type == "cuda"
    if requested == "auto":
        native = runtime.encoding_precision(device) is not None
        requested = "mixed" if cuda or native else "fp32"
    if requested == "mixed":
        requested = "fp16" if cuda and not torch.cuda.is_bf16_supported() else "bf16"
    if requested == "fp16" and not cuda:
        raise runtime.ArgumentError("precision fp16 needs CUDA; use --precision bf16 or fp32 on "
                                    "the CPU")
    return requested


def changed_settings(previous, config):
    """'lr 0.001 -> 0.0001, steps 6 -> 8': every saved setting the resumed run changes."""
    shown = [name for name in _saved(config) if name != "data_fingerprint"]  # refused if changed
    changes = [f"{name} {previous[name]} -> {config[name]}" for name in shown
               if name in previous and previous[name] != config[name]]
    return ", ".join(changes)


def _saved(config):
    """The config as the checkpoint keeps it (without the options of this invocation)."""
    kept = [name for name in config if name not in PER_INVOCATION + ("precision_requested",)]
    return {name: config[name] for name in kept}


# ========================================================================= processes and devices

def _start_processes(args):
    """Under torchrun (RANK set): join the process group (NCCL on CUDA, gloo on the CPU) and
    return this process's device; otherwise just the device."""
    if "RANK" not in os.environ:
        return runtime.resolve_device(args.device)
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = runtime.resolve_device(args.device, local_rank)
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
    if runtime.world_size() == 1:
        return tensor
    from torch.distributed._functional_collectives import all_gather_single  # autograd-aware
    return all_gather_single(tensor.contiguous(), 0, dist.group.WORLD).wait()


# ============================================================================= the run

class _BatchSampler:
    """Random batches without replacement, epoch after epoch; its state is saved for --resume."""

    def __init__(self, size, batch_size, seed):
        self.size = size
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.new_epoch()

    def new_epoch(self):
        self.epoch_start_state = self.rng.bit_generator.state
        self.order = self.rng.permutation(self.size)
        self.position = 0

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


class _PairSampler:
    """adagvae/mlvae: each step's pairs as one index (2 x pairs,), [first images; second images],
    drawn by data.PairSampler from its own generator, whose state is saved for --resume."""

    def __init__(self, dataset, k, pairs, seed):
        self.pairs = data.PairSampler(dataset.factors, dataset.factor_sizes, k)
        self.count = pairs
        self.rng = np.random.default_rng(seed)

    def next(self):
        first, second = self.pairs.draw(self.count, self.rng)
        return np.concatenate([first, second])

    def state_dict(self):
        return {"pair_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["pair_generator"]


AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class _Run:
    """Everything a training run carries from step to step, and its checkpoint. Reads `config`
    (run_config's) only."""

    def __init__(self, config, dataset, device):
        self.config = config
        self.dataset = dataset
        self.device = device
        self.autocast_dtype = AUTOCAST_DTYPES[config["precision"]]
        self.model = runtime.build_model(config).to(device)
        fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config["lr"], **fast)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config["precision"] == "fp16")
        self.discriminator = None
        self.discriminator_optimizer = None
        if config["model"] == "factorvae":  # Kim & Mnih's discriminator, with its own Adam
            self.discriminator = models.build_discriminator(config["latents"]).to(device)
            self.discriminator_optimizer = torch.optim.Adam(
                self.discriminator.parameters(), lr=losses.DISCRIMINATOR_LR,
                betas=losses.DISCRIMINATOR_BETAS, **fast)
        batch = config["batch_size"]
        pairs = config["model"] in losses.PAIR_OBJECTIVES
        if pairs:
            self.sampler = _PairSampler(dataset, config["k"], batch, config["seed"])
        else:
            self.sampler = _BatchSampler(len(dataset), batch, config["seed"])
        self.images_per_step = 2 * batch if pairs else batch
        # this process's slice of every global batch; of pairs, both images of its pairs
        world = runtime.world_size()
        rank = runtime.rank()
        self.local = slice(rank * batch // world, (rank + 1) * batch // world)
        if pairs:
            mine = np.arange(self.local.start, self.local.stop)
            self.local = np.concatenate([mine, batch + mine])
        self.step = 0
        self.history = []
        self.evaluations = []
        self.skipped = 0
        self.loop_img_per_s = 0.0  # set by _loop (_steady_rate)
        self.latent_kl = torch.zeros(config["latents"], device=device)  # summed since last logged
        self.history_csv = runtime.history_path(config["out"])
        self.tensorboard = None  # --tensorboard: a SummaryWriter on the first process
        self.hyper = _objective_weights(config, len(dataset))
        self.step_model, self.step_discriminator = _step_modules(self, config, device)
        self.source = runtime.ImageSource(dataset.images, device)

    def state(self, final=None):
        """The checkpoint: plain containers and tensors only (weights_only=True loads it)."""
        state = {"format": runtime.CHECKPOINT_FORMAT, "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                 "step": self.step, "config": _saved(self.config),
                 "sampler": self.sampler.state_dict(), "history": self.history,
                 "evaluations": self.evaluations, "skipped": self.skipped,
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
        """Continue from a checkpoint written by state(); any world size can read it. A learning
        rate changed on resume replaces the one the optimizer state holds."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:
            group["lr"] = self.config["lr"]
        self.scaler.load_state_dict(state.get("scaler") or self.scaler.state_dict())
        if self.discriminator is not None:
            self.discriminator.load_state_dict(state["discriminator"])
            self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if self.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.step = state["step"]
        self.history = state["history"]
        self.evaluations = state["evaluations"]
        self.skipped = state.get("skipped", 0)

    def save(self, final=None):
        if runtime.rank() == 0:
            runtime.save_checkpoint(self.config["out"], self.state(final))

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                              enabled=self.autocast_dtype is not None)


def _objective_weights(config, dataset_size):
    """The keyword arguments losses.objective takes from the config."""
    names = ("beta", "alpha", "gamma", "recon", "estimator", "capacity", "capacity_steps",
             "lambda_od", "lambda_d")
    return {"dataset_size": dataset_size, **{name: config[name] for name in names}}


class _PairModel(torch.nn.Module):
    """adagvae/mlvae's forward, as the model's own: x (2P, C, H, W), [first images; second
    images], and noise (2P, D) -> logits, the encoder's mu and logvar, and z sampled from the
    pairs' aggregated posteriors (losses.aggregate_pair), which the decoder reads."""

    def __init__(self, model, method):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, x, noise):
        mu, logvar = self.model.encode(x)
        pairs = len(x) // 2
        mu1, logvar1, mu2, logvar2 = losses.aggregate_pair(
            mu[:pairs], logvar[:pairs], mu[pairs:], logvar[pairs:], self.method)
        z = torch.cat([mu1, mu2]) + noise * torch.exp(0.5 * torch.cat([logvar1, logvar2]))
        return self.model.decode(z), mu, logvar, z


def _step_modules(run, config, device):
    """What the step calls: the model (for pairs inside _PairModel), DDP wrappers under torchrun
    (they average the gradients), the model compiled on --compile."""
    step_model = run.model
    if config["model"] in losses.PAIR_OBJECTIVES:
        step_model = _PairModel(run.model, config["model"])
    step_discriminator = run.discriminator
    if runtime.world_size() > 1:
        device_ids = None if device.type == "cpu" else [device]
        step_model = torch.nn.parallel.DistributedDataParallel(step_model, device_ids=device_ids)
        if run.discriminator is not None:
            step_discriminator = torch.nn.parallel.DistributedDataParallel(
                run.discriminator, device_ids=device_ids)
    if config["compile"]:
        step_model = torch.compile(step_model)
    return step_model, step_discriminator


def _load_data(args, resumed):
    """The run's dataset: --data, or on --resume the checkpoint's data (its data_limit and seed
    either way, as those cannot change on resume)."""
    if resumed is None:
        return data.load(args.data or SETTINGS["data"], limit=args.data_limit,
                         seed=SETTINGS["seed"] if args.seed is None else args.seed)
    previous = resumed["config"]
    if args.data is None:
        return runtime.load_checkpoint_data(previous, args.out)
    return data.load(args.data, limit=previous["data_limit"], seed=previous["seed"])


def _build_run(args, device):
    """Load the data (and the checkpoint on --resume), settle the config, and make the run ready
    for its first step. Returns (run, the resumed checkpoint or None)."""
    _check_output(args)
    resumed = runtime.load_checkpoint(args.out) if args.resume else None
    dataset = _load_data(args, resumed)
    config = run_config(args, dataset, resumed, device)
    torch.manual_seed(config["seed"])
    random.seed(config["seed"])
    run = _Run(config, dataset, device)
    if resumed:
        run.restore(resumed)
    return run, resumed


# ============================================================================= the steps

def _train_step(run, x, noise):
    """Forward, objective, backward, the non-finite check and the optimizer steps. Returns the
    batch-mean terms (averaged over processes) and whether they and the gradient were finite (if
    not, no optimizer stepped)."""
    with run.autocast():
        logits, mu, logvar, z = run.step_model(x, noise)
    if run.config["model"] not in losses.PAIR_OBJECTIVES:  # pairs: each process its own
        # the whole global batch
        mu = _gather(mu)
        logvar = _gather(logvar)
        z = _gather(z)
    tc_logits = None
    if run.discriminator is not None:
        tc_logits = _fixed_discriminator(run.discriminator, z.float())
    loss, terms = losses.objective(run.config["model"], x, logits, mu, logvar, z, step=run.step,
                                   tc_logits=tc_logits, **run.hyper)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    measured = {"loss": loss.detach().float()}
    if run.discriminator is not None:
        measured.update(_discriminator_step(run, z.detach().float()))
    if not run.scaler.is_enabled():  # the GradScaler skips non-finite gradients itself
        measured["gradient_norm"] = torch.nn.utils.get_total_norm(
            [p.grad for p in run.model.parameters() if p.grad is not None])
    # Every value the step checks and logs is read back from the device in one transfer: each
    # .item() would wait for the device to finish (a host sync), and on a GPU one sync per step
    # costs far less than one per logged value.
    values = dict(zip(measured, torch.stack([v.float() for v in measured.values()]).tolist()))
    finite = math.isfinite(values.pop("gradient_norm", 0.0))
    terms = _mean_over_processes({"loss": values.pop("loss"), **terms, **values}, run.device)
    finite = finite and all(math.isfinite(v) for v in terms.values())
    if finite:
        run.latent_kl += losses.kl_normal(mu.detach().float(), logvar.detach().float()).mean(0)
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
    if runtime.world_size() == 1:
        return terms
    values = torch.tensor(list(terms.values()), dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(terms, (values / runtime.world_size()).tolist()))


def _any_process_stopping(stop, device):
    """True on every process as soon as one was signalled, so that all stop at the same step."""
    if runtime.world_size() == 1:
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
                    f"{run.config['out']}. Lower --lr, or pass --skip-nonfinite to skip such "
                    "batches")


def _log(run, window, progress, terms):
    """Add a step's terms to the window; every --log-every steps, average it into the history (and
    the history CSV, with each latent's KL)."""
    for k, v in terms.items():
        window[k] = window.get(k, 0.0) + v
    window["n"] = window.get("n", 0) + 1
    if run.step % run.config["log_every"] == 0 or run.step == run.config["steps"]:
        means = {k: v / window["n"] for k, v in window.items() if k != "n"}
        run.history.append({"step": run.step, "img_per_s": progress.rate(run.step), **means})
        _record(run, {**means, **_latent_kls(run, window["n"])})
        window.clear()


def _latent_kls(run, steps):
    """{kl_0: ..., kl_{D-1}: ...}: each latent's KL(q(z_j|x) || N(0, 1)), batch mean in nats,
    averaged over the `steps` steps summed in run.latent_kl (then zeroed) and over processes."""
    kls = {f"kl_{j}": v / steps for j, v in enumerate(run.latent_kl.tolist())}
    run.latent_kl.zero_()
    return _mean_over_processes(kls, run.device)


def _record(run, values, replace=False):
    """Append `values` ({name: float}) at this step to the history CSV beside --out and, with
    --tensorboard, as scalars (first process only). replace: drop these names' rows at this step
    first (the final evaluation's over a periodic one, or over those a resumed run re-measures)."""
    if not runtime.first_process():
        return
    if replace:
        runtime.rewrite_history(run.history_csv,
                                lambda step, name: step != run.step or name not in values)
    runtime.append_history(run.history_csv, run.step, values)
    if run.tensorboard is not None:
        for name, value in values.items():
            run.tensorboard.add_scalar(name, value, run.step)
        run.tensorboard.flush()


def _record_evaluation(run, result, final=False):
    """An evaluation's metrics into the history (runtime.flat_metrics names) and, with
    --tensorboard, the traversal of image 0 (a row per latent, TRAVERSAL_STEPS values in
    +-TRAVERSAL_RANGE) as an image."""
    _record(run, runtime.flat_metrics(result), replace=final)
    if run.tensorboard is not None:
        values = torch.linspace(-TRAVERSAL_RANGE, TRAVERSAL_RANGE, TRAVERSAL_STEPS)
        pixels = runtime.traversal(run.model, run.source, 0, range(run.config["latents"]), values)
        picture = np.asarray(runtime.tile(pixels, TRAVERSAL_STEPS))
        run.tensorboard.add_image("traversal", picture, run.step, dataformats="HWC")
        run.tensorboard.flush()


def _start_logs(run, resumed, tensorboard):
    """First process: the history CSV beside --out, empty for a new run; a resumed run keeps the
    rows up to its checkpoint's step (one killed after its last save had logged beyond it).
    tensorboard: --tensorboard's folder or None; its events past the checkpoint are purged."""
    if not runtime.first_process():
        return
    if tensorboard is not None:
        from torch.utils.tensorboard import SummaryWriter  # optional, not a dependency
        try:
            run.tensorboard = SummaryWriter(tensorboard,
                                            purge_step=run.step + 1 if resumed else None)
        except OSError as error:
            raise UserError(f"--tensorboard {tensorboard}: cannot write there "
                            f"({error.strerror or error})") from error
    runtime.rewrite_history(run.history_csv,
                            lambda step, name: resumed is not None and step <= run.step)


def _periodic_mig(run):
    """--eval-every: the discrete MIG of the means on --eval-subset images (rank 0; saved first)."""
    run.save()  # a failing or interrupted evaluation never costs the steps before it
    if runtime.rank() != 0:
        return None
    seed = run.config["seed"]
    index = runtime.evaluation_index(run.dataset, run.config["eval_subset"], seed)
    mu, logvar = runtime.encode_dataset(run.model, run.source, index)
    try:
        result, note = runtime.evaluate_codes(mu, logvar, run.dataset, index, seed, only_mig=True,
                                              protocol=run.config["eval_protocol"],
                                              factor_names=run.config["eval_factors"])
    except ValueError as error:
        result = {}
        note = str(error)
    if "mig_discrete" not in result:
        print(f"\nstep {run.step}: MIG not measured: {note}", file=sys.stderr)
        return None
    mig = float(result["mig_discrete"]["mig"])
    run.evaluations.append({"step": run.step, "discrete_mig": mig, "samples": len(mu)})
    _record_evaluation(run, result)
    return mig


# ============================================================================= train, then evaluate

def train(args):
    """Build or restore the run, train it to its steps, save, evaluate; returns the exit code."""
    device = _start_processes(args)
    run, resumed = _build_run(args, device)
    if runtime.rank() == 0:
        _say_what_runs(run, resumed)
    _start_logs(run, resumed, args.tensorboard)
    try:
        with _StopRequest() as stop:
            progress = _loop(run, stop)
            return _finish(run, stop, progress, resumed)
    finally:
        if run.tensorboard is not None:
            run.tensorboard.close()


def _precision_reason(run):
    """Why a CPU run trains in the precision it does, when the user left it to --precision auto."""
    if run.device.type != "cpu" or run.config.get("precision_requested") != "auto":
        return ""
    if run.config["precision"] == "bf16":
        return " (auto: this CPU runs bf16 natively; --precision fp32 for bit-reproducible runs)"
    return " (auto: this CPU has no native bf16)"


def _say_what_runs(run, resumed):
    """The first lines: what is trained on what, how; on --resume, what the command line changed."""
    config = run.config
    world = f" over {runtime.world_size()} processes" if runtime.world_size() > 1 else ""
    print(f"training {config['model']} ({config['arch']}, {config['latents']} latents) on "
          f"{data.describe(run.dataset)}: {config['steps']:,} steps of {config['batch_size']}"
          f"{world}, {run.device.type} {config['precision']}{_precision_reason(run)}, "
          f"recon {config['recon']}", file=sys.stderr)
    if resumed:
        changes = changed_settings(resumed["config"], config)
        print(f"resuming at step {run.step:,}"
              + (f" with changed settings: {changes}" if changes else " with the same settings"),
              file=sys.stderr)
    if run.step >= config["steps"]:
        print(f"the checkpoint is already at step {run.step:,} of {config['steps']:,}: measuring "
              "only", file=sys.stderr)


def _loop(run, stop):
    """The training loop, until the config's steps or a signal; returns its progress meter."""
    config = run.config
    device = run.device
    progress = runtime.Progress(config["steps"], run.step, run.images_per_step,
                                config["log_every"], live=runtime.rank() == 0)
    window = {}
    skipped_in_a_row = 0
    warm = None  # (time, step) once the first step trained now is done: _steady_rate
    while run.step < config["steps"] and not _any_process_stopping(stop, device):
        # this process's slice of the global batch, and of the global reparameterisation noise
        index = run.sampler.next()
        noise = torch.randn(run.images_per_step, config["latents"], device=device)[run.local]
        terms, finite = _train_step(run, run.source.batch(index[run.local]), noise)
        # a non-finite loss or gradient: skip the batch (--skip-nonfinite) or stop
        if not finite:
            run.skipped += 1
            skipped_in_a_row += 1
            if not config["skip_nonfinite"] or skipped_in_a_row > MAX_SKIPPED_IN_A_ROW:
                _nonfinite_stop(run, terms, skipped_in_a_row)
            continue
        run.step += 1
        skipped_in_a_row = 0
        warm = warm or (time.perf_counter(), run.step)
        # the history, a periodic MIG, the progress line, a checkpoint
        _log(run, window, progress, terms)
        eval_every = config["eval_every"]
        if eval_every and run.step % eval_every == 0 and run.dataset.factors is not None:
            mig = _periodic_mig(run)
            if mig is not None:
                terms["mig"] = mig
        progress.update(run.step, terms, force=run.step == config["steps"])
        if run.step % config["save_every"] == 0 and run.step < config["steps"]:
            run.save()
    run.loop_img_per_s = _steady_rate(run, progress, warm)
    progress.close()
    return progress


def _steady_rate(run, progress, warm):
    """Images per second from the end of the first step trained now (`warm`: (time, step)) to
    now, the end of the loop: the training speed without the first step, which allocates the
    optimizer's state and warms the kernels up (bench.py's bare step leaves it out too), and
    without the checkpoint written after the loop. With one step trained, the rate since the
    start."""
    if warm is None or warm[1] == run.step:
        return progress.rate(run.step)
    seconds = max(time.perf_counter() - warm[0], 1e-9)
    return (run.step - warm[1]) * run.images_per_step / seconds


def _finish(run, stop, progress, resumed):
    """Save; unless stopped, evaluate every metric on rank 0 and save again with the results."""
    out = run.config["out"]
    run.save()  # the weights are safe before the (possibly long) final evaluation
    if stop.signal is not None:
        if runtime.rank() == 0:
            print(f"{signal.Signals(stop.signal).name}: stopped at step {run.step}/"
                  f"{run.config['steps']}; checkpoint saved to {out}. Continue with: python "
                  f"train.py --resume --out {out}", file=sys.stderr)
        return 128 + stop.signal
    if runtime.rank() != 0:
        return 0
    final = {"step": run.step, "img_per_s": run.loop_img_per_s, "skipped": run.skipped}
    nothing_trained = run.step == progress.start_step
    if nothing_trained and resumed and "final" in resumed:  # keep the speed it was trained at
        final["img_per_s"] = resumed["final"]["img_per_s"]
    summary = f"done: {run.step:,} step{'' if run.step == 1 else 's'}"
    if final["img_per_s"] > 0:
        summary += f", {final['img_per_s']:,.0f} img/s"
    else:
        summary += " (none trained now)"
    try:
        with stop.raising():  # a signal now skips the evaluation at once: the weights are saved
            summary += _final_evaluation(run, final)
    except _Interrupted as interrupted:
        print(f"\n{signal.Signals(interrupted.signum).name}: the final evaluation was skipped; the "
              f"trained weights are saved in {out}. Measure them with: python traverse.py "
              f"{out} --metrics", file=sys.stderr)
        return 128 + interrupted.signum
    run.save(final)
    _record_evaluation(run, final["metrics"], final=True)
    print(summary + f"; saved {out}")
    return 0


def _final_evaluation(run, final):
    """Encode the evaluated images and store metrics.evaluate in `final`; returns the summary."""
    seed = run.config["seed"]
    index = runtime.evaluation_index(run.dataset, run.config["final_eval"], seed)
    rows = len(index)
    start = time.perf_counter()
    mu, logvar = runtime.encode_dataset(run.model, run.source, index,
                                        what=f"encoding {rows:,} images")
    print(f"encoded in {time.perf_counter() - start:.0f} s; computing the metrics", file=sys.stderr)
    result, note = runtime.evaluate_codes(mu, logvar, run.dataset, index, seed,
                                          protocol=run.config["eval_protocol"],
                                          factor_names=run.config["eval_factors"])
    final.update(samples=rows, metrics=runtime.plain(result),
                 evaluation_seconds=time.perf_counter() - start)
    if note:
        print(note, file=sys.stderr)
    errors = [f"{name}: {entry['error']}" for name, entry in result.items() if "error" in entry]
    if errors:
        print("not measured: " + "; ".join(errors), file=sys.stderr)
    labels = (("mig_discrete", "discrete"), ("mig_gaussian", "gaussian"))
    migs = [f"{label} {result[name]['mig']:.3f}" for name, label in labels
            if "mig" in result.get(name, {})]
    how = _evaluation_choices(run.config)
    if not migs:
        return f", evaluated {rows:,} images{how}"
    return f", MIG on {rows:,} images{how}: {', '.join(migs)}"


def _evaluation_choices(config):
    """' (dlib protocol; factors scale,posX)': what --eval-protocol and --factors chose, if not
    the defaults (exact, every factor); '' otherwise."""
    said = []
    if config["eval_protocol"] != "exact":
        said.append(f"{config['eval_protocol']} protocol")
    if config["eval_factors"] is not None:
        said.append("factors " + ",".join(config["eval_factors"]))
    return f" ({'; '.join(said)})" if said else ""


class _Interrupted(Exception):
    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks, so it can save before leaving; inside
    `raising()` (the final evaluation, after the save) a signal interrupts at once instead."""

    def __enter__(self):
        self.signal = None
        self.raise_now = False
        self.previous = {sig: signal.signal(sig, self.handle)
                         for sig in (signal.SIGINT, signal.SIGTERM)}
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


def main(argv=None):
    """The command line (argv: a list of strings, sys.argv[1:] if None) -> exit code: 0; 1 for a
    problem with the data, checkpoint or paths; 2 for a bad argument (one line on stderr)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--check-runs"]:
        return _check_runs()
    _, args = _parse_args(argv)
    torch.set_flush_denormal(True)  # denormal weights halve the CPU's speed otherwise
    runtime.reuse_freed_memory()  # no page faults for each step's tensors
    try:
        return runtime.report_errors(lambda: train(args), args.debug)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    code = main()
    if runtime.started_by_torchrun():
        # torch 2.13 keeps a process group that DDP or a functional collective used alive after
        # destroy_process_group, and its gloo threads race the interpreter's teardown: a process
        # that leaves first could abort ("terminate called without an active exception", exit
        # -6) while the others evaluate. Everything is saved: leave without the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
