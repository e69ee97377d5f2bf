"""How good the samples are, by sampler, on the MNIST split (issue 33, item 5): one table of test NLL, Fréchet
distance, KID, precision and recall for the VAE with its prior, a Gaussian mixture and a flow fitted to its codes,
the plain autoencoder with the mixture and the flow, the conditional VAE with its prior, and the VQ-VAE (issue 34)
with the autoregressive prior over its code indices and a mixture fitted to its quantised codes.

    .venv/bin/python bench/generation.py                 # 10 epochs each; about 15 minutes on 2 idle cores
    .venv/bin/python bench/generation.py --epochs 2      # quicker
    .venv/bin/python bench/generation.py --runs DIR      # keep the runs in DIR (default: a temporary folder)
    .venv/bin/python bench/generation.py --models VQ-VAE # some of the models; the others' rows are kept

Every number is ``aevb eval``'s: the samples of each sampler against the 2,000 test images, in the features of the
classifier aevb trains on the training split (its test accuracy is printed with the table, since the features
are only as good as it is), beside the floor (the training split against the test split).  The conditional
VAE's NLL is −log p(x|y), given the label.  Writes ``bench/results/generation.json``.
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
RESULTS = Path(__file__).resolve().parent / "results" / "generation.json"
MODELS = {  # name: (flags, the samplers fitted to its codes)
    "VAE": (("--model", "vae"), ("gmm", "flow")),
    "AE": (("--model", "ae"), ("gmm", "flow")),
    # a conditional model's codes depend on its label: it samples its prior
    "conditional VAE": (("--model", "vae", "--conditional"), ()),
    # 10 vectors of 2 numbers, each one of 64 entries; its uniform training prior is not judged
    "VQ-VAE": (("--model", "vq-vae", "--code-dim", "2", "--codebook-size", "64"), ("autoregressive", "gmm")),
}


def aevb(*args) -> str:
    done = subprocess.run([sys.executable, "-m", "aevb.cli", *map(str, args)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"aevb {' '.join(map(str, args))} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--runs", type=Path, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--iw-samples", type=int, default=1000)
    parser.add_argument("--models", nargs="+", help=f"some of: {', '.join(MODELS)} (default: all)")
    args = parser.parse_args()
    if not MNIST.is_dir():
        raise SystemExit(f"the MNIST test set is not in {MNIST}")
    runs = args.runs or Path(tempfile.mkdtemp(prefix="aevb-generation-"))
    chosen = args.models or list(MODELS)
    unknown = sorted(set(chosen) - set(MODELS))
    if unknown:
        raise SystemExit(f"--models: no model {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    kept = json.loads(RESULTS.read_text()) if RESULTS.is_file() and args.models else {}
    rows = [row for row in kept.get("rows", []) if row["model"] not in chosen and not row["model"].startswith("floor")]
    seconds, codes = kept.get("seconds", {}), kept.get("code_log_likelihood", {})
    for name in chosen:
        flags, samplers = MODELS[name]
        run = runs / name.replace(" ", "-").lower()
        start = time.perf_counter()
        aevb("train", *RECIPE, *flags, "--epochs", args.epochs, "--out", run, "--force")
        for sampler in samplers:
            aevb("fit-sampler", run, "--sampler", sampler)
        aevb("eval", run, "-k", args.iw_samples, "--quality")
        seconds[name] = time.perf_counter() - start
        metrics = json.loads((run / "eval.json").read_text())
        quality = metrics["sample_quality"]
        for sampler, scores in quality["samplers"].items():
            rows.append({"model": name, "sampler": sampler, "nll": metrics.get("nll"), **scores})
        if "autoregressive" in samplers:  # how much the prior over the code learnt, against the uniform one
            fit = json.loads((run / "samplers" / "autoregressive.json").read_text())["fit"]
            codes[name] = {key: fit[key] for key in ("held_out_log_likelihood", "uniform_log_likelihood",
                                                     "frequency_log_likelihood", "code_length", "codebook_size")}
        floor = quality["floor"]
        accuracy = quality.get("classifier_accuracy")
    order = list(MODELS)
    rows.sort(key=lambda row: order.index(row["model"]))
    rows.insert(0, {"model": "floor: training split", "sampler": "", "nll": None, **floor})
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"epochs": args.epochs, "rows": rows, "classifier_accuracy": accuracy,
                                   "seconds": seconds, "code_log_likelihood": codes}, indent=2))
    print(f"MNIST split, {args.epochs} epochs, 2,000 samples against the 2,000 test images; the classifier's test "
          f"accuracy {accuracy:.3f}")
    print(f"{'model':<22} {'sampler':<8} {'test NLL':>9} {'Fréchet':>8} {'KID':>14} {'precision':>9} {'recall':>7}")
    for row in rows:
        nll = "—" if row["nll"] is None else f"{row['nll']:.1f}"
        kid = f"{row['kid']:.3f} ± {row['kid_standard_error']:.3f}"
        print(f"{row['model']:<22} {row['sampler']:<8} {nll:>9} {row['frechet_distance']:>8.2f} {kid:>14} "
              f"{row['precision']:>9.2f} {row['recall']:>7.2f}")
    for name, found in codes.items():
        print(f"{name}: log-probability of a held-out code of {found['code_length']} indices into "
              f"{found['codebook_size']} entries: {found['held_out_log_likelihood']:.1f} nats under the autoregressive "
              f"prior, {found['frequency_log_likelihood']:.1f} with each place drawn from the entries' frequencies, "
              f"{found['uniform_log_likelihood']:.1f} under the uniform training prior")
    print("seconds (train, fit the samplers, evaluate): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))


if __name__ == "__main__":
    main()
