"""Samplers fitted after training, on the MNIST split: how long each fit takes and how well each density
explains the codes of the test split (issue 33, item 1).

    .venv/bin/python bench/samplers.py               # a VAE and an AE, 10 epochs each; about 6 minutes on 2 cores
    .venv/bin/python bench/samplers.py --epochs 2    # quicker
    .venv/bin/python bench/samplers.py --runs DIR    # keep the runs in DIR (default: a temporary folder)

For each model it prints the test split's code log-density under each
sampler, mean log q̂(z) over the posterior means of the 2,000 test images
(nats per example, higher is better: the sampler puts its mass where the
encoder puts test images, which is where the decoder was trained), the
seconds each fit took, and for the VAE the aggregate posterior's I(x; z)
and KL(q(z) ‖ p(z)) from ``aevb eval``.  Sample quality in a feature space
(Fréchet distance, precision, recall) is ``aevb eval``'s, where it has it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
RECIPE = ("--data", str(MNIST / "t10k-images-idx3-ubyte.gz"), "--labels", str(MNIST / "t10k-labels-idx1-ubyte.gz"),
          "--test-split", "2000", "--likelihood", "bernoulli", "--binarize", "dynamic", "--hidden", "400",
          "--latent-dim", "20", "--device", "cpu", "-q")


def aevb(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "aevb.cli", *map(str, args)], check=True, capture_output=True,
                          text=True).stdout


def measure(run: Path, model: str) -> dict:
    from aevb.run.open import open_run
    from aevb.sampling.codes import codes
    from aevb.sampling.fitted import fit_sampler, sampler_for

    opened = open_run(run, "cpu")
    x, _ = opened.held_out("test")
    test_codes = codes(opened.model, x)[0]  # [2000, 20]
    row = {"model": model}
    if opened.model.has_kl:
        row["prior"] = sampler_for(opened, "prior").log_prob(test_codes).mean().item()
    for name in ("gmm", "flow"):
        start = time.perf_counter()
        sampler, _ = fit_sampler(opened, name)
        row[f"{name}_seconds"] = time.perf_counter() - start
        row[name] = sampler.log_prob(test_codes).mean().item()
        row[f"{name}_fit"] = {k: v for k, v in sampler.description.items() if k != "bic"}
    if opened.model.has_kl:
        metrics = json.loads((run / "eval.json").read_text())
        row.update({k: metrics[k] for k in ("nll", "mutual_information", "aggregate_kl", "aggregate_posterior_examples")})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--runs", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="JSON file of the rows")
    args = parser.parse_args()
    folder = args.runs or Path(tempfile.mkdtemp(prefix="aevb-samplers-"))
    rows = []
    for model in ("vae", "ae"):
        run = folder / model
        if not (run / "model").is_dir():
            aevb("train", *RECIPE, "--model", model, "--epochs", args.epochs, "--out", run)
        if model == "vae":
            aevb("eval", run, "-k", 1000)
        rows.append(measure(run, model))
    print("| model | log q̂(z) of test codes: prior | GMM (K by BIC) | flow | GMM fit, s | flow fit, s | I(x; z) | KL(q(z) ‖ p(z)) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        prior = f"{row['prior']:.2f}" if "prior" in row else "—"
        information = f"{row['mutual_information']:.2f}" if "mutual_information" in row else "—"
        kl = f"{row['aggregate_kl']:.2f}" if "aggregate_kl" in row else "—"
        print(f"| {row['model']} | {prior} | {row['gmm']:.2f} (K = {row['gmm_fit']['chosen_components']}) | "
              f"{row['flow']:.2f} | {row['gmm_seconds']:.1f} | {row['flow_seconds']:.1f} | {information} | {kl} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
