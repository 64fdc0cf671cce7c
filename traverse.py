"""PNG grids from a checkpoint: latent traversals, reconstructions, prior samples, and the MI matrix.

    python traverse.py ckpt.pt                  # traversal.png, reconstructions.png, samples.png
    python traverse.py ckpt.pt --mig --out grids  # + both MIGs on the whole dataset, metrics.json, mi.png

The model is rebuilt from the checkpoint alone; the data comes from the checkpoint's config unless
--data is given. Needs torch, numpy, pillow (and the toolkit's data, models, metrics and train).
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import data
import metrics
import train

COLLAPSED_KL = 0.01  # mean KL (nats) under which a latent carries no information


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Draw PNG grids (and optionally measure MIG) from a "
                                "checkpoint written by train.py.",
                                formatter_class=train.HelpFormatter)
    p.add_argument("checkpoint", help="checkpoint written by train.py")
    p.add_argument("--out", help="folder for the PNGs (default: beside the checkpoint)")
    p.add_argument("--data", help="dataset to encode (default: the one in the checkpoint's config)")
    p.add_argument("--range", type=float, default=3.0, help="traverse each latent over +-range")
    p.add_argument("--steps", type=int, default=10, help="columns of the traversal")
    p.add_argument("--image", type=int, default=0, help="index of the image whose code is traversed")
    p.add_argument("--stats-subset", type=int, default=10_000,
                   help="images encoded for the per-latent KL and factor labels")
    p.add_argument("--mig", action="store_true",
                   help="encode the whole dataset and report discrete and Gaussian MIG "
                        "(metrics.json, mi.png)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the prior samples and image subsets")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    if args.range <= 0 or args.steps < 2 or args.stats_subset < 1:
        p.error("--range must be positive, --steps at least 2, --stats-subset positive")
    return args


# ----------------------------------------------------------------------------- drawing

def to_pixels(logits):
    """Model output logits (B, C, H, W) -> uint8 (B, H, W, C)."""
    return (torch.sigmoid(logits.float()) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def tile(images, columns, pad=2, background=255):
    """uint8 (N, H, W, C) -> one RGB grid image with `columns` columns."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), background, np.uint8)
    for i, image in enumerate(images):
        top, left = pad + (i // columns) * (h + pad), pad + (i % columns) * (w + pad)
        grid[top:top + h, left:left + w] = image if c == 3 else image.repeat(3, axis=2)
    return Image.fromarray(grid)


def with_labels(grid, labels, row_height, width=170, pad=2):
    """Put one text label left of each row of `grid`."""
    canvas = Image.new("RGB", (grid.width + width, grid.height), "white")
    canvas.paste(grid, (width, 0))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for i, label in enumerate(labels):
        draw.text((4, pad + i * (row_height + pad) + row_height // 2 - 6), label, fill="black", font=font)
    return canvas


def heatmap(matrix, row_names, column_names, cell=56):
    """A table of values in [0, 1] with its numbers written in the cells (white = 0, blue = 1)."""
    rows, columns = matrix.shape
    left, top = 48, 28
    font = ImageFont.load_default()
    cell = max([cell] + [int(ImageDraw.Draw(Image.new("1", (1, 1))).textlength(name, font=font)) + 10
                         for name in column_names])
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


# ----------------------------------------------------------------------------- the grids

def normalized(result):
    """MI matrix (latents x factors) divided by each factor's entropy."""
    return np.asarray(result["mi"]) / np.maximum(np.asarray(result["entropy"]), 1e-12)[None, :]


def latent_labels(order, mean_kl, normalized_mi, factor_names):
    labels = []
    for j in order:
        label = f"z{j}"
        if normalized_mi is not None:
            best = int(np.argmax(normalized_mi[j]))
            if normalized_mi[j, best] >= 0.005:  # below that it holds no factor worth naming
                label += f"  {factor_names[best]} {normalized_mi[j, best]:.2f}"
            else:
                label += "  no factor"
        label += f"  KL {mean_kl[j]:.2f}"
        labels.append(label + ("  collapsed" if mean_kl[j] < COLLAPSED_KL else ""))
    return labels


@torch.inference_mode()
def draw_grids(model, source, dataset, args, out, normalized_mi=None):
    index = train.evaluation_index(dataset, args.stats_subset, args.seed)
    mu, logvar = train.encode_dataset(model, source, index)
    mean_kl = (0.5 * (mu ** 2 + np.exp(logvar) - 1 - logvar)).mean(0)
    order = np.argsort(-mean_kl, kind="stable")
    if normalized_mi is None and dataset.factors is not None:
        normalized_mi = normalized(metrics.discrete_mig(mu, dataset.factors[index]))
    size = source.images.shape[1]

    code = model.encode(source.batch(np.array([args.image % len(dataset)])))[0][0]
    values = torch.linspace(-args.range, args.range, args.steps)
    codes = code.repeat(len(order) * args.steps, 1)
    for row, j in enumerate(order):
        codes[row * args.steps:(row + 1) * args.steps, j] = values
    grid = tile(to_pixels(model.decode(codes)), args.steps)
    labels = latent_labels(order, mean_kl, normalized_mi, dataset.factor_names)
    paths = {"traversal": os.path.join(out, "traversal.png")}
    with_labels(grid, labels, size).save(paths["traversal"])

    originals = source.batch(np.random.default_rng(args.seed).choice(len(dataset), 8, replace=False))
    reconstructed = model.decode(model.encode(originals)[0])
    pixels = np.concatenate([(originals * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy(),
                             to_pixels(reconstructed)])
    paths["reconstructions"] = os.path.join(out, "reconstructions.png")
    tile(pixels, 8).save(paths["reconstructions"])

    torch.manual_seed(args.seed)
    prior = torch.randn(64, model.latents, device=source.device)
    paths["samples"] = os.path.join(out, "samples.png")
    tile(to_pixels(model.decode(prior)), 8).save(paths["samples"])
    return paths


def measure_mig(model, source, dataset, seed):
    """Both MIG estimators on the whole dataset; the printed table and the JSON-ready dict."""
    mu, logvar = train.encode_dataset(model, source)
    results = {"discrete": metrics.discrete_mig(mu, dataset.factors),
               "gaussian": metrics.gaussian_mig(mu, logvar, dataset.factors, seed=seed)}
    names = dataset.factor_names
    print(f"MIG on all {len(dataset):,} images of {dataset.name}")
    widths = [max(len(name), 6) + 2 for name in names]
    print(f"{'estimator':<10}{'MIG':>7}" + "".join(f"{n:>{w}}" for n, w in zip(names, widths)))
    for estimator, result in results.items():
        print(f"{estimator:<10}{result['mig']:>7.3f}"
              + "".join(f"{g:>{w}.3f}" for g, w in zip(result["gaps"], widths)))
    report = {"images": len(dataset), "dataset": dataset.name, "factor_names": names,
              **{name: train.plain(result) for name, result in results.items()}}
    return results, report


def main(argv=None):
    args = parse_args(argv)
    return train.report_errors(lambda: make_pictures(args), args.debug)


def make_pictures(args):
    state = train.load_checkpoint(args.checkpoint)
    config = state["config"]
    device = train.resolve_device(args.device)
    model = train.model_from_checkpoint(state, args.checkpoint).to(device).eval()
    source_name = args.data or config["data"]
    dataset = data.load(source_name, limit=config.get("data_limit"), seed=config.get("seed", 0))
    channels, size = train.check_dataset(dataset, config["arch"], source_name)
    if (channels, size) != (config["channels"], config["size"]):
        raise train.UserError(f"{source_name}: images are {size}x{size}x{channels}, the model "
                              f"was trained on {config['size']}x{config['size']}x{config['channels']}")
    out = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
    os.makedirs(out, exist_ok=True)
    source = train.ImageSource(dataset.images, device)
    normalized_mi = None
    if args.mig:
        if dataset.factors is None:
            raise train.UserError(f"{dataset.name}: has no ground-truth factors, so no MIG")
        results, report = measure_mig(model, source, dataset, args.seed)
        normalized_mi = normalized(results["gaussian"])
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(report, f, indent=1)
        heatmap(normalized_mi, [f"z{j}" for j in range(model.latents)],
                dataset.factor_names).save(os.path.join(out, "mi.png"))
    paths = draw_grids(model, source, dataset, args, out, normalized_mi)
    print("wrote " + ", ".join(paths.values()) +
          (f", {out}/metrics.json, {out}/mi.png" if args.mig else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
