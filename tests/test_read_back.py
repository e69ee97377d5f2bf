"""Values taken from files and from the user (issue 29, classes 5–8): checked before they are used.

5. every size a file gives is checked against the weights' header before anything is built: for every
   registered model, in an exported model, a checkpoint and a resumed run's config.json;
6. the same checks for every file aevb reads back (dtypes, finiteness, counts and positions), one message
   naming the file and the field;
7. no traceback for a test split of one example, deeply nested JSON or TOML anywhere, a data shape of zero, an
   option that multiplies memory beyond its bound; running out of memory names the options that asked;
8. an empty value is an error naming the option; an option the chosen likelihood does not take is refused.

The damaged files are made here, from a small run trained once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import aevb
from aevb.config import run_options
from aevb.errors import UserError
from aevb.io import MAX_NESTING, write_safetensors
from aevb.model import base
from aevb.registry import FIGURES, LIKELIHOODS, MODELS
from aevb.run.checkpoints import read_checkpoint
from aevb.run.folder import CHECKPOINT
from conftest import aevb_cli

SMALL = ("--latent-dim", "4", "--hidden", "32", "--device", "cpu", "-q")
STEPS_PER_EPOCH = 13


def one_error_line(capsys, *names: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line.strip() for line in err.replace("\r", "\n").splitlines()]
    lines = [line for line in lines if line and not line.startswith(("note:", "evaluating"))]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for name in names:
        assert name in lines[0], f"{name!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("read-back")


@pytest.fixture(scope="module")
def run(runs) -> Path:
    """A VAE trained for two epochs on digits (copy it before changing it)."""
    assert aevb_cli("train", "--out", runs / "vae", *SMALL, "--epochs", 2) == 0
    return runs / "vae"


@pytest.fixture
def run_copy(run, tmp_path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def rewrite_checkpoint(path: Path, change) -> None:
    """Change a checkpoint's tensors and metadata as they are, unchecked (it may be damaged already)."""
    from safetensors import safe_open

    state = load_file(path)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
    change(state, meta)
    write_safetensors(path, state, {"format": "aevb-checkpoint", "meta": json.dumps(meta)})


@pytest.fixture
def real_builds(monkeypatch) -> list[str]:
    """The devices models are built on from here: 'meta' holds no memory, anything else does."""
    built = []
    real = base.build_model

    def build_model(name, **kwargs):
        model = real(name, **kwargs)
        built.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(base, "build_model", build_model)
    import aevb.run.checkpoints

    monkeypatch.setattr(aevb.run.checkpoints, "build_model", build_model)
    return built


# ---------------------------------------------------------------------------
# 5. sizes from files checked against the weights before anything is built


@pytest.mark.parametrize("model", MODELS.names())
def test_every_models_sizes_are_checked_against_its_weights_before_it_is_built(model, runs, real_builds):
    run = runs / f"sizes-{model}"
    if not run.exists():
        assert aevb_cli("train", "--out", run, "--model", model, *SMALL, "--steps", 1) == 0
    exported = run / "model"
    original = (exported / "config.json").read_text()
    try:
        for change in ({"hidden": [5_000_000]}, {"hidden": [32] * 1_000_000}, {"latent_dim": 1_000_000_000},
                       {"data_shape": [1, 100_000, 100_000]}):
            edit_json(exported / "config.json", lambda c: c["args"].update(change))
            real_builds.clear()
            with pytest.raises(UserError, match=r"config\.json"):
                aevb.load(exported)
            assert "cpu" not in real_builds, (model, change)  # refused before a model was allocated
            (exported / "config.json").write_text(original)
    finally:
        (exported / "config.json").write_text(original)


def test_a_checkpoints_sizes_are_checked_before_its_model_is_built(run_copy, capsys, real_builds):
    shutil.rmtree(run_copy / "model")  # an unfinished run: the commands read its checkpoint
    rewrite_checkpoint(run_copy / CHECKPOINT, lambda state, meta: meta["model_kwargs"].update(hidden=[5_000_000]))
    assert aevb_cli("sample", run_copy) == 2
    one_error_line(capsys, "last.safetensors does not match its model arguments", "wrong shape")
    assert "cpu" not in real_builds


