"""A run's networks as files that other programs run: ``torch.export`` programs and ONNX (``aevb export RUN``).

    RUN/export/encoder.pt2, decoder.pt2     torch.export programs (torch.export.load(path).module())
    RUN/export/encoder.onnx, decoder.onnx   ONNX, where the optional onnx extra is installed
    RUN/export/export.json                  what each file takes and returns, and how closely it matched

The encoder maps x [B, *data_shape] to the parameters of q(z|x) [B, k·D], the
decoder z [B, D] to those of p(x|z) [B, k·C, *data_shape[1:]] (the
distributions' own code, :mod:`aevb.model.posteriors` and
:mod:`aevb.model.likelihoods`, says what the k parameters are); the batch
size is free.  Each file is checked by running it, loaded back, on a batch of
another size than the one it was traced with and comparing with the model.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aevb.errors import UserError
from aevb.io import write_json
from aevb.model.base import Model

ONNX_PACKAGES = ("onnxscript", "onnxruntime")  # the onnx extra: the exporter and a runtime to check the files with
ONNX_MISSING = "ONNX needs the onnx extra (pip install 'aevb[onnx]': onnxscript and onnxruntime); skipped"
TOLERANCE = 1e-4  # of the largest output value: float32 kernels of another library sum in another order


def export_model(model: Model, out: str | Path, *, onnx: bool = True, seed: int = 0) -> dict[str, Any]:
    """Write the model's encoder and decoder to ``out`` (see the module's docstring); the record of export.json."""
    if model.conditional:  # before any file is written
        raise UserError("aevb export writes networks that take x and z alone, and this model is conditional: its "
                        "networks also take the one-hot label (aevb.model.conditioning); use it through aevb.load")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.float().eval().cpu()
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(8, model.latent_dim, generator=generator)  # [8, D]
    with torch.no_grad():
        x = model.decode(z).mean  # [8, *data_shape]: examples of the model's own, so no data are needed
    record: dict[str, Any] = {"data_shape": list(model.data_shape), "latent_dim": model.latent_dim,
                              "posterior": model.posterior_family, "likelihood": model.config["likelihood"],
                              "model": model.config}
    onnx_missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    for name, network, inputs, meaning in (
            ("encoder", model.encoder, x, f"x [B, {', '.join(map(str, model.data_shape))}] → the posterior's "
                                          f"parameters [B, {model.encoder_outputs}]"),
            ("decoder", model.decoder, z, f"z [B, {model.latent_dim}] → the likelihood's parameters "
                                          f"[B, {', '.join(map(str, model.decoder_shape))}]")):
        entry: dict[str, Any] = {"maps": meaning}
        entry["torch_export"] = _torch_export(network, inputs, out / f"{name}.pt2")
        if not onnx:
            entry["onnx"] = {"skipped": "not asked for"}
        elif onnx_missing:
            entry["onnx"] = {"skipped": ONNX_MISSING}
        else:
            entry["onnx"] = _onnx_export(network, inputs, out / f"{name}.onnx")
        record[name] = entry
    write_json(out / "export.json", record)
    return record


def _torch_export(network: nn.Module, inputs: torch.Tensor, path: Path) -> dict[str, Any]:
    """``network`` as a torch.export program with a free batch size, saved to ``path`` and checked loaded back."""
    batch = torch.export.Dim("batch")
    try:
        program = torch.export.export(network, (inputs,), dynamic_shapes=({0: batch},))
    except Exception as e:  # torch.export's failures are of many types; each names what it could not trace
        raise UserError(f"torch.export cannot trace the {path.stem} ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); a network of your own must "
                        f"be traceable by torch.export") from None
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    check = inputs[:5]  # another batch size than the traced one
    return {"file": path.name, **_compared(loaded(check), network(check), path)}


def _onnx_export(network: nn.Module, inputs: torch.Tensor, path: Path) -> dict[str, Any]:
    """``network`` as ONNX (torch's dynamo exporter, onnxscript) with a free batch size, checked with onnxruntime."""
    onnxruntime = importlib.import_module("onnxruntime")  # optional: the onnx extra
    batch = torch.export.Dim("batch")
    torch.onnx.export(network, (inputs,), str(path), dynamo=True, dynamic_shapes=({0: batch},),
                      input_names=["input"], output_names=["params"], verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check = inputs[:5]
    (got,) = session.run(None, {session.get_inputs()[0].name: check.numpy()})
    return {"file": path.name, **_compared(torch.from_numpy(got), network(check), path)}


def _compared(got: torch.Tensor, expected: torch.Tensor, path: Path) -> dict[str, Any]:
    """How far the exported file's output is from the model's; a UserError past :data:`TOLERANCE`."""
    with torch.no_grad():
        difference = float((got - expected).abs().max()) if got.shape == expected.shape else float("inf")
        scale = float(expected.abs().max()) + 1
    if not difference <= TOLERANCE * scale:
        raise UserError(f"{path} does not compute what the model does (largest difference {difference:.3g} on a "
                        f"batch of {len(expected)}); report it with the run's config.json")
    return {"checked_batch": len(expected), "max_abs_difference": difference}
