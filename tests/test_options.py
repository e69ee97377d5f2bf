"""Options declared once: the Option's one check, the models' declarations read from source as
imported, the run configuration that collects them, and a model registered at run time whose
option becomes a checked flag of ``aevb train`` and an argument of its constructor."""

from __future__ import annotations

import inspect
import json

import pytest

import aevb
from aevb.config import RUN_OPTIONS, make_config, model_options, read_config_file, run_options
from aevb.errors import UserError
from aevb.model.autoencoders import AE
from aevb.options import Option, as_flag
from aevb.registry import MODELS, PRIORS, _Source, _Unreadable
from aevb.config import check_model_options
from conftest import aevb_cli

SMALL = ("--latent-dim", "2", "--hidden", "8", "--device", "cpu", "-q", "--steps", "1", "--batch-size", "512")


# ---------------------------------------------------------------------------
# the one check of a value


def test_a_value_is_checked_by_its_option_and_named_as_the_caller_spells_it():
    level = Option("noise_level", 0.3, "corruption level", low=0)
    assert level.check(0.5) == 0.5 and isinstance(level.check(1), float)
    with pytest.raises(UserError, match=r"^noise_level must be ≥ 0, got -1$"):
        level.check(-1)
    with pytest.raises(UserError, match=r"^--noise-level must be ≥ 0, got -1$"):
        level.check(-1, level.flag)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(UserError, match="noise_level must be a finite number"):
            level.check(bad)
    with pytest.raises(ValueError, match="noise_level must be a number, got 'x'"):  # only code passes text
        level.check("x")
    target = Option("target", 0.05, "ρ", above=0, below=1)
    with pytest.raises(UserError, match=r"target must be in \(0, 1\), got 1"):
        target.check(1)
    clip = Option("grad_clip", None, "norm", kind="float", above=0, hint="leave it out for no clipping")
    assert clip.check(None) is None
    with pytest.raises(UserError, match="> 0, got 0; leave it out for no clipping"):
        clip.check(0)


def test_whole_numbers_choices_and_lists():
    samples = Option("mc_samples", 1, "L", low=1)
    assert samples.kind == "int" and samples.check(3.0) == 3 and isinstance(samples.check(3.0), int)
    for bad in (2.5, True):
        with pytest.raises(UserError, match="mc_samples must be a whole number"):
            samples.check(bad)
    with pytest.raises(UserError, match=r"mc_samples must be ≥ 1, got 0"):
        samples.check(0)
    corruption = Option("corruption", "gaussian", "how", choices=("gaussian", "masking"))
    with pytest.raises(UserError, match=r"unknown --corruption 'blur'; choose one of: gaussian, masking"):
        corruption.check("blur", corruption.flag)
    prior = Option("prior", "standard", "p(z)", choices=PRIORS)  # a registry's names
    assert prior.check("mog") == "mog"
    with pytest.raises(UserError, match="choose one of: standard, mog, vamp"):
        prior.check("flow")
    hidden = Option("hidden", None, "sizes", kind="list[int]", low=1)
    assert hidden.check([3, 4]) == [3, 4]
    with pytest.raises(UserError, match=r"hidden must be ≥ 1, got \[3, 0\]"):
        hidden.check([3, 0])
    with pytest.raises(ValueError, match="needs kind"):
        Option("components", None, "K")


def test_values_are_read_from_text_as_the_option_says():
    assert Option("k", 5, "k").parse("7") == 7
    assert Option("hidden", None, "h", kind="list[int]").parse("32, 16") == [32, 16]
    assert Option("download", False, "d").parse("yes") is True
    assert Option("test_split", 0.1, "split").parse("2000") == 2000  # a count of examples, else a fraction
    with pytest.raises(UserError, match="--k: cannot read '2.5' as int"):
        Option("k", 5, "k").parse("2.5")


# ---------------------------------------------------------------------------
# declarations: beside each model, read from source as they are when imported


def test_the_options_read_from_source_are_those_of_the_imported_classes():
    source = _Source()  # a fresh reader: the one of the registry may hold the imported classes' answers
    for name, cls in MODELS.items():
        assert source.options(MODELS.modules, MODELS.variable, name) == cls.options, name


