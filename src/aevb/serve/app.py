"""The explorer as a web application: a Starlette app over an :class:`~aevb.serve.explorer.Explorer`.

    GET  /                     the page (static/index.html), its script and style under /static/
    GET  /static/plotly.min.js plotly.js, from the installed plotly package (nothing from the internet)
    GET  /api/state            the planes, the test codes' points and labels, the sliders, the samplers
    GET  /api/examples/{i}     test example i: itself, its code and its reconstruction
    GET  /api/thumbnails/{i}   test example i as a PNG (images only): what a hovered point shows
    POST /api/decode           {"z": [D]} or {"plane": "coords"|"pca", "point": [u, v]} → the decoded mean
    POST /api/interpolate      {"a": [D], "b": [D], "steps": S} → the linear and spherical paths, decoded
    POST /api/samples          {"sampler": name, "n": n, "seed": s} → n draws, decoded

Every request is checked before the model sees it: a body over
:func:`body_limit` bytes (413), bad JSON or not an object (400), a missing or
unknown field, a wrong type, a vector of the wrong dimension, a number that
is not finite or out of range (422); each answer is ``{"error": message}``
naming the field and what it should be, and the server goes on serving.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from aevb.errors import UserError
from aevb.io import loads_json
from aevb.serve.explorer import Explorer

STATIC = Path(__file__).parent / "static"
MAX_STEPS = 64  # points on an interpolated path
MAX_DRAWS = 64  # draws of a sampler at once
MAX_SEED = 2**63 - 1


class BadRequest(Exception):
    """A request the explorer refuses: its HTTP status and one message naming the field and the fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def plotly_js() -> Path:
    """plotly.min.js of the installed plotly package; a UserError naming the extra to install without it."""
    spec = importlib.util.find_spec("plotly")  # its file only: importing plotly's Python side is not needed
    path = Path(next(iter(spec.submodule_search_locations))) / "package_data" / "plotly.min.js" if spec else None
    if path is None or not path.is_file():
        raise UserError("aevb serve needs plotly.js from the plotly package: pip install 'aevb[serve]'")
    return path


def body_limit(latent_dim: int) -> int:
    """The largest request body accepted, in bytes: two latent vectors written out in full, and room."""
    return 16384 + 2 * 40 * latent_dim


