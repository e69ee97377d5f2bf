"""`aevb serve`: the explorer's planes and sliders against their definitions, its JSON API over real HTTP (every
decoded picture is the model's decode at the point asked, bad requests get 4xx and the server keeps serving),
a table's rows in the units of its file, a conv model, the page in headless Chromium (no console error, no
request leaving the machine, hover, click, sliders, interpolation, draws), and the command started and stopped
with SIGINT."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.distributions import Normal, kl_divergence

pytest.importorskip("starlette", reason="aevb serve needs the serve extra (pip install 'aevb[serve]')")
pytest.importorskip("uvicorn", reason="aevb serve needs the serve extra (pip install 'aevb[serve]')")

import aevb  # noqa: E402
from aevb.registry import MODELS  # noqa: E402
from aevb.run.open import open_run  # noqa: E402
from aevb.serve.app import body_limit, create_app  # noqa: E402
from aevb.serve.explorer import Explorer  # noqa: E402
from aevb.serve.server import running  # noqa: E402

from conftest import aevb_cli  # noqa: E402

STATIC = Path(aevb.__file__).parent / "serve" / "static"


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "run"
    assert aevb_cli("train", "--epochs", "1", "--latent-dim", "4", "--hidden", "32", "-q", "--out", out) == 0
    return out


@pytest.fixture(scope="module")
def explorer(digits_run):
    return Explorer.from_run(open_run(digits_run))


@pytest.fixture(scope="module")
def server(explorer):
    with running(create_app(explorer)) as url:
        yield url


def request(url: str, body=None, *, raw: bytes | None = None, method: str | None = None,
            headers: dict | None = None) -> tuple[int, dict | bytes]:
    """(status, JSON answer or bytes) of one HTTP request; 4xx and 5xx answers returned, not raised."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json",
                                                                          **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as answer:
            status, content, kind = answer.status, answer.read(), answer.headers.get("content-type", "")
    except urllib.error.HTTPError as error:
        status, content, kind = error.code, error.read(), error.headers.get("content-type", "")
    return status, json.loads(content) if kind.startswith("application/json") else content


