"""Studies with train.py: a grid of runs trained here or on a SLURM cluster, then the results table.

    python examples/reproduce.py run                       # 7 objectives x 3 seeds on sprites
    python examples/reproduce.py run --workers 4           # 4 at once: a GPU each, or CPU cores
    python examples/reproduce.py run --slurm --gres gpu:1  # write runs/study.sbatch (job array)
    python examples/reproduce.py table                     # the table of the finished runs

A study is a grid (datasets x objectives x betas x seeds x any other train.py option) whose runs
keep their checkpoints in one folder (--out). Each run is one `python train.py ...` command, printed
before it starts, with a checkpoint named after its grid point: data-model-beta-seed-steps, plus a
short hash of any option that differs from the recipe. A finished run (its final metrics measured
on the whole dataset) is skipped and an unfinished one resumed, so a stopped study continues where
it stopped; the SLURM script follows the same rule.

`table` reads every finished checkpoint in the folder and gives, per dataset, objective and
setting, the median and [min, max] over seeds of every metric the checkpoints hold (table.md,
table.json; table.csv has one row per run, every config entry and metric, for pandas); it draws
the MIG of each seed per objective and beta, as in Locatello et al. 2019's figures (mig-DATA.png),
and MIG against beta where an objective was run at several betas (mig_vs_beta-DATA.png).

Model selection without labels: beside each finished checkpoint the table stores NAME.codes.npz,
the posterior means and per-latent mean KL of one fixed sample of the data (10,000 rows, or all
where fewer; the same rows for every run of a dataset), encoding it once for runs that lack it.
From them it scores every run by UDR (Duan et al. 2020, over all runs of a dataset), adds a UDR
column per setting, and ranks the runs by UDR beside their ranking by MIG with the Spearman
correlation of the two (ranking.md). NAME.dlib.json holds the run's metrics under
disentanglement_lib's result names (discrete_mig, dci_disentanglement, ...).

Needs what train.py needs (torch, numpy, pillow); on a cluster, nothing but this repository.
"""
import argparse
import csv
import hashlib
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
import zipfile

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import data  # noqa: E402
import losses  # noqa: E402
import metrics  # noqa: E402
import runtime  # noqa: E402  (its ArgumentParser: a bad argument is one line, exit code 2)
TRAIN = os.path.normpath(os.path.join(HERE, os.pardir, "train.py"))
UNSUPERVISED = ("ae", "vae", "betavae", "betatc", "factorvae", "dipvae1", "dipvae2")
OBJECTIVES = UNSUPERVISED + ("adagvae", "mlvae")  # and the weakly supervised, trained on pairs
TITLES = {"ae": "AE", "vae": "VAE", "betavae": "beta-VAE", "betatc": "beta-TCVAE",
          "factorvae": "FactorVAE", "dipvae1": "DIP-VAE-I", "dipvae2": "DIP-VAE-II",
          "adagvae": "Ada-GVAE", "mlvae": "Ada-ML-VAE"}
# beta means nothing to the other objectives: they are not run per beta
BETA_OBJECTIVES = ("betavae", "betatc", "adagvae", "mlvae")
HYPERPARAMETERS = {"betavae": ("beta", "capacity"), "betatc": ("beta",), "factorvae": ("gamma",),
                   "dipvae1": ("lambda_od", "lambda_d"), "dipvae2": ("lambda_od", "lambda_d"),
                   "adagvae": ("beta", "k"), "mlvae": ("beta", "k")}
# The README's recipe, given to every run; --set or options after -- replace any of it.
RECIPE = {"arch": "conv", "batch-size": "64", "lr": "1e-3", "precision": "auto", "latents": "10"}
# train.py options the runner sets itself, and why the user need not
SET_BY_THE_RUNNER = {
    "data": "use --data", "model": "use --models", "beta": "use --betas", "seed": "use --seeds",
    "steps": "use --steps", "out": "use --out", "resume": "it resumes unfinished runs itself",
    "force": "it never overwrites a finished run",
    "final-eval": "a study measures every run on the whole dataset"}
NOT_IN_THE_NAME = ("device", "log-every", "save-every", "eval-every", "eval-subset", "compile",
                   "debug")
DERIVED = ("seed", "channels", "size", "dataset_size", "dataset_name", "factor_names",
           "factor_sizes", "data_fingerprint")
MIGS = {"mig_gaussian": "MIG (Chen et al.)", "mig_discrete": "MIG (discretized)"}
COLOURS = ("#666666", "#7570b3", "#1b9e77", "#d95f02", "#e7298a", "#66a61e", "#e6ab02",
           "#a6761d", "#1f78b4")


# ----------------------------------------------------------------------------- the grid

