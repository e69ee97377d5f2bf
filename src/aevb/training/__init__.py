"""Training: the loop that turns a configuration and data into a trained model in a run folder.

Owns :func:`train` (the whole of ``aevb train``), the training step, β
schedules and the metrics log; it chooses the accelerations in one place
(:mod:`aevb.training.loop`).

May import: every layer below it (model, data, run, analysis for the
pictures drawn while training, acceleration).  Never the CLI.

``train`` is imported lazily so that this package stays light (the CLI's
``--help`` imports no torch).
"""

from __future__ import annotations


def __getattr__(name: str):
    if name == "train":
        from aevb.training.loop import train

        return train
    raise AttributeError(f"module 'aevb.training' has no attribute {name!r}")