def test_a_resumed_runs_sizes_are_checked_before_its_model_is_built(run_copy, capsys, real_builds):
    shutil.rmtree(run_copy / "model")
    # edited both where the resume reads them, so that only the weights can tell
    edit_json(run_copy / "config.json", lambda c: c.update(hidden=[5_000_000]))
    rewrite_checkpoint(run_copy / CHECKPOINT, lambda state, meta: meta["config"].update(hidden=[5_000_000]))
    assert aevb_cli("train", "--resume", run_copy, "--epochs", 3) == 2
    one_error_line(capsys, "last.safetensors does not match the model", "config.json describes")
    assert "cpu" not in real_builds


# ---------------------------------------------------------------------------
# 6. the values of every file read back


@pytest.mark.parametrize("damage, message", [
    (lambda t, k: t.__setitem__(k, torch.full_like(t[k], float("nan"))), "holds NaN or infinite values"),
    (lambda t, k: t.__setitem__(k, torch.full_like(t[k], float("inf"))), "holds NaN or infinite values"),
    (lambda t, k: t.__setitem__(k, t[k].long()), "wrong dtype"),
    (lambda t, k: t.__setitem__(k, t[k] > 0), "wrong dtype"),
    (lambda t, k: t.__setitem__(k, t[k].double()), "wrong dtype"),
], ids=["nan", "inf", "int64", "bool", "float64"])
def test_exported_weights_of_another_kind_are_refused_naming_the_file_and_tensor(run_copy, capsys, damage, message):
    path = run_copy / "model" / "weights.safetensors"
    tensors = load_file(path)
    name = sorted(tensors)[0]
    damage(tensors, name)
    save_file(tensors, path, metadata={"format": "aevb-model"})
    for command in (("eval", "-k", 2), ("sample",), ("explore",)):
        assert aevb_cli(command[0], run_copy, *command[1:]) == 2
        one_error_line(capsys, "weights.safetensors", name, message)


def _meta(**changes):
    return lambda state, meta: meta.update(changes)


def _state(key_part, make):
    def damage(state, meta):
        key = next(k for k in sorted(state) if key_part in k)
        state[key] = make(state[key])
    return damage


@pytest.mark.parametrize("damage, field", [
    (_meta(step=-1), "step is -1"),
    (_meta(epoch=-2), "epoch is -2"),
    (_meta(batch=-1), "batch is -1"),
    (_meta(step="26"), "step is '26'"),
    (_meta(step=True), "step is True"),
    (_meta(step=10**30), "position (step"),
    (_meta(batch=99), "position (step"),
    (_meta(examples=0), "examples is 0"),
    (_meta(model_kwargs=[1, 2]), "model_kwargs is list"),
    (_meta(precision={"device": "cpu", "multiplies": "fp8"}), "precision is"),
    (_state("exp_avg_sq", lambda t: torch.full_like(t, float("nan"))), "holds NaN or infinite values"),
    (_state("exp_avg", lambda t: t.long()), "not floating point"),
    (_state("exp_avg", lambda t: t[:1]), "has shape"),
    (_state("optim.0.step", lambda t: torch.tensor(float("inf"))), "holds NaN or infinite values"),
    (_state("rng.torch", lambda t: t.float()), "random state rng.torch"),
], ids=["negative-step", "negative-epoch", "negative-batch", "text-step", "bool-step", "huge-step",
        "batch-past-epoch", "no-examples", "kwargs-list", "precision", "nan-moment", "int-moment",
        "short-moment", "inf-step-count", "float-rng"])
def test_a_damaged_checkpoint_is_refused_naming_the_file_and_field(run_copy, capsys, damage, field):
    shutil.rmtree(run_copy / "model")
    rewrite_checkpoint(run_copy / CHECKPOINT, damage)
    damaged = (run_copy / CHECKPOINT).read_bytes()
    assert aevb_cli("train", "--resume", run_copy, "--epochs", 3) == 2
    one_error_line(capsys, "checkpoint", "last.safetensors", "is corrupt", field)
    assert (run_copy / CHECKPOINT).read_bytes() == damaged