def number(value):
    """6.0 -> '6', 0.5 -> '0.5': the shortest text that reads back as the same float."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def canonical(value):
    """'1e-3' and '0.001' are the same option value."""
    try:
        return repr(float(value))
    except (TypeError, ValueError):
        return value


def data_label(data):
    """'sprites:positions=2,scales=2' -> 'sprites_positions2_scales2';
    '/d/3dshapes.h5' -> '3dshapes'."""
    source, _, options = data.partition(":")
    name = os.path.splitext(os.path.basename(source.rstrip("/")))[0]
    options = "".join(c if c.isalnum() or c == "." else "_" for c in options.replace("=", ""))
    return f"{name}_{options}" if options else name


def parse_passthrough(tokens):
    """Options after a lone `--`: ['--lr', '5e-4', '--compile'] -> {'lr': '5e-4',
    'compile': None}."""
    options = {}
    name = None
    for token in tokens:
        if token.startswith("--"):
            name, equals, value = token[2:].partition("=")
            options[name] = value if equals else None
        elif name is not None and options[name] is None:
            options[name] = token
        else:
            raise ValueError(f"options after --: {token!r} is not an option (--name) or its value")
    return options


def parse_axis(text):
    """--set '[MODEL:]NAME=V1,V2' -> (MODEL or '', NAME, [V1, V2])."""
    target, equals, values = text.partition("=")
    model, _, name = target.rpartition(":")
    values = [v for v in values.split(",") if v]
    if not equals or not name or not values:
        raise ValueError(f"--set {text}: write NAME=VALUE[,VALUE...], optionally MODEL:NAME=...")
    if model and model not in OBJECTIVES:
        raise ValueError(f"--set {text}: {model} is not an objective ({', '.join(OBJECTIVES)})")
    return model, name.lstrip("-").replace("_", "-"), values


def check_options(names, where):
    for name in names:
        if name in SET_BY_THE_RUNNER:
            raise ValueError(f"{where}: --{name} is set by the runner ({SET_BY_THE_RUNNER[name]})")


def axis_points(axes, model):
    """Every combination of the --set axes that apply to `model`: a list of {name: value}."""
    points = [{}]
    for scope, name, values in axes:
        if scope in ("", model):
            points = [{**point, name: value} for point in points for value in values]
    return points


def sbatch_quote(value):
    """A value for an #SBATCH line: sbatch splits those lines on blanks and takes double-quoted
    words whole, so a path with a space is quoted (a double quote in it is refused)."""
    text = str(value)
    if '"' in text:
        raise runtime.ArgumentError(f"{text}: a double quote cannot be written into an "
                                    "#SBATCH line")
    return f'"{text}"' if any(c.isspace() or c in "'\\$`" for c in text) else text


def make_run(folder, data, model, beta, seed, steps, options):
    """One grid point: its name, checkpoint path and train.py options (in order; None: a flag)."""
    extra = sorted((k, canonical(v)) for k, v in options.items() if k not in NOT_IN_THE_NAME
                   and (k not in RECIPE or canonical(v) != canonical(RECIPE[k])))
    source = data.partition(":")[0]
    if os.path.exists(source):  # a file: d1/x.npz and d2/x.npz share a stem, not a run
        extra.append(("data_path", os.path.realpath(source)))
    parts = [data_label(data), model] + ([f"beta{number(beta)}"] if beta is not None else [])
    name = "-".join(parts + [f"seed{seed}", str(steps)])
    if extra:
        name += "-" + hashlib.sha1(json.dumps(extra).encode()).hexdigest()[:6]
    out = os.path.join(folder, name + ".pt")
    head = {"data": data, "model": model, **({"beta": number(beta)} if beta is not None else {}),
            "seed": str(seed), "steps": str(steps)}
    return {"name": name, "out": out, "options": {**head, **options, "out": out}}


def grid(args, passthrough):
    """Every run of the study, seed by seed (so a stopped study has whole seeds done first)."""
    runs = {}
    for seed in args.seeds:
        for dataset in args.data:
            for model in args.models:
                for beta in args.betas if model in BETA_OBJECTIVES else [None]:
                    for point in axis_points(args.set, model):
                        run = make_run(args.out, dataset, model, beta, seed, args.steps,
                                       {**RECIPE, **passthrough, **point})
                        runs.setdefault(run["name"], run)
    return list(runs.values())


def train_arguments(run):
    """The run's options as train.py arguments."""
    arguments = []
    for name, value in run["options"].items():
        arguments += [f"--{name}"] + ([] if value is None else [value])
    return arguments


def printable(arguments):
    """The command as a user would type it in the current folder."""
    return shlex.join(["python", os.path.relpath(TRAIN)] + arguments)


# ----------------------------------------------------------------------------- run states

def is_finished(checkpoint):
    """Its final metrics were measured on the whole dataset (or it has no final metrics to take)."""
    final = checkpoint.get("final")
    size = checkpoint["config"]["dataset_size"]
    return isinstance(final, dict) and final.get("samples", size) == size


def run_state(path):
    """'finished' (skip it), 'unfinished' (train.py --resume) or 'missing' (train.py --force)."""
    if not os.path.exists(path):
        return "missing"
    try:
        return "finished" if is_finished(runtime.load_checkpoint(path)) else "unfinished"
    except runtime.UserError:  # unreadable or foreign: train.py --resume says what is wrong with it
        return "unfinished"


def mode(state):
    """train.py continues an unfinished checkpoint (or re-measures it) and starts a missing one."""
    return "--resume" if state == "unfinished" else "--force"


# ----------------------------------------------------------------------------- local workers

