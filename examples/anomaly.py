"""Does a VAE find a shape it never saw unusual? Anomaly detection by the negative ELBO.

    python examples/anomaly.py                        # 2,000 steps: 12 minutes on a busy
                                                      # 2-core CPU (README), a table at the end
    python examples/anomaly.py --held-out square --steps 1000 --out /tmp/anomaly

1. train.py (a subprocess) trains a VAE on the built-in sprites without one shape: the data
   sprites:GRID,exclude=shape=K, data.py's option that leaves out the images of one class of a
   factor (square 0, ellipse 1, heart 2, the order data.py draws them in).
2. traverse.py --score (a subprocess) scores every image of all three shapes, sprites:GRID, by its
   negative ELBO in nats per image: the analytic KL(q(z|x) || p(z)) plus the reconstruction loss
   at one sample z ~ q(z|x) drawn with --seed (scores.csv, and scores.png with the most and the
   least typical images, in --out).
3. The table: per shape, its images' negative ELBO, and the ROC-AUC of the held-out shape against
   it: the probability that a random held-out image scores higher (more unusual) than a random
   image of that shape, ties counting half (0.5: no better than chance; 1: every held-out image
   scores above every image of that shape); the last line, against both shapes seen in training.

A checkpoint already in --out is resumed (a finished one is used as it is: train.py --resume
only redoes its final evaluation), so a second call with the same settings retrains nothing.
Needs torch, numpy and pillow, and the toolkit's runtime.py, train.py and traverse.py (run as
commands, never imported).
"""
import argparse
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import runtime  # noqa: E402

SHAPES = ("square", "ellipse", "heart")  # the sprites' shape classes 0, 1, 2 (data.py)


