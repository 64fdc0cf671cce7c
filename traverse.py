"""Pictures, metrics and exported codes from a checkpoint written by train.py.

    python traverse.py ckpt.pt                          # the pictures, beside ckpt.pt
    python traverse.py ckpt.pt --metrics --out grids    # + every metric on the whole dataset
    python traverse.py ckpt.pt --codes codes.npz        # + the codes of the whole dataset
    python traverse.py ckpt.pt --score sprites          # only: each image's negative ELBO

Writes into --out (default: the checkpoint's folder):
  traversal.png        one row per latent, most informative first (largest mean KL): the code of
                       --image with that latent swept over [-range, range]; each row is labelled
                       with the latent's mean KL and the factor it holds most information about
  traversal.gif        the same sweep with every latent moving at once: one cell per latent (in the
                       order of traversal.png), one frame per sweep value, forward and back, looping
  reconstructions.png  8 images (top) above their reconstructions (bottom)
  samples.png          64 decodings of codes drawn from the prior N(0, I)
  history.png          the run's logged terms, per-latent KLs and periodic metrics against the step,
                       from the history CSV beside the checkpoint (ckpt.pt: ckpt.history.csv), or
                       from the checkpoint's own history (no per-latent KLs) where there is none;
                       each name logged at two steps or more
  metrics.json         with --metrics: every metric of metrics.evaluate on the whole dataset, under
                       --protocol (exact or dlib), scoring the --factors named (default: all)
  NAME.dlib.json       with --metrics, named after the checkpoint (ckpt.pt: ckpt.dlib.json): the
                       same metrics as one flat JSON object under disentanglement_lib's result
                       names (metrics.dlib_names: discrete_mig, dci_disentanglement, ...), as
                       examples/reproduce.py writes beside each checkpoint of a study
  mi.png               with --metrics: the mutual information of each latent with each factor,
                       divided by the factor's entropy (Chen et al.'s Gaussian estimator; the
                       discretized estimator's where the Gaussian one could not be measured)
and, with --codes PATH, one .npz (np.savez, no pickle) of the whole dataset: `mu` and `logvar`, the
posterior means and log-variances, float32 (N, latents); for labelled data also `factors`, int64
(N, K), `factor_names`, a unicode array (K,), and `factor_sizes`, int64 (K,).

With --score PATH (anything train.py --data takes), instead of all the above, every image of PATH
is scored by its negative ELBO (runtime.score_dataset), into --out:
  scores.csv           header index,neg_elbo,recon,kl and, for labelled data, one column per factor
                       (named as the data names it: class indices); one row per image in the data's
                       order. Nats per image, neg_elbo = recon + kl: kl is KL(q(z|x) || N(0, I)),
                       analytic; recon the checkpoint's reconstruction loss (bce: -log p(x|z) of
                       the Bernoulli decoder; mse: the summed squared error training minimised, not
                       a likelihood) at ONE sample z ~ q(z|x) drawn with --seed (not at the mean,
                       which would not be the ELBO): the numbers of training's recon and kl terms
  scores.png           the 8 most typical images (lowest negative ELBO, lowest first) above the 8
                       least typical (highest first)
A plain autoencoder (model ae) has no ELBO and is refused; adagvae and mlvae score single images
with their encoder and decoder, as a VAE.

The model is rebuilt from the checkpoint alone; the data comes from the checkpoint's config unless
--data is given (a relative path stored by an older train.py is also looked for beside the
checkpoint). Needs torch, numpy, pillow, and the toolkit's runtime.py (what the commands share),
data.py, losses.py, metrics.py and models.py.
"""
import argparse
import csv
import io
import json
import math
import os
import re
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import data
import losses
import metrics
import runtime

COLLAPSED_KL = 0.01  # mean KL (nats) under which a latent carries no information
FRAME_MS = 120       # how long traversal.gif shows each sweep value
GIF_COLUMNS = 5      # at most this many latents per row of traversal.gif
GIF_HEADER = 16      # pixels above the cells of traversal.gif, for the sweep value
GIF_LABEL = 12       # pixels above each cell of traversal.gif, for the latent's name
PAD = runtime.TILE_PAD  # pixels between the images of every grid
PANEL_WIDTH = 260  # history.png: one panel per term
PANEL_HEIGHT = 160
PANEL_COLUMNS = 3
LOG_SCALE = 20  # history.png plots positive values spanning this factor or more on a log scale
SCORE_COLUMNS = 8  # scores.png: this many most typical images above as many least typical
CSV_CHUNK = 65_536  # scores.csv is written this many rows at a time
NOT_PLOTTED = ("step", "img_per_s", "samples")  # entries of history/evaluations that are not terms
LINE_COLOURS = ((31, 90, 180), (230, 120, 20), (40, 150, 60), (200, 40, 40), (140, 90, 190),
                (140, 85, 70), (220, 110, 180), (110, 110, 110), (170, 170, 30), (20, 170, 190))

