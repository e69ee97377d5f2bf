"""The ``aevb`` command end to end: every command on small data, Ctrl-C, a diverging run,
the bad-input cases of the issue (one line, exit status 2, no traceback) and --help without
torch (how fast it answers is measured by bench/cli_help.py, not here).

What must be seen from outside (exit statuses, stderr, signals, what --help imports)
runs ``aevb`` as a real subprocess; the rest calls ``aevb.cli.main`` in this
process, which is the same code without the 2–4 s of importing torch again.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import aevb
from aevb.cli import cli
from aevb.errors import UserError
from aevb.run.checkpoints import read_checkpoint
from aevb.run.folder import CHECKPOINT
from conftest import aevb_cli

# --val-split 0: these runs watch the test split, as before validation became the default (issue 30)
SMALL = ("--latent-dim", "4", "--hidden", "32", "--device", "cpu", "-q", "--val-split", "0")
_SCRIPT = Path(sys.executable).with_name("aevb")
AEVB = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "aevb.cli"]
COMMANDS = list(cli.commands)


# ---------------------------------------------------------------------------
# helpers




def run_aevb(*args, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``aevb ARGS`` as a subprocess in ``cwd``."""
    return subprocess.run([*AEVB, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def assert_user_error(proc: subprocess.CompletedProcess, *names: str) -> str:
    """Exit status 2, no traceback, and stderr is one line 'error: …' naming each of ``names``."""
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for name in names:
        assert name in lines[0], f"{name!r} not in {lines[0]!r}"
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "weights.safetensors")


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def write_idx_images(path: Path, images: np.ndarray) -> None:
    """An IDX file of uint8 images [N, H, W], as MNIST is published."""
    header = struct.pack(">BBBB", 0, 0, 0x08, images.ndim) + struct.pack(f">{images.ndim}I", *images.shape)
    path.write_bytes(header + images.astype(np.uint8).tobytes())


def png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A VAE trained for two epochs on digits (do not change it; copy it)."""
    out = tmp_path_factory.mktemp("cli") / "vae-digits"
    assert aevb_cli("train", "--out", out, *SMALL, "--epochs", 2) == 0
    return out


@pytest.fixture
def run_copy(run, tmp_path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    """300 rows of 5 correlated Gaussian columns (2 latent factors), with a header."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 2)) @ rng.normal(size=(2, 5)) + 0.1 * rng.normal(size=(300, 5))
    path = tmp_path_factory.mktemp("table") / "table.csv"
    np.savetxt(path, x, delimiter=",", header="a,b,c,d,e", comments="")
    return path


# ---------------------------------------------------------------------------
# 7. every command end to end


def test_eval_writes_eval_json_and_prints_a_table(run, capsys):
    capsys.readouterr()
    assert aevb_cli("eval", run, "-k", 50) == 0
    out = capsys.readouterr().out
    assert "negative ELBO" in out and "negative log-likelihood (k=50" in out
    metrics = json.loads((run / "eval.json").read_text())
    assert metrics["examples"] == 180 and metrics["iw_samples"] == 50  # the last 10 % of 1,797 digits
    assert metrics["neg_elbo"] == pytest.approx(metrics["reconstruction_nll"] + metrics["kl"])
    # the importance-sampled log-likelihood is above the ELBO (on average; k = 50)
    assert 0 < metrics["nll"] <= metrics["neg_elbo"] + 0.5
    assert metrics["bits_per_dim"] is None or metrics["bits_per_dim"] > 0
    assert 0 <= metrics["active_units"] <= metrics["latent_dim"] == 4
    assert f"{metrics['neg_elbo']:.3f}" in out
    # the default: bf16 multiplies in the importance sampler where they are faster (AMX)
    import torch

    from aevb.acceleration.bf16 import bf16_is_faster

    assert metrics["iw_precision"] == ("bf16" if bf16_is_faster(torch.device("cpu")) else "fp32")


def test_eval_precision_applies_to_the_importance_sampler_only(run_copy, capsys, monkeypatch):
    from aevb.acceleration import bf16 as precision

    monkeypatch.setattr(precision, "bf16_is_native", lambda device: True)  # emulated where not: slow, same maths
    (run_copy / "eval.json").unlink(missing_ok=True)  # one with more samples would be kept (issue 30)
    assert aevb_cli("eval", run_copy, "-k", 20, "--precision", "bf16") == 0
    out = capsys.readouterr().out
    bf16 = json.loads((run_copy / "eval.json").read_text())
    assert bf16["iw_precision"] == "bf16" and "negative log-likelihood (k=20, bf16)" in out
    assert aevb_cli("eval", run_copy, "-k", 20, "--precision", "fp32") == 0
    fp32 = json.loads((run_copy / "eval.json").read_text())
    assert fp32["iw_precision"] == "fp32"
    assert fp32["neg_elbo"] == bf16["neg_elbo"]  # the ELBO is float32 in both (same seed)
    assert fp32["nll"] != bf16["nll"] and abs(fp32["nll"] - bf16["nll"]) < 0.05
    monkeypatch.setattr(precision, "bf16_is_native", lambda device: False)
    capsys.readouterr()
    assert aevb_cli("eval", run_copy, "-k", 20, "--precision", "bf16") != 0
    assert "no native bfloat16" in capsys.readouterr().err


def test_sample_writes_a_grid_of_n_images(run, tmp_path):
    path = tmp_path / "samples.png"
    assert aevb_cli("sample", run, "-n", 16, "-o", path) == 0
    width, height = png_size(path)
    # a 4×4 grid of 8×8 tiles with 2-pixel padding is 42 pixels a side, upscaled by a whole factor
    assert width == height and width % 42 == 0
    from PIL import Image

    with Image.open(path) as image:
        grid = np.asarray(image.convert("L"))
    scale = width // 42
    for line in range(5):  # the padding between the tiles is white
        band = slice(line * 10 * scale, (line * 10 + 2) * scale)
        assert (grid[band, :] == 255).all() and (grid[:, band] == 255).all()
    # seeded: the same seed gives the same picture, another seed another one
    again, other = tmp_path / "again.png", tmp_path / "other.png"
    assert aevb_cli("sample", run, "-n", 16, "-o", again) == 0
    assert aevb_cli("sample", run, "-n", 16, "--seed", 1, "-o", other) == 0
    assert again.read_bytes() == path.read_bytes() != other.read_bytes()
    # the default path is in the run folder
    assert aevb_cli("sample", run, "-n", 4) == 0
    assert png_size(run / "images" / "samples-T1.png")[0] % 22 == 0  # 2×2 grid


def test_reconstruct_writes_originals_above_reconstructions(run, tmp_path):
    path = tmp_path / "recon.png"
    assert aevb_cli("reconstruct", run, "-n", 5, "-o", path) == 0
    width, height = png_size(path)
    # 5 columns, 2 rows of 8×8 tiles with 2-pixel padding: 52 × 22, upscaled by a whole factor
    assert width * 22 == height * 52 and width % 52 == 0
    assert aevb_cli("reconstruct", run) == 0
    width, height = png_size(run / "images" / "reconstructions.png")
    assert width * 22 == height * 102  # one per class: 10 columns


def test_a_csv_table_trains_and_evaluates_but_draws_no_pictures(table, tmp_path, capsys):
    out = tmp_path / "table-run"
    assert aevb_cli("train", "--data", table, "--likelihood", "gaussian-diag", "--arch", "mlp",
                    "--latent-dim", 2, "--hidden", 32, "--epochs", 3, "--batch-size", 64, "-q", "--out", out,
                    "--val-split", 0) == 0
    model = aevb.load(out / "model")
    assert model.data_shape == (5,) and model.config["likelihood"] == "gaussian-diag"
    assert not list((out / "images").glob("*.png"))
    assert len([r for r in records(out) if "test_elbo" in r]) == 3
    assert aevb_cli("eval", out, "-k", 50) == 0
    metrics = json.loads((out / "eval.json").read_text())
    assert metrics["examples"] == 30 and metrics["bits_per_dim"] is None
    assert math.isfinite(metrics["nll"]) and metrics["nll"] <= metrics["neg_elbo"] + 0.5
    # pictures of a table are refused; its samples and reconstructions are tables in the file's units (issue 31)
    capsys.readouterr()
    assert aevb_cli("sample", out, "--format", "png") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1
    assert "pictures" in err and "rows of 5 numbers" in err
    assert aevb_cli("sample", out, "-n", 400) == aevb_cli("reconstruct", out, "-n", 30) == 0
    samples = np.loadtxt(out / "samples-T1.csv", delimiter=",", skiprows=1)
    assert (out / "samples-T1.csv").read_text().splitlines()[0] == "a,b,c,d,e" and samples.shape == (400, 5)
    original = np.loadtxt(table, delimiter=",", skiprows=1)
    assert np.abs(samples.mean(0) - original.mean(0)).max() < 0.5 * original.std(0).max()  # not standardised
    reconstructions = np.loadtxt(out / "reconstructions.csv", delimiter=",", skiprows=1)
    assert reconstructions.shape == (30, 10)
    np.testing.assert_allclose(reconstructions[:, :5], original[-30:], rtol=1e-5, atol=1e-5)  # the test rows


def test_a_toml_config_file_sets_options(tmp_path):
    config = tmp_path / "small.toml"
    config.write_text('[model]\nlatent_dim = 3\nhidden = [32]\n\n[training]\nsteps = 2\nseed = 7\n')
    out = tmp_path / "toml-run"
    assert aevb_cli("train", "--config", config, "--out", out, "--device", "cpu", "-q") == 0
    written = json.loads((out / "config.json").read_text())
    assert (written["latent_dim"], written["hidden"], written["steps"], written["seed"]) == (3, [32], 2, 7)
    assert aevb.load(out / "model").latent_dim == 3
    # flags override the file
    out2 = tmp_path / "toml-override"
    assert aevb_cli("train", "--config", config, "--latent-dim", 5, "--out", out2, "--device", "cpu", "-q") == 0
    assert aevb.load(out2 / "model").latent_dim == 5


def test_force_overwrites_an_existing_run(run_copy):
    before = weights(run_copy)
    # the user's own files in the run's folders stay, even where they look like the run's; the old run's
    # pictures do not (it wrote an epoch-2 picture, the one-epoch run that replaces it none)
    (run_copy / "images" / "photo.jpg").write_bytes(b"precious")
    (run_copy / "model" / "notes.txt").write_text("mine")
    (run_copy / "images" / "old-figure-of-aevb.png").write_bytes(b"")
    assert (run_copy / "images" / "reconstructions-epoch002.png").is_file()
    assert aevb_cli("train", "--out", run_copy, *SMALL, "--epochs", 1, "--seed", 3, "--force") == 0
    assert json.loads((run_copy / "config.json").read_text())["seed"] == 3
    after = weights(run_copy)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    steps = [r["step"] for r in records(run_copy)]
    assert steps == sorted(steps) and steps[-1] == 13  # a new log, not appended to the old one
    assert read_checkpoint(run_copy / CHECKPOINT)[1]["step"] == 13
    assert (run_copy / "images" / "photo.jpg").read_bytes() == b"precious"
    assert (run_copy / "model" / "notes.txt").read_text() == "mine"
    assert (run_copy / "images" / "old-figure-of-aevb.png").exists()  # not the run's: aevb never wrote it
    assert not (run_copy / "images" / "reconstructions-epoch002.png").exists()


def test_a_model_refuses_images_of_another_size(run):
    model = aevb.load(run / "model")
    with pytest.raises(UserError, match="8, 8"):
        model.encode(torch.rand(2, 1, 28, 28))


# ---------------------------------------------------------------------------
# 4. Ctrl-C


def test_ctrl_c_saves_a_checkpoint_exits_130_and_the_run_resumes(tmp_path):
    args = ["train", "--out", "run", *SMALL, "--epochs", 200, "--log-every", 1]
    proc = subprocess.Popen([*AEVB, *map(str, args)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 90
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert proc.poll() is None, f"the run ended early: {proc.communicate()}"
            assert time.monotonic() < deadline, "no metrics after 90 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: interrupted at step "), stderr
    assert "aevb train --resume run" in lines[0]
    step = int(lines[0].split("interrupted at step ")[1].split(";")[0])
    state, meta = read_checkpoint(tmp_path / "run" / CHECKPOINT)
    assert meta["step"] == step >= 1
    assert all(torch.isfinite(v).all() for k, v in state.items() if k.startswith("model."))
    steps = [r["step"] for r in records(tmp_path / "run") if "loss" in r]
    assert steps[-1] == step and steps == sorted(set(steps))

    # resume and finish: the same weights as a run that was never interrupted
    target = step + 6
    assert aevb_cli("train", "--resume", tmp_path / "run", "--steps", target, "-q") == 0
    assert read_checkpoint(tmp_path / "run" / CHECKPOINT)[1]["step"] == target
    straight = tmp_path / "straight"
    assert aevb_cli("train", "--out", straight, *SMALL, "--epochs", 200, "--log-every", 1, "--steps", target) == 0
    assert_same_tensors(weights(tmp_path / "run"), weights(straight))


# ---------------------------------------------------------------------------
# 5. a diverging run


def test_a_nan_loss_ends_with_one_line_naming_the_step_and_the_terms(tmp_path):
    proc = run_aevb("train", "--out", "run", *SMALL, "--lr", "1e30", "--epochs", 2, cwd=tmp_path)
    line = assert_user_error(proc, "non-finite", "step 2 ", "loss=", "reconstruction=", "kl=", "--lr")
    assert "loss=nan" in line or "loss=inf" in line
    assert not (tmp_path / "run" / "model").exists()


# ---------------------------------------------------------------------------
# 9. bad input: one line, exit status 2, no traceback


@pytest.mark.parametrize("option,value", [("--likelihood", "gausian"), ("--model", "vea"), ("--arch", "cnn"),
                                          ("--latent-dim", "two")])
def test_an_unknown_option_value_is_one_line(option, value, tmp_path):
    proc = run_aevb("train", option, value, cwd=tmp_path)
    assert_user_error(proc, option, value)
    assert not (tmp_path / "runs").exists()


def test_a_missing_data_file_is_one_line(tmp_path):
    proc = run_aevb("train", "--data", "missing.npy", cwd=tmp_path)
    assert_user_error(proc, "missing.npy", "not found")
    assert not list((tmp_path / "runs").rglob("*.json"))


@pytest.mark.parametrize("folder", ["nonexistent", "empty"])
def test_a_folder_that_is_not_a_run_is_one_line(folder, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(run_aevb("eval", folder, cwd=tmp_path), folder, "run folder")
    assert not (tmp_path / "nonexistent").exists()


def test_a_corrupt_model_is_one_line(run_copy):
    weights_file = run_copy / "model" / "weights.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[: weights_file.stat().st_size // 2])
    proc = run_aevb("eval", run_copy, "-k", 5, cwd=run_copy.parent)
    assert_user_error(proc, "weights.safetensors", "corrupt")


def test_a_corrupt_checkpoint_is_one_line(run_copy):
    checkpoint = run_copy / CHECKPOINT
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    proc = run_aevb("train", "--resume", run_copy, "--epochs", 3, cwd=run_copy.parent)
    assert_user_error(proc, "checkpoint", "corrupt")


def test_an_existing_out_is_not_overwritten_without_force(run_copy):
    before = snapshot(run_copy)
    proc = run_aevb("train", "--out", run_copy, "--epochs", 1, cwd=run_copy.parent)
    assert_user_error(proc, str(run_copy), "already exists", "--force")
    assert snapshot(run_copy) == before


def test_data_of_another_image_size_is_one_line(run_copy):
    (run_copy / "eval.json").unlink(missing_ok=True)
    images = np.random.default_rng(0).integers(0, 256, size=(40, 28, 28))
    write_idx_images(run_copy.parent / "big-images-idx3-ubyte", images)
    config = json.loads((run_copy / "config.json").read_text())
    config["data"] = str(run_copy.parent / "big-images-idx3-ubyte")
    (run_copy / "config.json").write_text(json.dumps(config))
    for command in ("eval", "reconstruct"):
        proc = run_aevb(command, run_copy, "-k" if command == "eval" else "-n", 5, cwd=run_copy.parent)
        assert_user_error(proc, "28×28", "8×8")
    assert not (run_copy / "eval.json").exists()


def test_a_config_file_with_an_unknown_key_is_one_line(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"latent_dim": 3, "learning_rate": 0.1}))
    proc = run_aevb("train", "--config", "bad.json", cwd=tmp_path)
    assert_user_error(proc, "bad.json", "learning_rate")
    (tmp_path / "bad.toml").write_text("[model]\nlatent_dims = 3\n")
    assert_user_error(run_aevb("train", "--config", "bad.toml", cwd=tmp_path), "latent_dims")


def test_resume_with_force_is_refused(run_copy, capsys):
    before = snapshot(run_copy)
    assert aevb_cli("train", "--resume", run_copy, "--force", "--epochs", 3) == 2
    assert "drop one of them" in capsys.readouterr().err and snapshot(run_copy) == before


def test_resume_with_another_learning_rate_is_refused(run_copy):
    before = snapshot(run_copy)
    proc = run_aevb("train", "--resume", run_copy, "--lr", "0.01", "--epochs", 3, cwd=run_copy.parent)
    assert_user_error(proc, "--resume", "--lr")
    assert snapshot(run_copy) == before


# ---------------------------------------------------------------------------
# 10. --help does not import torch and has examples (its time is measured by bench/cli_help.py)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_lists_the_commands_or_has_examples(command, tmp_path):
    args = [*AEVB, *([command] if command else []), "--help"]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    if command is None:
        assert all(name in proc.stdout for name in COMMANDS)
    else:
        assert "Example" in proc.stdout and f"aevb {command}" in proc.stdout


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_does_not_import_torch(command, tmp_path):
    argv = [*([command] if command else []), "--help"]
    code = (
        "import sys\n"
        "from aevb.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision'})\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_every_train_flag_of_the_issue_exists():
    help_text = subprocess.run([*AEVB, "train", "--help"], capture_output=True, text=True, timeout=60).stdout
    for flag in ("--data", "--labels", "--test-split", "--model", "--likelihood", "--arch", "--latent-dim",
                 "--hidden", "--beta", "--epochs", "--batch-size", "--lr", "--seed", "--device", "--out",
                 "--resume", "--config", "--force"):
        assert f"{flag} " in help_text, flag


# ---------------------------------------------------------------------------
# misuse found in review: refused up front, and never at the cost of earlier results


@pytest.mark.parametrize("option,value", [("--grad-clip", "-1"), ("--beta-warmup", "-5"), ("--image-every", "-1"),
                                          ("--lr", "nan"), ("--beta", "inf"), ("--free-bits", "nan"),
                                          ("--likelihood-scale", "0"), ("--seed", "99999999999999999999"),
                                          ("--image-size", "100000")])
def test_out_of_range_training_options_are_refused_before_anything_is_written(tmp_path, capsys, option, value):
    extra = ("--likelihood", "gaussian") if option == "--likelihood-scale" else ()
    assert aevb_cli("train", option, value, *extra, *SMALL, "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and option in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [("sample", "--temperature", "nan"), ("explore", "--grid-range", "inf")])
def test_non_finite_figure_options_are_refused(run, capsys, command):
    assert aevb_cli(command[0], run, *command[1:]) == 2
    assert "not a finite number" in capsys.readouterr().err


def test_a_run_that_fails_to_start_leaves_no_folder_and_force_keeps_the_old_run(run_copy, tmp_path, capsys):
    assert aevb_cli("train", "--data", tmp_path / "missing.npy", *SMALL, "--out", tmp_path / "new") == 2
    assert not (tmp_path / "new").exists()  # the same --out works once the data are fixed
    before = snapshot(run_copy)
    assert aevb_cli("train", "--data", tmp_path / "missing.npy", *SMALL, "--out", run_copy, "--force") == 2
    assert snapshot(run_copy) == before  # --force clears a folder only once the new run can start
    (tmp_path / "file").write_text("not a folder")
    assert aevb_cli("train", *SMALL, "--out", tmp_path / "file") == 2
    assert "is a file" in capsys.readouterr().err


def test_resume_refuses_a_length_it_has_reached_and_records_a_new_one_before_training(run_copy, capsys):
    before = snapshot(run_copy)
    assert aevb_cli("train", "--resume", run_copy, "--epochs", 1) == 2  # the run has 2 epochs
    assert "pass a larger --epochs" in capsys.readouterr().err
    assert aevb_cli("train", "--resume", run_copy) == 2  # finished: nothing to continue
    assert snapshot(run_copy) == before
    # a length set with --steps is replaced by a later --epochs
    config = json.loads((run_copy / "config.json").read_text())
    config["steps"] = 5
    (run_copy / "config.json").write_text(json.dumps(config))
    assert aevb_cli("train", "--resume", run_copy, "--epochs", 3, "-q") == 0
    config = json.loads((run_copy / "config.json").read_text())
    assert config["epochs"] == 3 and config["steps"] is None
    _, meta = read_checkpoint(run_copy / CHECKPOINT)
    assert meta["epoch"] == 3


def test_resume_skips_a_metrics_line_cut_short(run_copy):
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "lo')  # the process was killed mid-line
    assert aevb_cli("train", "--resume", run_copy, "--epochs", 3, "-q") == 0
    lines = (run_copy / "metrics.jsonl").read_text().splitlines()
    assert all(isinstance(json.loads(line), dict) for line in lines)


def test_a_checkpoint_missing_its_random_state_is_reported_as_corrupt(run_copy, capsys):
    from safetensors.torch import save_file

    path = run_copy / CHECKPOINT
    tensors = load_file(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    del tensors["rng.shuffle"]
    save_file(tensors, path, metadata=metadata)
    assert aevb_cli("train", "--resume", run_copy, "--epochs", 3) == 2
    err = capsys.readouterr().err
    assert "is corrupt" in err and "rng.shuffle" in err and "Traceback" not in err


def test_bernoulli_refuses_real_valued_data(table, tmp_path, capsys):
    assert aevb_cli("train", "--data", table, *SMALL, "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "models values in [0, 1]" in err and "gaussian" in err
    assert not (tmp_path / "run").exists()


def test_run_folders_store_absolute_data_paths_and_reproduce_into_a_new_folder(table, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(table.parent)
    assert aevb_cli("train", "--data", table.name, "--likelihood", "gaussian-diag", *SMALL, "--epochs", 1,
                    "--out", tmp_path / "run") == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"] == str(table.resolve())
    monkeypatch.chdir(tmp_path)  # elsewhere, the run still finds its data
    assert aevb_cli("eval", tmp_path / "run", "-k", 2) == 0
    # --config RUN/config.json alone trains a copy into a fresh folder, not over RUN
    assert aevb_cli("train", "--config", tmp_path / "run" / "config.json", "-q") == 0
    assert (tmp_path / "runs" / "vae-table" / "model").is_dir()
    # nor, from a copy of the run folder, over the run it was copied from (its config.json names that one)
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    before = snapshot(tmp_path / "run")
    assert aevb_cli("train", "--config", tmp_path / "copy" / "config.json", "--force", "-q") == 0
    assert snapshot(tmp_path / "run") == before and (tmp_path / "runs" / "vae-table-2" / "model").is_dir()


def test_an_unwritable_output_is_one_error_naming_it(run_copy, monkeypatch, capsys):
    import errno
    import os

    def read_only(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(dst))

    monkeypatch.setattr(os, "replace", read_only)
    (run_copy / "eval.json").unlink(missing_ok=True)  # one with more samples would be kept (issue 30)
    assert aevb_cli("eval", run_copy, "-k", 2) == 2
    out, err = capsys.readouterr()
    assert "negative ELBO" in out  # the figures were shown before eval.json could not be written
    assert "Traceback" not in err and err.count("error:") == 1
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("error: cannot write") and "eval.json" in last and "Read-only file system" in last


def _one_error_line(capsys, *names: str) -> None:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "frame #" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for name in names:
        assert name in lines[0], f"{name!r} not in {lines[0]!r}"


@pytest.mark.parametrize("command", ["eval", "sample", "explore"])
def test_a_seed_torch_cannot_take_is_one_line(run, capsys, command):
    assert aevb_cli(command, run, "--seed", 10**23) == 2
    _one_error_line(capsys, "--seed", "range")


def test_the_model_folder_for_the_run_folder_is_one_line_naming_the_run(run, capsys):
    assert aevb_cli("eval", run / "model", "-k", 2) == 2
    _one_error_line(capsys, "exported model", f"({run})")


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    (tmp_path / "c.toml").write_bytes(b"\xff\xfe")
    assert aevb_cli("train", "--config", tmp_path / "c.toml") == 2
    _one_error_line(capsys, "c.toml", "UTF-8")


def test_a_hand_edited_model_config_is_one_line(run_copy, capsys):
    path = run_copy / "model" / "config.json"
    config = json.loads(path.read_text())
    config["args"]["latent_dim"] = "x"
    path.write_text(json.dumps(config))
    assert aevb_cli("sample", run_copy, "-n", 4) == 2
    _one_error_line(capsys, "model/config.json", "corrupt")


def test_running_out_of_memory_is_one_line(run, monkeypatch, capsys, tmp_path):
    def too_big(*args, **kwargs):  # what torch's CPU allocator raises for an allocation it cannot make
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 160000000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(aevb.model.base.Model, "sample", too_big)
    assert aevb_cli("sample", run, "-n", 2**16, "--out", tmp_path / "s.png") == 2  # the most -n takes
    _one_error_line(capsys, "not enough memory", "160000000000 bytes", "-n")
    # and torch's C++ stack is no part of a message on bad model sizes
    assert aevb_cli("train", "--latent-dim", 10**20, "--out", tmp_path / "huge", "-q") == 2
    _one_error_line(capsys, "latent")


def test_commands_on_an_unfinished_run_say_which_checkpoint_they_use(run_copy, capsys):
    shutil.rmtree(run_copy / "model")  # as while training: only the checkpoint
    (run_copy / "eval.json").unlink(missing_ok=True)  # one with more samples would be kept (issue 30)
    assert aevb_cli("eval", run_copy, "-k", 2) == 0
    captured = capsys.readouterr()
    assert "has not finished training" in captured.err and "step 26" in captured.err
    assert json.loads((run_copy / "eval.json").read_text())["checkpoint_step"] == 26


def test_resume_refuses_a_config_json_edited_since_the_checkpoint(run_copy, capsys):
    config = json.loads((run_copy / "config.json").read_text())
    config["lr"] = 0.5
    (run_copy / "config.json").write_text(json.dumps(config))
    assert aevb_cli("train", "--resume", run_copy, "--epochs", 3) == 2
    err = capsys.readouterr().err
    assert "differs from the one its checkpoint was trained with" in err and "lr: 0.003 → 0.5" in err


@pytest.mark.parametrize("options,cause", [(("--test-split", "1.5"), "must be whole"),
                                           (("--image-size", "16"), "keeps its own size"),
                                           (("--data-dir", "."), "for the registered data sets")])
def test_options_that_would_be_ignored_are_refused(tmp_path, capsys, options, cause):
    data = ("--data", str(tmp_path / "x.npy")) if options[0] == "--data-dir" else ()
    if data:
        np.save(tmp_path / "x.npy", np.zeros((20, 4, 4), dtype=np.uint8))
    assert aevb_cli("train", *data, *options, *SMALL, "--out", tmp_path / "run") == 2
    assert cause in capsys.readouterr().err


def test_few_unlabelled_test_images_and_more_pictures_than_classes(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).integers(0, 256, (40, 8, 8), dtype=np.uint8))
    run = tmp_path / "run"
    assert aevb_cli("train", "--data", tmp_path / "x.npy", "--test-split", 5, *SMALL, "--epochs", 1,
                    "--out", run) == 0  # reconstruction pictures of the 5 there are
    assert aevb_cli("reconstruct", run, "-n", 20) == 0


def test_an_autoencoder_has_no_prior_samples(tmp_path, capsys):
    from aevb.analysis.gallery import plan_figures
    from aevb.run.open import open_run

    run = tmp_path / "ae"
    assert aevb_cli("train", "--model", "ae", *SMALL, "--epochs", 1, "--out", run) == 0
    assert aevb_cli("sample", run) == 2
    assert "no prior to sample" in capsys.readouterr().err
    plan = plan_figures(open_run(run).model, run)
    assert "prior-samples.png" not in plan.figures and "no prior" in plan.skipped["prior-samples.png"]


def test_figures_must_be_named_png_and_configs_toml_or_json(run, tmp_path, capsys):
    assert aevb_cli("sample", run, "-o", tmp_path / "x.jpg") == 2
    assert "ending in .png" in capsys.readouterr().err and not (tmp_path / "x.jpg").exists()
    (tmp_path / "c.yaml").write_text("epochs: 2\n")
    assert aevb_cli("train", "--config", tmp_path / "c.yaml", *SMALL) == 2
    assert "TOML (.toml) or JSON" in capsys.readouterr().err
    (tmp_path / "c.toml").write_text("epochs = true\n")
    assert aevb_cli("train", "--config", tmp_path / "c.toml", *SMALL) == 2
    assert "--epochs: cannot read True" in capsys.readouterr().err


def test_runs_written_by_earlier_versions_still_load(run_copy, capsys):
    """Earlier versions stored --grad-clip 0 (no clipping) and --image-size for non-folders, now refused as flags."""
    config = json.loads((run_copy / "config.json").read_text())
    config.update(grad_clip=0, image_size=32, seed=-1)
    (run_copy / "config.json").write_text(json.dumps(config))
    assert aevb_cli("eval", run_copy, "-k", 2) == 0


def test_runs_started_together_get_a_folder_each(tmp_path, monkeypatch):
    from aevb.config import make_config
    from aevb.run.folder import make_run_dir, new_run_dir

    monkeypatch.chdir(tmp_path)
    config = make_config(epochs=1)
    planned = [new_run_dir(config), new_run_dir(config)]  # both load their data before claiming a folder
    assert planned[0] == planned[1]
    claimed = [make_run_dir(path, config) for path in planned]
    assert claimed == [Path("runs/vae-digits"), Path("runs/vae-digits-2")]


def test_resume_exports_a_run_that_finished_training_but_not_its_export(run_copy):
    shutil.rmtree(run_copy / "model")
    assert aevb_cli("train", "--resume", run_copy, "-q") == 0
    assert (run_copy / "model" / "weights.safetensors").is_file()


def test_resume_from_python_and_with_the_data_path_as_given(table, tmp_path, monkeypatch):
    from aevb.run.folder import read_run_config
    from aevb.training.loop import train

    monkeypatch.chdir(table.parent)
    run = tmp_path / "run"
    assert aevb_cli("train", "--data", table.name, "--likelihood", "gaussian-diag", *SMALL, "--epochs", 1,
                    "--out", run) == 0
    # the same --data, relative as first given, is no change
    assert aevb_cli("train", "--resume", run, "--data", table.name, "--epochs", 2, "-q") == 0
    import dataclasses

    config = dataclasses.replace(read_run_config(run), epochs=3, out=None)
    train(config, resume=run, progress=False)


def test_threshold_binarisation_makes_any_data_bernoulli(tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).uniform(-1, 1, (60, 6)))
    assert aevb_cli("train", "--data", tmp_path / "x.npy", "--binarize", "threshold", *SMALL, "--epochs", 1,
                    "--out", tmp_path / "run") == 0
