"""Tests of aevb.data: registered data sets, file and folder readers, splits, binarisation."""

from __future__ import annotations

import gzip
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MNIST_IMAGES, MNIST_LABELS, requires_mnist
from PIL import Image
from sklearn.datasets import load_digits

from aevb.config import BINARIZE_MODES
from aevb.data.datasets import Dataset, load_data
from aevb.data.files import read_idx
from aevb.data.transforms import binarize, holdout_indices
from aevb.errors import UserError
from aevb.registry import DATASETS

IDX_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C}


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """Write an IDX file as published for MNIST: magic, big-endian dims, big-endian values."""
    array = np.asarray(array)
    big = array.astype(array.dtype.newbyteorder(">"))
    header = bytes([0, 0, IDX_CODES[big.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + big.tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


@pytest.fixture(scope="module")
def digits_images() -> np.ndarray:
    return load_digits().images.astype(np.float32) / 16  # [1797, 8, 8]


# --------------------------------------------------------------------------- digits and splits


def test_registry_names():
    assert DATASETS.names() == ["digits", "mnist", "fashion-mnist", "cifar10", "shapes"]


def test_digits_loads():
    data = load_data("digits")
    assert isinstance(data, Dataset)
    assert data.data_shape == (1, 8, 8)
    assert (len(data.train), len(data.test)) == (1617, 180)  # 10 % of 1797, rounded
    assert data.val is None and data.val_labels is None
    assert data.train.dtype == torch.float32 and data.train_labels.dtype == torch.int64
    assert data.train.min() == 0 and data.train.max() == 1
    assert data.train_labels.shape == (1617,) and data.test_labels.shape == (180,)
    assert set(data.train_labels.tolist()) == set(range(10))
    assert (data.kind, data.levels, data.classes) == ("image", 17, [str(d) for d in range(10)])
    assert "digits" in repr(data) and len(repr(data)) < 300


def test_split_counts_are_the_last_examples_in_file_order(digits_images):
    data = load_data("digits", test_split=300, val_split=100)
    assert (len(data.train), len(data.val), len(data.test)) == (1397, 100, 300)
    torch.testing.assert_close(data.test[:, 0], torch.from_numpy(digits_images[-300:]))
    torch.testing.assert_close(data.val[:, 0], torch.from_numpy(digits_images[-400:-300]))
    torch.testing.assert_close(data.train[:, 0], torch.from_numpy(digits_images[:1397]))
    assert data.test_labels.tolist() == load_digits().target[-300:].tolist()


def test_split_fractions():
    data = load_data("digits", test_split=0.25, val_split=0.1)
    assert (len(data.train), len(data.val), len(data.test)) == (1797 - 449 - 180, 180, 449)
    assert load_data("digits", test_split=2000.0 - 1000).test.shape[0] == 1000  # whole floats are counts


def test_shuffle_is_seeded_and_permutes(digits_images):
    a = load_data("digits", shuffle=True, seed=3)
    b = load_data("digits", shuffle=True, seed=3)
    c = load_data("digits", shuffle=True, seed=4)
    torch.testing.assert_close(a.train, b.train)
    assert torch.equal(a.test_labels, b.test_labels)
    assert not torch.equal(a.train, c.train)
    assert not torch.equal(a.test[:, 0], torch.from_numpy(digits_images[-180:]))
    # same examples, only reordered: labels still match images
    everything = torch.cat([a.train, a.test])
    assert torch.isclose(everything.sum(), torch.from_numpy(digits_images).sum(), rtol=1e-5)
    first = a.train[0, 0].numpy()
    index = int(np.flatnonzero((digits_images == first).all(axis=(1, 2)))[0])
    assert a.train_labels[0] == load_digits().target[index]


@pytest.mark.parametrize(
    "splits",
    [
        {"test_split": 0},
        {"test_split": -1},
        {"test_split": 1.5},
        {"test_split": 1797},
        {"test_split": "10"},
        {"test_split": True},
        {"val_split": -0.1},
        {"test_split": 1000, "val_split": 797},
        {"test_split": 0.6, "val_split": 0.4},
    ],
)
def test_invalid_splits(splits):
    with pytest.raises(UserError, match="split"):
        load_data("digits", **splits)


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, compress):
    images = np.random.default_rng(0).integers(0, 256, size=(7, 5, 4), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5, 9, 2], dtype=np.uint8)
    suffix = ".gz" if compress else ""
    images_path = write_idx(tmp_path / f"images-idx3-ubyte{suffix}", images, compress)
    labels_path = write_idx(tmp_path / f"labels-idx1-ubyte{suffix}", labels, compress)
    assert np.array_equal(read_idx(images_path), images)
    assert np.array_equal(read_idx(labels_path), labels)

    data = load_data(str(images_path), labels=str(labels_path), test_split=2)
    assert data.data_shape == (1, 5, 4) and data.levels == 256
    torch.testing.assert_close(data.train[:, 0], torch.from_numpy(images[:5] / 255).float())
    assert data.test_labels.tolist() == [9, 2]


def test_idx_wider_types_are_big_endian(tmp_path):
    values = np.array([[1000, -5], [70000, 0]], dtype=np.int32)
    assert np.array_equal(read_idx(write_idx(tmp_path / "x.idx", values)), values)


def test_idx_corrupt_or_truncated(tmp_path):
    images = np.zeros((4, 3, 3), dtype=np.uint8)
    good = write_idx(tmp_path / "good-idx3-ubyte", images).read_bytes()

    bad_magic = tmp_path / "bad-magic-idx3-ubyte"
    bad_magic.write_bytes(b"\x12\x34" + good[2:])
    with pytest.raises(UserError, match="not an IDX file"):
        read_idx(bad_magic)

    truncated = tmp_path / "truncated-idx3-ubyte"
    truncated.write_bytes(good[:-1])
    with pytest.raises(UserError, match="truncated"):
        read_idx(truncated)
    with pytest.raises(UserError, match="truncated"):
        load_data(str(truncated))

    truncated_gz = tmp_path / "truncated-idx3-ubyte.gz"
    truncated_gz.write_bytes(gzip.compress(good)[:-10])
    with pytest.raises(UserError, match="truncated"):
        read_idx(truncated_gz)


def test_labels_count_mismatch(tmp_path):
    images = write_idx(tmp_path / "images-idx3-ubyte", np.zeros((5, 2, 2), dtype=np.uint8))
    labels = write_idx(tmp_path / "labels-idx1-ubyte", np.zeros(4, dtype=np.uint8))
    with pytest.raises(UserError, match="4 labels but the data have 5"):
        load_data(str(images), labels=str(labels), test_split=1)


@requires_mnist
def test_real_mnist_test_set():
    images, labels = read_idx(MNIST_IMAGES), read_idx(MNIST_LABELS)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert images.mean() == pytest.approx(33.79, abs=0.01)

    data = load_data(str(MNIST_IMAGES), labels=str(MNIST_LABELS), test_split=2000)
    assert (len(data.train), len(data.test)) == (8000, 2000)
    assert data.data_shape == (1, 28, 28) and data.levels == 256
    assert torch.equal((data.train[:, 0] * 255).round().to(torch.uint8), torch.from_numpy(images[:8000]))
    assert data.train_labels.tolist() == labels[:8000].tolist()
    assert data.test_labels.tolist() == labels[8000:].tolist()


# --------------------------------------------------------------------------- arrays


def test_npy_uint8_nhwc_becomes_nchw(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, size=(6, 5, 7, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    data = load_data(str(tmp_path / "x.npy"), test_split=1)
    assert data.data_shape == (3, 5, 7) and data.kind == "image" and data.levels == 256
    expected = torch.from_numpy(images.transpose(0, 3, 1, 2) / 255).float()
    torch.testing.assert_close(torch.cat([data.train, data.test]), expected)
    assert 0 <= data.train.min() and data.train.max() <= 1


def test_npy_float_images_and_range_check(tmp_path):
    images = np.random.default_rng(2).random((4, 6, 6)).astype(np.float32)
    np.save(tmp_path / "ok.npy", images)
    data = load_data(str(tmp_path / "ok.npy"), test_split=1)
    assert data.data_shape == (1, 6, 6) and data.levels is None
    torch.testing.assert_close(data.train[:, 0], torch.from_numpy(images[:3]))

    np.save(tmp_path / "big.npy", images * 255)
    with pytest.raises(UserError, match="rescale"):
        load_data(str(tmp_path / "big.npy"))


def test_npz_with_labels(tmp_path):
    images = np.random.default_rng(3).integers(0, 256, size=(5, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([0, 1, 2, 1, 0]))
    data = load_data(str(tmp_path / "d.npz"), test_split=2)
    assert data.data_shape == (1, 4, 4)
    assert data.train_labels.tolist() == [0, 1, 2] and data.test_labels.tolist() == [1, 0]
    assert data.classes == ["0", "1", "2"]


def test_csv_tabular_is_standardised_with_train_statistics(tmp_path):
    rng = np.random.default_rng(4)
    rows = rng.normal(loc=[5.0, -3.0, 100.0], scale=[2.0, 0.5, 30.0], size=(50, 3))
    path = tmp_path / "table.csv"
    np.savetxt(path, rows, delimiter=",", header="a,b,c", comments="")
    data = load_data(str(path), test_split=10)
    assert data.kind == "tabular" and data.data_shape == (3,) and data.levels is None
    assert len(data.train) == 40 and len(data.test) == 10
    torch.testing.assert_close(data.train.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(data.train.std(0, unbiased=False), torch.ones(3), atol=1e-5, rtol=0)
    mean, std = np.array(data.standardization["mean"]), np.array(data.standardization["std"])
    np.testing.assert_allclose(mean, rows[:40].mean(0))
    np.testing.assert_allclose(data.test.numpy(), (rows[40:] - mean) / std, rtol=1e-5, atol=1e-5)


def test_a_column_constant_in_training_keeps_its_scale(tmp_path):
    """MNIST's border pixels as table columns: constant in the training rows, not in the test rows."""
    rows = np.random.default_rng(6).normal(size=(50, 3))
    rows[:40, 1] = 7.0
    np.save(tmp_path / "t.npy", rows)
    data = load_data(str(tmp_path / "t.npy"), test_split=10)
    assert data.standardization["std"][1] == 1.0
    np.testing.assert_allclose(data.test[:, 1].numpy(), rows[40:, 1] - 7.0, rtol=1e-5, atol=1e-6)
    assert torch.equal(data.train[:, 1], torch.zeros(40))


def test_labels_from_csv_file(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 3, 3), dtype=np.uint8))
    (tmp_path / "y.csv").write_text("label\n2\n0\n1\n2\n")
    data = load_data(str(tmp_path / "x.npy"), labels=str(tmp_path / "y.csv"), test_split=1)
    assert data.train_labels.tolist() == [2, 0, 1] and data.test_labels.tolist() == [2]


def test_one_dimensional_array_is_refused(tmp_path):
    np.save(tmp_path / "flat.npy", np.arange(10))
    with pytest.raises(UserError, match="flat.npy"):
        load_data(str(tmp_path / "flat.npy"))


# --------------------------------------------------------------------------- image folders


def _png(path: Path, mode: str, size: tuple[int, int], colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


def test_image_folder(tmp_path):
    _png(tmp_path / "a.png", "L", (20, 30), 128)
    _png(tmp_path / "b.png", "RGB", (40, 25), (255, 0, 0))
    wide = np.zeros((10, 40), dtype=np.uint8)
    wide[:, 15:25] = 255  # only the centre 10 columns are white
    Image.fromarray(wide).save(tmp_path / "c.png")
    (tmp_path / "d_bad.png").write_bytes(b"this is not a picture")
    (tmp_path / "e_cut.png").write_bytes((tmp_path / "b.png").read_bytes()[:60])  # header fine, pixels cut
    (tmp_path / "notes.txt").write_text("ignored")

    with pytest.warns(UserWarning, match="d_bad.png, e_cut.png"):
        data = load_data(str(tmp_path), image_size=10, test_split=1)
    assert data.data_shape == (3, 10, 10) and data.levels == 256
    assert data.train_labels is None and data.classes is None
    images = torch.cat([data.train, data.test])  # a, b, c in path order
    assert len(images) == 3
    torch.testing.assert_close(images[0], torch.full((3, 10, 10), 128 / 255))
    torch.testing.assert_close(images[1, 0], torch.ones(10, 10), atol=1 / 255, rtol=0)
    assert images[1, 1:].max() <= 1 / 255
    assert torch.equal(images[2], torch.ones(3, 10, 10))  # centre crop kept the white band


def test_a_folder_of_one_size_keeps_it(tmp_path):
    """A folder of 28×28 PNGs was silently upscaled to 64×64 (issue 30): it keeps its own size, unresized."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(3, 28, 20), dtype=np.uint8)  # height 28, width 20
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing resized, nothing to say
        data = load_data(str(tmp_path), test_split=1)
    assert data.data_shape == (1, 28, 20)
    assert torch.equal(torch.cat([data.train, data.test])[:, 0], torch.from_numpy(pixels).float() / 255)


def test_greyscale_folder_of_several_sizes_is_refused_with_the_sizes(tmp_path):
    """Behaviour change (issue 30): several sizes were resized to 64×64 without a word; now --image-size is asked for."""
    for i in range(3):
        _png(tmp_path / f"{i}.png", "L", (70 + i % 2, 80), 200)
    with pytest.raises(UserError, match=r"2 sizes \(height×width: 80×70 \(2\), 80×71 \(1\)\).*--image-size"):
        load_data(str(tmp_path), test_split=1)
    with pytest.warns(UserWarning, match=r"resized and centre-cropped 3 of 3 images .* to 64×64"):
        data = load_data(str(tmp_path), test_split=1, image_size=64)
    assert data.data_shape == (1, 64, 64)


def test_a_portrait_by_exif_has_its_upright_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 8 wide and 4 high, shown 4 wide and 8 high
    Image.fromarray(np.zeros((4, 8), dtype=np.uint8)).save(tmp_path / "a.png", exif=exif)
    Image.fromarray(np.zeros((8, 4), dtype=np.uint8)).save(tmp_path / "b.png")
    assert load_data(str(tmp_path), test_split=1).data_shape == (1, 8, 4)


def test_image_folder_subfolders_are_classes(tmp_path):
    for i in range(2):
        _png(tmp_path / "dogs" / f"{i}.png", "RGB", (8, 8), (0, 0, 255))
        _png(tmp_path / "cats" / f"{i}.png", "RGB", (8, 8), (0, 255, 0))
    data = load_data(str(tmp_path), image_size=4, test_split=1)
    assert data.classes == ["cats", "dogs"]
    assert sorted(data.train_labels.tolist() + data.test_labels.tolist()) == [0, 0, 1, 1]
    for images, labels in ((data.train, data.train_labels), (data.test, data.test_labels)):
        for image, label in zip(images, labels):  # each image keeps its own label: cats green, dogs blue
            assert image[1 + int(label)].min() == 1


def test_a_folder_of_classes_is_split_in_a_seeded_random_order(tmp_path):
    """Its files are sorted by class: a split from the end would test on the last class alone."""
    for c in range(5):
        for i in range(20):
            _png(tmp_path / f"class{c}" / f"{i:02d}.png", "L", (4, 4), 50 * c)
    data = load_data(str(tmp_path), image_size=4, test_split=0.2, val_split=0.2)
    for labels in (data.test_labels, data.val_labels, data.train_labels):
        assert len(set(labels.tolist())) >= 3
    assert torch.equal(data.test_labels, load_data(str(tmp_path), image_size=4, test_split=0.2, val_split=0.2).test_labels)
    assert not torch.equal(data.test_labels, load_data(str(tmp_path), image_size=4, test_split=0.2, val_split=0.2,
                                                       seed=1).test_labels)
    # the label of every image is its folder's: grey level 50·c
    torch.testing.assert_close(data.test[:, 0, 0, 0], data.test_labels.float() * 50 / 255)


def test_exif_orientation_is_applied_as_viewers_show_the_image(tmp_path):
    stored = np.zeros((8, 8), dtype=np.uint8)
    stored[:, 0] = 255  # the first column bright, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": a camera held upright
    Image.fromarray(stored).save(tmp_path / "a.png", exif=exif)
    Image.fromarray(stored).save(tmp_path / "b.png")
    data = load_data(str(tmp_path), image_size=8, test_split=1)
    upright, plain = data.train[0, 0], data.test[0, 0]
    assert torch.equal(upright[0], torch.ones(8)) and upright[1:].max() == 0  # the first row, as viewers show it
    assert torch.equal(plain[:, 0], torch.ones(8))


def test_uint8_rows_of_three_planes_are_colour_images_in_cifars_layout(tmp_path):
    rng = np.random.default_rng(5)
    rows = rng.integers(0, 256, size=(6, 3 * 32 * 32), dtype=np.uint8)  # CIFAR-10's python batches
    np.savez(tmp_path / "cifar.npz", data=rows, labels=np.arange(6) % 3)
    data = load_data(str(tmp_path / "cifar.npz"), test_split=2)
    assert data.kind == "image" and data.data_shape == (3, 32, 32) and data.levels == 256
    expected = torch.from_numpy(rows.reshape(6, 3, 32, 32).astype(np.float32) / 255)
    torch.testing.assert_close(torch.cat([data.train, data.test]), expected)
    assert data.train[0, 1, 0, 0] == rows[0, 1024] / 255  # the green plane follows the red one
    # a small uint8 table of 3·s² columns (s < 4) stays a table
    np.save(tmp_path / "small.npy", rng.integers(0, 256, size=(20, 12), dtype=np.uint8))
    assert load_data(str(tmp_path / "small.npy"), test_split=2).kind == "tabular"


def test_folder_without_readable_images(tmp_path):
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match="no readable images"), pytest.warns(UserWarning, match="x.png"):
        load_data(str(tmp_path))
    # a folder of data files (the published MNIST files) names them and the option that reads them
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((2, 4, 4), dtype=np.uint8), compress=True)
    with pytest.raises(UserError, match=r"t10k-images-idx3-ubyte.gz.*--data FILE"), pytest.warns(UserWarning):
        load_data(str(tmp_path))


# --------------------------------------------------------------------------- errors and named sets


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere.npy"
    with pytest.raises(UserError, match="not found: .*nowhere.npy.*digits"):
        load_data(str(missing))


def test_unknown_format(tmp_path):
    path = tmp_path / "data.xyz"
    path.write_bytes(b"\x89PNG not data")
    with pytest.raises(UserError, match=r"data\.xyz.*\.npy"):
        load_data(str(path))


def test_labels_option_is_for_files():
    with pytest.raises(UserError, match="labels"):
        load_data("digits", labels="y.csv")


def test_published_mnist_files_in_data_dir(tmp_path):
    rng = np.random.default_rng(5)
    train, test = (rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8) for n in (6, 3))
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train, compress=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(6, dtype=np.uint8), compress=True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", test)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([7, 8, 9], dtype=np.uint8))
    data = load_data("fashion-mnist", data_dir=str(tmp_path), test_split=0.9, val_split=2)
    assert (len(data.train), len(data.val), len(data.test)) == (4, 2, 3)  # official test set, test_split ignored
    torch.testing.assert_close(data.test[:, 0], torch.from_numpy(test / 255).float())
    assert data.test_labels.tolist() == [7, 8, 9] and data.classes[0] == "T-shirt/top"


def test_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(6).integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    for split in ("train", "t10k"):
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", np.array([1, 2, 3, 4], dtype=np.uint8))
    data = load_data("mnist", data_dir=str(tmp_path))
    assert data.data_shape == (1, 28, 28) and len(data.train) == 4 and len(data.test) == 4
    torch.testing.assert_close(data.train[:, 0], torch.from_numpy(images / 255).float())


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_missing_torchvision_files_without_download(tmp_path, name):
    with pytest.raises(UserError, match="--download"):
        load_data(name, data_dir=str(tmp_path))


# --------------------------------------------------------------------------- binarize, holdout


def test_binarize_modes():
    x = torch.tensor([0.0, 0.2, 0.5, 0.7, 1.0])
    assert BINARIZE_MODES == ("none", "threshold", "dynamic")
    assert binarize(x, "none") is x
    assert binarize(x, "threshold").tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    with pytest.raises(UserError, match="binarization"):
        binarize(x, "sometimes")


def test_dynamic_binarization_is_unbiased_and_seeded():
    x = torch.linspace(0, 1, 11)  # [11]
    samples = binarize(x.expand(20000, 11), "dynamic", torch.Generator().manual_seed(0))
    assert set(samples.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(samples.mean(0), x, atol=0.015, rtol=0)
    again = binarize(x.expand(20000, 11), "dynamic", torch.Generator().manual_seed(0))
    assert torch.equal(samples, again)
    assert not torch.equal(binarize(x.expand(100, 11), "dynamic"), binarize(x.expand(100, 11), "dynamic"))


def test_holdout_indices():
    labels = torch.tensor([3, 1, 3, 0, 1, 2, 0])
    assert holdout_indices(labels, n=4).tolist() == [3, 1, 5, 0]  # first 0, first 1, first 2, first 3
    assert holdout_indices(labels, n=2).tolist() == [3, 1]
    # more than there are classes: then the second of each class (class 2 has no second), all at most
    assert holdout_indices(labels).tolist() == [3, 1, 5, 0, 6, 4, 2]
    assert holdout_indices(None, n=4).tolist() == [0, 1, 2, 3]
    assert holdout_indices(None, n=10, num_examples=3).tolist() == [0, 1, 2]
    data = load_data("digits")
    picked = holdout_indices(data.test_labels)
    assert data.test_labels[picked].tolist() == list(range(10))


def test_a_folder_of_16_bit_grey_images_loads_as_grey(tmp_path):
    """Pillow's convert('L') clips 16-bit values at 255: every image would be white (and RGB)."""
    from PIL import Image

    for i, value in enumerate((30000, 65535, 0, 257 * 40)):
        Image.fromarray(np.full((10, 10), value, dtype=np.uint16)).save(tmp_path / f"{i}.png")
    data = load_data(str(tmp_path), image_size=8, test_split=1, stream="no")
    assert data.data_shape == (1, 8, 8)
    means = [round(float(x.mean()) * 255) for x in data.train] + [round(float(data.test.mean()) * 255)]
    assert means == [117, 255, 0, 40]  # value / 257