# what the table prints per metric: the first key is the headline, the others follow it
HEADLINES = {"mig_discrete": ("mig",), "mig_gaussian": ("mig",), "beta_vae_score": ("score",),
             "factor_vae_score": ("score",),
             "dci": ("disentanglement", "completeness", "informativeness_test"),
             "sap_score": ("score",),
             "modularity_explicitness": ("modularity", "explicitness_test"),
             "gaussian_total_correlation": ("score",), "mutual_info_score": ("score",)}


class _Formatter(runtime.HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """runtime's help layout, keeping the line breaks of the description."""


def parse_args(argv=None):
    """The command line -> argparse namespace; a bad argument is one line and exit code 2."""
    p = runtime.ArgumentParser(
        prog="traverse.py", formatter_class=_Formatter,
        description="Draw pictures of what each latent of a trained model does, and optionally\n"
                    "measure every disentanglement metric and export the codes of the dataset.\n\n"
                    "  python traverse.py ckpt.pt                        # traversal.png/.gif, "
                    "...\n"
                    "  python traverse.py ckpt.pt --metrics --out grids  # + metrics.json, mi.png\n"
                    "  python traverse.py ckpt.pt --codes codes.npz      # + means, log-variances, "
                    "factors\n"
                    "  python traverse.py ckpt.pt --score sprites        # only scores.csv, "
                    "scores.png\n\n"
                    "See the top of traverse.py for what each file shows.")
    _what_options(p)
    _picture_options(p.add_argument_group("pictures"))
    _running_options(p.add_argument_group("running"))
    args = p.parse_args(argv)
    _check_arguments(p, args)
    return args


def _what_options(p):
    """The checkpoint, and what to write: pictures, metrics, codes or scores."""
    p.add_argument("checkpoint", help="checkpoint written by train.py (its --out)")
    p.add_argument("--out", help="folder for the pictures and metrics.json (default: the "
                   "checkpoint's folder)")
    p.add_argument("--data", help="dataset to encode (default: the one in the checkpoint's config; "
                   "give it when the data has moved)")
    p.add_argument("--metrics", action="store_true",
                   help="encode the whole dataset, run every metric (labelled data: MIG, BetaVAE, "
                        "FactorVAE, DCI, SAP, modularity; any data: the label-free ones), print a "
                        "table, write metrics.json and mi.png")
    p.add_argument("--mig", dest="metrics", action="store_true",
                   help="the same as --metrics (its former name; the MIGs are among the metrics)")
    p.add_argument("--protocol", choices=metrics.PROTOCOLS,
                   help="with --metrics: exact (every metric on every row; the default) or dlib "
                        "(disentanglement_lib's settings, Locatello et al. 2019: MIG on 10,000 "
                        "drawn rows, DCI from gradient-boosted trees, ...)")
    p.add_argument("--factors", metavar="NAME,...", type=runtime.parse_factor_names,
                   help="score only these factors (as the data names them; e.g. "
                        "scale,orientation,posX,posY leaves sprites' shape out, as Chen et al. "
                        "2018 scored dSprites), in the metrics and the latents' labels "
                        "(default: every factor)")
    p.add_argument("--codes", metavar="PATH",
                   help="write the whole dataset's posterior means, log-variances and factors to "
                        "this .npz file")
    p.add_argument("--score", metavar="PATH",
                   help="instead of the pictures: score every image of PATH (a built-in name, file "
                        "or folder, as train.py --data) by its negative ELBO in nats, recon + KL "
                        "(the analytic KL plus the checkpoint's recon loss at one sample "
                        "z ~ q(z|x) drawn with --seed, not at the mean); write scores.csv "
                        "(index,neg_elbo,recon,kl, factors) "
                        "and scores.png (most typical images above least typical)")


def _picture_options(g):
    g.add_argument("--image", type=int, default=0, help="index of the image whose code is swept")
    g.add_argument("--range", type=float, default=3.0,
                   help="sweep each latent over [-range, range]")
    g.add_argument("--steps", type=int, default=10,
                   help="sweep values: columns of traversal.png, frames of traversal.gif "
                        "(2 x steps - 2, forward and back)")
    g.add_argument("--stats-subset", type=int, default=10_000,
                   help="images encoded for the latents' order and labels (mean KL, best factor); "
                        "with --metrics or --codes the whole dataset is used instead")


def _running_options(g):
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available, else cpu")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the metrics' sampling, the prior samples, the image subsets and "
                        "--score's samples z")
    g.add_argument("--debug", action="store_true", help="show tracebacks")


