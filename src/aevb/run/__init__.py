"""Run: the run folder that ``aevb train`` writes and every other command reads.

Owns the folder's layout and lifecycle (:mod:`aevb.run.folder`), who may
write it (one process at a time, :mod:`aevb.run.owner`) and the list of what
the run wrote (:mod:`aevb.run.manifest`: what ``--force`` may replace), the
checkpoint that lets a run resume bit for bit (:mod:`aevb.run.checkpoints`),
the run's data as its configuration says to load, binarise and dequantise
them (:mod:`aevb.run.data`), the device a command computes on
(:mod:`aevb.run.device`), and the one way to open an existing run
(:func:`aevb.run.open.open_run`), which every command on a run folder uses.

May import: the model and data layers and aevb's base modules (``errors``,
``io``, ``registry``, ``config``).  Never training, analysis, acceleration
or the CLI.
"""