def test_the_source_reader_refuses_what_it_does_not_evaluate(tmp_path, monkeypatch):
    (tmp_path / "toy_declarations.py").write_text(
        "from aevb.options import Option\n"
        "from aevb.registry import PRIORS\n"
        "SHARED = (Option('a', 1, 'a'), Option('p', 'standard', 'p', choices=PRIORS))\n"
        "class Base:\n    options = (*SHARED,)\n"
        "@TOYS.register('inherits')\nclass Inherits(Base):\n    pass\n"
        "@TOYS.register('extends')\nclass Extends(Base):\n    options = (*Base.options, Option('b', -0.5, 'b', low=-1))\n"
        "@TOYS.register('computed')\nclass Computed(Base):\n    options = (Option('c', 2 ** 3, 'c'),)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    source, modules = _Source(), ("toy_declarations",)
    shared = (Option("a", 1, "a"), Option("p", "standard", "p", choices=PRIORS))
    assert source.options(modules, "TOYS", "inherits") == shared
    assert source.options(modules, "TOYS", "extends") == (*shared, Option("b", -0.5, "b", low=-1))
    assert source.registered("toy_declarations", "TOYS") == ["inherits", "extends", "computed"]
    with pytest.raises(_Unreadable):
        source.options(modules, "TOYS", "computed")


def test_constructor_defaults_are_the_declared_ones():
    for name, cls in MODELS.items():
        parameters = {n: p.default for klass in cls.__mro__ if "__init__" in vars(klass)
                      for n, p in inspect.signature(klass.__init__).parameters.items()}
        for option in cls.options:
            if option.name in parameters:  # prior_components is an entry of prior_args
                assert parameters[option.name] == option.default, (name, option.name)


def test_the_run_configuration_collects_every_models_options():
    names = [option.name for option in model_options()]
    assert names == ["corruption", "noise_level", "sparsity", "sparsity_weight", "sparsity_target",
                     "contractive_weight", "jacobian", "jacobian_projections", "rae_code_weight", "rae_decoder",
                     "rae_decoder_weight", "prior", "prior_components", "beta",
                     "mc_samples", "free_bits", "posterior_flow", "flow_steps", "flow_hidden", "k", "iwae_variant", "iwae_m", "ciwae_beta", "stochastic_layers", "mi_weight", "tc_weight",
                     "dimension_kl_weight", "tc_estimator", "gamma", "discriminator_hidden", "dip_type",
                     "lambda_offdiagonal", "lambda_diagonal", "mmd_weight", "kernel", "kernel_bandwidth",
                     "info_alpha", "info_lambda", "codebook_size", "code_dim", "commitment_weight", "ema_decay",
                     "dead_code_threshold"]
    config = make_config(model="dae", noise_level="0.5")
    assert (config.noise_level, config.k, config.latent_dim) == (0.5, 5, 20)
    stored = config.to_dict()
    assert set(stored) == {"format", *run_options()} and stored["noise_level"] == 0.5
    config.k = 9  # a model's option set like a field lands where to_dict reads it
    assert config.to_dict()["k"] == 9 and "k" not in vars(config)
    with pytest.raises(AttributeError):
        config.no_such_option


def test_config_json_round_trip_and_an_old_one_without_later_options(tmp_path):
    config = make_config(model="sparse-ae", sparsity="kl", sparsity_target=0.2, hidden=[8, 4])
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    assert make_config(read_config_file(tmp_path / "config.json")).to_dict() == json.loads(json.dumps(config.to_dict()))
    old = {k: v for k, v in config.to_dict().items() if k not in ("precision", "output_bias", "posterior_scale")}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert make_config(read_config_file(tmp_path / "old.json")).posterior_scale == "log-scale"


@pytest.mark.parametrize("option,value", [("noise_level", -0.1), ("sparsity_target", 1.0), ("jacobian_projections", 0),
                                          ("mc_samples", 0), ("k", 0), ("free_bits", -1.0), ("beta", -1.0),
                                          ("stochastic_layers", 1), ("jacobian", "sometimes")])
def test_run_and_constructor_refuse_a_value_by_the_same_rule(option, value):
    model = next(name for name, cls in MODELS.items() if option in {o.name for o in cls.options})
    with pytest.raises(UserError, match=f"{as_flag(option)} must be|unknown {as_flag(option)}"):
        make_config(model=model, **{option: value})
    with pytest.raises(UserError, match=f"^{option} must be|^unknown {option}"):
        MODELS.get(model)(data_shape=(4,), latent_dim=2, **{option: value})


def test_rules_between_a_models_options_are_the_models_for_both():
    config = make_config(model="dae", corruption="masking", noise_level=1.5)
    with pytest.raises(UserError, match="^--noise-level is a probability for --corruption masking, got 1.5$"):
        check_model_options(config)
    with pytest.raises(UserError, match="^noise_level is a probability for corruption masking, got 1.5$"):
        aevb.DenoisingAE(data_shape=(4,), latent_dim=2, corruption="masking", noise_level=1.5)
    check_model_options(make_config(model="dae", noise_level=1.5))  # σ of Gaussian noise may exceed 1


def test_options_of_other_models_and_of_a_missing_requirement_are_refused():
    with pytest.raises(UserError, match="--beta-cycles, --k do not apply to --model ae; drop them"):
        check_model_options(make_config(model="ae", k=3, beta_cycles=2))
    with pytest.raises(UserError, match="^--k does not apply to --model vae; drop it"):
        check_model_options(make_config(model="vae", k=3, beta_cycles=2))
    with pytest.raises(UserError, match="--beta-ratio does not apply to --model iwae"):
        check_model_options(make_config(model="iwae", beta_ratio=0.3))  # the β schedules require beta
    with pytest.raises(UserError, match="--prior-components does not apply to --model hvae"):
        check_model_options(make_config(model="hvae", prior_components=3))
    check_model_options(make_config(model="hvae", beta=2.0, beta_warmup=10, stochastic_layers=3))
    check_model_options(make_config(model="iwae", prior="mog", prior_components=3, k=2))


def test_the_latent_dimension_is_checked_by_the_runs_option_in_every_model():
    with pytest.raises(UserError, match=r"^latent_dim must be in \[1, 2\^31\), got 0$"):
        aevb.VAE(data_shape=(4,), latent_dim=0)
    with pytest.raises(UserError, match=r"^--latent-dim must be in \[1, 2\^31\), got 0$"):
        make_config(latent_dim=0)
    with pytest.raises(UserError, match=r"^--seed must be in \[-2\^63, 2\^64\), got 18446744073709551616$"):
        make_config(seed=2**64)
    assert RUN_OPTIONS["latent_dim"].check(2.0) == 2


# ---------------------------------------------------------------------------
# a model registered at run time brings its option


WOBBLE = Option("wobble", 0.5, "wobbly-ae: how much the code wobbles", low=0, high=1, metavar="W")


class WobblyAE(AE):
    """An AE with one option of its own, registered by the test."""

    name = "wobbly-ae"
    options = (WOBBLE,)

    def __init__(self, *args, wobble: float = WOBBLE.default, **kwargs):
        super().__init__(*args, **kwargs)
        self.wobble = self.check_options({"wobble": wobble})["wobble"]
        self.config.update(wobble=self.wobble)


@pytest.fixture
def wobbly():
    MODELS.items()  # every built-in model imported, so that the registry's entries are its names
    MODELS.register("wobbly-ae")(WobblyAE)
    yield "wobbly-ae"
    MODELS.unregister("wobbly-ae")


def test_a_model_registered_at_run_time_has_its_option_checked_and_passed(wobbly, tmp_path, capsys):
    assert aevb_cli("train", "--help") == 0
    assert "--wobble W" in capsys.readouterr().out
    assert make_config(model=wobbly).wobble == 0.5
    with pytest.raises(UserError, match=r"--wobble must be in \[0, 1\], got 2.0"):
        make_config(model=wobbly, wobble=2)
    with pytest.raises(UserError, match="--wobble does not apply to --model vae"):
        check_model_options(make_config(wobble=0.25))
    assert aevb_cli("train", "--model", wobbly, "--wobble", "2", *SMALL, "--out", tmp_path / "refused") == 2
    assert "--wobble must be in [0, 1]" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    run = tmp_path / "run"
    assert aevb_cli("train", "--model", wobbly, "--wobble", "0.25", *SMALL, "--out", run) == 0
    assert json.loads((run / "config.json").read_text())["wobble"] == 0.25
    model = aevb.load(run / "model")
    assert isinstance(model, WobblyAE) and model.wobble == 0.25


def test_the_order_of_entries_does_not_depend_on_the_order_modules_are_imported_in():
    """--help, config.json and error messages list models and options the same way in every process."""
    import subprocess
    import sys

    code = ("import aevb.model.hierarchical, aevb.model.vae, aevb.model.autoencoders\n"
            "from aevb.config import model_options\nfrom aevb.registry import MODELS\n"
            "print((MODELS.names(), [o.name for o in model_options()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str((MODELS.names(), [o.name for o in model_options()]))
    assert MODELS.names()[:4] == ["ae", "dae", "sparse-ae", "cae"]
