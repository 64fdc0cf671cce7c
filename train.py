"""Train an autoencoder for disentanglement: AE, VAE, beta-VAE or beta-TCVAE. Needs torch, numpy, pillow.

    python train.py                                   # beta-TCVAE, beta 6, built-in sprites
    python train.py --model betavae --beta 4 --data dsprites.npz --steps 30000 --out runs/bvae.pt
    python train.py --resume --out runs/bvae.pt --steps 60000   # continue a run

Batches are drawn by index from the uint8 image array and converted on the fly (no DataLoader).
The checkpoint (--out) is written atomically every --save-every steps, at the end, and when the
run is interrupted (Ctrl-C, SIGTERM) or stopped by a non-finite loss; `torch.load(path,
weights_only=True)` reads it.
"""
import argparse
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch

import data
import losses
import metrics
import models

torch.set_flush_denormal(True)  # before the first op: denormal weights halve CPU speed otherwise

CHECKPOINT_FORMAT = "disentangle-checkpoint-1"
MAX_SKIPPED_IN_A_ROW = 100  # --skip-nonfinite gives up when the run itself has diverged
# Options that define the run; on --resume they must match the checkpoint (or be left out).
RUN_DEFINING = ("model", "beta", "alpha", "gamma", "estimator", "capacity", "capacity_steps",
                "arch", "latents", "batch_size", "lr", "seed", "recon", "data_limit")


class UserError(Exception):
    """A problem with the user's input or files: printed as one line, exit code 1."""


# ----------------------------------------------------------------------------- arguments

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where there is one worth showing (not None, not a flag's False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def make_parser(suppress_defaults=False):
    p = argparse.ArgumentParser(
        description="Train an autoencoder for disentangled representations and save a checkpoint.",
        epilog="Example: python train.py --model betatc --beta 6 --data dsprites.npz --steps 30000",
        argument_default=argparse.SUPPRESS if suppress_defaults else None,
        formatter_class=HelpFormatter)
    d = (lambda value: argparse.SUPPRESS) if suppress_defaults else (lambda value: value)
    g = p.add_argument_group("objective")
    g.add_argument("--model", choices=losses.OBJECTIVES, default=d("betatc"),
                   help="ae: reconstruction only; vae: ELBO; betavae: beta-weighted KL; "
                        "betatc: KL split into MI, total correlation and dimension-wise KL")
    g.add_argument("--beta", type=float, default=d(6.0),
                   help="weight of the KL (betavae) or of the total correlation (betatc)")
    g.add_argument("--alpha", type=float, default=d(1.0), help="betatc: weight of the index-code MI")
    g.add_argument("--gamma", type=float, default=d(None),
                   help="betatc: weight of the dimension-wise KL (default 1); betavae with "
                        "--capacity: weight of |KL - C| (default 1000)")
    g.add_argument("--estimator", choices=("mws", "mss"), default=d("mws"),
                   help="betatc: minibatch-weighted or minibatch-stratified sampling")
    g.add_argument("--capacity", type=float, default=d(None),
                   help="betavae: Burgess et al.'s target KL in nats (e.g. 25); enables "
                        "recon + gamma |KL - C| with C rising linearly from 0")
    g.add_argument("--capacity-steps", type=int, default=d(100_000),
                   help="steps over which the capacity C rises to --capacity")
    g.add_argument("--recon", choices=("auto", "bce", "mse"), default=d("auto"),
                   help="reconstruction loss; auto: bce for 1-channel images, mse for colour")
    g = p.add_argument_group("model and data")
    g.add_argument("--data", default=d("sprites"),
                   help="a built-in dataset (sprites, shapes; options as sprites:positions=8) or a "
                        "file/folder: dSprites .npz/.hdf5, 3dshapes .h5, images folder or .zip, ...")
    g.add_argument("--data-limit", type=int, default=d(None),
                   help="keep a random subset of this many images (chosen with --seed)")
    g.add_argument("--arch", choices=models.ARCHS, default=d("conv"),
                   help="conv: Burgess et al. 2018 conv net (64x64); mlp: Chen et al.'s MLP")
    g.add_argument("--latents", type=int, default=d(10), help="number of latent dimensions")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=d(64), help="images per step")
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
    g = p.add_argument_group("output")
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
                   help="images used by the final MIG: 0 for the whole dataset, or a fixed random "
                        "subset of N (resuming a finished run only redoes this evaluation)")
    g.add_argument("--debug", action="store_true", default=d(False), help="show tracebacks")
    return p