def test_an_unfinished_runs_checkpoint_with_a_negative_step_or_nan_weights_is_refused(run_copy, capsys):
    shutil.rmtree(run_copy / "model")
    rewrite_checkpoint(run_copy / CHECKPOINT, _meta(step=-5))
    assert aevb_cli("eval", run_copy, "-k", 2) == 2
    one_error_line(capsys, "last.safetensors", "step is -5")
    rewrite_checkpoint(run_copy / CHECKPOINT, _meta(step=26))
    rewrite_checkpoint(run_copy / CHECKPOINT, _state("model.", lambda t: torch.full_like(t, float("nan"))))
    assert aevb_cli("sample", run_copy) == 2
    one_error_line(capsys, "last.safetensors", "holds NaN or infinite values")


def test_the_run_folders_other_files_are_read_back_with_checks(run_copy, capsys):
    # metrics.jsonl: records that are not numbers are skipped by the curves and by a resume
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"step": "x", "loss": "high"}\n{"step": 5, "loss": [1], "reconstruction": 1, "kl": 1}\n[1, 2]\n'
                '{"step": -3, "loss": 1, "reconstruction": 1, "kl": 1}\n')
    assert aevb_cli("explore", run_copy) == 0
    shutil.rmtree(run_copy / "model")
    assert aevb_cli("train", "--resume", run_copy, "--epochs", 3, "-q") == 0
    steps = [json.loads(line)["step"] for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(s, int) and s >= 0 for s in steps) and steps == sorted(steps)
    # eval.json that is no table: the report evaluates again
    (run_copy / "eval.json").write_text("[1, 2, 3]")
    assert aevb_cli("report", run_copy, "-k", 2) == 0
    assert isinstance(json.loads((run_copy / "eval.json").read_text()), dict)
    # the list of the run's files: corrupt, then --force is refused naming it
    listed = (run_copy / ".aevb-run.jsonl").read_text()
    (run_copy / ".aevb-run.jsonl").write_text(listed + '"../../outside"\n"images/x.png"\n')
    assert aevb_cli("train", "--out", run_copy, *SMALL, "--steps", 1, "--force") == 2
    one_error_line(capsys, ".aevb-run.jsonl is corrupt", "no path inside the run folder")
    # the model's exported step
    (run_copy / ".aevb-run.jsonl").write_text(listed)
    edit_json(run_copy / "model" / "config.json", lambda c: c.update(step=-1))
    assert aevb_cli("sample", run_copy) == 2
    one_error_line(capsys, "model/config.json is corrupt", "step is -1")


# ---------------------------------------------------------------------------
# 7. no traceback: small test splits, nested files, zero sizes, memory


@pytest.mark.parametrize("data", ["images", "table"])
def test_explore_and_report_draw_or_skip_every_figure_for_one_test_example(tmp_path, capsys, data):
    rng = np.random.default_rng(0)
    if data == "images":
        np.save(tmp_path / "x.npy", rng.integers(0, 256, (40, 8, 8), dtype=np.uint8))
        extra = ()
    else:
        np.save(tmp_path / "x.npy", rng.normal(size=(40, 5)))
        extra = ("--likelihood", "gaussian")
    run = tmp_path / "run"
    assert aevb_cli("train", "--data", tmp_path / "x.npy", *extra, "--test-split", 1, *SMALL, "--epochs", 1,
                    "--out", run) == 0
    for directions in ("auto", "pca", "coords"):
        capsys.readouterr()
        assert aevb_cli("explore", run, "--directions", directions) == 0
        out = capsys.readouterr().out
        accounted = [name for name in FIGURES.names() if f"written: {run / 'images' / name}" in out
                     or f"skipped {name}:" in out]
        # all but the silent ones: denoising, layers, the class samples (conditional runs) and the samples of the
        # samplers this run never fitted
        never_fitted = [name for name in FIGURES.names() if name.startswith("samples-")]
        assert len(accounted) >= len(FIGURES.names()) - 3 - len(never_fitted)
        if directions == "pca":
            assert "need two test examples or more; pass --directions coords" in out
    assert aevb_cli("report", run, "-k", 2) == 0


def _nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


@pytest.mark.parametrize("where", ["config-json", "config-toml", "run-config", "model-config", "checkpoint-meta",
                                   "eval-json", "files-list"])
