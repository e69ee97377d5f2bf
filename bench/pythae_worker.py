"""Setup (c): pythae's ``VAE`` trained by its ``BaseTrainer``, run in ``bench/.venv-pythae``.

Called by ``bench/run.py`` as

    bench/.venv-pythae/bin/python bench/pythae_worker.py --worker pythae_train --params '{…}' --result OUT.json

The encoder and decoder are the same layer stacks as aevb's and the
hand-written model (pythae's default MLP is 784-512-D, so it is replaced);
the decoder ends in a sigmoid because pythae's ``bce`` loss takes
probabilities.  Everything else is pythae's own: its dataset wrapper and
DataLoader collation, its trainer (a ``loss.item()`` per step, an
evaluation and a deep copy of the best model per epoch), its ``get_nll``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pythae.data.datasets import BaseDataset  # noqa: E402
from pythae.models import VAE, VAEConfig  # noqa: E402
from pythae.models.base.base_utils import ModelOutput  # noqa: E402
from pythae.models.nn import BaseDecoder, BaseEncoder  # noqa: E402
from pythae.trainers import BaseTrainer, BaseTrainerConfig  # noqa: E402

from common import LATENT, copy_aevb_weights, load_mnist, make_plain, peak_rss_mb, sync  # noqa: E402

logging.getLogger("pythae").setLevel(logging.WARNING)
logging.getLogger("pythae.trainers.base_trainer.base_trainer").setLevel(logging.WARNING)


class Encoder(BaseEncoder):
    def __init__(self, body):
        BaseEncoder.__init__(self)
        self.body = body

    def forward(self, x):
        mu, logvar = self.body.encode(x)
        return ModelOutput(embedding=mu, log_covariance=logvar)


class Decoder(BaseDecoder):
    def __init__(self, body):
        BaseDecoder.__init__(self)
        self.body = body

    def forward(self, z):
        return ModelOutput(reconstruction=torch.sigmoid(self.body.decode(z)).view(-1, 1, 28, 28))


def build(arch: str) -> VAE:
    body = make_plain(arch)  # one module holds both halves' weights, split by the two wrappers
    config = VAEConfig(input_dim=(1, 28, 28), latent_dim=LATENT, reconstruction_loss="bce")
    return VAE(config, encoder=Encoder(body), decoder=Decoder(body))


@torch.no_grad()
def neg_elbo(model: VAE, x: torch.Tensor, batch_size: int = 1000) -> float:
    """Mean one-sample negative ELBO over x with pythae's own loss, in eval mode."""
    was = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size]
        total += float(model({"data": xb}).loss) * len(xb)
    model.train(was)
    return total / len(x)


def pythae_train(arch="mlp", max_epochs=10, min_epochs=10, target=None, device="cpu", n_train=8000,
                 lr=1e-3, batch_size=128):
    torch.manual_seed(0)
    x_train, x_test = load_mnist(n_train)
    x_test_dev = x_test.to(device)
    model = build(arch)
    tmp = tempfile.mkdtemp(prefix="pythae-bench-")
    config = BaseTrainerConfig(output_dir=tmp, learning_rate=lr, per_device_train_batch_size=batch_size,
                               per_device_eval_batch_size=1000, num_epochs=max_epochs, optimizer_cls="Adam",
                               no_cuda=(device != "cuda"), seed=0)
    trainer = BaseTrainer(model, train_dataset=BaseDataset(x_train, torch.zeros(len(x_train))),
                          eval_dataset=BaseDataset(x_test, torch.zeros(len(x_test))), training_config=config)
    state = {"t0": None, "excluded": 0.0, "epochs": [], "rates": []}
    train_step, eval_step = trainer.train_step, trainer.eval_step

    def timed_train_step(epoch):
        if state["t0"] is None:
            state["t0"] = time.perf_counter()
        sync(device)
        start = time.perf_counter()
        loss = train_step(epoch)
        sync(device)
        end = time.perf_counter()
        state["rates"].append(n_train / (end - start))
        value = neg_elbo(trainer.model, x_test_dev)
        state["epochs"].append({"epoch": epoch, "wall_s": end - state["t0"] - state["excluded"], "neg_elbo": value})
        state["excluded"] += time.perf_counter() - end
        return loss

    class Stop(Exception):
        pass

    def timed_eval_step(epoch):
        start = time.perf_counter()
        loss = eval_step(epoch)
        state["excluded"] += time.perf_counter() - start
        done = state["epochs"][-1]
        if done["epoch"] >= min_epochs and (target is None or done["neg_elbo"] <= target) and epoch < max_epochs:
            raise Stop
        return loss

    trainer.train_step, trainer.eval_step = timed_train_step, timed_eval_step
    try:
        trainer.train()
    except Stop:
        pass
    epochs = state["epochs"]
    times = [e["wall_s"] for e in epochs]
    per_epoch = [b - a for a, b in zip([0.0, *times[:-1]], times)]
    steady = per_epoch[1:] or per_epoch
    reached = next((e for e in epochs if target and e["neg_elbo"] <= target), None)
    return {"setup": "pythae", "epochs": epochs, "seconds_per_epoch": statistics.median(steady),
            "epoch_images_per_s": n_train / statistics.median(steady),
            "images_per_s": statistics.median(state["rates"][1:] or state["rates"]),
            "neg_elbo_at_10": next((e["neg_elbo"] for e in epochs if e["epoch"] == 10), None),
            "neg_elbo_last": epochs[-1]["neg_elbo"], "epochs_run": len(epochs),
            "time_to_target_s": reached["wall_s"] if reached else None,
            "epochs_to_target": reached["epoch"] if reached else None, "target": target}


def pythae_nll(k=1000, n_images=100, device="cpu", model_path=None):
    """pythae's VAE.get_nll(x, n_samples=k) as a user calls it (its default batch_size=100).

    With ``model_path`` (an aevb model saved by the aevb_train worker) the
    weights are aevb's, so the log-likelihood is comparable across setups.
    """
    torch.manual_seed(0)
    _, x_test = load_mnist()
    x = x_test[-n_images:].to(device)
    model = build("mlp")
    if model_path and Path(model_path, "config.json").is_file():
        import aevb

        copy_aevb_weights(aevb.load(model_path), model.encoder.body)
    model = model.to(device).eval()
    model.device = device
    with torch.no_grad():
        model.get_nll(x[:2], n_samples=100)
        sync(device)
        start = time.perf_counter()
        nll = model.get_nll(x, n_samples=k)
        sync(device)
        seconds = time.perf_counter() - start
    return {"setup": "pythae-nll", "k": k, "n_images": n_images, "seconds": seconds,
            "ms_per_image": seconds / n_images * 1e3, "mean_log_likelihood": float(nll)}


WORKERS = {"pythae_train": pythae_train, "pythae_nll": pythae_nll}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True, choices=sorted(WORKERS))
    parser.add_argument("--params", default="{}")
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    result = WORKERS[args.worker](**json.loads(args.params))
    result["peak_rss_mb"] = peak_rss_mb()
    result["threads"] = torch.get_num_threads()
    Path(args.result).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