def parse_args(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    args.explicit = set(vars(make_parser(suppress_defaults=True).parse_args(argv)))
    checks = [
        (args.beta < 0 or args.alpha < 0 or (args.gamma or 0) < 0, "--beta, --alpha and --gamma must be >= 0"),
        (args.latents < 1, "--latents must be at least 1"),
        (args.batch_size < 1, "--batch-size must be positive"),
        (args.batch_size < 2 and args.model == "betatc",
         "--batch-size must be at least 2 for betatc: its estimators compare samples in a batch"),
        (args.steps < 1, "--steps must be positive"),
        (args.epochs is not None and args.epochs <= 0, "--epochs must be positive"),
        (not args.lr > 0 or not math.isfinite(args.lr), "--lr must be a positive number"),
        (args.capacity is not None and args.capacity < 0, "--capacity must be >= 0"),
        (args.capacity_steps < 0, "--capacity-steps must be >= 0"),
        (args.data_limit is not None and args.data_limit < 2, "--data-limit must be at least 2"),
        (min(args.save_every, args.log_every, args.eval_subset) < 1,
         "--save-every, --log-every and --eval-subset must be positive"),
        (args.eval_every < 0 or args.final_eval < 0, "--eval-every and --final-eval must be >= 0"),
        (args.resume and args.force, "--resume continues --out and --force overwrites it: pick one"),
        (args.capacity is not None and args.model != "betavae", "--capacity is for --model betavae"),
    ]
    for failed, message in checks:
        if failed:
            parser.error(message)
    if args.amp is not None and "precision" not in args.explicit:
        args.precision = "auto" if args.amp else "fp32"
    if args.precision == "auto" and args.amp:
        args.precision = "bf16"  # --amp on the CPU; on CUDA resolve_precision picks the AMP dtype
    return parser, args


# ----------------------------------------------------------------------------- devices and data

def resolve_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available to torch")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                        "cpu" if name == "auto" else name)


def resolve_precision(precision, device):
    """(autocast dtype or None, whether a GradScaler is needed)."""
    if precision == "auto":
        if device.type != "cuda":
            return None, False
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs CUDA; use bf16 on the CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision], precision == "fp16"


def check_dataset(dataset, arch, source):
    n, height, width, channels = dataset.images.shape
    if height != width or (arch == "conv" and height != 64):
        raise UserError(f"{source}: images are {height}x{width}; the {arch} architecture needs "
                        "64x64" if arch == "conv" else "square images")
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
        """index: int64 numpy array -> float NCHW batch on the device."""
        if self.on_device is not None:
            return to_float(self.on_device[torch.from_numpy(index).to(self.device)])
        batch = torch.from_numpy(self.images[index])
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return to_float(batch)


class BatchSampler:
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


def encode_dataset(model, source, index=None, batch_size=1024, dtype=None):
    """Posterior means and log-variances (numpy float32) of the images at `index` (all if None)."""
    index = np.arange(len(source)) if index is None else index
    mus, logvars = [], []
    was_training = model.training
    model.eval()
    with torch.inference_mode(), torch.autocast(source.device.type, dtype=dtype or torch.bfloat16,
                                                enabled=dtype is not None):
        for start in range(0, len(index), batch_size):
            mu, logvar = model.encode(source.batch(index[start:start + batch_size]))
            mus.append(mu.float().cpu())
            logvars.append(logvar.float().cpu())
    model.train(was_training)
    return torch.cat(mus).numpy(), torch.cat(logvars).numpy()


def evaluation_index(dataset, samples, seed):
    """All rows, or a fixed random subset of `samples` rows (sorted), for the MIG."""
    if samples == 0 or samples >= len(dataset):
        return np.arange(len(dataset))
    return np.sort(np.random.default_rng(seed + 1).choice(len(dataset), samples, replace=False))


def evaluate_mig(model, source, dataset, samples, seed, gaussian=True, dtype=None):
    index = evaluation_index(dataset, samples, seed)
    mu, logvar = encode_dataset(model, source, index, dtype=dtype)
    factors = dataset.factors[index]
    result = {"samples": len(index), "discrete": metrics.discrete_mig(mu, factors)}
    if gaussian:
        result["gaussian"] = metrics.gaussian_mig(mu, logvar, factors, seed=seed)
    return result


def plain(value):
    """numpy values -> Python lists/floats so the checkpoint loads with weights_only=True."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    return value


# ----------------------------------------------------------------------------- checkpoints

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


def load_checkpoint(path):
    """Read a checkpoint of this toolkit (weights only, no pickle); a clear error otherwise."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds here; all mean "not a usable checkpoint"
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{path}: not a readable checkpoint ({first_line[:200]})") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a checkpoint of this toolkit (expected format "
                        f"{CHECKPOINT_FORMAT!r}); it may come from another program or version")
    missing = [k for k in ("model", "optimizer", "step", "config") if k not in state]
    if missing:
        raise UserError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return state


