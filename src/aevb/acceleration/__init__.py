"""Acceleration: what makes the same maths faster, chosen by training in one visible place.

Owns the fused VAE loss (one autograd node with a hand-written backward
pass), torch's fused Adam with a lean step, whether bf16 multiplies pay on a
device (``--precision``), and process-wide CPU settings (the allocator,
subnormal floats flushed).  Each gives the numbers of the reference path to
rounding and stays only while ``bench/accelerations.py`` measures it at
least 1.05× faster on what it targets.

May import: the model layer and aevb's base modules.  Never imported by the
model, data or analysis layers' maths; nothing here imports training,
analysis or the CLI.
"""
