"""Disentanglement on ``shapes`` (issue 34, item 7): VAE, β-VAE (β = 4), β-TCVAE, FactorVAE and DIP-VAE, each
over three seeds, with the test ELBO and NLL and every score of Locatello et al. (2019), as mean ± standard
deviation over the seeds, beside the ranges that paper shows for dSprites.

    .venv/bin/python bench/disentanglement.py --runs DIR           # 15 runs of 20 epochs: about 75 minutes on 2 cores
    .venv/bin/python bench/disentanglement.py --epochs 2 --seeds 0  # quicker
    .venv/bin/python bench/disentanglement.py --arch conv --models VAE "β-VAE (β = 4)" --seeds 0 --runs DIR

The recipe is one for two CPU cores, not Locatello et al.'s: an MLP (4096-512-512-10 and back) instead of their
convolutional networks, and 20 epochs of 80,000 sprites (12,500 steps of 128) instead of 300,000 steps of 64,
about a twelfth of their examples seen.  Each model keeps aevb's defaults for its own weights (β-TCVAE β = 6,
FactorVAE γ = 10, DIP-VAE-II λ_od = 10), which lie inside the ranges they swept.  The scores are ``aevb eval``'s on
the posterior means of the 10,000 test sprites; the NLL uses ``-k`` importance samples (default 100).  A run
with an ``eval.json`` in ``--runs`` is not trained again, so an interrupted table can be finished by running the
same command.  ``--arch conv`` trains aevb's convolutional networks instead of the MLP (Locatello et al.'s kind of
network, at about 45 s an epoch on two cores).  Writes ``bench/results/disentanglement.json`` (with ``--arch conv``:
``disentanglement-conv.json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = ("--data", "shapes", "--likelihood", "bernoulli", "--latent-dim", "10", "--batch-size", "128", "--lr", "1e-3",
          "--device", "cpu", "-q")
NETWORKS = {"mlp": ("--arch", "mlp", "--hidden", "512,512"), "conv": ("--arch", "conv")}
MODELS = {
    "VAE": ("--model", "vae"),
    "β-VAE (β = 4)": ("--model", "vae", "--beta", "4"),
    "β-TCVAE (β = 6)": ("--model", "beta-tcvae"),
    "FactorVAE (γ = 10)": ("--model", "factorvae"),
    "DIP-VAE-II (λ = 10)": ("--model", "dip-vae"),
}
SCORES = ("beta_vae_score", "factor_vae_score", "mig", "dci_disentanglement", "dci_completeness",
          "dci_informativeness", "sap")
HEADINGS = ("β-VAE", "FactorVAE", "MIG", "DCI D", "DCI C", "DCI I", "SAP")
# For orientation only: the spread of each score over all models, hyperparameters and seeds on dSprites, read
# approximately off the per-method plots of Locatello et al. (2019, "Challenging common assumptions…", the
# appendix's figure of scores by method and data set); their models were convolutional and trained 300k steps,
# and DCI there is boosted trees'.  Completeness and informativeness are not shown there for dSprites.
LOCATELLO_DSPRITES = {
    "beta_vae_score": (0.60, 0.90),
    "factor_vae_score": (0.40, 0.85),
    "mig": (0.00, 0.40),
    "dci_disentanglement": (0.00, 0.60),
    "sap": (0.00, 0.10),
}
RESULTS = Path(__file__).resolve().parent / "results" / "disentanglement.json"


def aevb(*args) -> str:
    done = subprocess.run([sys.executable, "-m", "aevb.cli", *map(str, args)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"aevb {' '.join(map(str, args))} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout


def mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", type=Path, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("-k", "--iw-samples", type=int, default=100)
    parser.add_argument("--arch", choices=NETWORKS, default="mlp", help="the networks (default: the MLP of the table)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), metavar="NAME",
                        help=f"the models, by their names in the table: {', '.join(MODELS)}")
    args = parser.parse_args()
    recipe = (*RECIPE, *NETWORKS[args.arch])
    suffix = "" if args.arch == "mlp" else f"-{args.arch}"
    results_file = RESULTS.with_name(f"{RESULTS.stem}{suffix}.json")
    runs = args.runs or Path(tempfile.mkdtemp(prefix="aevb-disentanglement-"))
    results, seconds = {}, {}
    for name in args.models:
        flags = MODELS[name]
        results[name] = []
        for seed in args.seeds:
            run = runs / f"{flags[1]}{'-b4' if '--beta' in flags else ''}{suffix}-s{seed}"
            if not (run / "eval.json").is_file():
                start = time.perf_counter()
                aevb("train", *recipe, *flags, "--epochs", args.epochs, "--seed", seed, "--out", run, "--force")
                aevb("eval", run, "-k", args.iw_samples, "--no-quality")
                seconds[run.name] = round(time.perf_counter() - start)
                print(f"{run.name}: {seconds[run.name]} s", flush=True)
            metrics = json.loads((run / "eval.json").read_text())
            results[name].append({"seed": seed, "neg_elbo": metrics["neg_elbo"], "nll": metrics["nll"],
                                  "kl": metrics["kl"], "active_units": metrics["active_units"],
                                  "total_correlation": metrics.get("total_correlation"),
                                  **{score: metrics["disentanglement"][score] for score in SCORES}})
    results_file.parent.mkdir(exist_ok=True)
    results_file.write_text(json.dumps({"epochs": args.epochs, "seeds": args.seeds, "recipe": recipe,
                                   "iw_samples": args.iw_samples, "models": results, "seconds": seconds,
                                   "locatello_dsprites": LOCATELLO_DSPRITES}, indent=2))
    print(f"shapes, {args.arch}, {args.epochs} epochs, seeds {args.seeds}: mean ± standard deviation over the seeds; "
          f"nats per sprite; scores on 10,000 test sprites (0 worst, 1 best)")
    header = f"{'model':<20} {'−ELBO':>12} {'NLL':>12} {'KL':>10} " + " ".join(f"{h:>11}" for h in HEADINGS)
    print(header)
    for name, rows in results.items():
        cells = []
        for key, width, digits in (("neg_elbo", 12, 1), ("nll", 12, 1), ("kl", 10, 1)):
            mean, spread = mean_spread([row[key] for row in rows])
            cells.append(f"{mean:.{digits}f} ± {spread:.{digits}f}".rjust(width))
        for score in SCORES:
            mean, spread = mean_spread([row[score] for row in rows])
            cells.append(f"{mean:.2f} ± {spread:.2f}".rjust(11))
        print(f"{name:<20} " + " ".join(cells))
    ranges = [f"{LOCATELLO_DSPRITES[s][0]:.2f}–{LOCATELLO_DSPRITES[s][1]:.2f}" if s in LOCATELLO_DSPRITES else "—"
              for s in SCORES]
    print(f"{'Locatello, dSprites':<20} {'':>12} {'':>12} {'':>10} " + " ".join(f"{r:>11}" for r in ranges))
    if seconds:
        print("seconds per run (train and evaluate): " + ", ".join(f"{k} {v}" for k, v in seconds.items()))


if __name__ == "__main__":
    main()
