"""Data: the data-set registry, files, image folders and streaming of large training sets.

Owns turning what a user names (``digits``, a path) into tensors of examples
in [0, 1] with a train/validation/test split, and the seeded transforms of
training data (binarisation, dequantisation).  One module a concept:

* ``datasets``: :func:`~aevb.data.datasets.load_data`, the ``Dataset`` it returns, the split;
* ``sources``: ``SourceData`` (what every reader returns) and ``CACHE_DIR``;
* ``named``: the registered data sets (``digits``, ``mnist``, ``fashion-mnist``, ``cifar10``);
* ``files``: data and labels files (IDX, ``.npy``, ``.npz``, ``.csv``);
* ``folders``: image folders, decoded on threads, and their cache of 8-bit pixels;
* ``streaming``: training images converted batch by batch, and when to stream;
* ``transforms``: binarisation, dequantisation, the held-out examples of pictures.

May import: torch, numpy, Pillow, torchvision, scikit-learn, and aevb's base
modules.  Knows no model: never the model, training, analysis, acceleration
or CLI layers.
"""
