"""Serving a trained model to a browser: ``aevb serve RUN``, an interactive explorer of its latent space.

Owns the explorer's model side (:mod:`aevb.serve.explorer`: the test set's
codes in a plane, a plane point back to a latent point, decoding,
interpolation, prior and sampler draws, all as plain values), the web
application over it (:mod:`aevb.serve.app`: a Starlette app whose JSON API
checks every request), the page and its scripts (``static/``, with plotly.js
served from the plotly package: nothing is fetched from the internet) and
running it (:mod:`aevb.serve.server`: uvicorn on 127.0.0.1, Ctrl-C).

May import: analysis and the layers below it (the run folder, data, model,
aevb's base modules).  Never training or the CLI; the CLI imports it inside
its ``serve`` command, so ``aevb --help`` needs neither Starlette nor uvicorn.
"""
