"""Which disentanglement metrics score every disentangled code high and every entangled one low?

    python examples/metric_properties.py              # under a minute; prints the table and writes
                                                      # docs/metric_properties.png, .json and .md
    python examples/metric_properties.py --data sprites:positions=8 --out /tmp/props   # quicker

No model is trained. The codes are built by hand from the ground-truth factors of the built-in
sprites (shape, scale, orientation, posX, posY), so their structure is known exactly:

  perfect    one latent per factor, the factor's value (standardised)
  monotone   one latent per factor, each a different nonlinear increasing function of it
  rotated    as perfect, but posX and posY turned 45 degrees: two latents each mix both
  split      as perfect, but posX split over two latents: its coarse part and its fine part
  two-in-1   as perfect, but posX and posY held together in one latent (posX * size + posY)
  mixed      a random linear mix of all five factors
  noise      Gaussian noise, no factor at all

Every code gets three collapsed latents as well (one constant, two with standard deviation 0.01
and 0.001), as a trained VAE has. The first two codes are disentangled; the other five are not.
Each is scored with every metric of metrics.py through metrics.evaluate, with posterior means =
the code and posterior standard deviation 0.01 (codes are standardised, so this is 1% of a latent's
spread) for mig_gaussian. Sepliarskaia et al. 2019 ("How to Not Measure Disentanglement") ask of a
metric (1) a high score for every disentangled code and (2) a low score for every entangled one;
the last lines of the output say which disentanglement scores meet each on these codes (DCI's
informativeness and explicitness measure whether the factors can be read from the code at all, not
how they are arranged in it, so they are shown but not judged).
Needs the toolkit's data.py and metrics.py, NumPy and pillow only: it runs where torch is not installed.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFont

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import data  # noqa: E402
import metrics  # noqa: E402

DISENTANGLED = ("perfect", "monotone")
ENTANGLED = ("rotated", "split", "two-in-1", "mixed", "noise")
# (column title, metric, key): disentanglement scores, then how much of the factors the code holds at
# all (not how it is arranged: the properties do not apply), then the label-free scores, in nats
COLUMNS = [("BetaVAE", "beta_vae_score", "score"), ("FactorVAE", "factor_vae_score", "score"),
           ("DCI dis.", "dci", "disentanglement"), ("DCI compl.", "dci", "completeness"),
           ("SAP", "sap_score", "score"), ("modularity", "modularity_explicitness", "modularity"),
           ("MIG discr.", "mig_discrete", "mig"), ("MIG Chen", "mig_gaussian", "mig"),
           ("DCIMIG", "dcimig", "dcimig"), ("IRS", "irs", "score"),
           ("DCI info.", "dci", "informativeness_test"),
           ("explicitness", "modularity_explicitness", "explicitness_test"),
           ("TC (nats)", "gaussian_total_correlation", "score"),
           ("pair MI (nats)", "mutual_info_score", "score")]
SCORES, SHADED = COLUMNS[:10], 12  # the columns judged; the columns shaded white (0) to blue (1)
HIGH, NOTICED = 0.9, 0.1  # property 1: >= HIGH on both disentangled codes; property 2: each entangled
                          # code at least NOTICED below the perfect one


def standardise(z):
    return (z - z.mean(0)) / z.std(0)


def build_codes(factors, sizes, seed):
    """{name: (N, D) codes} from integer factors (shape, scale, orientation, posX, posY)."""
    rng = np.random.default_rng(seed)
    u = standardise(factors.astype(np.float64))
    x, y = u[:, 3], u[:, 4]
    pos_x = factors[:, 3]
    parts = max(2, int(round(np.sqrt(sizes[3]))))  # posX = parts * coarse + fine
    codes = {
        "perfect": u,
        "monotone": np.stack([np.exp(u[:, 0]), u[:, 1] ** 3, np.sinh(u[:, 2]), np.exp(x / 2), np.arctan(y)],
                             1),
        "rotated": np.stack([u[:, 0], u[:, 1], u[:, 2], (x + y) / np.sqrt(2), (x - y) / np.sqrt(2)], 1),
        "split": np.stack([u[:, 0], u[:, 1], u[:, 2], pos_x // parts, pos_x % parts, y], 1),
        "two-in-1": np.stack([u[:, 0], u[:, 1], u[:, 2], factors[:, 3] * sizes[4] + factors[:, 4]], 1),
        "mixed": u @ rng.normal(size=(5, 5)),
        "noise": rng.normal(size=u.shape),
    }
    collapsed = np.stack([np.zeros(len(u)), rng.normal(0, 0.01, len(u)), rng.normal(0, 0.001, len(u))], 1)
    return {name: np.hstack([standardise(z.astype(np.float64)), collapsed]) for name, z in codes.items()}


def verdicts(table):
    """Per score column: (property 1 holds, property 2 holds, the entangled codes it misses)."""
    out = {}
    for title, _, _ in SCORES:
        high = min(table[name][title] for name in DISENTANGLED) >= HIGH
        missed = [name for name in ENTANGLED if table["perfect"][title] - table[name][title] < NOTICED]
        out[title] = (high, not missed, missed)
    return out


def draw_table(table, verdict, path, cell=84, row_height=22, left=80, top=30):
    """The table as a PNG: scores shaded white (0) to blue (1), label-free columns grey, verdicts below."""
    font = ImageFont.load_default()
    names = list(table)
    rows = names + ["property 1", "property 2"]
    image = Image.new("RGB", (left + len(COLUMNS) * cell + 4, top + len(rows) * row_height + 30), "white")
    draw = ImageDraw.Draw(image)
    for k, (title, _, _) in enumerate(COLUMNS):
        draw.text((left + k * cell + 4, 10), title, fill="black", font=font)
    for j, name in enumerate(rows):
        y = top + j * row_height
        draw.text((6, y + 5), name, fill="black", font=font)
        for k, (title, _, _) in enumerate(COLUMNS):
            box = (left + k * cell, y, left + (k + 1) * cell - 1, y + row_height - 1)
            if name in table:
                value = table[name][title]
                if k < SHADED:
                    shade = float(np.clip(value, 0, 1))
                    fill = tuple(int(255 - shade * (255 - c)) for c in (31, 90, 180))
                    ink = "white" if shade > 0.55 else "black"
                else:
                    fill, ink = (225, 225, 225), "black"
                draw.rectangle(box, fill=fill)
                draw.text((box[0] + 22, box[1] + 5), f"{value:.2f}", fill=ink, font=font)
            elif k < len(SCORES):
                holds = verdict[title][0] if name == "property 1" else verdict[title][1]
                draw.rectangle(box, fill=(200, 235, 200) if holds else (245, 200, 200))
                draw.text((box[0] + 22, box[1] + 5), "yes" if holds else "no", fill="black", font=font)
        if name == names[len(DISENTANGLED) - 1]:
            draw.line((0, y + row_height, image.width, y + row_height), fill="black")
    for k in (len(SCORES), SHADED):  # between the groups of columns
        draw.line((left + k * cell - 1, 0, left + k * cell - 1, top + len(rows) * row_height), fill="black")
    draw.text((6, image.height - 22), f"property 1: >= {HIGH} on perfect and monotone; property 2: every "
              f"entangled code >= {NOTICED} below perfect. Grey: label-free, lower = more independent.",
              fill="black", font=font)
    image.save(path)


def markdown(table, verdict):
    head = "| code | " + " | ".join(title for title, _, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[title]:.2f}" for title, _, _ in COLUMNS) + " |")
    for i, label in ((0, "property 1"), (1, "property 2")):
        cells = ["yes" if verdict[title][i] else "**no**" for title, _, _ in SCORES]
        lines.append(f"| **{label}** | " + " | ".join(cells) + " |" + " |" * (len(COLUMNS) - len(SCORES)))
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(prog="metric_properties.py", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # a bad argument is one line and exit code 2, as in the toolkit's commands (whose parser,
    # runtime.ArgumentParser, needs torch)
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message} (see --help)\n")
    p.add_argument("--data", default="sprites:positions=16,orientations=20",
                   help="built-in sprites grid whose factors the codes are built from (default: %(default)s, "
                        "92,160 rows; plain 'sprites' is the full 737,280)")
    p.add_argument("--seed", type=int, default=0, help="seed of the codes' noise and of the metrics' draws")
    p.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "docs"),
                   help="folder for metric_properties.png, .json and .md (default: the repository's docs/)")
    args = p.parse_args()
    if not args.data.startswith("sprites"):
        p.error("--data must be the built-in sprites (the codes are built from its five factors)")
    try:
        dataset = data.load(args.data)
    except data.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if list(dataset.factor_names) != ["shape", "scale", "orientation", "posX", "posY"]:
        print(f"error: {args.data}: needs all five sprites factors with at least 2 values each, "
              f"got {dataset.factor_names}", file=sys.stderr)
        sys.exit(2)
    factors, sizes = dataset.factors, list(dataset.factor_sizes)
    del dataset  # only the factor grid is needed
    print(f"{args.data}: {len(factors):,} rows, factor sizes {sizes}")

    table, raw = {}, {}
    for name, codes in build_codes(factors, sizes, args.seed).items():
        start = time.perf_counter()
        result = metrics.evaluate(codes, np.full(codes.shape, 2 * np.log(0.01)), factors, seed=args.seed)
        errors = {m: r["error"] for m, r in result.items() if "error" in r}
        if errors:
            raise SystemExit(f"error: {name}: {errors}")
        table[name] = {title: float(result[metric][key]) for title, metric, key in COLUMNS}
        raw[name] = {m: {k: v for k, v in r.items() if np.ndim(v) == 0} for m, r in result.items()}
        print(f"{name:9s} " + "  ".join(f"{title} {table[name][title]:.2f}" for title, _, _ in COLUMNS)
              + f"  ({time.perf_counter() - start:.1f} s)", flush=True)

    verdict = verdicts(table)
    print()
    for title, (high, low, missed) in verdict.items():
        print(f"{title:13s} property 1 (high on disentangled): {'yes' if high else 'no '}   "
              f"property 2 (low on entangled): {'yes' if low else 'no, misses ' + ', '.join(missed)}")
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, "metric_properties")
    draw_table(table, verdict, base + ".png")
    with open(base + ".md", "w") as f:
        f.write(markdown(table, verdict))
    with open(base + ".json", "w") as f:
        json.dump({"data": args.data, "rows": len(factors), "seed": args.seed, "table": table,
                   "property_1": {t: v[0] for t, v in verdict.items()},
                   "property_2": {t: v[1] for t, v in verdict.items()}, "metrics": raw}, f, indent=1)
    print(f"\nwrote {base}.png, {base}.md, {base}.json")


if __name__ == "__main__":
    main()
