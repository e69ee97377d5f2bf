"""Training: the loop that turns a configuration and data into a trained model in a run folder.

Owns :func:`train` (the whole of ``aevb train``) and the :class:`Trainer`
it drives (:mod:`aevb.training.loop`), the metrics log
(:mod:`~aevb.training.metrics`), validation at each epoch's end
(:mod:`~aevb.training.validation`), Ctrl-C (:mod:`~aevb.training.interrupt`)
and β schedules (:mod:`~aevb.training.schedules`); it chooses the
accelerations in one place (:mod:`aevb.training.loop`).  The run folder and
its checkpoints are :mod:`aevb.run`'s.

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