def pixels(png: str | bytes) -> np.ndarray:
    """A PNG (bytes, or a data URI) as uint8 [H, W, 3]."""
    if isinstance(png, str):
        png = base64.b64decode(png.removeprefix("data:image/png;base64,"))
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def expected_pixels(model, z) -> np.ndarray:
    """model.decode(z).mean for one image model's z [D], as the 8-bit grey pixels [H, W] a PNG holds."""
    with torch.no_grad():
        mean = model.decode(torch.as_tensor(z, dtype=torch.float32)[None]).mean[0, 0]  # [H, W]
    return torch.floor(mean.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()


def assert_decodes(model, png, z):
    got = pixels(png)
    assert (got[..., 0] == got[..., 2]).all()  # grey
    assert np.abs(got[..., 0].astype(int) - expected_pixels(model, z).astype(int)).max() <= 1


# -- the model side --------------------------------------------------------------------------------


def test_planes_map_their_points_back_to_latent_points(explorer):
    prior_mean = explorer.model.prior().mean
    coords = explorer.planes["coords"]
    z = coords.to_latent(0.7, -1.2)
    assert z[:2].tolist() == pytest.approx([0.7, -1.2])
    assert torch.equal(z[2:], prior_mean[2:])  # every other dimension at the prior's mean
    pca = explorer.planes["pca"]
    torch.testing.assert_close(pca.axes @ pca.axes.T, torch.eye(2), atol=1e-5, rtol=0)  # orthonormal directions
    assert pca.project(pca.to_latent(0.3, 2.5)[None])[0].tolist() == pytest.approx([0.3, 2.5], abs=1e-5)
    # the scores are the principal components of the codes: uncorrelated, in decreasing variance
    scores = pca.project(explorer.codes)
    covariance = torch.cov(scores.T)
    assert covariance[0, 1].abs() < 1e-4 * covariance[0, 0]
    assert covariance[0, 0] >= covariance[1, 1]
    assert covariance[0, 0] >= torch.cov(explorer.codes.T).diagonal().max() - 1e-5  # no axis spreads them more


def test_in_two_dimensions_the_inverse_projection_returns_every_code():
    model = aevb.VAE(data_shape=(1, 8, 8), latent_dim=2, arch="linear").eval()
    explorer = Explorer(model, torch.rand(50, 1, 8, 8))
    pca = explorer.planes["pca"]
    back = torch.stack([pca.to_latent(u, v) for u, v in pca.project(explorer.codes).tolist()])
    torch.testing.assert_close(back, explorer.codes, atol=1e-5, rtol=0)


def test_sliders_put_the_active_dimensions_first_each_by_its_kl():
    torch.manual_seed(0)
    model = aevb.VAE(data_shape=(1, 8, 8), latent_dim=5, arch="linear").eval()
    layer = model.encoder[-1]  # Linear(64 → 2·5): means, then log-scales
    with torch.no_grad():
        layer.weight[:5] = torch.randn(5, 64) * 0.5 * torch.tensor([1.0, 0.0, 2.0, 0.0, 0.6])[:, None]  # z2, z4:
        # means constant in x
        layer.bias[:5] = torch.tensor([0.0, 2.0, 0.0, 0.5, 0.0])
    x = torch.rand(200, 1, 8, 8)
    explorer = Explorer(model, x)
    with torch.no_grad():
        posterior = model.encode(x)
    kl = kl_divergence(Normal(posterior.mean, posterior.stddev), Normal(0.0, 1.0)).mean(0)  # [D]
    dims = explorer.dims
    assert [d["active"] for d in dims] == [True, True, True, False, False]
    assert {d["dim"] for d in dims[3:]} == {1, 3}
    for group in (dims[:3], dims[3:]):
        assert [d["score"] for d in group] == sorted((d["score"] for d in group), reverse=True)
    for d in dims:
        assert d["score"] == pytest.approx(float(kl[d["dim"]]), rel=1e-4)
        assert d["score_name"] == "KL" and d["low"] <= -3 and d["high"] >= 3


CASES = [(name, "standard") for name in MODELS.names()] + [("vae", "mog"), ("vae", "vamp")]


@pytest.mark.parametrize("name,prior", CASES, ids=lambda v: str(v))
def test_every_model_and_prior_is_explored(name, prior):
    torch.manual_seed(0)
    model_class = MODELS.get(name)
    kwargs = {"prior": prior} if model_class.has_kl else {}
    model = aevb.build_model(name, data_shape=(1, 8, 8), latent_dim=3, arch="mlp", hidden=[16], **kwargs).eval()
    explorer = Explorer(model, torch.rand(30, 1, 8, 8), torch.arange(30) % 3)
    state = json.loads(json.dumps(explorer.state(), allow_nan=False))  # strict JSON: what the page gets
    assert sorted(d["dim"] for d in state["dims"]) == [0, 1, 2]
    assert len(state["planes"]["pca"]["points"]) == 30
    z = [0.3, -0.2, 1.0]
    assert_decodes(model, explorer.decode(torch.tensor(z))["output"]["png"], z)
    assert state["samplers"] == (["prior"] if model.has_kl else [])
    if model.has_kl:
        draws = explorer.draw("prior", 4, seed=1)
        for output, z in zip(draws["outputs"], draws["z"]):
            assert_decodes(model, output["png"], z)


# -- the API over HTTP -----------------------------------------------------------------------------


def test_decoded_pictures_are_the_models_decode_at_the_point_asked(server, explorer):
    model = explorer.model
    z = [0.5, -1.0, 2.0, 0.25]
    status, answer = request(server + "api/decode", {"z": z})
    assert status == 200 and answer["z"] == pytest.approx(z)
    assert_decodes(model, answer["output"]["png"], z)
    # a point of the plane: decoded at its latent point
    status, answer = request(server + "api/decode", {"plane": "pca", "point": [1.5, -0.5]})
    assert status == 200
    assert answer["z"] == pytest.approx(explorer.planes["pca"].to_latent(1.5, -0.5).tolist(), abs=1e-6)
    assert_decodes(model, answer["output"]["png"], answer["z"])
    # a test example: its posterior mean, and the reconstruction there
    status, example = request(server + "api/examples/7")
    x = explorer.x[7:8]
    assert example["z"] == pytest.approx(model.encode(x).mean[0].tolist(), abs=1e-6)
    assert_decodes(model, example["reconstruction"]["png"], example["z"])
    assert np.array_equal(pixels(example["input"]["png"])[..., 0],
                          torch.floor(x[0, 0] * 255 + 0.5).to(torch.uint8).numpy())
    status, png = request(server + "api/thumbnails/7")
    assert status == 200 and np.array_equal(pixels(png), pixels(example["input"]["png"]))


def test_interpolation_runs_from_a_to_b_linearly_and_along_the_sphere(server, explorer):
    a, b = [2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]  # equal norms, at right angles
    status, answer = request(server + "api/interpolate", {"a": a, "b": b, "steps": 5})
    assert status == 200 and answer["t"] == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    linear, spherical = torch.tensor(answer["z_linear"]), torch.tensor(answer["z_slerp"])
    assert linear[0].tolist() == a and linear[-1].tolist() == b and spherical[0].tolist() == a
    assert linear[2].tolist() == pytest.approx([1.0, 0.0, 1.0, 0.0])
    torch.testing.assert_close(spherical.norm(dim=1), torch.full((5,), 2.0), atol=1e-5, rtol=0)  # slerp keeps the norm
    assert spherical[2].tolist() == pytest.approx([math.sqrt(2), 0.0, math.sqrt(2), 0.0], abs=1e-5)
    for kind, path in (("linear", linear), ("slerp", spherical)):
        assert len(answer[kind]) == 5
        for output, z in zip(answer[kind], path):
            assert_decodes(explorer.model, output["png"], z.tolist())


def test_prior_draws_are_seeded_and_decoded(server, explorer):
    status, first = request(server + "api/samples", {"sampler": "prior", "n": 6, "seed": 3})
    assert status == 200 and len(first["outputs"]) == 6
    again = request(server + "api/samples", {"sampler": "prior", "n": 6, "seed": 3})[1]
    other = request(server + "api/samples", {"sampler": "prior", "n": 6, "seed": 4})[1]
    assert again["z"] == first["z"] and other["z"] != first["z"]
    expected = explorer.model.sample_layers(6, torch.Generator().manual_seed(3))[0]
    torch.testing.assert_close(torch.tensor(first["z"]), expected)
    for output, z in zip(first["outputs"], first["z"]):
        assert_decodes(explorer.model, output["png"], z)


BAD = {  # name: (path, body as sent, status)
    "NaN coordinate": ("api/decode", b'{"z": [NaN, 0, 0, 0]}', 422),
    "infinite coordinate": ("api/decode", b'{"z": [0, Infinity, 0, 0]}', 422),
    "overflowing coordinate": ("api/decode", b'{"z": [0, 1e999, 0, 0]}', 422),
    "beyond float32": ("api/decode", b'{"z": [0, 1e39, 0, 0]}', 422),
    "null coordinate (JSON.stringify(NaN))": ("api/decode", b'{"z": [null, 0, 0, 0]}', 422),
    "wrong dimension": ("api/decode", b'{"z": [0, 0, 0]}', 422),
    "string coordinate": ("api/decode", b'{"z": ["0", 0, 0, 0]}', 422),
    "boolean coordinate": ("api/decode", b'{"z": [true, 0, 0, 0]}', 422),
    "z not a list": ("api/decode", b'{"z": 3}', 422),
    "no z nor plane": ("api/decode", b'{}', 422),
    "unknown field": ("api/decode", b'{"z": [0, 0, 0, 0], "temperature": 2}', 422),
    "unknown plane": ("api/decode", b'{"plane": "tsne", "point": [0, 0]}', 422),
    "plane point of three": ("api/decode", b'{"plane": "pca", "point": [0, 0, 0]}', 422),
    "NaN plane point": ("api/decode", b'{"plane": "coords", "point": [NaN, 0]}', 422),
    "not JSON": ("api/decode", b'{"z": [0, 0', 400),
    "not UTF-8": ("api/decode", b'\xff\xfe', 400),
    "JSON not an object": ("api/decode", b'[0, 0, 0, 0]', 400),
    "nested too deep": ("api/decode", b'[' * 3000 + b']' * 3000, 400),
    "too many steps": ("api/interpolate", b'{"a": [0, 0, 0, 0], "b": [1, 1, 1, 1], "steps": 100000}', 422),
    "fractional steps": ("api/interpolate", b'{"a": [0, 0, 0, 0], "b": [1, 1, 1, 1], "steps": 2.5}', 422),
    "missing b": ("api/interpolate", b'{"a": [0, 0, 0, 0]}', 422),
    "unknown sampler": ("api/samples", b'{"sampler": "flow"}', 422),
    "too many draws": ("api/samples", b'{"n": 1000000}', 422),
    "negative seed": ("api/samples", b'{"seed": -1}', 422),
}


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_request_gets_a_4xx_naming_its_fault_and_the_server_keeps_serving(server, name):
    path, body, expected = BAD[name]
    status, answer = request(server + path, raw=body)
    assert status == expected, answer
    assert isinstance(answer["error"], str) and answer["error"]
    status, answer = request(server + "api/decode", {"z": [0, 0, 0, 0]})
    assert status == 200 and "png" in answer["output"]


def test_a_huge_payload_is_refused_before_it_is_read_and_other_paths_answer_4xx(server):
    # refused on its declared length, before its body is sent (a client still sending it would find the
    # connection closed under it: the server answers and stops reading)
    host, port = server.removeprefix("http://").rstrip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(b"POST /api/decode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 3000000\r\n\r\n" + b'{"z": [' + b"0, " * 1000)
        answer = b""
        while b"bytes" not in answer:  # the status line, the headers, then the message
            received = connection.recv(1000)
            assert received, answer
            answer += received
        assert answer.startswith(b"HTTP/1.1 413") and b"over 16704 bytes" in answer
    # a chunked body (no Content-Length) is read only up to the limit
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        chunk = b"0, " * 10_000
        head = (b"POST /api/decode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        connection.sendall(head + b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5)))
        assert connection.recv(200).startswith(b"HTTP/1.1 413")
    assert body_limit(4) < 5 * len(chunk)
    assert request(server + "api/examples/100000")[0] == 404
    assert request(server + "api/examples/-1")[0] == 404
    assert request(server + "api/nothing")[0] == 404
    assert request(server + "api/decode", method="GET")[0] == 405
    assert request(server + "api/decode", {"z": [1, 2, 3, 4]})[0] == 200


@pytest.fixture(scope="module")
def table_run(tmp_path_factory):
    """A run on a CSV table of 4 columns in very different units."""
    folder = tmp_path_factory.mktemp("serve-table")
    rng = np.random.default_rng(0)
    table = rng.normal(size=(200, 2)) @ rng.normal(size=(2, 4)) * [1, 10, 100, 1000] + [5, -50, 0, 3000]
    np.savetxt(folder / "table.csv", table, delimiter=",", header="a,b,c,d", comments="")
    out = folder / "run"
    assert aevb_cli("train", "--data", folder / "table.csv", "--likelihood", "gaussian", "--latent-dim", "2",
                    "--hidden", "16", "--epochs", "1", "-q", "--out", out) == 0
    return out


def test_a_tables_decoded_row_is_in_the_units_of_its_file(table_run):
    run = open_run(table_run)
    explorer = Explorer.from_run(run)
    with running(create_app(explorer)) as url:
        status, state = request(url + "api/state")
        assert state["kind"] == "table" and state["columns"] == ["a", "b", "c", "d"]
        status, answer = request(url + "api/decode", {"z": [0.5, -0.5]})
        assert status == 200
        with torch.no_grad():
            standardized = run.model.decode(torch.tensor([[0.5, -0.5]])).mean
        expected = run.dataset.original_units(standardized)[0]
        assert answer["output"]["row"] == pytest.approx(expected.tolist(), rel=1e-5)
        assert request(url + "api/thumbnails/0")[0] == 404  # rows have no pictures
        status, example = request(url + "api/examples/0")
        x, _ = run.held_out("test")
        assert example["input"]["row"] == pytest.approx(run.dataset.original_units(x[:1])[0].tolist(), rel=1e-5)


def test_a_conv_models_decode_round_trip():
    torch.manual_seed(0)
    model = aevb.VAE(data_shape=(1, 28, 28), latent_dim=3, arch="conv").eval()
    explorer = Explorer(model, torch.rand(30, 1, 28, 28), torch.arange(30) % 3)
    with running(create_app(explorer)) as url:
        status, answer = request(url + "api/decode", {"z": [1.0, -2.0, 0.5]})
        assert status == 200
        assert_decodes(model, answer["output"]["png"], [1.0, -2.0, 0.5])


def test_the_samplers_fitted_to_a_run_are_offered_beside_the_prior(digits_run, tmp_path):
    """A Gaussian mixture fitted to the run's codes (aevb fit-sampler) is offered beside the prior; the flow, never
    fitted, is not (the explorer reads the run and never fits one)."""
    import shutil

    from aevb.sampling.fitted import saved_sampler
    from conftest import aevb_cli

    run = tmp_path / "run"
    shutil.copytree(digits_run, run)  # the shared run stays without fits
    assert aevb_cli("fit-sampler", run, "--sampler", "gmm", "--max-components", "2") == 0
    explorer = Explorer.from_run(open_run(run))
    assert list(explorer.samplers) == ["prior", "gmm"]
    assert not (run / "samplers" / "flow.json").exists()
    sampler = saved_sampler(run, "gmm", explorer.model)[0]
    draws = explorer.draw("gmm", 3, seed=2)
    torch.testing.assert_close(torch.tensor(draws["z"]), sampler.sample(3, torch.Generator().manual_seed(2)))
    for output, z in zip(draws["outputs"], draws["z"]):
        assert_decodes(explorer.model, output["png"], z)


def test_an_autoencoder_has_no_draws_and_says_so(tmp_path):
    model = aevb.AE(data_shape=(1, 8, 8), latent_dim=2, arch="linear").eval()
    explorer = Explorer(model, torch.rand(20, 1, 8, 8))
    assert explorer.samplers == {}
    assert torch.equal(explorer.planes["coords"].origin, torch.zeros(2))
    with running(create_app(explorer)) as url:
        status, answer = request(url + "api/samples", {"n": 2})
        assert status == 422 and "no prior" in answer["error"]


# -- the page in a real browser --------------------------------------------------------------------


def test_the_page_refers_to_nothing_outside_the_server():
    for name in ("index.html", "explorer.js", "explorer.css"):
        text = (STATIC / name).read_text()
        assert not re.search(r"https?:|(src|href)=[\"']//|url\(", text), name  # only paths of this server


def _empty_spot(page) -> tuple[float, float]:
    """Page coordinates of a spot of the plot area at least 40 pixels from every drawn point."""
    return tuple(page.evaluate("""() => {
        const box = document.querySelector('#plane .nsewdrag').getBoundingClientRect();
        const points = [...document.querySelectorAll('#plane .scatterlayer path.point')]
            .map((p) => p.getBoundingClientRect()).map((r) => [r.x + r.width / 2, r.y + r.height / 2]);
        for (let fy = 0.05; fy < 1; fy += 0.05) for (let fx = 0.05; fx < 1; fx += 0.05) {
            const x = box.left + fx * box.width, y = box.top + fy * box.height;
            if (points.every(([px, py]) => Math.hypot(px - x, py - y) > 40)) return [x, y];
        }
        return null;
    }"""))


def _decoded_z(page) -> list[float]:
    return json.loads(page.get_attribute("#decoded img", "data-z"))


def test_the_explorer_in_headless_chromium(chromium, server, explorer):
    model = explorer.model
    page = chromium.new_page(viewport={"width": 1280, "height": 1000})
    errors, requests = [], []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda r: requests.append(r.url))
    try:
        page.goto(server)
        page.wait_for_selector("body[data-ready=true]", timeout=30_000)
        assert page.locator("#plane .scatterlayer path.point").count() == len(explorer.x)
        assert "inverse projection" in page.inner_text("#inverse")  # the page says how a point maps back

        # hover: the point's own image
        box = page.locator("#plane .scatterlayer path.point").nth(10).bounding_box()
        spot = (box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)  # under the plot's drag layer
        page.mouse.move(*spot)
        page.wait_for_function("() => { const i = document.getElementById('tooltip-image');"
                               " return !document.getElementById('tooltip').hidden && i.complete && i.naturalWidth > 0 }")
        index = int(page.get_attribute("#tooltip-image", "data-index"))
        shown = page.evaluate("""async () => { const r = await fetch(document.getElementById('tooltip-image').src);
                                 return [...new Uint8Array(await r.arrayBuffer())]; }""")
        assert np.array_equal(pixels(bytes(shown))[..., 0],
                              torch.floor(explorer.x[index, 0] * 255 + 0.5).to(torch.uint8).numpy())

        # click that point: its posterior mean, decoded
        page.mouse.click(*spot)
        page.wait_for_function(f"() => document.getElementById('decoded-caption').textContent"
                               f".includes('test example {index} ')")
        assert _decoded_z(page) == pytest.approx(explorer.codes[index].tolist(), abs=1e-6)
        assert_decodes(model, page.get_attribute("#decoded img", "src"), _decoded_z(page))
        page.click("#set-a")

        # click an empty spot of the plane: the plane's point there, decoded
        page.mouse.move(5, 5)
        x, y = _empty_spot(page)
        page.mouse.click(x, y)
        page.wait_for_function("() => document.getElementById('decoded-caption').textContent.includes('of the plane')")
        z = _decoded_z(page)
        u, v = map(float, re.search(r"\(([-\d.]+), ([-\d.]+)\)", page.inner_text("#decoded-caption")).groups())
        pca = explorer.planes["pca"]
        assert pca.project(torch.tensor([z]))[0].tolist() == pytest.approx([u, v], abs=0.006)
        assert z == pytest.approx(pca.to_latent(*pca.project(torch.tensor([z]))[0].tolist()).tolist(), abs=1e-5)
        assert_decodes(model, page.get_attribute("#decoded img", "src"), z)
        page.click("#set-b")

        # a slider: that dimension moves, the others stay
        slider = page.locator("#sliders input").first
        dim = int(slider.get_attribute("data-dim"))
        assert dim == explorer.dims[0]["dim"]
        before = _decoded_z(page)
        slider.fill(str(before[dim] + 0.75))
        page.wait_for_function("() => document.getElementById('decoded-caption').textContent.includes('moved to')")
        page.wait_for_function(f"() => Math.abs(JSON.parse(document.querySelector('#decoded img').dataset.z)[{dim}]"
                               f" - Number(document.querySelector('#sliders input').value)) < 1e-5")
        after = _decoded_z(page)
        assert after[dim] == pytest.approx(float(slider.input_value()), abs=1e-5)
        assert after[dim] != pytest.approx(before[dim])
        assert [a for d, a in enumerate(after) if d != dim] == pytest.approx([b for d, b in enumerate(before) if d != dim])
        assert_decodes(model, page.get_attribute("#decoded img", "src"), after)

        # interpolation from A (the clicked example) to B (the plane's point)
        page.fill("#steps", "5")
        page.click("#interpolate")
        page.wait_for_function("() => document.querySelectorAll('#path-slerp img').length === 5")
        linear = [json.loads(z) for z in page.locator("#path-linear img").evaluate_all("l => l.map(i => i.dataset.z)")]
        assert linear[0] == pytest.approx(explorer.codes[index].tolist(), abs=1e-6)
        assert linear[-1] == pytest.approx(z, abs=1e-6)
        assert linear[2] == pytest.approx(((explorer.codes[index] + torch.tensor(z)) / 2).tolist(), abs=1e-5)
        assert_decodes(model, page.locator("#path-slerp img").nth(2).get_attribute("src"),
                       json.loads(page.locator("#path-slerp img").nth(2).get_attribute("data-z")))

        # draws: shown at start, drawn again on request
        assert page.locator("#draws img").count() == 16
        first = page.locator("#draws img").first.get_attribute("data-z")
        page.click("#draw")
        page.wait_for_function("() => document.getElementById('draws-note').textContent.includes('seed 1')")
        assert page.locator("#draws img").first.get_attribute("data-z") != first

        # the other plane redraws the points where they project
        page.select_option("#plane-choice", "coords")
        page.wait_for_function("() => document.querySelector('#plane .xtitle').textContent === 'z1'")

        assert errors == []
        assert requests and all(url.startswith(server) or url.startswith("data:") for url in requests), requests
    finally:
        page.close()


def test_a_table_in_headless_chromium(chromium, table_run):
    run = open_run(table_run)
    explorer = Explorer.from_run(run)
    page = chromium.new_page(viewport={"width": 1280, "height": 1000})
    errors = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        with running(create_app(explorer)) as url:
            page.goto(url)
            page.wait_for_selector("body[data-ready=true]", timeout=30_000)
            box = page.locator("#plane .scatterlayer path.point").nth(3).bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.wait_for_selector("#tooltip-row table")  # hovering a row shows the row
            assert page.locator("#tooltip-row th").all_inner_texts() == ["a", "b", "c", "d"]
            page.mouse.move(5, 5)
            x, y = _empty_spot(page)
            page.mouse.click(x, y)
            page.wait_for_function("() => document.getElementById('decoded-caption').textContent.includes('of the plane')")
            z = json.loads(page.get_attribute("#decoded table", "data-z"))
            shown = [float(v) for v in page.locator("#decoded td").all_inner_texts()]
            with torch.no_grad():
                expected = run.dataset.original_units(run.model.decode(torch.tensor([z])).mean)[0]
            assert shown == pytest.approx(expected.tolist(), rel=1e-3)  # 4 significant digits on the page
            assert page.locator("#draws table").count() == 16
        assert errors == []
    finally:
        page.close()


# -- the command -----------------------------------------------------------------------------------


def test_aevb_serve_prints_its_address_and_stops_on_sigint(digits_run):
    process = subprocess.Popen([sys.executable, "-m", "aevb.cli", "serve", str(digits_run)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    address: list[str] = []
    found = threading.Event()

    def read():
        for line in process.stdout:
            lines.append(line)
            if line.startswith("explorer: "):
                address.append(line)
                found.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert found.wait(120), (lines, process.poll())
        url = re.search(r"http://127\.0\.0\.1:(\d+)/", address[0]).group(0)
        status, state = request(url + "api/state")
        assert status == 200 and state["latent_dim"] == 4
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
        reader.join(timeout=10)
        assert lines[-1].strip() == "stopped"
        assert "Traceback" not in process.stderr.read()
        with pytest.raises(OSError):  # nothing listens there any more
            urllib.request.urlopen(url, timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_listening_socket_says_it_is_tcp_so_answers_are_not_held_back():
    # asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets whose protocol is IPPROTO_TCP; on one
    # made with protocol 0, a response's headers and body, written apart, wait 40 ms for a delayed ACK
    from aevb.serve.server import bind

    with bind() as sock:
        assert sock.proto == socket.IPPROTO_TCP
        with socket.create_connection(sock.getsockname()):
            accepted, _ = sock.accept()
            with accepted:
                assert accepted.proto == socket.IPPROTO_TCP


def test_a_port_in_use_is_refused_with_a_way_out(digits_run, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert aevb_cli("serve", digits_run, "--port", port) == 2
    error = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in error and "choose another --port" in error
    assert aevb_cli("serve", digits_run, "--host", "localhost-ish") == 2
    assert "is not an IP address" in capsys.readouterr().err
