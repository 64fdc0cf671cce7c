"""Throughput, memory and metric-speed figures for this toolkit; prints one table. Needs torch,
numpy, pillow.

    python bench.py                          # about half an hour on 2 CPU cores
    python bench.py --quick                  # a few minutes: fewer steps and rounds, smaller inputs
    python bench.py --only evaluation --checkpoint runs/sprites/sprites-betatc-beta6-seed0-5000.pt
    python bench.py --only cuda              # on a CUDA machine: AMP against fp32, speeds

Speeds are medians over interleaved rounds, measured in this process (train.py's own in the
subprocesses it runs in); read them as ratios (absolute figures drift with the machine's load).
Memory figures come from fresh subprocesses. Needs the toolkit's runtime.py and leaf modules.
"""
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import data
import losses
import metrics
import runtime

BENCH_DATA = "sprites:positions=16"  # 184,320 images: a dSprites-like grid at a quarter the size
ROWS = []


def row(what, value, how):
    ROWS.append((what, value, how))
    print(f"  {what:<44} {value:>16}  {how}", flush=True)


# ----------------------------------------------------------------------------- training speed

def make_model(arch, channels=1):
    """The model train.py builds for 64x64 images, 10 latents."""
    config = {"arch": arch, "latents": 10, "channels": channels, "size": 64, "model": "betatc"}
    return runtime.build_model(config)


def random_rows(rng, count, rows):
    """`rows` distinct row indices of `count`, drawn with `rng`, sorted (as batches are read)."""
    return np.sort(rng.choice(count, rows, replace=False))