def visible_gpus(gpus, options):
    """The GPUs the workers share: --gpus, else those of CUDA_VISIBLE_DEVICES, else all torch
    sees."""
    if options.get("device") == "cpu":
        return []
    if gpus is None and os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        gpus = os.environ["CUDA_VISIBLE_DEVICES"]
    if gpus is not None:
        return [g.strip() for g in gpus.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def worker_environment(slot, workers, gpus, cores):
    """The environment of worker `slot` of `workers`: its GPU (round-robin) and its share of the
    cores."""
    env = dict(os.environ)
    threads = str(max(1, cores // workers))
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    return env


def cpu_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def last_line(path):
    with open(path, errors="replace") as f:
        lines = [line.strip() for line in f.read()[-20000:].replace("\r", "\n").splitlines()]
    return next((line for line in reversed(lines) if line), "(no output)")


class StopRequest:
    """Ctrl-C, SIGTERM or SIGHUP: start no more runs and pass SIGTERM on to the running ones, which
    save their checkpoints; a second signal is passed on again, and train.py then leaves at once."""

    def __init__(self):
        self.signal = None
        self.count = 0
        self.previous = {sig: signal.signal(sig, self.handle)
                         for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def handle(self, signum, frame):
        self.signal = self.signal or signum
        self.count = self.count + 1

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def start(run, state, env, label, logs):
    """Start one train.py in its own session (so only the runner passes signals on to it)."""
    arguments = train_arguments(run) + [mode(state)]
    log_path = os.path.join(logs, run["name"] + ".log")
    print(f"{label} {'resume' if state == 'unfinished' else 'start'} {run['name']}\n"
          f"    {printable(arguments)}", flush=True)
    with open(log_path, "a") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {printable(arguments)}\n")
        log.flush()
        process = subprocess.Popen([sys.executable, TRAIN] + arguments, stdout=log,
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return {"process": process, "run": run, "arguments": arguments, "log": log_path, "label": label,
            "started": time.perf_counter()}


def report(job, stop):
    """Say how a run ended; returns whether it failed (a run the runner stopped has not)."""
    code = job["process"].returncode
    name = job["run"]["name"]
    label = job["label"]
    seconds = time.perf_counter() - job["started"]
    took = f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    if code == 0:
        print(f"{label} done {name} in {took}: {last_line(job['log'])}", flush=True)
        return False
    if stop.signal is not None and code in (128 + signal.SIGTERM, -signal.SIGTERM):
        saved = "checkpoint saved" if code > 0 else "stopped before training began"
        print(f"{label} stopped {name} ({saved}); it resumes next time", flush=True)
        return False
    print(f"{label} FAILED {name} (exit {code}) after {took}: {last_line(job['log'])}\n"
          f"    command: {printable(job['arguments'])}\n    log: {job['log']}", flush=True)
    return True


def run_locally(todo, workers, gpus, logs):
    """Train `todo` ([(run, state)]) with `workers` processes at once; returns (failed jobs,
    signal)."""
    cores = cpu_cores()
    queue = list(enumerate(todo, 1))
    running = {}
    failed = []
    forwarded = 0
    print(f"{workers} worker(s): " + (f"GPUs {', '.join(gpus)} round-robin" if gpus else "CPU") +
          f", {max(1, cores // workers)} thread(s) each; logs in {logs}", flush=True)
    stop = StopRequest()
    try:
        while running or (queue and stop.signal is None):
            for slot in range(workers):
                if slot not in running and queue and stop.signal is None:
                    index, (run, state) = queue.pop(0)
                    where = f"GPU {gpus[slot % len(gpus)]}" if gpus else "CPU"
                    label = f"[{index}/{len(todo)}, worker {slot}, {where}]"
                    env = worker_environment(slot, workers, gpus, cores)
                    running[slot] = start(run, state, env, label, logs)
            if stop.count > forwarded:
                forwarded = stop.count
                for job in running.values():
                    job["process"].send_signal(signal.SIGTERM)
            for slot, job in list(running.items()):
                if job["process"].poll() is not None:
                    failed += [job] if report(job, stop) else []
                    del running[slot]
            time.sleep(0.2)
    finally:
        stop.restore()
    return failed, stop.signal


def run_study(args, runs):
    """Train here what has not finished, then write the table. Returns the exit code."""
    states = [(run, run_state(run["out"])) for run in runs]
    todo = [(run, state) for run, state in states if state != "finished"]
    resumed = sum(state == "unfinished" for _, state in todo)
    print(f"{len(runs)} runs in {args.out}: {len(runs) - len(todo)} finished (skipped), "
          f"{resumed} to resume, {len(todo) - resumed} to start", flush=True)
    if args.dry_run:
        for run, state in states:
            command = printable(train_arguments(run) + [mode(state)]) if state != "finished" else ""
            print(f"{state:10}  {command or run['out']}")
        return 0
    if todo:
        os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
        gpus = visible_gpus(args.gpus, runs[0]["options"])
        failed, stopped = run_locally(todo, args.workers, gpus, os.path.join(args.out, "logs"))
        if stopped:
            print(f"stopped by {signal.Signals(stopped).name}: run the same command again to "
                  "continue")
            return 128 + stopped
        if failed:
            print(f"{len(failed)} of {len(todo)} runs failed (the table leaves them out):\n" +
                  "\n".join(f"    {printable(job['arguments'])}" for job in failed))
            if len(failed) < len(runs):
                write_table(args.out)
            return 1
    return write_table(args.out)


# ----------------------------------------------------------------------------- SLURM

def slurm_script(args, runs):
    """A bash job-array script: task i trains run i, with the runner's skip-if-done rule."""
    this = shlex.quote(os.path.relpath(os.path.abspath(__file__)))
    sbatch = [("job-name", args.job_name), ("array", f"0-{len(runs) - 1}"),
              ("output", os.path.join(os.path.abspath(args.out), "logs", "%x-%A_%a.log")),
              ("time", args.time), ("cpus-per-task", args.cpus_per_task), ("mem", args.mem),
              ("gres", args.gres), ("partition", args.partition)]
    lines = ["#!/bin/bash",
             f"# {len(runs)} train.py runs of a study, written by examples/reproduce.py. Task i",
             "# trains run i: skipped if its checkpoint is finished, resumed if it exists, started",
             "# otherwise."]
    lines += [f"#SBATCH --{key}={sbatch_quote(value)}" for key, value in sbatch if value]
    lines += [f"#SBATCH {option if option.startswith('-') else '--' + option}"
              for option in args.sbatch]
    lines += ["set -eo pipefail",  # a failing --setup line stops the task
              f"cd {shlex.quote(os.getcwd())}"]
    lines += args.setup + [
        "set -u",  # only after --setup: many activate scripts read unset variables
        'if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then',
        '  export OMP_NUM_THREADS="$SLURM_CPUS_PER_TASK" MKL_NUM_THREADS="$SLURM_CPUS_PER_TASK"',
        "fi",
        'case "${SLURM_ARRAY_TASK_ID:?submit this script with sbatch}" in']
    for index, run in enumerate(runs):
        command = shlex.join(["python", os.path.relpath(TRAIN)] + train_arguments(run))
        lines.append(f"  {index}) out={shlex.quote(run['out'])}; command=({command}) ;;")
    lines += ['  *) echo "this study has no run $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;',
              "esac",
              f'state=$(python {this} state "$out")',
              'if [ "$state" = finished ]; then echo "$out: finished, skipped"; exit 0; fi',
              'if [ "$state" = unfinished ]; then mode=--resume; else mode=--force; fi',
              'echo "${command[*]} $mode"',
              'exec "${command[@]}" "$mode"']
    return "\n".join(lines) + "\n"


def write_slurm(args, runs):
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)  # SLURM does not create it
    path = os.path.join(args.out, f"{args.job_name}.sbatch")
    with open(path, "w") as f:
        f.write(slurm_script(args, runs))
    this = shlex.quote(os.path.relpath(os.path.abspath(__file__)))
    print(f"wrote {path}: {len(runs)} runs as a job array (tasks 0-{len(runs) - 1}); finished "
          f"runs are skipped, so it can be submitted again after a stop\n"
          f"submit:            sbatch {shlex.quote(path)}\n"
          f"when it has ended: python {this} table --out {shlex.quote(args.out)}")
    return 0


# ----------------------------------------------------------------------------- the table

def final_metrics(final):
    """A checkpoint's `final` metrics as metrics.evaluate returns them ({metric: dict}), in both
    layouts: train.py's `metrics` dict, and the older `gaussian_mig` / `discrete_mig` entries."""
    found = dict(final.get("metrics") or {})
    for old, new in (("gaussian_mig", "mig_gaussian"), ("discrete_mig", "mig_discrete")):
        if old in final:
            found.setdefault(new, final[old])
    return found


def metric_values(final):
    """{column: float} of every scalar metric of a checkpoint's `final` entry: the metric's name
    for its headline figure (mig, score, or a key named as the metric, as dcimig's), else
    metric.key (dci.disentanglement, downstream.sample_efficiency, ...)."""
    values = {}
    for metric, result in final_metrics(final).items():
        if isinstance(result, dict) and "error" not in result:
            for key, value in result.items():
                if isinstance(value, float) and value == value:  # not NaN
                    headline = key in ("mig", "score", metric)
                    values[metric if headline else f"{metric}.{key}"] = value
    return values


def collect(folder):
    """Finished checkpoints of `folder`, grouped by everything in their config but the seed
    ({"identity": config, "runs": [{seed, file, config, result, metrics, weights}]}); and the
    files left out: unfinished, not checkpoints, or a second checkpoint of the same run."""
    groups = {}
    left_out = []
    for file in sorted(f for f in os.listdir(folder) if f.endswith(".pt")):
        try:  # the config completed as train.py reads it, so older checkpoints group with newer
            checkpoint = runtime.load_checkpoint(os.path.join(folder, file))
            config = checkpoint["config"]
            finished = is_finished(checkpoint)
        except runtime.UserError:  # not a checkpoint of this toolkit
            finished = False
        if not finished:
            left_out.append(file)
            continue
        identity = {k: v for k, v in config.items() if k not in DERIVED}
        if config["model"] not in BETA_OBJECTIVES:
            identity.pop("beta", None)
        group = groups.setdefault(json.dumps(identity, sort_keys=True, default=str),
                                  {"identity": identity, "runs": []})
        if any(run["seed"] == config["seed"] for run in group["runs"]):
            left_out.append(file)
            continue
        group["runs"].append({"seed": config["seed"], "file": file, "config": config,
                              "result": final_metrics(checkpoint["final"]),
                              "metrics": metric_values(checkpoint["final"]),
                              "weights": weights_digest(checkpoint)})
    return list(groups.values()), left_out


def settings(identity, varying):
    """'beta 6' or 'gamma 35, lr 0.0005': the objective's hyperparameters and what else varies."""
    names = dict.fromkeys(HYPERPARAMETERS.get(identity["model"], ()) + tuple(varying))
    shown = [(k, identity[k]) for k in names if identity.get(k) is not None]
    return ", ".join(f"{k} {number(v) if isinstance(v, float) else v}" for k, v in shown)


def summarise(groups):
    """Rows of the table: one per group, seeds in order, median and [min, max] per metric."""
    every_hyperparameter = {k for names in HYPERPARAMETERS.values() for k in names}
    keys = {k for g in groups for k in g["identity"]} - {"data", "model"} - every_hyperparameter
    varying = sorted(k for k in keys
                     if len({json.dumps(g["identity"].get(k), default=str) for g in groups}) > 1)
    rows = []
    for group in groups:
        identity = group["identity"]
        runs = sorted(group["runs"], key=lambda run: (run["seed"], run["file"]))
        row = {"data": identity["data"], "objective": identity["model"],
               "settings": settings(identity, varying), "config": identity,
               "seeds": [run["seed"] for run in runs], "checkpoints": [run["file"] for run in runs],
               "metrics": {}}
        for column in dict.fromkeys(k for run in runs for k in run["metrics"]):
            values = [run["metrics"].get(column) for run in runs]
            present = [v for v in values if v is not None]
            row["metrics"][column] = {"median": statistics.median(present), "min": min(present),
                                      "max": max(present), "values": values}
        rows.append(row)
    order = {model: i for i, model in enumerate(OBJECTIVES)}
    return sorted(rows, key=lambda r: (r["data"], order.get(r["objective"], len(order)),
                                       float(r["config"].get("beta") or 0), r["settings"]))


def columns_of(rows):
    """The MIGs and UDR first, then every other metric; the training-side figures (accuracies,
    `*_train`) are left to table.json."""
    found = [k for k in dict.fromkeys(k for row in rows for k in row["metrics"])
             if not any(word in k.split(".")[-1] for word in ("train", "accuracy"))]
    first = [k for k in (*MIGS, "udr") if k in found]
    return first + [k for k in found if k not in first]


def cell(summary):
    """'0.425 [0.128, 0.430]', and how many seeds have it when not all do."""
    if summary is None:
        return ""
    present = sum(v is not None for v in summary["values"])
    text = f"{summary['median']:.3f} [{summary['min']:.3f}, {summary['max']:.3f}]"
    return text + (f" ({present} seeds)" if present < len(summary["values"]) else "")


def markdown(rows):
    columns = columns_of(rows)
    lines = ["| data | objective | settings | seeds | " + " | ".join(columns) + " |",
             "|---" * (4 + len(columns)) + "|"]
    for row in rows:
        cells = [cell(row["metrics"].get(column)) for column in columns]
        title = TITLES.get(row["objective"], row["objective"])
        lines.append(f"| {data_label(row['data'])} | {title} | {row['settings']} | "
                     f"{len(row['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(folder):
    """Of every finished checkpoint in `folder`: table.md, table.json, table.csv, the MIG figures,
    ranking.md (UDR against MIG), and beside each checkpoint NAME.dlib.json and, where missing,
    NAME.codes.npz (its codes of the data's fixed sample)."""
    if not os.path.isdir(folder):
        raise runtime.UserError(f"--out {folder}: no such folder")
    groups, left_out = collect(folder)
    if not groups:
        this = os.path.relpath(os.path.abspath(__file__))
        raise runtime.UserError(f"{folder}: no finished checkpoints ({len(left_out)} other .pt "
                                f"files); train them with: python {this} run --out {folder}")
    runs = [run for group in groups for run in group["runs"]]
    compared, no_udr = add_udr(folder, runs)
    rows = summarise(groups)
    text = markdown(rows)
    note = ""
    if left_out:
        note = f"; not counted (unfinished, foreign or a copy): {', '.join(left_out)}"
    print(f"\n{len(runs)} finished runs in {folder} (median [min, max] over seeds){note}\n\n{text}")
    ranked, entries = rankings(compared)
    if no_udr:
        shown = no_udr[:5] + ([f"    ... and {len(no_udr) - 5} more"] if len(no_udr) > 5 else [])
        print("no UDR for:\n" + "\n".join(shown) + "\n")
    print(ranked)
    written = write_reports(folder, rows, runs, left_out, (ranked, entries, no_udr))
    print(f"wrote {written}{draw_figures(folder, rows)} in {folder}")
    return 0


def write_reports(folder, rows, runs, left_out, udr):
    """table.md, table.json, table.csv, ranking.md (where any run has a UDR) and NAME.dlib.json
    beside each checkpoint; returns what it wrote, in words."""
    ranked, entries, no_udr = udr
    with open(os.path.join(folder, "table.md"), "w") as f:
        f.write(markdown(rows))
    with open(os.path.join(folder, "table.json"), "w") as f:
        json.dump({"rows": rows, "not_counted": left_out, "udr_rankings": entries,
                   "no_udr": [line.strip() for line in no_udr]}, f, indent=1, default=str)
    write_csv(folder, runs)
    write_dlib_results(folder, runs)
    written = "table.md, table.json, table.csv"
    if ranked:
        with open(os.path.join(folder, "ranking.md"), "w") as f:
            f.write(ranked)
        written += ", ranking.md"
    return written + ", NAME.dlib.json beside each checkpoint"


def draw_figures(folder, rows):
    """mig-DATA.png per dataset and mig_vs_beta-DATA.png where an objective has several betas;
    returns what was drawn, in words."""
    drawn = False
    for dataset in dict.fromkeys(row["data"] for row in rows):
        label = data_label(dataset)
        subset = [row for row in rows if row["data"] == dataset]
        drawn |= draw_strips(subset, os.path.join(folder, f"mig-{label}.png"))
        curves = beta_curves(subset)
        if curves:
            draw_curves(curves, os.path.join(folder, f"mig_vs_beta-{label}.png"),
                        f"{MIGS['mig_gaussian']} against beta on {label}: median and [min, max] "
                        "over seeds")
    return " and the MIG figures" if drawn else " (no MIG figures: the data has no factors)"


# ----------------------------------------------------------------------------- codes and UDR

CODE_ROWS = 10_000  # the fixed sample every run of a dataset encodes for UDR (all rows if fewer)


def beside(file, suffix):
    """The file beside a checkpoint: runs/x.pt -> runs/x.codes.npz for suffix ".codes.npz"."""
    return file.removesuffix(".pt") + suffix


def weights_digest(checkpoint):
    """16 hex digits of the SHA-256 of a checkpoint's model weights (names and bytes): codes
    stored beside it are used only while it holds the weights that made them."""
    digest = hashlib.sha256()
    for name, tensor in sorted(checkpoint["model"].items()):
        digest.update(name.encode())
        if isinstance(tensor, torch.Tensor):
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def sample_rows(dataset):
    """The fixed sample of a dataset: CODE_ROWS rows (all of them where fewer), sorted int64,
    drawn without replacement by default_rng seeded with the dataset's fingerprint
    (runtime.data_fingerprint), so every run of the dataset, whatever its seed, encodes the same
    rows. Returns (rows, fingerprint)."""
    fingerprint = runtime.data_fingerprint(dataset)
    if len(dataset) <= CODE_ROWS:
        return np.arange(len(dataset), dtype=np.int64), fingerprint
    rng = np.random.default_rng(int(fingerprint, 16))
    return np.sort(rng.choice(len(dataset), CODE_ROWS, replace=False)), fingerprint


def sample_of(config, path, datasets):
    """(ImageSource on the CPU, rows, fingerprint) of the run's data as every run of it sees it:
    its --data and data_limit, read with seed 0 (a limit's subset and a variant's colours the
    same for every run, not the run's own). Read once per table (`datasets` caches it, and the
    DataError of data that cannot be read); only the last data read is kept in memory."""
    source = runtime.data_source(config["data"], beside=path)
    key = (source, config["data_limit"])
    if key not in datasets:
        datasets.clear()
        try:
            dataset = data.load(source, limit=config["data_limit"], seed=0)
            rows, fingerprint = sample_rows(dataset)
            datasets[key] = (runtime.ImageSource(dataset.images, torch.device("cpu")), rows,
                             fingerprint)
        except data.DataError as error:
            datasets[key] = runtime.UserError(f"{error} (the name {config['data']!r} comes from "
                                              "the checkpoint)")
    if isinstance(datasets[key], Exception):
        raise datasets[key]
    return datasets[key]


def stored_codes(path, weights):
    """The codes file at `path` as a dict, or None where it is missing, unreadable or was made
    by other weights than `weights` (weights_digest)."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            codes = {key: stored[key] for key in ("mu", "kl", "rows", "fingerprint", "weights")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    return codes if str(codes["weights"]) == weights else None


def encode_sample(path, weights, datasets):
    """Encode the fixed sample of its data with the checkpoint at `path` and write the codes
    file beside it (data.write_atomically): `mu` (N, D) float32 posterior means, encoded in fp32
    on the CPU; `kl` (D,) float64 each latent's mean KL(q(z|x) || N(0, 1)) over the N rows in
    nats (Duan et al.'s test of an active latent); `rows` (N,) int64 the sample's rows;
    `fingerprint` the data's; `weights` the checkpoint's weights_digest. Returns that dict;
    raises UserError naming the file (weights that do not fit, data that cannot be read)."""
    state = runtime.load_checkpoint(path)
    model = runtime.model_from_checkpoint(state, path)
    source, rows, fingerprint = sample_of(state["config"], path, datasets)
    mu, logvar = runtime.encode_dataset(model, source, rows, dtype=None)
    kl = losses.kl_normal(torch.from_numpy(mu), torch.from_numpy(logvar)).double().mean(0)
    codes = {"mu": mu, "kl": kl.numpy(), "rows": rows, "fingerprint": np.str_(fingerprint),
             "weights": np.str_(weights)}
    data.write_atomically(beside(path, ".codes.npz"), lambda f: np.savez(f, **codes))
    return codes


def attach_codes(folder, runs):
    """Give every run its codes of the fixed sample (run["codes"]), read from its codes file or
    encoded and written where that is missing or stale. Returns the lines saying which runs
    have none and why."""
    datasets = {}
    problems = []
    encoded = 0
    def data_of(run):
        return run["config"]["data"], str(run["config"]["data_limit"])

    for run in sorted(runs, key=data_of):  # a dataset's runs one after another: read once
        path = os.path.join(folder, run["file"])
        run["codes"] = stored_codes(beside(path, ".codes.npz"), run["weights"])
        if run["codes"] is None:
            try:
                run["codes"] = encode_sample(path, run["weights"], datasets)
                encoded += 1
            except runtime.UserError as error:
                problems.append(f"    {run['file']}: {str(error).removeprefix(path + ': ')}")
    if encoded:
        print(f"stored the codes of a fixed sample of the data (<= {CODE_ROWS:,} rows, the same "
              f"for every run of a dataset) for {encoded} run(s): *.codes.npz")
    return problems


def udr_groups(runs):
    """{(fingerprint, latents): [runs]}: the runs UDR compares, those that encoded the same rows
    of the same data into as many latents, with finite codes."""
    groups = {}
    for run in runs:
        codes = run.get("codes")
        if codes is not None and np.isfinite(codes["mu"]).all() and np.isfinite(codes["kl"]).all():
            rows = hashlib.sha1(codes["rows"].tobytes()).hexdigest()
            key = (str(codes["fingerprint"]), rows, codes["mu"].shape[1])
            groups.setdefault(key, []).append(run)
    return list(groups.values())


def add_udr(folder, runs):
    """UDR (metrics.udr, Spearman: Duan et al. 2020 as disentanglement_lib's udr_sklearn) over
    all the runs of each dataset at once (every setting and seed), each run's score joining its
    metrics as "udr". Returns (the groups compared, lines saying which runs have no UDR and
    why)."""
    problems = attach_codes(folder, runs)
    groups = udr_groups(runs)
    for group in groups:
        if len(group) < 2:
            problems.append(f"    {group[0]['file']}: the only run of its data (and latents): "
                            "UDR compares at least two")
            continue
        result = metrics.udr([run["codes"]["mu"] for run in group],
                             np.stack([run["codes"]["kl"] for run in group]))
        for run, score in zip(group, result["scores"]):
            run["metrics"]["udr"] = float(score)
    compared = {id(run) for group in groups for run in group}
    problems += [f"    {run['file']}: its codes are not finite" for run in runs
                 if run.get("codes") is not None and id(run) not in compared]
    return [group for group in groups if len(group) > 1], problems


# ----------------------------------------------------------------------------- UDR against MIG

def average_ranks(values):
    """Ranks 1..n of `values` (ascending), ties given their mean rank."""
    values = np.asarray(values, dtype=np.float64)
    ranks = np.empty(len(values))
    ranks[np.argsort(values, kind="stable")] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a, b):
    """Spearman's rank correlation of two equally long sequences: the Pearson correlation of
    their average ranks, in [-1, 1]; NaN where either is constant."""
    ra, rb = average_ranks(a) - (len(a) + 1) / 2, average_ranks(b) - (len(b) + 1) / 2
    scale = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb / scale) if scale > 0 else float("nan")


def mig_of(group):
    """The MIG column every run of the group has (Chen et al.'s first), or None."""
    return next((m for m in MIGS if all(m in run["metrics"] for run in group)), None)


def ranking(group, title):
    """The runs of one UDR group ranked by UDR beside their ranking by MIG, and the Spearman
    correlation of the two: (markdown lines, the same as a dict for table.json)."""
    by_udr = sorted(group, key=lambda run: -run["metrics"]["udr"])
    mig = mig_of(group)
    lines = [f"## {title}: {len(group)} runs by UDR"
             + (f" beside {MIGS[mig]}" if mig else ""), ""]
    entry = {"data": title, "by_udr": [(run["file"], run["metrics"]["udr"]) for run in by_udr]}
    if mig is None:
        why = ("the data has no factors" if not any(run["config"].get("factor_names")
                                                  for run in group) else "not every run has one")
        lines += ["| rank | run | UDR |", "|---|---|---|"]
        lines += [f"| {i} | {run['file']} | {run['metrics']['udr']:.3f} |"
                  for i, run in enumerate(by_udr, 1)]
        lines += ["", f"No ranking by MIG: {why}."]
        return lines, {**entry, "no_mig_ranking": why}
    by_mig = sorted(group, key=lambda run: -run["metrics"][mig])
    lines += [f"| rank | run by UDR | UDR | run by {mig} | {mig} |", "|---|---|---|---|---|"]
    lines += [f"| {i} | {u['file']} | {u['metrics']['udr']:.3f} | {m['file']} | "
              f"{m['metrics'][mig]:.3f} |" for i, (u, m) in enumerate(zip(by_udr, by_mig), 1)]
    rho = spearman([run["metrics"]["udr"] for run in group], [run["metrics"][mig] for run in group])
    top = by_udr[0]
    place = 1 + sum(run["metrics"][mig] > top["metrics"][mig] for run in group)  # ties share
    tied = sum(run["metrics"]["udr"] == top["metrics"]["udr"] for run in group) - 1
    correlation = (f"{rho:.3f}" if rho == rho else
                   f"undefined (every run has the same {'UDR' if tied else mig})")
    lines += ["", f"Spearman rank correlation of UDR and {mig} over the {len(group)} runs: "
                  f"{correlation}. UDR's top run ({top['file']}"
                  + (f", tied with {tied} more" if tied else "")
                  + f") is number {place} by {mig}: {'in' if place <= 3 else 'not in'} its top "
                  "three."]
    return lines, {**entry, "mig": mig, "by_mig": [(run["file"], run["metrics"][mig])
                                                   for run in by_mig],
                   "spearman": rho if rho == rho else None, "udr_top_run_mig_rank": place}


def rankings(groups):
    """ranking() of every UDR group, titled by its data (and latents where a data has several
    groups): (markdown text, [dicts])."""
    labels = [data_label(group[0]["config"]["data"]) for group in groups]
    text, entries = [], []
    for label, group in zip(labels, groups):
        title = label
        if labels.count(label) > 1:
            title += f" ({group[0]['codes']['mu'].shape[1]} latents)"
        lines, entry = ranking(group, title)
        text += lines + [""]
        entries.append(entry)
    return "\n".join(text), entries


# ----------------------------------------------------------------------------- flat files

def csv_value(value):
    """A config entry or metric as one CSV cell: lists and dicts as JSON, None as empty."""
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else value


def write_csv(folder, runs):
    """table.csv: one row per run, `checkpoint`, every config entry and every scalar metric (the
    table's columns and udr) as flat columns, ready for pandas.read_csv."""
    config_columns = list(dict.fromkeys(k for run in runs for k in run["config"]))
    metric_columns = list(dict.fromkeys(k for run in runs for k in run["metrics"]))
    named = {k: f"metric.{k}" if k in config_columns else k for k in metric_columns}
    with open(os.path.join(folder, "table.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["checkpoint"] + config_columns + [named[k] for k in metric_columns])
        for run in sorted(runs, key=lambda run: run["file"]):
            config = [csv_value(run["config"].get(k)) for k in config_columns]
            values = [csv_value(run["metrics"].get(k)) for k in metric_columns]
            writer.writerow([run["file"]] + config + values)


def write_dlib_results(folder, runs):
    """Beside each checkpoint, NAME.dlib.json: its final metrics as one flat JSON object under
    disentanglement_lib's result names (metrics.dlib_names: discrete_mig, dci_disentanglement,
    beta_vae_score, ...) and the protocol that measured them."""
    for run in runs:
        flat = {name: value for name, value in metrics.dlib_names(run["result"]).items()
                if value == value}  # NaN is no JSON number
        if flat and flat.get("protocol") is None:  # measured before protocols: exact, all rows
            flat["protocol"] = "exact"
        text = json.dumps(flat, indent=1, allow_nan=False) + "\n"
        data.write_atomically(beside(os.path.join(folder, run["file"]), ".dlib.json"),
                              lambda f: f.write(text.encode()))


# ----------------------------------------------------------------------------- figures

def text_width(text, font):
    return ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=font)


def centred(draw, font, x, y, text):
    draw.text((x - text_width(text, font) / 2, y), text, fill="black", font=font)


def ceiling_of(values):
    """The top of the y axis: the largest value and a little more, in tenths, at least 0.1."""
    return max(0.1, math.ceil(max(values, default=0) * 1.05 * 10) / 10)


def axes(draw, font, left, top, width, height, ceiling, title):
    """A title and a y axis from 0 to `ceiling` with grid lines; returns y(value) in pixels."""
    y = lambda v: top + height - v / ceiling * height
    draw.text((left, top - 22), title, fill="black", font=font)
    for k in range(5):
        v = ceiling * k / 4
        draw.line([(left - 4, y(v)), (left + width, y(v))], fill="black" if k == 0 else "#e4e4e4")
        label_left = left - 8 - text_width(f"{v:g}", font)
        draw.text((label_left, y(v) - 6), f"{v:g}", fill="black", font=font)
    draw.line([(left, top), (left, top + height)], fill="black")
    return y


def colour_of(objective):
    if objective not in OBJECTIVES:
        return "black"
    return COLOURS[OBJECTIVES.index(objective) % len(COLOURS)]


def draw_strips(rows, path, height=200, margin=50):
    """One panel per MIG: a column per objective and setting, a point per seed, a bar at the
    median. Returns whether it drew one (False for unlabelled data, which has no MIG)."""
    font = ImageFont.load_default()
    migs = [m for m in MIGS if any(m in row["metrics"] for row in rows)]
    if not migs:  # unlabelled data (celebA): no MIG to draw
        return False
    titles = [f"{MIGS[m]} on {data_label(rows[0]['data'])}: a point per seed, a bar at the median"
              for m in migs]
    labels = [[TITLES.get(row["objective"], row["objective"])] + row["settings"].split(", ")
              for row in rows]
    column = max(64, max(text_width(text, font) + 12 for lines in labels for text in lines))
    width = max(column * len(rows), max(text_width(title, font) for title in titles) - margin)
    values = [v for row in rows for m in migs if m in row["metrics"]
              for v in row["metrics"][m]["values"] if v is not None]
    ceiling = ceiling_of(values)
    panel = height + 64 + 13 * max(map(len, labels))
    image = Image.new("RGB", (round(width + 2 * margin), panel * len(migs)), "white")
    draw = ImageDraw.Draw(image)
    for p, (metric, title) in enumerate(zip(migs, titles)):
        top = p * panel + 40
        y = axes(draw, font, margin, top, width, height, ceiling, title)
        for c, row in enumerate(rows):
            centre = margin + column * (c + 0.5)
            for line, text in enumerate(labels[c]):
                centred(draw, font, centre, top + height + 8 + 13 * line, text)
            summary = row["metrics"].get(metric)
            if summary is None:
                continue
            median = y(summary["median"])
            draw.line([(centre - column / 4, median), (centre + column / 4, median)],
                      fill="black", width=2)
            points = [v for v in summary["values"] if v is not None]
            spacing = min(8, column / 2 / len(points))
            for i, v in enumerate(points):
                x = centre + (i - (len(points) - 1) / 2) * spacing
                draw.ellipse([x - 3, y(v) - 3, x + 3, y(v) + 3], fill=colour_of(row["objective"]),
                             outline="white")
    image.save(path)
    return True


def beta_curves(rows):
    """{label: {beta: summary of mig_gaussian}} for each objective (and setting) run at several
    betas."""
    curves = {}
    for row in rows:
        beta = row["config"].get("beta")
        measured = "mig_gaussian" in row["metrics"]
        if row["objective"] in BETA_OBJECTIVES and beta is not None and measured:
            rest = ", ".join(s for s in row["settings"].split(", ") if not s.startswith("beta "))
            label = TITLES[row["objective"]] + (f" ({rest})" if rest else "")
            curves.setdefault(label, {})[float(beta)] = row["metrics"]["mig_gaussian"]
    return {label: points for label, points in curves.items() if len(points) > 1}


def draw_curves(curves, path, title, height=320, margin=50):
    """MIG against beta: a line through the medians per objective, a [min, max] bar at each beta."""
    font = ImageFont.load_default()
    legend = max(text_width(label, font) for label in curves) + 40
    plot = max(400, text_width(title, font) - legend)
    image = Image.new("RGB", (round(plot + legend + 2 * margin), height), "white")
    draw = ImageDraw.Draw(image)
    betas = sorted({b for points in curves.values() for b in points})
    ceiling = ceiling_of([p["max"] for points in curves.values() for p in points.values()])
    y = axes(draw, font, margin, 40, plot, height - 90, ceiling, title)
    x = lambda b: margin + 10 + (b - betas[0]) / max(betas[-1] - betas[0], 1e-9) * (plot - 20)
    for b in betas:
        centred(draw, font, x(b), height - 44, number(b))
    centred(draw, font, margin + plot / 2, height - 26, "beta")
    for row, (label, points) in enumerate(curves.items()):
        colour = COLOURS[(row + 2) % len(COLOURS)]
        draw.line([(x(b), y(points[b]["median"])) for b in sorted(points)], fill=colour, width=2)
        for b, p in points.items():
            draw.line([(x(b), y(p["min"])), (x(b), y(p["max"]))], fill=colour)
            draw.ellipse([x(b) - 3, y(p["median"]) - 3, x(b) + 3, y(p["median"]) + 3], fill=colour)
        left = margin + plot + 20
        top = 46 + 16 * row
        draw.line([(left, top + 6), (left + 16, top + 6)], fill=colour, width=2)
        draw.text((left + 22, top), label, fill=colour, font=font)
    image.save(path)


# ----------------------------------------------------------------------------- command line

RUN_EPILOG = """examples:
  reproduce.py run                               # the README's table: 7 objectives x seeds 0 1 2
  reproduce.py run --models betavae betatc --betas 1 2 4 6 8 10 --seeds 0 --steps 2500 \\
      --out runs/curve
  reproduce.py run --data shapes --steps 3000 --workers 2 --out runs/shapes
  reproduce.py run --set lr=1e-3,5e-4 --set factorvae:gamma=10,35 -- --device cuda
  reproduce.py run --slurm --gres gpu:1 --time 2:00:00 --setup 'source venv/bin/activate'

Every run gets the README's recipe (--arch conv --batch-size 64 --lr 1e-3 --precision auto
--latents 10) unless --set or an option after -- says otherwise. Runs are named
DATA-MODEL[-betaB]-seedS-STEPS[-HASH]; the hash covers the options that differ from the recipe
(not --device, --compile or the logging options) and, for a data file or folder, its real path,
so runs of another setting, or of other data with the same file name, never mix."""


def make_parser():
    p = runtime.ArgumentParser(prog="reproduce.py", description=__doc__.split("\n")[0],
                               epilog=__doc__.split("\n", 2)[2],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = p.add_subparsers(dest="stage", required=True, metavar="{run,table,state}")
    run = stages.add_parser(
        "run", help="train every run of the grid that has not finished, here or as a SLURM job "
                    "array",
        description="Train every run of the grid that has not finished (N at once with "
                    "--workers), then write the table; or, with --slurm, write a SLURM job-array "
                    "script instead.",
        usage="reproduce.py run [grid options] [--workers N | --slurm ...] [-- train.py options]",
        epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    grid_options(run.add_argument_group("the grid (every combination is one run)"))
    local_options(run.add_argument_group("on this machine"))
    slurm_options(run.add_argument_group("on a SLURM cluster"))
    table = stages.add_parser(
        "table", help="the table and MIG figures of every finished checkpoint in --out",
        description="Aggregate every finished checkpoint in the study folder into table.md, "
                    "table.json, table.csv, mig-DATA.png (and mig_vs_beta-DATA.png where an "
                    "objective has several betas), rank the runs by UDR beside MIG (ranking.md) "
                    "and write NAME.dlib.json beside each checkpoint. Trains nothing; encodes "
                    "the data's fixed sample (NAME.codes.npz) for runs that lack it.")
    table.add_argument("--out", default="runs", metavar="DIR",
                       help="the study folder (default: runs)")
    state = stages.add_parser("state", help="print finished, unfinished or missing for one "
                                            "checkpoint (what the SLURM script asks before each "
                                            "run)")
    state.add_argument("checkpoint")
    return p


def grid_options(g):
    g.add_argument("--data", nargs="+", default=["sprites"], metavar="D",
                   help="datasets: built-in names (sprites, shapes; options as "
                        "sprites:positions=8) or files, as train.py --data takes them (default: "
                        "sprites)")
    g.add_argument("--models", nargs="+", choices=OBJECTIVES, default=list(UNSUPERVISED),
                   metavar="M", help=f"objectives, of {', '.join(OBJECTIVES)} (default: the "
                                     "unsupervised seven; adagvae and mlvae train on pairs, "
                                     "--set k=1,0 runs both k = 1 and k random)")
    g.add_argument("--betas", nargs="+", type=float, default=[6.0], metavar="B",
                   help="betas of betavae, betatc, adagvae and mlvae; the others ignore beta "
                        "and are not repeated per beta (default: 6)")
    g.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="S",
                   help=f"(0 to {runtime.MAX_SEED}; default: 0 1 2)")
    g.add_argument("--steps", type=int, default=5000, metavar="N",
                   help="training steps of every run (default: 5000)")
    g.add_argument("--set", action="append", default=[], metavar="[MODEL:]NAME=V1,V2",
                   help="any other train.py option as an axis of the grid: each value multiplies "
                        "the runs (of MODEL only, when given); repeatable, e.g. --set "
                        "lr=1e-3,5e-4 --set factorvae:gamma=10,35. Options after a lone -- go to "
                        "every run as they are")
    g.add_argument("--out", default="runs", metavar="DIR",
                   help="the study folder: checkpoints, logs/, the table (default: runs)")


def local_options(g):
    g.add_argument("--workers", type=int, default=1, metavar="N",
                   help="runs at once: on GPUs, round-robin over --gpus; on the CPU, the cores are "
                        "divided between them (OMP_NUM_THREADS). Ctrl-C stops them all, each "
                        "saving its checkpoint (default: 1)")
    g.add_argument("--gpus", metavar="LIST",
                   help="comma-separated GPU ids for the workers, e.g. 0,1,2,3 (default: those in "
                        "CUDA_VISIBLE_DEVICES, else every GPU torch sees)")
    g.add_argument("--dry-run", action="store_true",
                   help="list every run, its state and command; train nothing")


def slurm_options(g):
    g.add_argument("--slurm", action="store_true",
                   help="write DIR/NAME.sbatch, a job array of one train.py run per task, and "
                        "print the sbatch command, instead of training here")
    g.add_argument("--job-name", default="study", metavar="NAME", help="(default: study)")
    g.add_argument("--time", help="time limit per run, e.g. 2:00:00 (a run stopped at its limit "
                                  "saves its checkpoint and resumes when the script is submitted "
                                  "again)")
    g.add_argument("--cpus-per-task", metavar="N",
                   help="CPU cores per run (also its OMP_NUM_THREADS)")
    g.add_argument("--mem", help="memory per run, e.g. 16G")
    g.add_argument("--gres", help="generic resources per run, e.g. gpu:1")
    g.add_argument("--partition", help="the partition (queue)")
    g.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="any other #SBATCH line, e.g. --sbatch account=lab; repeatable")
    g.add_argument("--setup", action="append", default=[], metavar="COMMAND",
                   help="a shell line run before training, e.g. 'module load cuda' or "
                        "'source venv/bin/activate'; repeatable")


def parse_args(argv):
    """(args, the train.py options after a lone --); bad arguments exit 2 with one line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = make_parser()
    args = parser.parse_args(argv[:split])
    if args.stage != "run":
        if argv[split:]:
            parser.error(f"options after -- are for the run stage, not {args.stage}")
        return args, {}
    try:
        passthrough = parse_passthrough(argv[split + 1:])
        check_options(passthrough, "options after --")
        args.set = [parse_axis(text) for text in args.set]
        repeated = {f"{scope}:{name}".lstrip(":") for i, (scope, name, _) in enumerate(args.set)
                    if (scope, name) in [(s, n) for s, n, _ in args.set[:i]]}
        if repeated:
            raise ValueError(f"--set {sorted(repeated)[0]}=... is given twice: put all its values "
                         "in one --set")
        check_options([name for _, name, _ in args.set], "--set")
    except ValueError as error:
        parser.error(str(error))
    for scope, name, _ in args.set:
        if scope and scope not in args.models:
            parser.error(f"--set {scope}:{name}=...: {scope} is not among --models")
    if args.workers < 1 or args.steps < 1 or min(args.betas) < 0:
        parser.error("--workers and --steps must be positive, --betas >= 0")
    for seed in args.seeds:
        runtime.check_seed(parser, seed, "--seeds")
    runs = grid(args, passthrough)
    for run, problem in zip(runs, train_problems(runs)):  # said now rather than per run
        if problem:
            problem = problem.removeprefix("train.py: error: ").removesuffix(" (see --help)")
            parser.error(f"run {run['name']}: {problem}")
    return args, passthrough


def train_problems(runs):
    """What train.py would refuse in each run's arguments (None where nothing), from one
    `train.py --check-runs` (one process, not one per run: each would load torch)."""
    argument_lists = [train_arguments(run) + ["--force"] for run in runs]
    checked = subprocess.run([sys.executable, TRAIN, "--check-runs"],
                             input=json.dumps(argument_lists), capture_output=True, text=True)
    if checked.returncode != 0:
        raise SystemExit(f"error: {TRAIN} --check-runs failed: {checked.stderr.strip()[-500:]}")
    return json.loads(checked.stdout)


def run_stage(args, passthrough):
    """The stage the command line asked for; a file that cannot be read or written is a
    UserError."""
    try:
        if args.stage == "state":
            print(run_state(args.checkpoint))
            return 0
        if args.stage == "table":
            return write_table(args.out)
        runs = grid(args, passthrough)
        return write_slurm(args, runs) if args.slurm else run_study(args, runs)
    except OSError as error:
        raise runtime.UserError(str(error)) from error


def main(argv=None):
    args, passthrough = parse_args(argv)
    return runtime.report_errors(lambda: run_stage(args, passthrough))


if __name__ == "__main__":
    sys.exit(main())