def create_app(explorer: Explorer) -> Starlette:
    """The web application serving ``explorer`` (run it with uvicorn: :mod:`aevb.serve.server`)."""
    limit = body_limit(explorer.latent_dim)
    plotly = plotly_js()

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def plotly_script(request: Request) -> Response:
        return FileResponse(plotly, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})

    async def state(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(explorer.state))

    async def example(request: Request) -> Response:
        index = _example_index(request, len(explorer.x))
        return JSONResponse(await run_in_threadpool(explorer.example, index))

    async def thumbnail(request: Request) -> Response:
        if explorer.tabular:
            raise BadRequest(404, "the data are rows of a table, which have no thumbnails; ask /api/examples/{i}")
        index = _example_index(request, len(explorer.x))
        return Response(await run_in_threadpool(explorer.thumbnail, index), media_type="image/png",
                        headers={"Cache-Control": "max-age=3600"})

    async def decode(request: Request) -> Response:
        body = await _json_object(request, limit)
        if "z" in body:
            _only(body, {"z"})
            z = _vector(body["z"], explorer.latent_dim, "z")
        elif "plane" in body:
            _only(body, {"plane", "point"})
            plane = _choice(body["plane"], explorer.planes, "plane")
            u, v = _vector(_field(body, "point"), 2, "point").tolist()
            z = explorer.plane_point(plane, u, v)
        else:
            raise BadRequest(422, 'give "z" (a latent point of length '
                                  f'{explorer.latent_dim}) or "plane" and "point" ([u, v])')
        return JSONResponse(await run_in_threadpool(explorer.decode, z))

    async def interpolate(request: Request) -> Response:
        body = await _json_object(request, limit)
        _only(body, {"a", "b", "steps"})
        a = _vector(_field(body, "a"), explorer.latent_dim, "a")
        b = _vector(_field(body, "b"), explorer.latent_dim, "b")
        steps = _integer(body.get("steps", 9), 2, MAX_STEPS, "steps")
        return JSONResponse(await run_in_threadpool(explorer.interpolate, a, b, steps))

    async def samples(request: Request) -> Response:
        body = await _json_object(request, limit)
        _only(body, {"sampler", "n", "seed"})
        if not explorer.samplers:
            raise BadRequest(422, f"this model ({explorer.model.name}) has no prior to draw from")
        sampler = _choice(body.get("sampler", next(iter(explorer.samplers))), explorer.samplers, "sampler")
        n = _integer(body.get("n", 16), 1, MAX_DRAWS, "n")
        seed = _integer(body.get("seed", 0), 0, MAX_SEED, "seed")
        return JSONResponse(await run_in_threadpool(explorer.draw, sampler, n, seed))

    async def refused(request: Request, error: BadRequest) -> Response:
        return JSONResponse({"error": str(error)}, status_code=error.status)

    async def http_error(request: Request, error: HTTPException) -> Response:  # unknown paths, wrong methods
        return JSONResponse({"error": error.detail}, status_code=error.status_code, headers=error.headers)

    routes = [
        Route("/", page),
        Route("/static/plotly.min.js", plotly_script),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
        Route("/api/state", state),
        Route("/api/examples/{index}", example),
        Route("/api/thumbnails/{index}", thumbnail),
        Route("/api/decode", decode, methods=["POST"]),
        Route("/api/interpolate", interpolate, methods=["POST"]),
        Route("/api/samples", samples, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={BadRequest: refused, HTTPException: http_error})


# -- checking a request ----------------------------------------------------------


async def _json_object(request: Request, limit: int) -> dict[str, Any]:
    """The request's body as a JSON object, read no further than ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise BadRequest(413, f"the request body is over {limit} bytes; send one latent point or two")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadRequest(413, f"the request body is over {limit} bytes; send one latent point or two")
    try:
        value = loads_json(bytes(body).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadRequest(400, f"the request body is not JSON ({error}); send a JSON object") from None
    if not isinstance(value, dict):
        raise BadRequest(400, f"the request body is JSON {type(value).__name__}, not an object; send {{...}}")
    return value


def _example_index(request: Request, count: int) -> int:
    text = request.path_params["index"]
    if not text.isdigit() or int(text) >= count:
        raise BadRequest(404, f"no test example {text!r}: there are {count}, numbered 0 to {count - 1}")
    return int(text)


def _only(body: dict[str, Any], fields: set[str]) -> None:
    unknown = sorted(set(body) - fields)
    if unknown:
        raise BadRequest(422, f"unknown field {unknown[0]!r}; this request takes {', '.join(sorted(fields))}")


def _field(body: dict[str, Any], name: str) -> Any:
    if name not in body:
        raise BadRequest(422, f"the field {name!r} is missing")
    return body[name]


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(422, f"{name} must be a number, not {json.dumps(value)[:40]}")
    if not math.isfinite(value):
        raise BadRequest(422, f"{name} must be a finite number, not {value}")
    return float(value)


def _vector(value: Any, length: int, name: str) -> torch.Tensor:
    """A list of ``length`` finite numbers as a float32 tensor [length]."""
    if not isinstance(value, list):
        raise BadRequest(422, f"{name} must be a list of {length} numbers")
    if len(value) != length:
        raise BadRequest(422, f"{name} has {len(value)} numbers; it must have {length}")
    numbers = [_number(v, f"{name}[{i}]") for i, v in enumerate(value)]
    z = torch.tensor(numbers, dtype=torch.float32)
    if not torch.isfinite(z).all():  # finite as a double, beyond float32's range
        raise BadRequest(422, f"{name} has a number beyond float32's range (±3.4e38)")
    return z


def _integer(value: Any, low: int, high: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(422, f"{name} must be a whole number from {low} to {high}, not {json.dumps(value)[:40]}")
    return value


def _choice(value: Any, choices, name: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise BadRequest(422, f"{name} must be one of {', '.join(choices)}, not {json.dumps(value)[:40]}")
    return value
