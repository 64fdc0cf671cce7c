"""Reproduce Chen et al.'s ordering (beta-TCVAE > beta-VAE > VAE > AE on MIG) with train.py on built-in data.

    python examples/reproduce.py table    # 4 objectives x 3 seeds, the results table
    python examples/reproduce.py curve    # MIG against beta for beta-VAE and beta-TCVAE

Each run is one `python train.py ...` command (printed before it starts), and every MIG is taken
over the whole dataset. A run whose checkpoint already holds its final MIG is not trained again (one
measured on a subset is re-measured with `train.py --resume`), so the script can be stopped and
restarted. Results go to OUT/table-DATA.json, OUT/curve-DATA.json and OUT/mig_vs_beta-DATA.png.
Needs the toolkit (torch, numpy, pillow).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

import torch
from PIL import Image, ImageDraw, ImageFont

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "..", "train.py")
RECIPE = ["--arch", "conv", "--batch-size", "64", "--lr", "1e-3", "--precision", "bf16", "--latents", "10"]
OBJECTIVES = ("ae", "vae", "betavae", "betatc")


def data_name(data):
    return os.path.splitext(os.path.basename(data.split(":")[0].rstrip("/")))[0]


def run(out_dir, data, model, beta, seed, steps, recon="auto"):
    """Train one model with train.py (or finish it); returns its checkpoint path."""
    out = os.path.join(out_dir, f"{data_name(data)}-{model}-beta{beta:g}-seed{seed}-{steps}.pt")
    state = torch.load(out, weights_only=True) if os.path.exists(out) else None
    final = (state or {}).get("final", {})
    if final and final.get("samples") == state["config"]["dataset_size"]:
        return out
    command = [sys.executable, TRAIN, "--out", out, "--log-every", "1000"]
    if final:  # trained, but measured on a subset: resuming a finished run only re-evaluates
        command += ["--resume"]
    else:
        command += ["--data", data, "--model", model, "--beta", str(beta), "--seed", str(seed),
                    "--steps", str(steps), "--resume" if state else "--force", *RECIPE]
        command += ["--recon", recon] if recon != "auto" else []
    print(" ".join(["python", "train.py"] + command[2:]), flush=True)
    subprocess.run(command, check=True)
    return out


def final_mig(path):
    final = torch.load(path, weights_only=True)["final"]
    return final["gaussian_mig"]["mig"], final["discrete_mig"]["mig"]


def table(args):
    results = {}
    for model in OBJECTIVES:
        migs = [final_mig(run(args.out, args.data, model, args.beta, seed, args.steps, args.recon)) for seed in args.seeds]
        results[model] = {"gaussian": [m[0] for m in migs], "discrete": [m[1] for m in migs]}
    print(f"\n| objective | Chen MIG median [range] | discrete MIG median [range] |\n|---|---|---|")
    for model, migs in results.items():
        cells = [f"{statistics.median(v):.3f} [{min(v):.3f}, {max(v):.3f}]" for v in migs.values()]
        print(f"| {model} | {cells[0]} | {cells[1]} |")
    return results


def curve(args):
    results = {model: {beta: final_mig(run(args.out, args.data, model, beta, 0, args.steps, args.recon))[0]
                       for beta in args.betas} for model in ("betavae", "betatc")}
    draw_curve(results, os.path.join(args.out, f"mig_vs_beta-{data_name(args.data)}.png"),
               f"MIG (Chen et al.) on {data_name(args.data)}, seed 0")
    return results


def draw_curve(results, path, title, width=480, height=300, margin=50):
    image = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    betas = sorted({b for r in results.values() for b in r})
    top = max(0.1, max(v for r in results.values() for v in r.values()) * 1.15)
    x = lambda b: margin + (b - betas[0]) / max(betas[-1] - betas[0], 1) * (width - 2 * margin)
    y = lambda v: height - margin - v / top * (height - 2 * margin)
    draw.line([(margin, y(0)), (width - margin, y(0))], fill="black")
    draw.line([(margin, y(0)), (margin, y(top))], fill="black")
    for b in betas:
        draw.text((x(b) - 3, y(0) + 6), f"{b:g}", fill="black", font=font)
    for k in range(5):
        v = top * k / 4
        draw.text((8, y(v) - 6), f"{v:.2f}", fill="black", font=font)
    draw.text((width // 2 - 10, height - 20), "beta", fill="black", font=font)
    draw.text((8, 8), title, fill="black", font=font)
    for row, ((model, points), colour) in enumerate(zip(results.items(), ("#d95f02", "#1b9e77"))):
        xy = [(x(b), y(points[b])) for b in sorted(points)]
        draw.line(xy, fill=colour, width=2)
        for px, py in xy:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        legend_y = 10 + 14 * row
        draw.line([(width - 130, legend_y + 6), (width - 110, legend_y + 6)], fill=colour, width=2)
        draw.text((width - 104, legend_y), model, fill=colour, font=font)
    image.save(path)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=("table", "curve"),
                   help="table: 4 objectives x seeds at one beta; curve: MIG against beta, seed 0")
    p.add_argument("--data", default="sprites", help="built-in dataset or file passed to train.py")
    p.add_argument("--recon", default="auto", choices=("auto", "bce", "mse"),
                   help="reconstruction loss passed to train.py")
    p.add_argument("--out", default="runs", help="folder for checkpoints and results")
    p.add_argument("--steps", type=int, default=5000, help="steps per run (the fixed budget)")
    p.add_argument("--beta", type=float, default=6.0, help="beta of betavae and betatc in the table")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the table")
    p.add_argument("--betas", type=float, nargs="+", default=[1, 2, 4, 6, 8, 10],
                   help="betas of the curve")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = table(args) if args.stage == "table" else curve(args)
    with open(os.path.join(args.out, f"{args.stage}-{data_name(args.data)}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