def model_from_checkpoint(state, path="checkpoint"):
    config = state["config"]
    model = models.build_model(config["arch"], config["latents"], config["channels"],
                               config["size"], deterministic=config["model"] == "ae")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise UserError(f"{path}: model weights do not fit the model in its config: "
                        f"{str(error).splitlines()[0]}") from error
    return model


def check_output(args):
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


def merge_resumed_config(parser, args, config):
    """On --resume, the run-defining options come from the checkpoint; given ones must agree."""
    for name in RUN_DEFINING + ("data",):
        if name in args.explicit and getattr(args, name) != config[name] and name != "data":
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)} does not match the "
                         f"checkpoint's {config[name]}; leave it out to resume, or start a new run")
        if name not in args.explicit:
            setattr(args, name, config[name])
    if "steps" not in args.explicit and "epochs" not in args.explicit:
        args.steps = config["steps"]
    if "precision" not in args.explicit and "amp" not in args.explicit:
        args.precision = config.get("precision", args.precision)  # continue as it was trained


# ----------------------------------------------------------------------------- training

class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks, so it can save before leaving."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: leave at once (the last save stays)
            raise KeyboardInterrupt
        self.signal = signum


class Progress:
    """One live line on a terminal; a line every `every` steps otherwise."""

    def __init__(self, total, start, batch_size, every):
        self.total, self.batch_size, self.every = total, batch_size, every
        self.live = sys.stderr.isatty()
        self.start_step, self.start_time, self.last_print = start, time.perf_counter(), 0.0

    def rate(self, step):
        return (step - self.start_step) * self.batch_size / max(time.perf_counter() - self.start_time, 1e-9)

    def update(self, step, terms, force=False):
        now = time.perf_counter()
        if not force and (now - self.last_print < 0.5 if self.live else step % self.every):
            return
        self.last_print = now
        rate = self.rate(step)
        eta = (self.total - step) * self.batch_size / max(rate, 1e-9)
        text = (f"step {step}/{self.total}  {rate:,.0f} img/s  ETA {eta // 60:.0f}m{eta % 60:02.0f}s  "
                + "  ".join(f"{k} {v:.4g}" for k, v in terms.items()))
        print(("\r" + text + "\033[K") if self.live else text, end="" if self.live else "\n",
              file=sys.stderr, flush=True)

    def close(self):
        if self.live:
            print(file=sys.stderr)


