"""Data: the data-set registry, files, image folders and streaming of large training sets.

Owns turning what a user names (``digits``, a path) into tensors of examples
in [0, 1] with a train/validation/test split, and the seeded transforms of
training data (binarisation, dequantisation).

May import: torch, numpy, Pillow, torchvision, scikit-learn, and aevb's base
modules.  Knows no model: never the model, training, analysis, acceleration
or CLI layers.
"""
