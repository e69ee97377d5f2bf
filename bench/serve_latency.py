"""How long the explorer of ``aevb serve`` takes to answer: HTTP request in, PNG/JSON out (target: well under 100 ms).

    .venv/bin/python bench/serve_latency.py [--requests 200] [--threads 1]

For the MNIST MLP VAE (784-400-20, the tutorial's) and the conv VAE (aevb's
``conv``: 16-32 convolutions, 128 hidden), on the 2,000 MNIST test images
(random images where ``../shared/data/mnist`` is absent): the server runs in
this process (uvicorn in a thread, as ``aevb serve`` runs it), and one client
keeps one connection open and sends ``--requests`` requests of each kind,
one at a time, as a page does: a decode at a latent point, a decode at a
point of the plane (PCA), a test example (its code and reconstruction), an
interpolation of 9 points each way, 16 prior draws.  The table gives the
median and the 95th percentile of the round trip, and beside it the same
model's ``decode`` alone (no HTTP, no PNG) for the first two, so the cost of
the web stack reads as the difference.  The weights are untrained: the time
of a decode does not depend on their values.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import time

import torch

from common import MNIST_IMAGES, load_mnist

import aevb
from aevb.serve.app import create_app
from aevb.serve.explorer import Explorer
from aevb.serve.server import running

TARGET_MS = 100.0


def round_trips(url: str, method: str, requests: list[tuple[str, dict | None]]) -> list[float]:
    """Milliseconds per request (path, JSON body) over one kept-alive connection; fails on any answer but 200."""
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    times = []
    for path, body in requests:
        data = None if body is None else json.dumps(body)
        start = time.perf_counter()
        connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
        answer = connection.getresponse()
        content = answer.read()
        times.append((time.perf_counter() - start) * 1000)
        if answer.status != 200:
            raise RuntimeError(f"{method} {path}: {answer.status} {content[:200]!r}")
    connection.close()
    return times


def decode_alone(model, zs: torch.Tensor) -> list[float]:
    """Milliseconds of model.decode(z).mean for each z [D], in this process."""
    times = []
    with torch.no_grad():
        for z in zs:
            start = time.perf_counter()
            model.decode(z[None]).mean
            times.append((time.perf_counter() - start) * 1000)
    return times


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="requests of each kind (default 200)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    torch.manual_seed(0)
    if MNIST_IMAGES.is_file():
        x, data = load_mnist()[1], "the 2,000 MNIST test images"
    else:
        x, data = torch.rand(2000, 1, 28, 28), "2,000 random 28×28 images (no MNIST here)"
    n = options.requests
    print(f"round trip of one request (HTTP to 127.0.0.1, kept alive), ms; {n} requests each; "
          f"{options.threads} torch thread(s); {data}; target < {TARGET_MS:.0f} ms")
    print(f"{'model':<10} {'request':<34} {'median':>8} {'p95':>8} {'decode alone':>13}")
    for arch in ("mlp", "conv"):
        model = aevb.VAE(data_shape=(1, 28, 28), latent_dim=20, arch=arch).eval()
        explorer = Explorer(model, x)
        zs = torch.randn(n, 20)
        alone = decode_alone(model, zs)
        kinds = [
            ("POST /api/decode z", "POST", [("/api/decode", {"z": z.tolist()}) for z in zs]),
            ("POST /api/decode plane point", "POST",
             [("/api/decode", {"plane": "pca", "point": p.tolist()}) for p in torch.randn(n, 2)]),
            ("GET /api/examples/i", "GET", [(f"/api/examples/{i}", None) for i in range(n)]),
            ("POST /api/interpolate 9+9", "POST",
             [("/api/interpolate", {"a": a.tolist(), "b": b.tolist(), "steps": 9}) for a, b in zip(zs, zs.roll(1, 0))]),
            ("POST /api/samples 16", "POST", [("/api/samples", {"n": 16, "seed": i}) for i in range(n)]),
        ]
        with running(create_app(explorer)) as url:
            for name, method, requests in kinds:
                times = round_trips(url, method, requests)
                beside = f"{statistics.median(alone):.2f}" if name.startswith("POST /api/decode") else ""
                print(f"{arch:<10} {name:<34} {statistics.median(times):8.2f} {percentile(times, 95):8.2f} "
                      f"{beside:>13}")


if __name__ == "__main__":
    main()