def train(parser, args):
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = resolve_device(args.device)
    check_output(args)
    resumed = load_checkpoint(args.out) if args.resume else None
    if resumed:
        merge_resumed_config(parser, args, resumed["config"])
    dataset = data.load(args.data, limit=args.data_limit, seed=args.seed)
    channels, size = check_dataset(dataset, args.arch, args.data)
    if resumed and resumed["config"]["dataset_size"] != len(dataset):
        raise UserError(f"{args.data}: has {len(dataset)} images, the checkpoint was trained on "
                        f"{resumed['config']['dataset_size']}")
    if args.model == "betatc" and len(dataset) < args.batch_size:
        raise UserError(f"{args.data}: {len(dataset)} images is fewer than --batch-size {args.batch_size}")
    recon = args.recon if args.recon != "auto" else ("bce" if channels == 1 else "mse")
    if args.epochs is not None:
        args.steps = max(1, round(args.epochs * len(dataset) / args.batch_size))
    autocast_dtype, needs_scaler = resolve_precision(args.precision, device)
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    model = models.build_model(args.arch, args.latents, channels, size, args.model == "ae").to(device)
    if args.arch == "conv":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, **(
        {"fused": True} if device.type == "cuda" else {"foreach": True}))
    scaler = torch.amp.GradScaler(device.type, enabled=needs_scaler)
    sampler = BatchSampler(len(dataset), args.batch_size, args.seed)
    config = {name: getattr(args, name) for name in RUN_DEFINING + ("data", "steps")}
    config.update(recon=recon, channels=channels, size=size, dataset_size=len(dataset),
                  dataset_name=dataset.name, factor_names=dataset.factor_names,
                  factor_sizes=dataset.factor_sizes, precision=precision)
    step, history, evaluations, skipped, skipped_in_a_row = 0, [], [], 0, 0
    if resumed:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scaler.load_state_dict(resumed.get("scaler", {}) or scaler.state_dict())
        sampler.load_state_dict(resumed["sampler"])
        torch.set_rng_state(resumed["rng"]["torch"])
        random.setstate(resumed["rng"]["python"])
        step, history = resumed["step"], resumed["history"]
        evaluations, skipped = resumed["evaluations"], resumed.get("skipped", 0)
    start_step = step
    step_model = torch.compile(model) if args.compile else model
    source = ImageSource(dataset.images, device)
    hyper = dict(beta=args.beta, alpha=args.alpha, gamma=args.gamma, dataset_size=len(dataset),
                 recon=recon, estimator=args.estimator, capacity=args.capacity,
                 capacity_steps=args.capacity_steps)

    def checkpoint(final=None):
        state = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step,
                 "config": config, "sampler": sampler.state_dict(), "history": history,
                 "evaluations": evaluations, "skipped": skipped,
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}
        if final is not None:
            state["final"] = final
        save_checkpoint(args.out, state)

    print(f"training {args.model} ({args.arch}, {args.latents} latents) on {dataset.name}: "
          f"{len(dataset):,} images {size}x{size}x{channels}, {args.steps:,} steps of "
          f"{args.batch_size}, {device.type} {precision}, recon {recon}", file=sys.stderr)
    if step >= args.steps:
        print(f"the checkpoint is already at step {step:,} of {args.steps:,}: measuring only",
              file=sys.stderr)
    stop, progress = StopRequest(), Progress(args.steps, step, args.batch_size, args.log_every)
    window = {}
    while step < args.steps and stop.signal is None:
        x = source.batch(sampler.next())
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            logits, mu, logvar, z = step_model(x)
        loss, terms = losses.objective(args.model, x, logits, mu, logvar, z, step=step, **hyper)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        finite = math.isfinite(terms["recon"]) and math.isfinite(loss.item())
        if finite and not needs_scaler:  # the GradScaler skips non-finite gradients itself
            finite = math.isfinite(torch.nn.utils.get_total_norm(
                [p.grad for p in model.parameters() if p.grad is not None]).item())
        if not finite:
            skipped, skipped_in_a_row = skipped + 1, skipped_in_a_row + 1
            described = "  ".join(f"{k}={v:.4g}" for k, v in terms.items())
            if not args.skip_nonfinite or skipped_in_a_row > MAX_SKIPPED_IN_A_ROW:
                checkpoint()  # the weights are still those of the last good step
                in_a_row = f", {skipped_in_a_row} batches in a row" if skipped_in_a_row > 1 else ""
                raise UserError(f"step {step + 1}: the loss or its gradient is not finite{in_a_row} "
                                f"(loss={loss.item():.4g}  {described}); saved the last good state "
                                f"(step {step}) to {args.out}. Lower --lr, or pass "
                                "--skip-nonfinite to skip such batches")
            continue
        skipped_in_a_row = 0
        scaler.step(optimizer)
        scaler.update()
        step += 1
        for k, v in terms.items():
            window[k] = window.get(k, 0.0) + v
        window["n"] = window.get("n", 0) + 1
        if step % args.log_every == 0 or step == args.steps:
            history.append({"step": step, "img_per_s": progress.rate(step),
                            **{k: v / window["n"] for k, v in window.items() if k != "n"}})
            window = {}
        if args.eval_every and step % args.eval_every == 0 and dataset.factors is not None:
            result = evaluate_mig(model, source, dataset, args.eval_subset, args.seed, gaussian=False)
            evaluations.append({"step": step, "discrete_mig": result["discrete"]["mig"],
                                "samples": result["samples"]})
            terms["mig"] = result["discrete"]["mig"]
        progress.update(step, terms, force=step == args.steps)
        if step % args.save_every == 0 and step < args.steps:
            checkpoint()
    progress.close()
    if stop.signal is not None:
        checkpoint()
        name = signal.Signals(stop.signal).name
        print(f"{name}: stopped at step {step}/{args.steps}; checkpoint saved to {args.out}. "
              f"Continue with: python train.py --resume --out {args.out}", file=sys.stderr)
        return 128 + stop.signal
    checkpoint()  # the weights are safe before the (possibly long) final evaluation
    final = {"step": step, "img_per_s": progress.rate(step), "skipped": skipped}
    if step == start_step and resumed and "final" in resumed:  # nothing trained: keep the speed
        final["img_per_s"] = resumed["final"]["img_per_s"]
    summary = f"done: {step} steps, {final['img_per_s']:,.0f} img/s"
    if dataset.factors is not None:
        result = evaluate_mig(model, source, dataset, args.final_eval, args.seed)
        final.update(plain({"samples": result["samples"], "discrete_mig": result["discrete"],
                            "gaussian_mig": result["gaussian"]}))
        summary += (f", MIG on {result['samples']:,} images: discrete {result['discrete']['mig']:.3f}, "
                    f"gaussian {result['gaussian']['mig']:.3f}")
    checkpoint(final)
    print(summary + f"; saved {args.out}")
    return 0


def main(argv=None):
    parser, args = parse_args(argv)
    return report_errors(lambda: train(parser, args), args.debug)


def report_errors(work, debug=False):
    """Run work(): a problem with the user's input is one line on stderr and exit code 1."""
    try:
        return work()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (UserError, data.DataError) as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
