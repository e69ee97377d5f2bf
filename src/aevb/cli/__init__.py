"""The ``aevb`` command: thin wrappers over importable functions.

Options of ``aevb train`` are generated from the run's options
(:func:`aevb.config.run_options`: RunConfig's fields and each registered
model's own), and their choices come from the registries, so nothing is
defined twice.
Each command imports the layers it runs (and so torch) inside its own
function: ``aevb --help`` imports no torch and answers at once
(``bench/cli_help.py`` times it).  Errors a user can cause print one line and exit with
status 2 (130 for Ctrl-C).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import click

from aevb.config import IW_SAMPLES, PRECISIONS, coerce, flag, make_config, memory_options, read_config_file
from aevb.cli.text import format_diagnostics, format_metrics, format_quality, memory_message, out_of_memory
from aevb.errors import UserError
from aevb.registry import SAMPLERS
from aevb.cli.params import (BATCH, CONTEXT, IW_SAMPLE_COUNT, MEMORY, PATH_POINTS, PICTURES, SEED, SIDE, GivenPath,
                             Group, RunCommand, SamplerCommand, device_option, finite, run_argument)

@click.group(cls=Group, context_settings=CONTEXT)
@click.version_option(package_name="aevb", prog_name="aevb")
def cli():
    """Train, evaluate and explore autoencoders and variational autoencoders.

    \b
    Quick start:
      aevb train                         # a VAE on the bundled 8x8 digits
      aevb eval runs/vae-digits          # test ELBO, log-likelihood, bits/dim
      aevb sample runs/vae-digits -n 64  # a grid of samples

    Every number is a log-probability in nats per example.
    """


# ---------------------------------------------------------------------------
# aevb train


@cli.command(cls=RunCommand, context_settings=CONTEXT)
@click.option("--config", "config_file", type=GivenPath(dir_okay=False), help="TOML or JSON file of options (e.g. RUN/config.json); flags override it")
@click.option("--resume", type=GivenPath(file_okay=False), metavar="RUN|auto", help="continue RUN from its last checkpoint (--epochs/--steps may be raised); auto: continue --out where it has a checkpoint and start it where not, so the same command can be run again after a crash (torchrun --max-restarts restarts it in every worker): a run started with other options is refused, a finished one left as it is (a folder named auto: ./auto)")
@click.option("--force", is_flag=True, help="reuse an existing --out folder: first deletes the run there (its config, metrics, checkpoints, model and pictures; files of yours stay)")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar and no per-epoch lines (metrics.jsonl still has every record)")
def train(config_file, resume, force, quiet, **flags):
    """Train a model and write a run folder.

    \b
    Examples:
      aevb train                                    # VAE on digits, 10 epochs
      aevb train --data ../shared/data/mnist/t10k-images-idx3-ubyte.gz \\
          --labels ../shared/data/mnist/t10k-labels-idx1-ubyte.gz --test-split 2000 \\
          --likelihood bernoulli --latent-dim 20 --hidden 400 --epochs 10 --out runs/mnist
      aevb train --data pictures/ --arch conv --likelihood gaussian-learned --dequantize
      aevb train --data table.csv --likelihood gaussian-diag --latent-dim 4
      aevb train --model iwae --k 50 --binarize dynamic
      aevb train --config runs/mnist/config.json --out runs/mnist-again   # reproduce
      aevb train --resume runs/mnist --epochs 20                           # continue
      aevb train --out runs/x --checkpoint-every 100 --resume auto         # start, or continue after a crash
    """
    given = {k: v for k, v in flags.items() if v is not None}
    auto = resume == "auto"
    if resume and force:
        raise UserError("--force makes a new run over an old one; --resume continues a run: drop one of them")
    if resume and not auto:
        from aevb.run.checkpoints import RESUMABLE as resumable
        from aevb.run.folder import PATH_OPTIONS, resolved_path
        from aevb.run.open import open_run

        config = open_run(resume).config

        def same(name, value) -> bool:
            ours, theirs = coerce(name, value), getattr(config, name)
            return resolved_path(ours) == resolved_path(theirs) if name in PATH_OPTIONS else ours == theirs

        changed = sorted(k for k, v in given.items() if k not in resumable and not same(k, v))
        if changed or config_file:
            raise UserError(f"--resume continues a run as it was configured; only "
                            f"{', '.join('--' + flag(k) for k in resumable)} may change "
                            f"(got {', '.join('--' + flag(k) for k in changed) or '--config'})")
        updates = {k: v for k, v in given.items() if k in resumable}
        if "epochs" in updates and "steps" not in updates:
            updates["steps"] = None  # --steps overrides --epochs: a new --epochs alone must count
        config = make_config(config.values(), **updates)
    else:
        file_values = read_config_file(config_file, template=True) if config_file else {}
        config = make_config(file_values, **given)

    click.get_current_context().meta[MEMORY] = memory_options(config)  # named if the run runs out of memory
    from aevb.training.loop import train as run_training

    model, run_dir = run_training(config, resume=resume, force=force, progress=not quiet)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
        click.echo(f"run folder: {run_dir}  (model in {run_dir}/model, pictures in {run_dir}/images)")


# ---------------------------------------------------------------------------
# commands on a run folder


@cli.command(name="eval", context_settings=CONTEXT, memory=("iw_samples", "batch_size", "quality_samples"))
@run_argument
@click.option("--iw-samples", "-k", type=IW_SAMPLE_COUNT, default=IW_SAMPLES, show_default=True, help="importance samples per test example for log p(x) (an eval.json of the same weights with more is kept)")
@click.option("--batch-size", type=BATCH, default=500, show_default=True, help="test examples per batch")
@click.option("--seed", type=SEED, default=0, show_default=True, help="seed of the Monte Carlo estimates")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="multiplies of the importance sampler: bf16 decodes the k samples about 2× faster where the "
                   "device has bf16 matrix units; against fp32 it moved each example's log p(x) by a few "
                   "thousandths of a nat on the 8×8 digits, by 0.03 on average (at most 0.16) on MNIST, and the "
                   "test mean by 0.004, less than other samples would; auto: bf16 where it is faster (AMX CPUs, other CPUs where a bf16 "
                   "multiply measures 1.5× faster, Ampere+ GPUs), else "
                   "fp32; bf16: wherever bf16 is native. The ELBO and all other metrics are float32")
@click.option("--quality/--no-quality", default=None,
              help="sample quality: Fréchet distance, KID, precision, recall, density and coverage of the model's "
                   "samples against the test split, and of the training split (the floor)  [default: where the "
                   "model can sample and the data have labels or --features is given]")
@click.option("--quality-samples", type=click.IntRange(20, 2**14), default=2000, show_default=True,
              help="samples drawn and test examples compared for the sample quality (at most the test split; "
                   "precision and recall hold three N × N distance matrices: 16,384 takes about 3 GB)")
@click.option("--features", metavar="PACKAGE.MODULE:BUILD",
              help="the feature network of the sample quality: build(data_shape) returns a torch.nn.Module from "
                   "x [B, *data_shape] to features [B, F]  [default: a classifier trained on the labelled "
                   "training split, cached in ~/.cache/aevb/classifiers]")
@click.option("--factor-examples", type=click.IntRange(min=10), default=10_000, show_default=True, metavar="N",
              help="test examples on which the disentanglement scores are computed, for data with known factors (shapes)")
@device_option
def eval_command(run, iw_samples, batch_size, seed, precision, quality, quality_samples, features, device,
                 factor_examples):
    """Evaluate a run on its test split; print a table and write RUN/eval.json.

    \b
    Reports the negative ELBO and its terms, the importance-sampled negative
    log-likelihood with k samples, bits per dimension for 8-bit or binary
    image data, reconstruction error, KL per latent dimension and active units,
    and the quality of the model's samples against the test split; on data
    with known factors of variation (shapes), the disentanglement scores of
    Locatello et al. (2019).

    \b
    Examples:
      aevb eval runs/vae-digits
      aevb eval runs/mnist --iw-samples 1000
      aevb eval runs/mnist --precision fp32     # float32 importance sampler
      aevb eval runs/mnist --quality-samples 5000 --features my_pkg.nets:features
    """
    from aevb.analysis.evaluation import Shard, evaluate_run
    from aevb.run.device import resolve_device
    from aevb.training import distributed

    # under torchrun the workers share the test set (aevb.analysis.evaluation.Shard); rank 0 shows and writes
    chosen = resolve_device(device)
    workers = distributed.start(chosen)  # one worker unless torchrun started this process
    try:
        shard = Shard(workers.rank, workers.world_size, lambda value: distributed.gathered(workers, value))
        metrics = evaluate_run(run, iw_samples=iw_samples, batch_size=batch_size, seed=seed,
                               device=distributed.worker_device(chosen, workers), progress=workers.writes,
                               precision=precision, write=False, shard=shard, factor_examples=factor_examples,
                               quality=quality, quality_samples=quality_samples, features=features,
                               echo=click.echo if workers.writes else None)
        if workers.writes:
            _show_evaluation(run, metrics, iw_samples)
        distributed.barrier(workers)  # rank 0 writes eval.json while the others wait in the group
    finally:
        distributed.stop(workers)


def _show_evaluation(run: str, metrics: dict, iw_samples: int) -> None:
    """The table of ``aevb eval``, then RUN/eval.json written."""
    from aevb.analysis.evaluation import save_evaluation

    # eval.json is written after the table is shown: a run folder one may not write to (or that another
    # process is writing) still gets the figures
    click.echo(format_metrics(metrics))
    for table in (format_diagnostics(metrics), format_quality(metrics)):
        if table:
            click.echo(table)
    if metrics.get("sample_quality_note"):
        click.echo(f"note: {metrics['sample_quality_note']}")
    if metrics.get("collapse_warning"):
        click.echo(f"warning: {metrics['collapse_warning']}", err=True)
    if metrics.get("likelihood_note"):
        click.echo(f"note: {metrics['likelihood_note']}")
    kept = save_evaluation(Path(run), metrics)  # owning the run folder while it writes
    if kept is None:
        click.echo(f"written: {Path(run) / 'eval.json'}")
    else:
        click.echo(f"kept: {Path(run) / 'eval.json'}, an evaluation of the same weights with k = "
                   f"{kept['iw_samples']} importance samples, more precise than k = {iw_samples}")


@cli.command(context_settings=CONTEXT, memory=("n",))
@run_argument
@click.option("-n", "n", type=PICTURES, default=64, show_default=True, help="number of samples")
@click.option("--sampler", type=click.Choice(SAMPLERS.names()), help="where the codes z come from: the model's prior, or a density fitted to the posterior means of the training split (gmm: a Gaussian mixture; flow: a normalising flow; autoregressive: a transformer over a VQ-VAE's code indices), fitted and saved in RUN/samplers/ on first use; 'aevb fit-sampler' fits one with other options  [default: the model's: prior; autoregressive for vq-vae, gmm for rae]")
@click.option("--temperature", type=click.FloatRange(min=0), default=1.0, show_default=True, callback=finite, help="the sampler's spread: z ~ N(0, T² I) from the standard prior, each component's covariance T²Σ for gmm, the flow's base N(0, T² I); 0 gives the modes")
@click.option("--seed", type=SEED, default=0, show_default=True, help="seed of the draws: the same seed, the same samples")
@click.option("--format", "file_format", type=click.Choice(["png", "npy", "csv"]), help="png: a grid of images; npy: the samples [n, *data_shape]; csv: a table's rows under its column names. A table's samples are in the units of its file  [default: png for images, csv for tables, or the suffix of --out]")
@click.option("--out", "-o", type=GivenPath(dir_okay=False), help="file to write [default: RUN/images/samples-T<temperature>.png, or RUN/samples-T<temperature>.npy/.csv; samples-<sampler>-T<temperature> for a fitted sampler; with --label K, ending -label<K>]")
@click.option("--label", type=click.IntRange(min=0), metavar="K", help="a conditional model (--conditional): draw every sample of class K, from p(x|z, y = K) [default: each sample's class drawn uniformly]")
@device_option
def sample(run, n, sampler, temperature, seed, file_format, out, label, device):
    """Draw samples: a PNG grid of the decoder means, or the samples as a .npy or .csv file.

    \b
    The codes come from the prior, or from a sampler fitted to the codes of
    the training split (the way to sample a plain autoencoder, and samples
    from where a VAE's decoder was trained).

    \b
    A conditional model (trained with --conditional) draws them of the class
    --label K, or, without --label, each of a class drawn uniformly.

    \b
    Examples:
      aevb sample runs/vae-digits -n 64
      aevb sample runs/mnist --temperature 0.7 -o samples.png
      aevb sample runs/ae-digits --sampler gmm             # fitted on first use, kept in RUN/samplers/
      aevb sample runs/vq-digits                           # a VQ-VAE: its autoregressive code prior
      aevb sample runs/mnist -n 1000 --format npy          # [1000, 1, 28, 28]
      aevb sample runs/table -n 500 -o synthetic.csv       # rows in the CSV's units, under its header
      aevb sample runs/cvae-digits --label 3               # a conditional model: 64 threes
    """
    import torch

    from aevb.run.open import open_run
    from aevb.run.owner import owning_if_in_run
    from aevb.sampling.fitted import draw

    opened = open_run(run, device)
    model = opened.model
    click.echo(f"model: {opened.provenance}")
    sampler = sampler or model.default_sampler
    if label is not None and not model.conditional:
        raise UserError(f"--label draws samples of one class from a conditional model, and the model of {run} is not "
                        f"one; drop --label, or train with --conditional")
    if label is not None and label >= model.n_classes:
        raise UserError(f"--label {label} is out of range: the model of {run} knows {model.n_classes} classes, "
                        f"0 … {model.n_classes - 1}")
    if model.conditional and sampler != "prior":
        raise UserError(f"the model of {run} is conditional: it samples its prior given a class (--label K); the "
                        f"samplers fitted to codes are for unconditional models: drop --sampler {sampler}")
    if file_format is None:  # from --out's suffix (a figure's where it names none of the three), or the data's kind
        suffix = Path(out).suffix.lstrip(".") if out else ""
        file_format = suffix if suffix in ("npy", "csv") else "png" if out or len(model.data_shape) == 3 else "csv"
    elif out and Path(out).suffix != f".{file_format}":
        raise UserError(f"--out {out} and --format {file_format} disagree; give the file the suffix .{file_format}")
    if file_format == "png":
        _require_images(model, "sample --format png")
    generator = torch.Generator(device=model.device).manual_seed(seed)
    if label is not None:  # a conditional model, one class
        samples = model.sample(n, generator=generator, temperature=temperature, label=label)  # [n, *data_shape]
    else:
        samples = draw(opened, sampler, n, generator, temperature, echo=click.echo)  # [n, *data_shape]
    name = f"samples-T{temperature:g}" if sampler == "prior" else f"samples-{sampler}-T{temperature:g}"
    name += "" if label is None else f"-label{label}"
    if file_format == "png":
        from aevb.analysis.grids import save_grid

        path = Path(out) if out else Path(run) / "images" / f"{name}.png"
        with owning_if_in_run(path, "aevb sample"):
            click.echo(f"written: {save_grid(samples, path)}")
        return
    from aevb.analysis.outputs import write_samples

    path = Path(out) if out else Path(run) / f"{name}.{file_format}"
    with owning_if_in_run(path, "aevb sample"):
        click.echo(f"written: {write_samples(opened, samples, path)}")


@cli.command(name="fit-sampler", cls=SamplerCommand, context_settings=CONTEXT)
@run_argument
@click.option("--sampler", type=click.Choice(SAMPLERS.names()), required=True, help="the sampler to fit: gmm (a Gaussian mixture), flow (a normalising flow) or autoregressive (a transformer over a VQ-VAE's code indices)")
@click.option("--seed", type=SEED, default=0, show_default=True, help="seed of the fit (initial values, the held-out codes)")
@device_option
def fit_sampler_command(run, sampler, seed, device, **flags):
    """Fit a sampler to the posterior means of the training split and keep it in RUN/samplers/.

    \b
    It replaces an earlier fit of that sampler; 'aevb sample --sampler NAME'
    and the report then use it.  Options of the sampler not given take their
    defaults (flags of the other samplers are refused).

    \b
    Examples:
      aevb fit-sampler runs/mnist --sampler gmm                  # components chosen by BIC
      aevb fit-sampler runs/mnist --sampler gmm --components 10 --covariance diag
      aevb fit-sampler runs/ae-mnist --sampler flow --transforms 4 --hidden-units 128,128
      aevb fit-sampler runs/vq-mnist --sampler autoregressive --layers 4 --width 256
    """
    from aevb.run.open import open_run
    from aevb.sampling.fitted import fit_sampler

    declared = {option.name: option for name in SAMPLERS.names() for option in SAMPLERS.options(name)}
    given = {name: declared[name].parse(value) for name, value in flags.items() if value is not None}
    opened = open_run(run, device)
    click.echo(f"model: {opened.provenance}")
    fitted, saved = fit_sampler(opened, sampler, given, seed=seed, echo=click.echo)
    for key, value in fitted.description.items():
        if key in ("chosen_components", "held_out_log_likelihood", "uniform_log_likelihood", "epochs_run",
                   "best_epoch"):
            click.echo(f"{key.replace('_', ' ')}: {value:.4g}" if isinstance(value, float) else
                       f"{key.replace('_', ' ')}: {value}")
    if saved is not None:
        click.echo(f"written: {saved}")


@cli.command(context_settings=CONTEXT)
@run_argument
@click.option("--out", "-o", type=click.Path(dir_okay=False), required=True, help="file to write: .npy (a structured array: mean, sigma, label), .csv, or .parquet (needs pyarrow)")
@click.option("--data", type=click.Path(exists=True), metavar="FILE|FOLDER", help="a data file or image folder of the run's kind, every example of it [default: the run's --split]")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False), metavar="FILE", help="labels of --data FILE, one per example")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True, help="the run's split to encode where --data is not given")
@click.option("--batch-size", type=click.IntRange(min=1), default=1000, show_default=True, help="examples per batch")
@device_option
def encode(run, out, data, labels, split, batch_size, device):
    """Write the codes of a data set: the posterior mean and σ of each example, and its label where there are labels.

    \b
    The data are prepared as in training (binarised, a table standardised
    with the training split's statistics); an autoencoder's σ is 0.

    \b
    Examples:
      aevb encode runs/vae-digits -o codes.npy                 # the test split
      aevb encode runs/mnist --split train -o train-codes.csv
      aevb encode runs/table --data new-rows.csv -o codes.csv
    """
    from aevb.analysis.outputs import encode_run
    from aevb.run.open import open_run

    if labels is not None and data is None:
        raise UserError("--labels go with --data FILE; drop --labels to encode the run's own split")
    path = encode_run(open_run(run, device), out, data=data, labels=labels, split=split, batch_size=batch_size)
    click.echo(f"written: {path}")


@cli.command(name="export", context_settings=CONTEXT)
@run_argument
@click.option("--out", "-o", type=click.Path(file_okay=False), help="folder to write [default: RUN/export]")
@click.option("--no-onnx", is_flag=True, help="write the torch.export programs only")
def export_command(run, out, no_onnx):
    """Write the encoder and decoder as torch.export programs and ONNX, each checked against the model.

    \b
    RUN/export/encoder.pt2, decoder.pt2      torch.export.load(path).module()(x)
    RUN/export/encoder.onnx, decoder.onnx    with the onnx extra: pip install 'aevb[onnx]'
    RUN/export/export.json                   what each takes and returns, and the check

    \b
    Example:
      aevb export runs/vae-digits
    """
    from aevb.analysis.export import export_model
    from aevb.run.open import open_run

    folder = Path(out) if out else Path(run) / "export"
    record = export_model(open_run(run, "cpu").model, folder, onnx=not no_onnx)
    for name in ("encoder", "decoder"):
        click.echo(f"written: {folder / record[name]['torch_export']['file']}")
        onnx = record[name]["onnx"]
        click.echo(f"written: {folder / onnx['file']}" if "file" in onnx else f"{name}.onnx: {onnx['skipped']}")
    click.echo(f"written: {folder / 'export.json'}")


@cli.command(context_settings=CONTEXT, memory=("n",))
@run_argument
@click.option("-n", "n", type=PICTURES, default=10, show_default=True, help="test images (one per class where labels exist); for a table, its first n test rows")
@click.option("--out", "-o", type=GivenPath(dir_okay=False), help="PNG to write [default: RUN/images/reconstructions.png]; for a table, a .csv or .npy file of the test rows and their reconstructions in the file's units [default: RUN/reconstructions.csv]")
@device_option
def reconstruct(run, n, out, device):
    """Write test images (top row) above their reconstructions (bottom row); for a table, the test rows and
    their reconstructions in the units of its file.

    \b
    Examples:
      aevb reconstruct runs/vae-digits -n 10
      aevb reconstruct runs/table -n 100 -o reconstructions.csv
    """
    from aevb.analysis.outputs import conditioning_labels
    from aevb.data.transforms import holdout_indices
    from aevb.run.open import open_run
    from aevb.run.owner import owning_if_in_run

    opened = open_run(run, device)
    model = opened.model
    click.echo(f"model: {opened.provenance}")
    x, y = opened.held_out("test")
    opened.check_data_shape(x)
    given = conditioning_labels(model, y, "aevb reconstruct")  # the labels a conditional model reconstructs with
    if len(model.data_shape) != 3:
        from aevb.analysis.outputs import write_reconstructions

        path = Path(out) if out else Path(run) / "reconstructions.csv"
        with owning_if_in_run(path, "aevb reconstruct"):
            click.echo(f"written: {write_reconstructions(opened, x[:n], path, None if given is None else given[:n])}")
        return
    from aevb.analysis.grids import reconstruction_grid

    shown = holdout_indices(y, n, num_examples=len(x))
    x = x[shown].to(model.device)
    path = Path(out) if out else Path(run) / "images" / "reconstructions.png"
    with owning_if_in_run(path, "aevb reconstruct"):
        click.echo(f"written: {reconstruction_grid(model, x, path, None if given is None else given[shown])}")


def _require_images(model, command: str) -> None:
    if len(model.data_shape) != 3:
        raise UserError(f"'aevb {command}' draws pictures, but this model's data are rows of "
                        f"{model.data_shape[0]} numbers, not images")


@cli.command(context_settings=CONTEXT, memory=("pairs", "steps"))
@run_argument
@click.option("--pairs", type=PICTURES, default=4, show_default=True, help="pairs of test images (of different classes where labels exist)")
@click.option("--steps", type=PATH_POINTS, default=10, show_default=True, help="points on each path, ends included")
@click.option("--out", "-o", type=GivenPath(dir_okay=False), help="PNG to write [default: RUN/images/interpolations.png]")
@device_option
def interpolate(run, pairs, steps, out, device):
    """Decode linear and spherical paths between the posterior means of test image pairs.

    \b
    Each pair is two rows, linear and slerp, with the inputs at the ends;
    t = 0 and t = 1 are exactly the reconstructions of the inputs.

    \b
    Examples:
      aevb interpolate runs/vae-digits
      aevb interpolate runs/mnist --pairs 6 --steps 12 -o interpolations.png
    """
    from aevb.data.transforms import holdout_indices
    from aevb.analysis.figures import interpolation
    from aevb.run.open import open_run
    from aevb.run.owner import owning_if_in_run

    opened = open_run(run, device)
    model = opened.model
    click.echo(f"model: {opened.provenance}")
    _require_images(model, "interpolate")
    if model.conditional:
        raise UserError("'aevb interpolate' decodes paths between codes without a label, and this model is conditional "
                        "on one; draw its classes with 'aevb sample RUN --label K' or 'aevb explore' (class-samples.png)")
    x, y = opened.held_out("test")
    chosen = holdout_indices(y, 2 * pairs, num_examples=len(x))
    if len(chosen) < 2:
        raise UserError(f"{run} has fewer than two test images to interpolate between")
    chosen = chosen[: len(chosen) // 2 * 2]
    x = x[chosen].to(model.device)
    path = Path(out) if out else Path(run) / "images" / "interpolations.png"
    with owning_if_in_run(path, "aevb interpolate"):
        interpolation(model, x[0::2], x[1::2], path, steps=steps)
    click.echo(f"written: {path}")


@cli.command(context_settings=CONTEXT, memory=("grid_size", "pairs", "top_dims"))
@run_argument
@click.option("--grid-range", type=click.FloatRange(min=0, min_open=True), metavar="R", callback=finite, help="half-width of the latent grid in latent units [default: 2 for coords, 2 standard deviations of the projected posterior means for pca]")
@click.option("--directions", type=click.Choice(["auto", "coords", "pca"]), default="auto", show_default=True, help="plane of the latent grid and scatter plot: z1,z2 (coords), the first two principal components of the posterior means (pca), or coords for a 2-D latent space or a single test example and pca otherwise (auto)")
@click.option("-n", "grid_size", type=SIDE, default=15, show_default=True, help="latent grid points per side")
@click.option("--pairs", type=PICTURES, default=4, show_default=True, help="interpolated pairs of test images")
@click.option("--top-dims", type=PICTURES, default=10, show_default=True, help="latent dimensions traversed (largest KL first)")
@click.option("--seed", type=SEED, default=0, show_default=True, help="seed of every random draw of the figures (prior samples, the images shown)")
@device_option
def explore(run, grid_range, directions, grid_size, pairs, top_dims, seed, device):
    """Write every figure of a run into RUN/images/ and print their paths.

    \b
    Training curves, reconstructions, prior samples at temperature 1 and 0.5,
    linear and spherical interpolations, the posterior means of the test set
    as a scatter plot, the decoder over a latent grid (other coordinates at
    the mean of the posterior means), traversals of the dimensions with the
    largest KL, and for Gaussian and Laplace likelihoods the plots that
    explain the choice of likelihood.  Figures of images are skipped for
    tabular data.

    \b
    Examples:
      aevb explore runs/vae-digits
      aevb explore runs/mnist --directions pca --grid-range 3 -n 20
    """
    from aevb.analysis.report import explore_run

    written, skipped = explore_run(run, grid_range=grid_range, directions=directions, grid_size=grid_size,
                                   pairs=pairs, top_dims=top_dims, device=device, seed=seed, echo=click.echo)
    for name, reason in skipped.items():
        click.echo(f"skipped {name}: {reason}")
    for path in written:
        click.echo(f"written: {path}")


@cli.command(context_settings=CONTEXT, memory=("iw_samples",))
@run_argument
@click.option("--iw-samples", "-k", type=IW_SAMPLE_COUNT, default=IW_SAMPLES, show_default=True, help="importance samples for the evaluation, if the run has no eval.json of its weights yet")
@click.option("--out", "-o", type=GivenPath(dir_okay=False), help="HTML file to write [default: RUN/report.html]")
@device_option
def report(run, iw_samples, out, device):
    """Write RUN/report.html: configuration, evaluation, curves and every figure, in one file.

    \b
    The page is self-contained (images embedded, no script, nothing fetched),
    readable on a phone and printable.  A run without eval.json is evaluated
    first (with -k importance samples) and missing figures are drawn as by
    'aevb explore'.

    \b
    Examples:
      aevb report runs/vae-digits
      aevb report runs/mnist -k 5000 -o mnist.html
    """
    from aevb.analysis.report import write_report

    path = write_report(run, iw_samples=iw_samples, device=device, out=out, echo=click.echo)
    click.echo(f"written: {path}")


@cli.command(context_settings=CONTEXT)
@run_argument
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True, help="TCP port to listen on; 0: a free one, printed with the address")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on; 127.0.0.1 keeps the explorer on this machine")
@device_option
def serve(run, port, host, device):
    """Explore RUN's latent space in the browser, until Ctrl-C.

    \b
    A local web page: the test set's codes in a plane (coloured by label,
    each showing its image on hover); click anywhere to decode that point,
    move a slider for any latent dimension, interpolate between two points
    (linear and spherical), draw from the prior.  The model runs in this
    process; the page fetches nothing from the internet.  Needs
    pip install 'aevb[serve]'.

    \b
    Examples:
      aevb serve runs/vae-digits              # prints http://127.0.0.1:PORT/
      aevb serve runs/mnist --port 8000
    """
    try:  # the web stack is an extra: say how to get it rather than fail on an import
        from aevb.serve.server import serve_run
    except ModuleNotFoundError as error:
        raise UserError(f"aevb serve needs {error.name}: pip install 'aevb[serve]'") from None

    serve_run(run, host=host, port=port, device=device, echo=click.echo)


# ---------------------------------------------------------------------------


# how torch, its C++ allocators and the devices' runtimes say that an allocation failed
def _notice(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one 'note:' line on stderr, without the source line Python shows."""
    click.echo(f"note: {message}", err=True)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    with warnings.catch_warnings():
        warnings.showwarning = _notice
        _run(args)


def _run(args: list[str]) -> None:
    try:
        result = cli.main(args=args, prog_name="aevb", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:  # `aevb` alone: show the help
        click.echo(e.ctx.get_help() if e.ctx else "")
        sys.exit(0)
    except click.exceptions.Abort:
        click.echo("error: interrupted (Ctrl-C); nothing was finished", err=True)
        sys.exit(130)
    except click.ClickException as e:
        command = " ".join(["aevb", *(e.ctx.command_path.split()[1:] if getattr(e, "ctx", None) else [])])
        click.echo(f"error: {e.format_message()} (see '{command} --help')", err=True)
        sys.exit(2)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except OSError as e:  # a folder that cannot be made or read: files are written through io.atomic_write
        where = f"{e.filename}: " if e.filename else ""
        click.echo(f"error: {where}{e.strerror or e}; check that the path is right, that you may write there, "
                   f"and that the disk has space", err=True)
        sys.exit(UserError.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except (RuntimeError, MemoryError) as e:  # outside a command (each command names its own options)
        if not out_of_memory(e):
            raise
        click.echo(f"error: {memory_message(e, [])}", err=True)
        sys.exit(UserError.exit_code)
    sys.exit(result if isinstance(result, int) else 0)