def test_deeply_nested_json_or_toml_is_one_line_wherever_it_is_read(run_copy, tmp_path, capsys, where):
    deep = _nested(MAX_NESTING + 1)
    deeper = _nested(100_000)  # beyond what the parser itself can nest
    for nested in (deep, deeper):
        if where == "config-json":
            (tmp_path / "c.json").write_text(f'{{"hidden": {nested}}}')
            assert aevb_cli("train", "--config", tmp_path / "c.json", "--out", tmp_path / "new") == 2
            one_error_line(capsys, "c.json is not valid JSON", "nested more than")
        elif where == "config-toml":
            (tmp_path / "c.toml").write_text(f"hidden = {nested}\n")
            assert aevb_cli("train", "--config", tmp_path / "c.toml", "--out", tmp_path / "new") == 2
            one_error_line(capsys, "c.toml is not valid TOML", "nested more than")
        elif where == "run-config":
            (run_copy / "config.json").write_text(f'{{"format": "aevb-run", "hidden": {nested}}}')
            assert aevb_cli("eval", run_copy) == 2
            one_error_line(capsys, "config.json is not valid JSON", "nested more than")
        elif where == "model-config":
            (run_copy / "model" / "config.json").write_text(f'{{"model": "vae", "args": {nested}}}')
            assert aevb_cli("sample", run_copy) == 2
            one_error_line(capsys, "model/config.json is corrupt", "nested more than")
        elif where == "checkpoint-meta":
            shutil.rmtree(run_copy / "model", ignore_errors=True)
            state = load_file(run_copy / CHECKPOINT)  # its tensors, whatever its metadata
            save_file(state, run_copy / CHECKPOINT, metadata={"format": "aevb-checkpoint", "meta": nested})
            assert aevb_cli("sample", run_copy) == 2
            one_error_line(capsys, "last.safetensors is corrupt or unreadable", "nested more than")
        elif where == "eval-json":
            (run_copy / "eval.json").write_text(f'{{"nll": {nested}}}')
            assert aevb_cli("report", run_copy, "-k", 2) == 0  # unreadable: evaluated again
            assert isinstance(json.loads((run_copy / "eval.json").read_text())["nll"], float)
        else:
            (run_copy / ".aevb-run.jsonl").write_text(f'{{"format": "aevb-run-files", "x": {nested}}}\n')
            assert aevb_cli("eval", run_copy, "-k", 2) == 2  # its write of eval.json owns the folder
            one_error_line(capsys, ".aevb-run.jsonl is corrupt", "nested more than")


@pytest.mark.parametrize("shape", [[0, 8, 8], [-1, 8, 8], [1, 0, 8], [1, 8, 2.5], [1, 8, True]])
def test_a_data_shape_that_is_no_size_is_one_line(run_copy, capsys, shape):
    edit_json(run_copy / "model" / "config.json", lambda c: c["args"].update(data_shape=shape))
    assert aevb_cli("sample", run_copy) == 2
    one_error_line(capsys, "model/config.json", "data_shape")


MEMORY_OPTIONS = [option for option in run_options().values() if option.memory]