def roc_auc(scores, positive):
    """The area under the ROC curve of `scores` (higher: more likely positive) for the labels
    `positive`: a float in [0, 1]. scores: (N,) finite numbers; positive: (N,) bool, both classes
    present. It is the Mann-Whitney U statistic of the positives' ranks divided by n_pos * n_neg
    (Hanley & McNeil 1982), i.e. P(score of a random positive > score of a random negative) +
    0.5 P(equal): tied scores share their mean rank. O(N log N). Raises ValueError for other
    shapes, non-finite scores or a class with no member."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    if scores.ndim != 1 or positive.shape != scores.shape:
        raise ValueError(f"scores and positive must be two (N,) arrays, got {scores.shape} and "
                         f"{positive.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    positives = int(positive.sum())
    negatives = len(scores) - positives
    if positives == 0 or negatives == 0:
        raise ValueError("roc_auc needs at least one positive and one negative")
    order = np.argsort(scores, kind="stable")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)  # 1-based mean rank of each tie
    u = ranks[positive].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives))


def parse_args(argv=None):
    """The command line -> argparse namespace; a bad argument is one line and exit code 2."""
    p = runtime.ArgumentParser(prog="anomaly.py", formatter_class=runtime.HelpFormatter,
                               description=__doc__.split("\n")[0],
                               epilog="See the top of examples/anomaly.py for what it does.")
    p.add_argument("--held-out", choices=SHAPES, default="heart",
                   help="the shape left out of training")
    p.add_argument("--grid", default="positions=16,orientations=8",
                   help="options of the built-in sprites (as sprites:OPTIONS) for training and "
                        "scoring; the default has 36,864 images, 12,288 per shape")
    p.add_argument("--model", default="vae", help="train.py --model (a VAE-family objective)")
    p.add_argument("--steps", type=int, default=2000, help="training steps of batch --batch-size")
    p.add_argument("--batch-size", type=int, default=64, help="train.py --batch-size")
    p.add_argument("--latents", type=int, default=10, help="train.py --latents")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of training and of the scores' samples z")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available, else cpu")
    p.add_argument("--out", default="anomaly",
                   help="folder for the checkpoint, scores.csv and scores.png")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    for option, value in (("--steps", args.steps), ("--batch-size", args.batch_size),
                          ("--latents", args.latents)):
        if value < 1:
            p.error(f"{option} {value}: must be at least 1")
    if ":" in args.grid or "exclude" in args.grid:
        p.error(f"--grid {args.grid}: give the sprites' options alone, such as positions=8")
    runtime.check_seed(p, args.seed)
    return args


def run(script, argv):
    """python SCRIPT ARGV from the toolkit's folder, its output shown as it goes; UserError if it
    fails (what it printed says why)."""
    command = [sys.executable, os.path.join(ROOT, script), *argv]
    done = subprocess.run(command)
    if done.returncode != 0:
        raise runtime.UserError(f"{script} stopped with exit code {done.returncode} (its output "
                                "is above): " + " ".join(command[1:]))


def train(args, checkpoint):
    """train.py on the sprites without the held-out shape (resumed if `checkpoint` exists)."""
    held_out = SHAPES.index(args.held_out)
    argv = ["--model", args.model, "--data", f"sprites:{args.grid},exclude=shape={held_out}",
            "--steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--latents", str(args.latents), "--seed", str(args.seed), "--device", args.device,
            "--final-eval", "5000", "--out", checkpoint]
    run("train.py", argv + (["--resume"] if os.path.exists(checkpoint) else []))


def read_scores(path):
    """scores.csv (traverse.py --score) -> (neg_elbo (N,) float64, shape (N,) int64)."""
    with open(path) as f:
        header = f.readline().strip().split(",")
    if "shape" not in header:
        raise runtime.UserError(f"{path}: no shape column (header {','.join(header)})")
    table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    return table[:, header.index("neg_elbo")], table[:, header.index("shape")].astype(np.int64)


def table(neg_elbo, shape, held_out):
    """The report's lines: per shape its count, mean and median negative ELBO and the ROC-AUC of
    the held-out shape against it; then the ROC-AUC against all trained shapes."""
    outlier = shape == held_out
    lines = [f"{'shape':<9}{'in training':<13}{'images':>8}{'neg ELBO mean':>15}{'median':>9}"
             f"{'ROC-AUC':>10}"]
    for k, name in enumerate(SHAPES):
        rows = shape == k
        pair = outlier | rows
        auc = "" if k == held_out else f"{roc_auc(neg_elbo[pair], outlier[pair]):.3f}"
        lines.append(f"{name:<9}{'no' if k == held_out else 'yes':<13}{rows.sum():>8,}"
                     f"{neg_elbo[rows].mean():>15.1f}{np.median(neg_elbo[rows]):>9.1f}{auc:>10}")
    lines.append(f"ROC-AUC of the {SHAPES[held_out]} against both trained shapes: "
                 f"{roc_auc(neg_elbo, outlier):.3f}")
    return lines


def experiment(args):
    """Train, score, print the table; returns the exit code."""
    os.makedirs(args.out, exist_ok=True)
    checkpoint = os.path.join(args.out, "ckpt.pt")
    start = time.perf_counter()
    train(args, checkpoint)
    trained = time.perf_counter()
    run("traverse.py", [checkpoint, "--score", f"sprites:{args.grid}", "--out", args.out,
                        "--seed", str(args.seed), "--device", args.device])
    scored = time.perf_counter()
    neg_elbo, shape = read_scores(os.path.join(args.out, "scores.csv"))
    held_out = SHAPES.index(args.held_out)
    print(f"\n{args.model} trained {args.steps:,} steps (batch {args.batch_size}) on "
          f"sprites:{args.grid} without the {args.held_out}; every image of the three shapes "
          f"scored by its negative ELBO (nats; train {trained - start:.0f} s, score "
          f"{scored - trained:.0f} s):")
    print("\n".join(table(neg_elbo, shape, held_out)))
    return 0


def main(argv=None):
    args = parse_args(argv)
    return runtime.report_errors(lambda: experiment(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