def bare_step_rate(arch, precision, batch_size, steps, objective="betatc", images=None, seed=0):
    """Forward, loss, backward and Adam step on batches already in memory: the floor to reach."""
    torch.manual_seed(seed)
    model = make_model(arch)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4, foreach=True)
    rng = np.random.default_rng(seed)
    batches = [runtime.to_float(torch.from_numpy(images[random_rows(rng, len(images), batch_size)]))
               for _ in range(8)]
    dtype = torch.bfloat16 if precision == "bf16" else None
    for step in range(steps + 1):
        if step == 1:  # the first step allocates Adam's state and warms the allocator: not timed
            start = time.perf_counter()
        x = batches[step % len(batches)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            logits, mu, logvar, z = model(x)
        loss, _ = losses.objective(objective, x, logits, mu, logvar, z, dataset_size=len(images))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * batch_size / (time.perf_counter() - start)


def train_loop_rate(arch, precision, batch_size, steps, folder, seed=0, device="cpu"):
    """train.py itself: the rate it saves is its loop's from the end of the first step to the end
    of the last, as bare_step_rate times it (not start-up, the first step, which allocates Adam's
    state, the checkpoint or the evaluation)."""
    out = os.path.join(folder, f"bench-{arch}-{precision}.pt")
    argv = ["--data", BENCH_DATA, "--arch", arch, "--precision", precision, "--batch-size",
            str(batch_size), "--steps", str(steps), "--out", out, "--force", "--log-every",
            str(steps), "--save-every", str(10 * steps), "--final-eval", "2000", "--seed",
            str(seed), "--device", device]
    quiet(argv)
    return torch.load(out, weights_only=True)["final"]["img_per_s"]


def bench_training(steps, rounds, folder):
    images = data.load(BENCH_DATA).images
    native_bf16 = runtime.encoding_precision(torch.device("cpu")) is not None
    for arch in ("conv", "mlp"):
        for precision in ("fp32", "bf16"):
            # bf16 emulated (AVX2-only CPUs) is ~10x slower: a shorter measurement, and said so
            emulated = precision == "bf16" and not native_bf16
            n, k = (max(steps // 5, 10), 1) if emulated else (steps, rounds)
            bare = []
            loop = []
            for r in range(k):
                bare.append(bare_step_rate(arch, precision, 64, n, images=images, seed=r))
                loop.append(train_loop_rate(arch, precision, 64, n, folder, seed=r))
            b = statistics.median(bare)
            t = statistics.median(loop)
            row(f"{arch} {precision} b64: train.py / bare step",
                f"{t:,.0f} / {b:,.0f} = {t / b:.2f}x",
                f"img/s, betatc, median of {k} interleaved rounds of {n} steps"
                + (" (bf16 emulated on this CPU)" if emulated else ""))


def bench_tc_estimator(rounds, sizes):
    """The betatc step against the same step with the plain VAE loss (no B x B x D matrix)."""
    for batch_size in sizes:
        images = (np.random.default_rng(0).random((max(batch_size * 2, 4096), 64, 64, 1)) > 0.8)
        images = images.astype(np.uint8) * 255
        steps = max(4, 8192 // batch_size)
        vae = []
        tc = []
        for r in range(rounds):
            vae.append(bare_step_rate("mlp", "fp32", batch_size, steps, "vae", images, r))
            tc.append(bare_step_rate("mlp", "fp32", batch_size, steps, "betatc", images, r))
        v = statistics.median(vae)
        t = statistics.median(tc)
        row(f"mlp b{batch_size}: betatc step / vae step", f"{t:,.0f} / {v:,.0f} = {t / v:.2f}x",
            f"img/s, fp32, {steps} steps, median of {rounds}")


def bench_denormals(steps):
    """A trained model's step with and without flushing denormals to zero."""
    images = data.load("sprites:positions=8").images
    torch.manual_seed(0)
    model = make_model("conv")
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4, foreach=True)
    rng = np.random.default_rng(0)

    def run(n):
        start = time.perf_counter()
        for _ in range(n):
            x = runtime.to_float(torch.from_numpy(images[random_rows(rng, len(images), 64)]))
            logits, mu, logvar, z = model(x)
            loss, _ = losses.objective("betatc", x, logits, mu, logvar, z, dataset_size=len(images))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return n * 64 / (time.perf_counter() - start)

    run(steps)  # train first: the slowdown appears once weights and activations drift small
    torch.set_flush_denormal(False)
    slow = run(max(steps // 5, 10))
    torch.set_flush_denormal(True)
    fast = run(max(steps // 5, 10))
    row("conv b64 after training: flush / no flush",
        f"{fast:,.0f} / {slow:,.0f} = {fast / slow:.2f}x",
        f"img/s, fp32, after {steps} betatc steps")


def bench_encoding(count, rounds):
    """runtime.encode_dataset's speed by precision and batch size (bf16 at 256 is its default)."""
    images = data.load(BENCH_DATA).images[:count]
    model = make_model("conv")
    source = runtime.ImageSource(images, torch.device("cpu"))
    rates = {}
    settings = [("fp32", None, 1024), ("fp32", None, 256), ("bf16", torch.bfloat16, 1024),
                ("bf16", torch.bfloat16, 256), ("bf16", torch.bfloat16, 128)]
    for _ in range(rounds):  # interleaved rounds
        for name, dtype, batch_size in settings:
            start = time.perf_counter()
            runtime.encode_dataset(model, source, batch_size=batch_size, dtype=dtype)
            rates.setdefault((name, batch_size), []).append(count / (time.perf_counter() - start))
    base = statistics.median(rates[("fp32", 1024)])
    for (name, batch_size), values in rates.items():
        rate = statistics.median(values)
        row(f"encoding (conv) {name} b{batch_size}", f"{rate:,.0f} img/s = {rate / base:.2f}x",
            f"against fp32 b1024; inference_mode, {count:,} images, median of {rounds}")


def trained_model(checkpoint, steps, folder):
    """(model, config, path) of `checkpoint`, or of one trained here for `steps` bf16 steps on
    sprites."""
    if checkpoint is None:
        checkpoint = os.path.join(folder, "bench-trained.pt")
        quiet(["--data", "sprites", "--steps", str(steps), "--precision", "bf16", "--out",
               checkpoint, "--force", "--final-eval", "1000", "--log-every", str(steps)])
    state = runtime.load_checkpoint(checkpoint)
    return runtime.model_from_checkpoint(state, checkpoint), state["config"], checkpoint


def bench_evaluation(checkpoint, steps, folder, accuracy_rows):
    """train.py's final evaluation on the whole built-in sprites (encoding at encoding_precision +
    metrics.evaluate), and how much the MIGs of bf16-encoded means differ from those of fp32-encoded
    means, on a fixed random subset of `accuracy_rows` images (bf16 is slow where it is
    emulated)."""
    model, config, path = trained_model(checkpoint, steps, folder)
    dataset = runtime.load_checkpoint_data(config, path)
    source = runtime.ImageSource(dataset.images, torch.device("cpu"))
    index = np.arange(len(dataset))
    native = runtime.encoding_precision(torch.device("cpu"))
    precision = {None: "fp32", torch.bfloat16: "bf16"}[native]
    start = time.perf_counter()
    mu, logvar = runtime.encode_dataset(model, source)
    encoded = time.perf_counter()
    runtime.evaluate_codes(mu, logvar, dataset, index, seed=0)
    done = time.perf_counter()
    row(f"final evaluation of {len(dataset):,} images", f"{done - start:.1f} s",
        f"encoding {encoded - start:.1f} s ({precision}, "
        f"{len(dataset) / (encoded - start):,.0f} img/s) + every metric {done - encoded:.1f} s")
    rows = runtime.evaluation_index(dataset, accuracy_rows, seed=0)
    codes = {name: runtime.encode_dataset(model, source, rows, dtype=dtype)
             for name, dtype in (("bf16", torch.bfloat16), ("fp32", None))}
    trained = "given checkpoint" if checkpoint else f"{steps} training steps"
    factors = dataset.factors[rows]
    for name, mig in (("discrete", lambda c: metrics.discrete_mig(c[0], factors)),
                      ("gaussian", lambda c: metrics.gaussian_mig(c[0], c[1], factors))):
        fast = mig(codes["bf16"])["mig"]
        exact = mig(codes["fp32"])["mig"]
        row(f"{name} MIG of bf16 codes - of fp32 codes", f"{fast - exact:+.4f}",
            f"MIG {exact:.3f} (fp32) on {len(rows):,} images, {trained}")


def bench_end_to_end():
    """`python train.py --steps 10` on the default data, as a user types it: the whole wall time."""
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        quiet(["--steps", "10", "--out", os.path.join(folder, "ckpt.pt")])
        row("python train.py --steps 10, end to end", f"{time.perf_counter() - start:.1f} s",
            "built-in sprites: load, 10 steps, encode all 737,280 images, every metric")


def bench_cuda(folder, steps, device="cuda"):
    """On a CUDA GPU: train.py with AMP (--precision auto) against fp32 for `steps` steps on
    sprites, the mean loss of the last 500 steps of each, and the training speed of conv and mlp at
    batch 64 and 256, fp32 and AMP. Skipped without CUDA (`device` lets the code path be tried on
    the CPU)."""
    if device == "cuda" and not torch.cuda.is_available():
        row("CUDA checks", "skipped", "no CUDA GPU visible to torch")
        return
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    ends = {}
    for precision in ("fp32", "auto"):
        out = os.path.join(folder, f"cuda-{precision}.pt")
        quiet(["--data", "sprites", "--device", device, "--precision", precision, "--steps",
               str(steps), "--out", out, "--force", "--log-every", str(max(steps // 20, 1)),
               "--final-eval", "2000"])
        state = torch.load(out, weights_only=True)
        tail = [h["loss"] for h in state["history"] if h["step"] > steps - max(steps // 4, 1)]
        ends[precision] = (statistics.mean(tail), state["config"]["precision"],
                           state["final"]["img_per_s"])
    fp32, _, fp32_rate = ends["fp32"]
    amp, amp_name, amp_rate = ends["auto"]
    row(f"{card}: {amp_name} / fp32 loss after {steps} steps",
        f"{amp:,.1f} / {fp32:,.1f} = {amp / fp32:.3f}",
        f"mean of the last quarter's logged losses; {amp_rate:,.0f} / {fp32_rate:,.0f} img/s")
    for arch in ("conv", "mlp"):
        for batch_size in (64, 256):
            rates = [train_loop_rate(arch, precision, batch_size, 200, folder, device=device)
                     for precision in ("fp32", "auto")]
            row(f"{card}: {arch} b{batch_size} {amp_name} / fp32",
                f"{rates[1]:,.0f} / {rates[0]:,.0f} = {rates[1] / rates[0]:.2f}x",
                "img/s of train.py, 200 steps")


def quiet(argv):
    """python train.py ARGV in a subprocess, its output kept unless it fails (then it is shown)."""
    train_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    done = subprocess.run([sys.executable, train_py, *argv], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"train.py {' '.join(argv)} failed:\n{done.stderr[-2000:]}")


# ----------------------------------------------------------------------------- metrics and data

DSPRITES_SIZES = (3, 6, 40, 32, 32)  # shape, scale, orientation, x, y


def fake_posteriors(n=737280, latents=10, seed=0):
    """Factors on the dSprites grid (tiled or cut to n rows) and posteriors like a trained VAE's:
    a few latents that track one factor (sigma 0.02..0.3), one that mixes two, the rest at the
    prior."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in DSPRITES_SIZES], indexing="ij"), -1)
    grid = grid.reshape(-1, len(DSPRITES_SIZES))
    factors = grid[random_rows(rng, len(grid), n)] if n < len(grid) else np.resize(grid, (n, 5))
    mu = rng.normal(0, 0.05, (n, latents))
    sigma = rng.uniform(0.9, 1.0, (n, latents))  # inactive latents: posterior = prior
    track = [(3, 0.02, 0.08), (4, 0.02, 0.08), (1, 0.05, 0.2), (2, 0.1, 0.3), (0, 0.1, 0.3)]
    for j, (k, low, high) in enumerate(track[:latents]):
        levels = np.linspace(-2, 2, DSPRITES_SIZES[k])
        mu[:, j] = levels[factors[:, k]] + rng.normal(0, 0.05, n)
        sigma[:, j] = rng.uniform(low, high, n)
    if latents > len(track):  # x and y mixed, with sigmas spread over the whole 0.02..1 range
        j = len(track)
        mu[:, j] = (factors[:, 3] - factors[:, 4]) / 16 + rng.normal(0, 0.1, n)
        sigma[:, j] = np.exp(rng.uniform(np.log(0.02), 0, n))
    return mu, 2 * np.log(sigma), factors


def per_pair_loop(codes, factors, bins=20):
    """disentanglement_lib's MIG loop with a numpy stand-in for sklearn's mutual_info_score (which
    labels both arrays with np.unique and counts pairs): the baseline that discrete_mig replaces."""
    def mutual_info_score(x, y):
        xs, x = np.unique(x, return_inverse=True)
        ys, y = np.unique(y, return_inverse=True)
        table = np.bincount(x * len(ys) + y, minlength=len(xs) * len(ys)).reshape(len(xs), len(ys))
        p = table / len(x)
        outer = p.sum(1, keepdims=True) * p.sum(0, keepdims=True)
        return np.sum(p[p > 0] * np.log(p[p > 0] / outer[p > 0]))

    binned = [np.digitize(c, np.histogram(c, bins)[1][:-1]) for c in codes.T]
    mi = np.array([[mutual_info_score(f, b) for f in factors.T] for b in binned])
    entropy = np.array([mutual_info_score(f, f) for f in factors.T])
    ranked = np.sort(mi, axis=0)[::-1]
    return np.mean((ranked[0] - ranked[1]) / entropy)


def bench_metrics(n):
    mu, logvar, factors = fake_posteriors(n)
    timings = {}
    for name, call in (("discrete_mig", lambda: metrics.discrete_mig(mu, factors)),
                       ("gaussian_mig", lambda: metrics.gaussian_mig(mu, logvar, factors)),
                       ("per-pair loop", lambda: {"mig": per_pair_loop(mu, factors)})):
        start = time.perf_counter()
        value = call()["mig"]
        timings[name] = time.perf_counter() - start
        row(f"{name} on {len(mu):,} x 10", f"{timings[name]:.2f} s",
            f"MIG {value:.3f}, factors 3/6/40/32/32")
    speed_up = timings["per-pair loop"] / timings["discrete_mig"]
    row("discrete_mig speed-up over the per-pair loop", f"{speed_up:.1f}x",
        "numpy stand-in for sklearn's mutual_info_score, which measured ~2x slower still")


def peak_rss_of(code):
    """Run `code` in a fresh Python; return (its seconds, its peak RSS in GiB).

    VmHWM, not ru_maxrss: the latter survives exec, so a child would inherit this process's peak.
    """
    script = ("import time, sys; sys.path.insert(0, %r); import data; start = time.perf_counter()\n"
              % os.path.dirname(os.path.abspath(__file__)) + code +
              "\nhwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')]"
              "[0].split()[1]"
              "\nprint(time.perf_counter() - start, hwm)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True)
    seconds, rss_kb = result.stdout.split()[-2:]
    return float(seconds), int(rss_kb) / 2**20


def bench_data_loading(folder, quick):
    name = "sprites:positions=16" if quick else "sprites"
    seconds, rss = peak_rss_of(f"d = data.load({name!r}); n = d.images.nbytes / 2**30")
    array_gb = (184_320 if quick else 737_280) * 4096 / 2**30
    row(f"load built-in {name}", f"{seconds:.1f} s, {rss:.2f} GiB",
        f"peak RSS of a fresh process; images {array_gb:.2f} GiB, so {rss / array_gb:.2f}x")
    n = 737_280 // (16 if quick else 4)
    path = os.path.join(folder, f"dsprites-{n}.npz")
    if not os.path.exists(path):
        sprites = data.load("sprites")
        step = 737_280 // n
        images = (sprites.images[::step, :, :, 0] // 255).astype(np.uint8)
        classes = np.concatenate([np.zeros((len(images), 1), np.int64), sprites.factors[::step]], 1)
        np.savez_compressed(path, imgs=images, latents_classes=classes,
                            latents_values=classes.astype(np.float64))
        del sprites, images
    seconds, rss = peak_rss_of(f"d = data.load({path!r})")
    array_gb = n * 4096 / 2**30
    row(f"load dSprites-layout npz ({n:,} images)", f"{seconds:.1f} s, {rss:.2f} GiB",
        f"peak RSS; images {array_gb:.2f} GiB, so {rss / array_gb:.2f}x incl. the interpreter")


def bench_hdf5(folder, n, rounds):
    """Whole-file read of a 3dshapes-layout file (gzip chunks of (15000, 4, 4, 1)): ours vs h5py.

    h5py writes the file and times its own read in fixtures/h5py_reference.py (a separate process,
    so the toolkit never imports it); skipped where h5py is not installed.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    reference = os.path.join(here, "fixtures", "h5py_reference.py")
    path = os.path.join(folder, f"3dshapes-layout-{n}.h5")
    made = subprocess.run([sys.executable, reference, "write", path, str(n)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        row("HDF5 whole-file read vs h5py", "skipped",
            "h5py is not installed (pip install h5py to measure)")
        return
    ours = []
    theirs = []
    for _ in range(rounds):  # interleaved, so both see the same page cache
        read = subprocess.run([sys.executable, reference, "read", path], capture_output=True,
                              text=True, check=True)
        seconds, checksum = read.stdout.split()
        theirs.append(float(seconds))
        start = time.perf_counter()
        with data.H5File(path) as f:
            images = f["images"][()]
        ours.append(time.perf_counter() - start)
        assert int(images.sum(dtype=np.uint64)) == int(checksum)
    o = statistics.median(ours)
    t = statistics.median(theirs)
    row(f"HDF5 read {n:,} x 64x64x3 (3dshapes layout)", f"{o:.2f} / {t:.2f} s = {o / t:.2f}x",
        f"data.H5File / h5py {made.stdout.strip()}, whole dataset, median of {rounds}")
    del images
    seconds, rss = peak_rss_of(f"f = data.H5File({path!r}); a = f['images'][()]")
    row("HDF5 whole-file read, peak RSS", f"{rss:.2f} GiB",
        f"fresh process; array {n * 12288 / 2**30:.2f} GiB")


GROUPS = ("training", "tc", "denormals", "encoding", "evaluation", "end-to-end", "metrics", "data",
          "cuda")


def main(argv=None):
    p = runtime.ArgumentParser(
        prog="bench.py", formatter_class=runtime.HelpFormatter,
        description="Measure training throughput (train.py against the bare model step), the TC "
                    "estimator's cost, encoding, the final evaluation, MIG and data loading; "
                    "prints one table.")
    p.add_argument("--quick", action="store_true",
                   help="fewer steps and rounds, smaller inputs (a few minutes)")
    p.add_argument("--only", nargs="*", choices=GROUPS, help="run only these groups of rows")
    p.add_argument("--checkpoint", help="evaluation: time this trained model (default: train one "
                   "for --eval-steps steps first)")
    p.add_argument("--eval-steps", type=int, default=2000,
                   help="evaluation: steps of the model trained first")
    args = p.parse_args(argv)
    if args.eval_steps < 1:
        p.error("--eval-steps must be positive")
    return runtime.report_errors(lambda: run_groups(args))


def run_groups(args):
    """Measure the chosen groups of rows, then print the table."""
    torch.set_flush_denormal(True)  # as train.py does
    runtime.reuse_freed_memory()  # as train.py does
    torch.manual_seed(0)
    groups = set(args.only or GROUPS)
    print(f"bench on {os.cpu_count()} CPU cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    with tempfile.TemporaryDirectory() as folder:
        if "training" in groups:
            bench_training(steps=30 if args.quick else 150, rounds=1 if args.quick else 3,
                           folder=folder)
        if "tc" in groups:
            bench_tc_estimator(rounds=1 if args.quick else 3,
                               sizes=(64, 256) if args.quick else (64, 256, 2048))
        if "denormals" in groups:
            bench_denormals(60 if args.quick else 600)
        if "encoding" in groups:
            bench_encoding(4096 if args.quick else 32768, 1 if args.quick else 3)
        if "evaluation" in groups:
            bench_evaluation(args.checkpoint, 200 if args.quick else args.eval_steps, folder,
                             5_000 if args.quick else 100_000)
        if "end-to-end" in groups:
            bench_end_to_end()
        if "cuda" in groups:
            bench_cuda(folder, 200 if args.quick else 2000)
        if "metrics" in groups:
            bench_metrics(737_280 // 16 if args.quick else 737_280)
        if "data" in groups:
            bench_data_loading(os.environ.get("BENCH_CACHE", folder), args.quick)
            bench_hdf5(folder, 6000 if args.quick else 60000, 1 if args.quick else 3)
    print("\n| what | figure | how |\n|---|---|---|")
    for what, value, how in ROWS:
        print(f"| {what} | {value} | {how} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