@pytest.mark.parametrize("option", MEMORY_OPTIONS, ids=[option.name for option in MEMORY_OPTIONS])
def test_every_option_that_multiplies_memory_has_an_upper_bound(option, tmp_path, capsys):
    beyond = option.high + 1 if option.high is not None else option.below
    model = next((m for m in MODELS.names() if option.name in {o.name for o in MODELS.options(m)}), "vae")
    assert aevb_cli("train", "--model", model, option.flag, beyond, "--out", tmp_path / "run", "-q") == 2
    one_error_line(capsys, option.flag, "must be")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("failure", [
    RuntimeError("std::bad_alloc"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 99999999999 bytes"),
    MemoryError(),
], ids=["bad_alloc", "torch-cpu", "MemoryError"])
@pytest.mark.parametrize("command, patched, named", [
    (("train", "--model", "iwae", "--k", 7, "--batch-size", 64, "--steps", 1), "aevb.training.loop.Trainer.step",
     ["--k 7", "--batch-size 64", "--latent-dim 4", "--hidden 32"]),
    (("eval", "{run}", "-k", 9, "--batch-size", 11), "aevb.model.base.Model.log_likelihood",
     ["--iw-samples 9", "--batch-size 11"]),
    (("interpolate", "{run}", "--steps", 33), "aevb.analysis.figures.interpolation", ["--pairs 4", "--steps 33"]),
    (("sample", "{run}", "-n", 5), "aevb.model.base.Model.sample", ["-n 5"]),
    (("explore", "{run}", "-n", 3), "aevb.analysis.figures.latent_grid", ["-n 3", "--pairs 4", "--top-dims 10"]),
], ids=["train", "eval", "interpolate", "sample", "explore"])
def test_running_out_of_memory_names_the_options_that_asked(run, tmp_path, monkeypatch, capsys, failure, command,
                                                             patched, named):
    def out_of_memory(*args, **kwargs):
        raise failure

    monkeypatch.setattr(patched, out_of_memory)
    args = [str(a).format(run=run) for a in command]
    if args[0] == "train":
        args += ["--out", str(tmp_path / "run"), *SMALL]
    assert aevb_cli(*args) == 2
    line = one_error_line(capsys, "not enough memory", "ask for less: a smaller")
    assert all(name in line for name in named), line
    if args[0] == "train":  # the options given first, then the defaults of the others
        assert max(line.index(name) for name in named) < line.index("--log-every 50")


# ---------------------------------------------------------------------------
# 8. empty values; options the choices do not take


TEXT_OPTIONS = [option for option in run_options().values()
                if option.kind.startswith("list") or (option.kind == "str" and option.choices is None)]


@pytest.mark.parametrize("option", TEXT_OPTIONS, ids=[option.name for option in TEXT_OPTIONS])
@pytest.mark.parametrize("empty", ["", "  "], ids=["empty", "spaces"])
def test_an_empty_value_is_an_error_naming_the_option(option, empty, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "x.npy", np.zeros((20, 4, 4), dtype=np.uint8))  # what --data '' would find here
    out = () if option.name == "out" else ("--out", tmp_path / "run")
    assert aevb_cli("train", option.flag, empty, *out, "--steps", 1, "-q") == 2
    one_error_line(capsys, option.flag, "is empty")
    (tmp_path / "c.toml").write_text(f'{option.name} = "{empty}"\n')
    assert aevb_cli("train", "--config", tmp_path / "c.toml", "-q") == 2
    one_error_line(capsys, option.flag, "is empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml", "x.npy"]  # no run anywhere


@pytest.mark.parametrize("command", [("train", "--config", ""), ("train", "--resume", ""), ("eval", ""),
                                     ("sample", "{run}", "-o", ""), ("report", "{run}", "-o", " "),
                                     ("explore", " ")])
def test_an_empty_path_is_an_error_naming_it(run, capsys, command):
    assert aevb_cli(*[a.format(run=run) for a in command]) == 2
    one_error_line(capsys, "is empty; give a path")


def test_python_callers_get_the_same_refusals(tmp_path):
    from aevb.config import make_config
    from aevb.run.open import open_run

    with pytest.raises(UserError, match="--out is empty"):
        make_config(out="")
    with pytest.raises(UserError, match="run folder to open is empty"):
        open_run("")
    with pytest.raises(UserError, match="--resume is empty"):
        aevb.train(make_config(), resume="")


@pytest.mark.parametrize("likelihood", LIKELIHOODS.names())
def test_likelihood_scale_applies_only_to_likelihoods_with_a_scale(likelihood, tmp_path, capsys):
    takes = LIKELIHOODS.get(likelihood).takes_scale
    status = aevb_cli("train", "--likelihood", likelihood, "--likelihood-scale", 0.5, "--steps", 1,
                      "--out", tmp_path / "run", *SMALL)
    if takes:
        assert status == 0
        assert aevb.load(tmp_path / "run" / "model").config["likelihood_args"]["scale"] == 0.5
    else:
        assert status == 2
        one_error_line(capsys, "--likelihood-scale does not apply to", f"--likelihood {likelihood}", "gaussian")
        assert not (tmp_path / "run").exists()
