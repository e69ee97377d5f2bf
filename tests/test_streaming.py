"""Streamed training images (aevb.data.streaming): the same numbers as the in-memory path, read batch by batch.

Every layout the loaders accept gives, streamed, exactly the float32 values
of the in-memory tensors; a run trained streamed logs the same losses; auto
streams only when the float32 copy would not fit; misuse is a clear error.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from aevb.data import datasets as data
from aevb.data import folders, sources, streaming, transforms
from aevb.errors import UserError
from aevb.data.streaming import StreamedImages

from conftest import aevb_cli


def _digits_uint8() -> np.ndarray:
    """scikit-learn's digits as 8-bit pixels [1797, 8, 8] (0..16 scaled to 0..240)."""
    from sklearn.datasets import load_digits

    return (load_digits().images * 15).astype(np.uint8)


LAYOUTS = {
    "grey [N, H, W]": lambda d: d,
    "colour [N, H, W, C]": lambda d: np.repeat(d[..., None], 3, axis=3),
    "colour [N, C, H, W]": lambda d: np.repeat(d[:, None], 3, axis=1),
    "flattened [N, H·W]": lambda d: d.reshape(len(d), -1),
    "float [N, 1, H, W]": lambda d: (d[:, None] / 255.0).astype(np.float32),
    "bool [N, H, W]": lambda d: d > 100,
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_streamed_images_are_the_in_memory_floats(tmp_path, layout):
    path = tmp_path / "x.npy"
    np.save(path, LAYOUTS[layout](_digits_uint8()))
    options = dict(test_split=200, val_split=100, shuffle=True, seed=3)
    memory = data.load_data(str(path), stream="no", **options)
    streamed = data.load_data(str(path), stream="yes", **options)

    train = streamed.train
    assert isinstance(train, StreamedImages) and isinstance(train.pixels, np.memmap)  # nothing was read
    assert isinstance(memory.train, torch.Tensor)
    assert train.shape == memory.train.shape and len(train) == len(memory.train) == 1497
    assert streamed.data_shape == memory.data_shape and streamed.levels == memory.levels
    # the held-out splits are loaded: evaluation and the figures read them whole
    assert torch.equal(streamed.test, memory.test) and torch.equal(streamed.val, memory.val)
    # every way the training loop and evaluation index a training set
    assert torch.equal(train.load(), memory.train)
    index = torch.tensor([5, 0, 1496, 5, 700])
    assert torch.equal(train[index], memory.train[index])
    assert torch.equal(train[10:74], memory.train[10:74])
    assert torch.equal(train[7], memory.train[7])
    assert train[index].dtype == torch.float32 and train[index].is_contiguous()
    torch.testing.assert_close(train.mean(0), memory.train.mean(0), rtol=0, atol=1e-6)
    for mode in ("threshold", "none"):
        assert torch.equal(transforms.binarize(train, mode)[index], transforms.binarize(memory.train, mode)[index])
    # dequantised as read, with the same draws as the tensor when read in one batch
    streamed_noise = transforms.dequantize(train, 256, torch.Generator().manual_seed(3)).load()
    assert torch.equal(streamed_noise, transforms.dequantize(memory.train, 256, torch.Generator().manual_seed(3)))


def _folder(root: Path) -> Path:
    """Two class subfolders of random colour PNGs, one loose image and a truncated PNG (its header reads)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(14):
        folder = root / ("cats" if i % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(root / "loose.png")
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(png, format="PNG")
    (root / "dogs" / "broken.png").write_bytes(png.getvalue()[:len(png.getvalue()) // 2])
    return root


@pytest.mark.filterwarnings("ignore:skipped 1 image.s. outside the class subfolders")
def test_streamed_image_folder_is_decoded_once_into_a_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CACHE_DIR", tmp_path / "cache")
    root = _folder(tmp_path / "images")
    with pytest.warns(UserWarning):
        memory = data.load_data(str(root), stream="no", image_size=8, test_split=3)
    with pytest.warns(UserWarning, match="broken.png"):
        streamed = data.load_data(str(root), stream="yes", image_size=8, test_split=3)
    assert isinstance(streamed.train, StreamedImages) and isinstance(streamed.train.pixels, np.memmap)
    assert streamed.train.pixels.dtype == np.uint8
    # the same images, labels and classes as in memory (the loose image and the broken file left out)
    assert torch.equal(streamed.train.load(), memory.train) and torch.equal(streamed.test, memory.test)
    assert torch.equal(streamed.train_labels, memory.train_labels) and streamed.classes == memory.classes == ["cats", "dogs"]
    caches = sorted((tmp_path / "cache" / "folders").glob("*.npy"))
    assert len(caches) == 1 and np.load(caches[0]).shape == (15, 8, 8, 3)  # 14 + loose; the truncated one dropped

    # a second load memory-maps the cache: nothing is decoded
    def no_decoding(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(folders, "_decode", no_decoding)
    with pytest.warns(UserWarning, match="broken.png"):  # still named, from the cache's index
        again = data.load_data(str(root), stream="yes", image_size=8, test_split=3)
    assert torch.equal(again.train.load(), memory.train)
    # a changed folder (or another size) is decoded again, into its own cache file
    monkeypatch.undo()
    monkeypatch.setattr(sources, "CACHE_DIR", tmp_path / "cache")
    from PIL import Image

    Image.new("RGB", (10, 10), (255, 0, 0)).save(root / "cats" / "new.png")
    with pytest.warns(UserWarning):
        changed = data.load_data(str(root), stream="yes", image_size=8, test_split=3)
    assert len(changed.train) + len(changed.test) == 15
    assert len(sorted((tmp_path / "cache" / "folders").glob("*.npy"))) == 2


def test_auto_decides_for_a_folder_before_decoding_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CACHE_DIR", tmp_path / "cache")
    root = _folder(tmp_path / "images")
    sizes = []
    monkeypatch.setattr(streaming, "_too_large_for_memory", lambda n_bytes: sizes.append(n_bytes) or True)
    with pytest.warns(UserWarning):
        streamed = data.load_data(str(root), image_size=8, test_split=3)
    assert isinstance(streamed.train, StreamedImages)
    assert sizes == [16 * 3 * 8 * 8 * 4]  # from the headers (the truncated file's reads): 16 files as float32


def _records(run: Path) -> list[dict]:
    timing = {"images_per_s", "seconds", "time", "elapsed_s", "epoch_seconds"}
    return [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_streamed_logs_the_same_losses_as_in_memory(tmp_path, one_thread):
    from aevb.config import make_config
    from aevb.training.loop import train

    path = tmp_path / "digits.npy"
    np.save(path, np.repeat(_digits_uint8()[..., None], 3, axis=3))  # colour, channels last
    records = {}
    for stream in ("no", "yes"):
        config = make_config(data=str(path), epochs=3, stream=stream, out=str(tmp_path / stream), latent_dim=4,
                             shuffle=True, val_split=100, binarize="threshold")
        model, run = train(config, progress=False)
        records[stream] = _records(run)
    assert len(records["yes"]) >= 4 and any("val_elbo" in r for r in records["yes"])
    assert records["yes"] == records["no"]  # every loss, term and evaluation, to the last bit


def test_auto_streams_only_when_the_float32_copy_does_not_fit(tmp_path, monkeypatch):
    path = tmp_path / "x.npy"
    np.save(path, _digits_uint8())
    assert not streaming._too_large_for_memory(1)
    assert streaming._too_large_for_memory(1 << 60)
    sizes = []
    monkeypatch.setattr(streaming, "_too_large_for_memory", lambda n_bytes: sizes.append(n_bytes) or True)
    assert isinstance(data.load_data(str(path)).train, StreamedImages)
    assert sizes == [1797 * 64 * 4]  # the float32 copy's size decides
    monkeypatch.setattr(streaming, "_too_large_for_memory", lambda n_bytes: False)
    assert isinstance(data.load_data(str(path)).train, torch.Tensor)


def test_stream_misuse_is_a_clear_error(tmp_path):
    np.save(tmp_path / "table.npy", np.random.default_rng(0).normal(size=(50, 3)))
    np.savetxt(tmp_path / "images.csv", np.zeros((5, 4)), delimiter=",")
    with pytest.raises(UserError, match="registered data set 'digits' is loaded into memory"):
        data.load_data("digits", stream="yes")
    with pytest.raises(UserError, match="is for images"):
        data.load_data(str(tmp_path / "table.npy"), stream="yes")
    with pytest.raises(UserError, match="reads a .npy file or an image folder"):
        data.load_data(str(tmp_path / "images.csv"), stream="yes")
    with pytest.raises(UserError, match="unknown stream mode"):
        data.load_data("digits", stream="maybe")
    # a table is never streamed by auto: it is standardised in memory
    assert isinstance(data.load_data(str(tmp_path / "table.npy"), stream="auto").train, torch.Tensor)


def test_cli_stream_option(tmp_path, capsys):
    path = tmp_path / "x.npy"
    np.save(path, _digits_uint8())
    out = tmp_path / "run"
    assert aevb_cli("train", "--data", path, "--stream", "yes", "--epochs", 1, "--latent-dim", 2, "-q",
                    "--out", out) == 0
    assert json.loads((out / "config.json").read_text())["stream"] == "yes"
    shutil.rmtree(out)
    capsys.readouterr()
    assert aevb_cli("train", "--data", "digits", "--stream", "yes", "--out", out) != 0
    err = capsys.readouterr().err
    assert "drop --stream" in err and "Traceback" not in err


def test_large_folders_decode_on_threads_in_file_order(tmp_path, monkeypatch):
    """The threaded decoder gives each file's pixels in order, None where one cannot be decoded, as one thread does."""
    import io

    from PIL import Image

    rng = np.random.default_rng(1)
    files = []
    for i in range(300):  # above the threshold for threads
        path = tmp_path / f"{i:03d}.png"
        if i % 37 == 5:  # a truncated file here and there
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(png, format="PNG")
            path.write_bytes(png.getvalue()[:len(png.getvalue()) // 2])
        else:
            Image.fromarray(rng.integers(0, 256, (int(rng.integers(6, 20)), 11, 3), dtype=np.uint8)).save(path)
        files.append(path)
    monkeypatch.setattr(folders, "_usable_cores", lambda: 4)
    threaded = list(folders._decode_all(files, "RGB", 8, "test"))
    monkeypatch.setattr(folders, "_usable_cores", lambda: 1)
    single = list(folders._decode_all(files, "RGB", 8, "test"))
    assert len(threaded) == len(single) == 300
    assert [i for i, a in enumerate(threaded) if a is None] == [i for i in range(300) if i % 37 == 5]
    for a, b in zip(threaded, single):
        assert (a is None and b is None) or (a.shape == (8, 8, 3) and np.array_equal(a, b))


def test_ordered_map_keeps_order_and_bounds_what_is_in_flight():
    import threading
    import time

    lock, started = threading.Lock(), [0]

    def square(i):
        with lock:
            started[0] += 1
        time.sleep(0.002 * (i % 3))  # finish out of order
        return i * i

    out, ahead = [], []
    for value in folders._ordered_map(square, list(range(60)), workers=4, in_flight=8):
        time.sleep(0.003)  # a slow consumer: unbounded, the threads would run far ahead
        with lock:
            ahead.append(started[0] - len(out))
        out.append(value)
    assert out == [i * i for i in range(60)]
    assert max(ahead) <= 8 + 1  # in flight, and the one just submitted for the next
