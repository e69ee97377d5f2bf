"""What the commands print: the evaluation table, its diagnostics, and the one line for running out of memory."""

from __future__ import annotations

import sys


def format_metrics(metrics: dict) -> str:
    weights = {"model": "exported model", "checkpoint": "last checkpoint (unfinished run)"}.get(metrics.get("weights"), "")
    rows = [
        ("training step of the weights", metrics.get("step"), weights),
        ("test examples", metrics.get("examples"), ""),
        ("negative ELBO", metrics.get("neg_elbo"), "nats"),
        ("  reconstruction −E[log p(x|z)]", metrics.get("reconstruction_nll"), "nats"),
        ("  KL(q(z|x) ‖ p(z))", metrics.get("kl"), "nats"),
        (f"negative log-likelihood (k={metrics.get('iw_samples')}"
         f"{', bf16' if metrics.get('iw_precision') == 'bf16' else ''})", metrics.get("nll"), "nats"),
        ("ELBO gap", metrics.get("elbo_gap"), "nats"),
        ("bits per dimension", metrics.get("bits_per_dim"), "bits"),
        ("reconstruction MSE per dim", metrics.get("mse_per_dim"), ""),
        ("active units", metrics.get("active_units"), f"of {metrics.get('latent_dim')}"),
        ("mean posterior μ / σ", f"{metrics['posterior_mu']:.3f} / {metrics['posterior_sigma']:.3f}", ""),
        ("codebook entries used (vq-vae)", metrics.get("codebook_usage"), f"of all {metrics.get('codebook_size')}"),
        ("codebook perplexity", metrics.get("codebook_perplexity"), "entries in effective use"),
        ("mutual information I(x; z)", metrics.get("mutual_information"),
         f"nats (≤ log {metrics.get('aggregate_posterior_examples')}: over that many test examples)"),
        ("KL(q(z) ‖ p(z)), aggregate posterior", metrics.get("aggregate_kl"), "nats"),
        ("total correlation of q(z)", metrics.get("total_correlation"), "nats: KL(q(z) ‖ Π_d q(z_d))"),
    ]
    # hierarchical models: one KL term and one active-unit count per stochastic layer
    for layer, (kl, active) in enumerate(zip(metrics.get("kl_per_layer") or [],
                                             metrics.get("active_units_per_layer") or []), start=1):
        rows.append((f"  layer z{layer}: KL / active units", f"{kl:.3f} / {active}", "nats / units"))
    lines = []
    for name, value, unit in rows:
        if value is None or (name.startswith("negative log") and "nll" not in metrics):
            continue
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(f"{name:<40} {text:>12} {unit}")
    if metrics.get("conditional_note"):
        lines.append(f"conditional model ({metrics.get('n_classes')} classes): {metrics['conditional_note']}")
    return "\n".join(lines)


def format_diagnostics(metrics: dict) -> str:
    """Representation accuracy and the per-class table of ``evaluate`` (empty without labels)."""
    lines = []
    if metrics.get("representation_accuracy") is not None:
        lines.append(f"{'classifier accuracy on posterior means':<40} {metrics['representation_accuracy']:>12.3f} "
                     f"logistic regression")
        lines.append(f"{'':<40} {metrics['representation_knn_accuracy']:>12.3f} 5-nearest neighbours")
        lines.append(f"{'':<40} {metrics['chance_accuracy']:>12.3f} chance (most common label)")
    scores = metrics.get("disentanglement")
    if scores:
        lines.append("")
        lines.append(f"disentanglement against the factors {', '.join(scores['factors'])} "
                     f"({scores['examples']} test examples; 0 worst, 1 best):")
        for key, name in (("beta_vae_score", "β-VAE score (chance 1/K)"), ("factor_vae_score", "FactorVAE score (chance 1/K)"),
                          ("mig", "mutual information gap"), ("dci_disentanglement", "DCI disentanglement"),
                          ("dci_completeness", "DCI completeness"), ("dci_informativeness", "DCI informativeness"),
                          ("sap", "SAP")):
            lines.append(f"  {name:<38} {scores[key]:>12.3f}")
    per_class = metrics.get("per_class")
    if per_class:
        keys = [k for k in ("reconstruction_nll", "neg_elbo", "nll") if k in per_class[0]]
        names = {"reconstruction_nll": "reconstruction", "neg_elbo": "−ELBO", "nll": "NLL"}
        lines.append("")
        lines.append(f"{'per class (nats)':<16} {'examples':>8}" + "".join(f" {names[k]:>14}" for k in keys))
        for row in per_class:
            label = str(row.get("class", row["label"]))[:16]
            lines.append(f"{label:<16} {row['examples']:>8}" + "".join(f" {row[k]:>14.3f}" for k in keys))
    return "\n".join(lines)


def format_quality(metrics: dict) -> str:
    """The sample-quality table of ``evaluate_run``: the floor and each sampler (empty where not measured)."""
    quality = metrics.get("sample_quality")
    if not quality:
        return ""
    accuracy = quality.get("classifier_accuracy")
    lines = ["", f"sample quality: {quality['examples']} samples against {quality['examples']} test examples, "
                 f"features of the {quality['features']}"
                 + (f", test accuracy {accuracy:.3f}" if accuracy is not None else ""),
             f"{'':<22} {'Fréchet':>9} {'KID ± s.e.':>17} {'precision':>9} {'recall':>7} {'density':>7} "
             f"{'coverage':>8}"]
    rows = ([("floor (training split)", quality["floor"])] if quality.get("floor") else []) + \
        list(quality["samplers"].items())
    for name, row in rows:
        kid = f"{row['kid']:.4f} ± {row['kid_standard_error']:.4f}"
        lines.append(f"{name[:22]:<22} {row['frechet_distance']:>9.3f} {kid:>17} {row['precision']:>9.3f} "
                     f"{row['recall']:>7.3f} {row['density']:>7.3f} {row['coverage']:>8.3f}")
    return "\n".join(lines)


_OUT_OF_MEMORY = ("can't allocate memory", "out of memory", "std::bad_alloc", "bad_alloc", "Cannot allocate memory")


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` reports an allocation that failed (Python's, torch's on the CPU or a GPU, C++'s)."""
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")  # loaded by whatever ran out of memory; --help does not load it
    if torch is not None and isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(words in str(error) for words in _OUT_OF_MEMORY)


def memory_message(error: BaseException, asked: list[str]) -> str:
    """One line: what could not be allocated, and the options (``--k 5000``) that asked for it."""
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    detail = detail.split("DefaultCPUAllocator: ")[-1]
    fix = f"ask for less: a smaller {', '.join(asked)}" if asked else "free memory, or use a machine with more"
    return f"not enough memory ({detail}); {fix}"