def _check_arguments(p, args):
    """Each combination or value the parser cannot refuse by itself: one line, exit 2."""
    checks = [
        (not (args.range > 0 and math.isfinite(args.range)), "--range must be a positive number"),
        (args.steps < 2, "--steps must be at least 2"),
        (args.stats_subset < 1, "--stats-subset must be at least 1"),
        (args.image < 0, "--image must be >= 0"),
        (args.score is not None and bool(args.metrics or args.codes or args.data),
         "--score PATH scores the data PATH alone: leave out --metrics, --codes and --data"),
        (args.protocol is not None and not args.metrics, "--protocol is for --metrics"),
        (args.score is not None and args.factors is not None,
         "--factors chooses the factors --metrics scores and the labels name: not for --score"),
    ]
    for failed, message in checks:
        if failed:
            p.error(message)
    runtime.check_seed(p, args.seed)


# ----------------------------------------------------------------------------- drawing

def with_labels(grid, labels, row_height, width=170):
    """Put one text label left of each row of `grid` (rows of row_height pixels, PAD apart)."""
    canvas = Image.new("RGB", (grid.width + width, grid.height), "white")
    canvas.paste(grid, (width, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, label in enumerate(labels):
        top = PAD + i * (row_height + PAD) + row_height // 2 - 6
        draw.text((4, top), label, fill="black", font=font)
    return canvas


def heatmap(matrix, row_names, column_names, cell=56):
    """A table of values in [0, 1] with its numbers written in the cells (white = 0, blue = 1)."""
    rows, columns = matrix.shape
    left = 48
    top = 28
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("1", (1, 1)))
    cell = max([cell] + [int(measure.textlength(name, font=font)) + 10 for name in column_names])
    image = Image.new("RGB", (left + columns * cell + 4, top + rows * 22 + 4), "white")
    draw = ImageDraw.Draw(image)
    for k, name in enumerate(column_names):
        draw.text((left + k * cell + 4, 8), name, fill="black", font=font)
    for j in range(rows):
        draw.text((6, top + j * 22 + 5), row_names[j], fill="black", font=font)
        for k in range(columns):
            value = float(np.clip(matrix[j, k], 0, 1))
            shade = tuple(int(255 - value * (255 - c)) for c in (31, 90, 180))
            box = (left + k * cell, top + j * 22, left + (k + 1) * cell - 1, top + (j + 1) * 22 - 1)
            draw.rectangle(box, fill=shade)
            draw.text((box[0] + 12, box[1] + 5), f"{matrix[j, k]:.2f}",
                      fill="white" if value > 0.55 else "black", font=font)
    return image


def fit_text(text, width, font):
    """`text`, cut at the end until it is at most `width` pixels wide."""
    measure = ImageDraw.Draw(Image.new("1", (1, 1)))
    while text and measure.textlength(text, font=font) > width:
        text = text[:-1]
    return text


def gif_columns(latents):
    """Cells per row of traversal.gif: at most GIF_COLUMNS, the rows as evenly filled as can be."""
    return -(-latents // -(-latents // GIF_COLUMNS))


def gif_cell_origin(i, size, columns):
    """(top, left) pixel of cell i's image (size x size) in a frame of traversal.gif."""
    top = GIF_HEADER + (i // columns) * (GIF_LABEL + size + PAD) + GIF_LABEL
    left = PAD + (i % columns) * (size + PAD)
    return top, left


def gif_frames(pixels, names, values):
    """Frames of traversal.gif from the traversal's pixels, uint8 (latents, steps, H, W, C): frame k
    shows column k of every row (one cell per latent, `names` above them, the value in a header);
    the sweep runs forward then back, 2 * steps - 2 frames. Gray images give mode "L" frames (stored
    exactly), colour ones "RGB" (the GIF writer reduces them to a 256-colour palette)."""
    latents, steps, size, _, channels = pixels.shape
    columns = gif_columns(latents)
    rows = -(-latents // columns)
    mode, white, black = ("L", 255, 0) if channels == 1 else ("RGB", (255, 255, 255), (0, 0, 0))
    width = PAD + columns * (size + PAD)
    height = GIF_HEADER + rows * (GIF_LABEL + size + PAD)
    font = ImageFont.load_default()
    frames = []
    for k in list(range(steps)) + list(range(steps - 2, 0, -1)):
        frame = Image.new(mode, (width, height), white)
        draw = ImageDraw.Draw(frame)
        draw.text((PAD + 2, 2), f"every latent at {values[k]:+.2f}", fill=black, font=font)
        for i, name in enumerate(names):
            top, left = gif_cell_origin(i, size, columns)
            draw.text((left, top - GIF_LABEL), fit_text(name, size, font), fill=black, font=font)
            cell = pixels[i, k] if channels == 3 else pixels[i, k, :, :, 0]
            frame.paste(Image.fromarray(cell), (left, top))
        frames.append(frame)
    return frames


# ----------------------------------------------------------------------------- history.png

def checkpoint_rows(state):
    """The history rows (step, name, value) a checkpoint holds itself: its logged terms, then its
    periodic metrics (what history.png draws for a run without a history CSV)."""
    entries = (state.get("history") or []) + (state.get("evaluations") or [])
    return [(entry["step"], name, float(value)) for entry in entries
            for name, value in entry.items()
            if name not in NOT_PLOTTED and isinstance(value, (int, float))]


def history_series(rows):
    """[(title, [(label, steps, values)])]: one panel per name of the history rows (step, name,
    value; runtime.read_history), in the order first logged, each with one line; the per-latent
    KLs kl_0, kl_1, ... share one panel, a line each, labelled 0, 1, ... Finite points only; a
    name with fewer than two (a final metric, measured once) is left out."""
    points = {}
    for step, name, value in rows:
        if math.isfinite(value):
            points.setdefault(name, []).append((step, value))
    panels = {}
    for name, pairs in points.items():
        latent = re.fullmatch(r"kl_(\d+)", name)
        if len(pairs) >= 2:
            title = "kl per latent" if latent else name
            line = (latent.group(1) if latent else "", [s for s, _ in pairs], [v for _, v in pairs])
            panels.setdefault(title, []).append(line)
    return list(panels.items())


def nice_ticks(low, high, count=4, smallest_spacing=0.0):
    """About `count` round values (1, 2 or 5 times a power of ten apart, at least
    smallest_spacing) spanning [low, high]: the axis runs from the first to the last."""
    if high - low <= 1e-9 * max(abs(low), abs(high), 1.0):  # a flat line: centre it
        low = low - max(abs(low) * 0.05, 0.5)
        high = high + max(abs(high) * 0.05, 0.5)
    raw = (high - low) / (count - 1)
    power = 10.0 ** math.floor(math.log10(raw))
    spacing = max(next(m * power for m in (1, 2, 5, 10) if m * power >= raw), smallest_spacing)
    first = math.floor(low / spacing)
    last = math.ceil(high / spacing)
    return [i * spacing for i in range(first, last + 1)]


def tick_label(value):
    """A short tick label: 1,250 / 0.25 / 1.5e-05."""
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return f"{value:.2g}"


def log_ticks(low, high):
    """Powers of ten spanning [low, high] (both > 0), with 2 and 5 between them within 2 decades."""
    first = math.floor(math.log10(low))
    last = math.ceil(math.log10(high))
    multiples = (1, 2, 5) if last - first <= 2 else (1,)
    ticks = [m * 10.0 ** e for e in range(first, last) for m in multiples] + [10.0 ** last]
    lowest = max(t for t in ticks if t <= low)
    highest = min(t for t in ticks if t >= high)
    return [t for t in ticks if lowest <= t <= highest]


def draw_panel(title, lines):
    """One PANEL_WIDTH x PANEL_HEIGHT plot of lines [(label, steps, values)] against the step:
    title, axes, round ticks, each line in a colour of LINE_COLOURS with its label at its last
    point; the value axis is logarithmic (and the title says so) when the values are positive and
    span a factor of LOG_SCALE or more, as a loss that falls from thousands to tens does."""
    steps = [step for _, line_steps, _ in lines for step in line_steps]
    values = [value for _, _, line_values in lines for value in line_values]
    image = Image.new("RGB", (PANEL_WIDTH, PANEL_HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left = 56
    right = PANEL_WIDTH - 16
    top = 20
    bottom = PANEL_HEIGHT - 22
    logarithmic = min(values) > 0 and max(values) >= LOG_SCALE * min(values)
    draw.text((left, 4), title + (" (log scale)" if logarithmic else ""), fill="black", font=font)
    scale = math.log10 if logarithmic else (lambda value: value)
    ticks = log_ticks if logarithmic else nice_ticks
    y_ticks = ticks(min(values), max(values))
    x_ticks = nice_ticks(min(steps), max(steps), smallest_spacing=1)

    def x(step):
        return left + (step - x_ticks[0]) / (x_ticks[-1] - x_ticks[0]) * (right - left)

    def y(value):
        low = scale(y_ticks[0])
        high = scale(y_ticks[-1])
        return bottom - (scale(value) - low) / (high - low) * (bottom - top)

    draw.rectangle((left, top, right, bottom), outline=(160, 160, 160))
    for value in y_ticks:
        label = tick_label(value)
        draw.line((left - 3, y(value), left, y(value)), fill="black")
        label_left = left - 5 - draw.textlength(label, font=font)
        draw.text((label_left, y(value) - 6), label, fill="black", font=font)
    for step in x_ticks:
        label = tick_label(step)
        draw.line((x(step), bottom, x(step), bottom + 3), fill="black")
        label_left = x(step) - draw.textlength(label, font=font) / 2
        draw.text((label_left, bottom + 5), label, fill="black", font=font)
    for i, (label, line_steps, line_values) in enumerate(lines):
        colour = LINE_COLOURS[i % len(LINE_COLOURS)]
        points = [(x(s), y(v)) for s, v in zip(line_steps, line_values)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        if len(points) <= 30:
            for px, py in points:
                draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
        draw.text((points[-1][0] + 3, points[-1][1] - 6), label, fill=colour, font=font)
    return image


def draw_history(series):
    """Small multiples of history_series(...): one panel per term, PANEL_COLUMNS to a row."""
    columns = min(len(series), PANEL_COLUMNS)
    rows = -(-len(series) // columns)
    image = Image.new("RGB", (columns * PANEL_WIDTH, rows * PANEL_HEIGHT), "white")
    for i, (title, lines) in enumerate(series):
        corner = ((i % columns) * PANEL_WIDTH, (i // columns) * PANEL_HEIGHT)
        image.paste(draw_panel(title, lines), corner)
    return image


# ----------------------------------------------------------------------------- the grids

def best_factor(row, factor_names):
    """(name, value) of the largest entry of a latent's normalised MI row (K,), or None when it is
    below 0.005 (no factor worth naming) or there is no factor."""
    if len(row) == 0 or np.max(row) < 0.005:
        return None
    best = int(np.argmax(row))
    return factor_names[best], float(row[best])


def latent_labels(order, mean_kl, normalized_mi, factor_names):
    """One label per latent of `order`: "z3  posX 0.82  KL 4.10" (best factor by normalised MI, or
    "no factor"; neither without a matrix), "collapsed" when the mean KL is under COLLAPSED_KL nats.
    normalized_mi: (D, K) or None; a (D, 0) matrix means that no factor varies."""
    labels = []
    for j in order:
        label = f"z{j}"
        if normalized_mi is not None:
            best = best_factor(normalized_mi[j], factor_names)
            label += f"  {best[0]} {best[1]:.2f}" if best else "  no factor"
        label += f"  KL {mean_kl[j]:.2f}"
        labels.append(label + ("  collapsed" if mean_kl[j] < COLLAPSED_KL else ""))
    return labels


def mean_kl(mu, logvar):
    """Mean over the rows of KL(q(z_j|x) || N(0, 1)) per latent (losses.kl_normal): (D,) float64,
    nats."""
    kl = losses.kl_normal(torch.from_numpy(mu).double(), torch.from_numpy(logvar).double())
    return kl.mean(0).numpy()


@torch.inference_mode()
def draw_grids(model, source, order, labels, gif_names, image, value_range, steps, seed, out):
    """Write traversal.png, traversal.gif, reconstructions.png and samples.png into folder `out`.
    order: the latents' row order; labels / gif_names: their text in the PNG / the GIF; image: the
    row of `source` whose code (posterior mean) is swept over `steps` values in [-value_range,
    value_range]; seed: of the reconstructed images and the prior samples. Returns {name: path}."""
    size = source.images.shape[1]
    values = torch.linspace(-value_range, value_range, steps)
    pixels = runtime.traversal(model, source, image, order, values)
    paths = {name: os.path.join(out, name) for name in
             ("traversal.png", "traversal.gif", "reconstructions.png", "samples.png")}
    with_labels(runtime.tile(pixels, steps), labels, size).save(paths["traversal.png"])
    sweeps = pixels.reshape(len(order), steps, *pixels.shape[1:])
    frames = gif_frames(sweeps, gif_names, values.tolist())
    frames[0].save(paths["traversal.gif"], save_all=True, append_images=frames[1:],
                   duration=FRAME_MS, loop=0)

    rng = np.random.default_rng(seed)
    originals = source.batch(rng.choice(len(source), min(8, len(source)), replace=False))
    reconstructed = runtime.to_pixels(model.decode(model.encode(originals)[0]))
    originals = (originals * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    pairs = runtime.tile(np.concatenate([originals, reconstructed]), len(originals))
    pairs.save(paths["reconstructions.png"])

    prior = torch.randn(64, model.latents, generator=torch.Generator().manual_seed(seed))
    samples = runtime.to_pixels(model.decode(prior.to(source.device)))
    runtime.tile(samples, 8).save(paths["samples.png"])
    return paths


# ----------------------------------------------------------------------------- metrics and codes

def scored_factor_names(result):
    """The names of the factors an evaluate_codes result scored (the columns of its MI matrices),
    [] when it scored none."""
    return next((entry["factors"] for entry in result.values() if "factors" in entry), [])


def normalized_mi(result):
    """The (D, K) mi_normalized of the first MIG measured in an evaluate_codes result (Gaussian,
    else discrete), or None."""
    for name in ("mig_gaussian", "mig_discrete"):
        if "mi_normalized" in result.get(name, {}):
            return np.asarray(result[name]["mi_normalized"], dtype=np.float64)
    return None


def metric_table(result):
    """One line per metric of a metrics.evaluate result, in the order of HEADLINES: name, headline
    value, the other key values; "not measured: reason" for a metric that failed."""
    lines = []
    for name in [n for n in HEADLINES if n in result] + [n for n in result if n not in HEADLINES]:
        entry = result[name]
        if "error" in entry:
            lines.append(f"{name:<28}not measured: {entry['error']}")
            continue
        keys = [k for k in HEADLINES.get(name, ()) if k in entry]
        if not keys:  # a metric the table does not know: its numbers
            keys = [k for k, v in entry.items() if isinstance(v, (int, float, np.number))]
        if not keys:
            lines.append(f"{name:<28}(see metrics.json)")
            continue
        values = [f"{float(entry[k]):.3f}" for k in keys]
        others = "".join(f"  {k} {v}" for k, v in zip(keys[1:], values[1:]))
        lines.append(f"{name:<28}{values[0]:>7}" + others)
    return lines


def json_ready(value):
    """runtime.plain(value) with NaN and infinities as None, so metrics.json is strict JSON."""
    value = runtime.plain(value)
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_codes(path, mu, logvar, dataset):
    """np.savez the codes (and factors, if any) of the whole dataset to `path` (no pickle)."""
    arrays = {"mu": mu, "logvar": logvar}
    if dataset.factors is not None:
        arrays.update(factors=np.asarray(dataset.factors, np.int64),
                      factor_names=np.array(dataset.factor_names, dtype=str),
                      factor_sizes=np.array(dataset.factor_sizes, np.int64))
    try:
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    except OSError as error:
        raise runtime.UserError(f"--codes {path}: cannot write it ({error.strerror})") from error


def check_writable(path, option):
    """UserError naming `option` unless a file can be written at `path` (checked before work)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise runtime.UserError(f"{option} {path}: is a folder; give a file path such as "
                                f"{path}/codes.npz")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise runtime.UserError(f"{option} {path}: folder {folder} does not exist or is not "
                                "writable")


def dlib_json(result, out, checkpoint):
    """Write metrics.dlib_names(result), its finite values, to NAME.dlib.json in `out` (NAME: the
    checkpoint's file name less .pt, as examples/reproduce.py names it); returns its path."""
    flat = {name: value for name, value in metrics.dlib_names(result).items()
            if not (isinstance(value, float) and not math.isfinite(value))}
    text = json.dumps(flat, indent=1, allow_nan=False) + "\n"
    path = os.path.join(out, os.path.basename(checkpoint).removesuffix(".pt") + ".dlib.json")
    data.write_atomically(path, lambda f: f.write(text.encode()))
    return path


def measure(mu, logvar, dataset, seed, out, checkpoint, step, protocol="exact",
            factor_names=None):
    """Every metric on the whole dataset's codes (runtime.evaluate_codes under `protocol`, scoring
    the factors `factor_names`, None: all): prints the table, writes metrics.json, NAME.dlib.json
    (dlib_json) and (for labelled data) mi.png into `out`; says on stderr which factors were left
    out. Returns (result, paths written)."""
    index = np.arange(len(dataset))
    try:
        result, note = runtime.evaluate_codes(mu, logvar, dataset, index, seed, protocol=protocol,
                                              factor_names=factor_names)
    except ValueError as error:  # the codes themselves cannot be measured (e.g. not finite)
        raise runtime.UserError(f"{checkpoint}: cannot measure its codes: {error}") from error
    names = scored_factor_names(result)
    report = {"checkpoint": checkpoint, "step": step, "dataset": dataset.name,
              "images": len(dataset), "seed": seed, "protocol": protocol, "factor_names": names,
              "note": note, "metrics": json_ready(result)}
    paths = [os.path.join(out, "metrics.json"), dlib_json(result, out, checkpoint)]
    with open(paths[0], "w") as f:
        json.dump(report, f, indent=1, allow_nan=False)
    mi = normalized_mi(result)
    if mi is not None:
        paths.append(os.path.join(out, "mi.png"))
        heatmap(mi, [f"z{j}" for j in range(len(mi))], names).save(paths[-1])
    unlabelled = " (no ground-truth factors: label-free metrics only)"
    scored = f", factors {','.join(names)}" if names else unlabelled * (dataset.factors is None)
    print(f"metrics of {checkpoint} (step {step:,}) on all {len(dataset):,} images of "
          f"{dataset.name}, {protocol} protocol{scored}")
    print("\n".join(metric_table(result)))
    if note:
        print(note, file=sys.stderr)
    return result, paths


# ----------------------------------------------------------------------------- scores

def write_scores(path, scores, dataset):
    """scores.csv at `path`, written whole or not at all (data.write_atomically): the header
    index,neg_elbo,recon,kl then the dataset's factor names (labelled data), one row per image;
    scores: (neg_elbo, recon, kl), three float arrays (N,) in nats, written to 6 decimals."""
    names = dataset.factor_names if dataset.factors is not None else []
    header = io.StringIO()
    csv.writer(header, lineterminator="\n").writerow(["index", "neg_elbo", "recon", "kl", *names])
    formats = ["%d", "%.6f", "%.6f", "%.6f"] + ["%d"] * len(names)

    def write(f):
        f.write(header.getvalue().encode())
        for start in range(0, len(dataset), CSV_CHUNK):
            rows = np.arange(start, min(start + CSV_CHUNK, len(dataset)))
            columns = [rows, *(values[rows] for values in scores)]
            if names:
                columns += list(dataset.factors[rows].T)
            table = np.empty((len(rows), len(columns)), dtype=object)  # ints stay ints
            for j, column in enumerate(columns):
                table[:, j] = column
            np.savetxt(f, table, fmt=formats, delimiter=",")

    data.write_atomically(path, write)


def typical_and_atypical(source, neg_elbo, columns=SCORE_COLUMNS):
    """scores.png: the `columns` images of lowest negative ELBO (top row, lowest first) above the
    `columns` of highest (bottom row, highest first); fewer columns for fewer images."""
    order = np.argsort(neg_elbo, kind="stable")
    count = min(columns, len(order))
    rows = np.concatenate([order[:count], order[::-1][:count]])
    pixels = (source.batch(rows) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return runtime.tile(pixels, count)


def score(args):
    """--score: the negative ELBO of every image of args.score (runtime.score_dataset: the
    checkpoint's recon loss, one sample per image drawn with --seed); writes scores.csv and
    scores.png into --out, prints a summary; returns the exit code."""
    state = runtime.load_checkpoint(args.checkpoint)
    config = state["config"]
    if config["model"] == "ae":
        raise runtime.UserError(f"{args.checkpoint}: an autoencoder (model ae) has no posterior "
                                "q(z|x), so no ELBO to score; --score needs a VAE-family model")
    device = runtime.resolve_device(args.device)
    model = runtime.model_from_checkpoint(state, args.checkpoint).to(device).eval()
    dataset = data.load(args.score, seed=config["seed"])  # every image; seed: variants' colours
    check_fits(dataset, config, f"--score {args.score}")
    out = output_folder(args)
    source = runtime.ImageSource(dataset.images, device)
    scores = runtime.score_dataset(model, source, config["recon"], args.seed,
                                   what=f"scoring {len(dataset):,} images")
    paths = [os.path.join(out, "scores.csv"), os.path.join(out, "scores.png")]
    write_scores(paths[0], scores, dataset)
    typical_and_atypical(source, scores[0]).save(paths[1])
    neg_elbo, recon, kl = (float(np.mean(values)) for values in scores)
    print(f"negative ELBO of {len(dataset):,} images of {dataset.name} (recon {config['recon']}, "
          f"one sample z per image, seed {args.seed}), nats per image: mean {neg_elbo:.2f} "
          f"(recon {recon:.2f} + kl {kl:.2f}), median {np.median(scores[0]):.2f}, "
          f"min {np.min(scores[0]):.2f}, max {np.max(scores[0]):.2f}")
    print("wrote " + ", ".join(paths))
    return 0


# ----------------------------------------------------------------------------- the command

def main(argv=None):
    """The command line (argv: a list of strings, sys.argv[1:] if None) -> exit code: 0, 1 for a
    problem with the checkpoint, data or paths (one line on stderr), 2 for a bad argument."""
    args = parse_args(argv)
    work = score if args.score is not None else make_pictures
    return runtime.report_errors(lambda: work(args), args.debug)


def check_fits(dataset, config, source_name):
    """UserError naming `source_name` unless the dataset's images are the shape the checkpoint's
    model was trained on (runtime.check_dataset, then its size and channels)."""
    channels, size = runtime.check_dataset(dataset, config["arch"], source_name)
    if (channels, size) != (config["channels"], config["size"]):
        trained = f"{config['size']}x{config['size']}x{config['channels']}"
        raise runtime.UserError(f"{source_name}: images are {size}x{size}x{channels}, the model "
                                f"was trained on {trained}")


def output_folder(args):
    """--out (default: the checkpoint's folder), created if missing; UserError if it cannot be."""
    out = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as error:
        raise runtime.UserError(f"--out {out}: cannot create it ({error.strerror})") from error
    return out


def load_run(args):
    """The checkpoint, its model on the device (eval mode), its dataset and an ImageSource."""
    state = runtime.load_checkpoint(args.checkpoint)
    config = state["config"]  # only entries load_checkpoint guarantees are read
    device = runtime.resolve_device(args.device)
    model = runtime.model_from_checkpoint(state, args.checkpoint).to(device).eval()
    if args.data:
        source_name = args.data
        dataset = data.load(source_name, limit=config["data_limit"], seed=config["seed"])
    else:
        source_name = config["data"]
        dataset = runtime.load_checkpoint_data(config, args.checkpoint)
    check_fits(dataset, config, source_name)
    if args.image >= len(dataset):
        raise runtime.UserError(f"--image {args.image}: {dataset.name} has {len(dataset)} images "
                              f"(0 to {len(dataset) - 1})")
    return state, model, dataset, runtime.ImageSource(dataset.images, device)


def encode(args, state, model, dataset, source, out):
    """Encode the whole dataset (--metrics, --codes: then measure and export) or --stats-subset
    images. Returns (rows encoded, mu, logvar, evaluate_codes result or {}, paths written)."""
    if not (args.metrics or args.codes):
        index = runtime.evaluation_index(dataset, args.stats_subset, args.seed)
        return (index, *runtime.encode_dataset(model, source, index), {}, [])
    mu, logvar = runtime.encode_dataset(model, source, what=f"encoding {len(dataset):,} images")
    result = {}
    written = []
    if args.codes:
        write_codes(args.codes, mu, logvar, dataset)
        written.append(args.codes)
    if args.metrics:
        result, paths = measure(mu, logvar, dataset, args.seed, out, args.checkpoint, state["step"],
                                args.protocol or "exact", args.factors)
        written += paths
    return np.arange(len(dataset)), mu, logvar, result, written


def label_latents(mu, logvar, dataset, index, result, seed, factor_names=None):
    """The latents' order (largest mean KL first) and their names in traversal.png and .gif. The
    factors' normalised MI comes from `result` (--metrics) or, when it is empty, from the discrete
    MIG of these codes on the factors `factor_names` (None: all) that vary in these rows (what is
    left out is said on stderr)."""
    if dataset.factors is not None and not result:  # not measured yet (no --metrics)
        try:
            result, note = runtime.evaluate_codes(mu, logvar, dataset, index, seed, only_mig=True,
                                                  factor_names=factor_names)
        except ValueError as error:
            result = {}
            note = f"no factor labels: {error}"
        if note:
            print(note, file=sys.stderr)
    kl = mean_kl(mu, logvar)
    order = np.argsort(-kl, kind="stable")
    mi = normalized_mi(result)
    names = []
    if dataset.factors is not None:
        names = scored_factor_names(result)
        mi = mi if mi is not None else np.zeros((mu.shape[1], 0))
    best = [best_factor(mi[j], names) if mi is not None else None for j in order]
    gif_names = [f"z{j} {b[0]}" if b else f"z{j}" for j, b in zip(order, best)]
    return order, latent_labels(order, kl, mi, names), gif_names


def make_pictures(args):
    """The whole command: load, encode, measure and export (if asked), draw; returns the exit
    code."""
    state, model, dataset, source = load_run(args)
    runtime.factor_columns(dataset, args.factors)  # before the long encoding: names it has?
    out = output_folder(args)
    if args.codes:  # before the long encoding
        check_writable(args.codes, "--codes")
    index, mu, logvar, result, written = encode(args, state, model, dataset, source, out)
    order, labels, gif_names = label_latents(mu, logvar, dataset, index, result, args.seed,
                                             args.factors)
    paths = draw_grids(model, source, order, labels, gif_names, args.image, args.range, args.steps,
                       args.seed, out)
    written += paths.values()
    csv_path = runtime.history_path(args.checkpoint)
    has_csv = os.path.exists(csv_path)
    series = history_series(runtime.read_history(csv_path) if has_csv else checkpoint_rows(state))
    if series:
        written.append(os.path.join(out, "history.png"))
        draw_history(series).save(written[-1])
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
