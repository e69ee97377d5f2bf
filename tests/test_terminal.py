"""What the terminal shows: the progress line of `aevb train` at 80 columns (the run's short name, the loss first,
the epoch), `aevb train --help` in the option groups the configuration declares, seeds' ranges in words, and help
text for every option of every command."""

from __future__ import annotations

import re

import click
import pytest

from aevb.cli import RunCommand, cli
from aevb.config import run_options
from aevb.registry import MODELS
from aevb.training.progress import NAME_WIDTH, number, short_name
from conftest import aevb_cli


def _help(*args: str, capsys) -> str:
    capsys.readouterr()
    assert aevb_cli(*args, "--help") == 0
    return capsys.readouterr().out


def _commands():
    return [(name, command) for name, command in cli.commands.items()]


def test_every_option_of_every_command_has_help_text():
    missing = []
    for name, command in [("aevb", cli), *_commands()]:
        with click.Context(command, info_name=name) as ctx:
            params = command.get_params(ctx)
        for param in params:
            if isinstance(param, click.Option) and not (param.help or "").strip():
                missing.append(f"{name} {'/'.join(param.opts)}")
    assert not missing, f"options without help text: {missing}"
    # train's flags are made from the run options: every one of those counts
    with click.Context(cli.commands["train"], info_name="train") as ctx:
        flags = {p.name for p in cli.commands["train"].get_params(ctx)}
    assert set(run_options()) <= flags


def test_train_help_is_grouped_by_the_options_declared_groups(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    text = _help("train", capsys=capsys)
    titles = ["Options:", "Data:", "Model:", "Options of particular models:", "Training:"]
    starts = [text.index(f"\n{title}\n") for title in titles]
    assert starts == sorted(starts)
    sections = dict(zip(titles, (text[a:b] for a, b in zip(starts, [*starts[1:], len(text)]))))
    assert "--config FILE" in sections["Options:"] and "--quiet" in sections["Options:"]
    of_models = {option.name: [m for m in MODELS.names() if option in MODELS.options(m)]
                 for m in MODELS.names() for option in MODELS.options(m)}
    for option in run_options().values():
        flag = re.compile(rf"^  {re.escape(option.flag)}[ /\n]", re.MULTILINE)
        if option.name in of_models:
            section = sections["Options of particular models:"]
            block = section[flag.search(section).start():]
            block = block[:re.search(r"\n  --|\Z", block[2:]).start() + 2]
            # a narrow help wraps a model's name at its hyphen ("vq-" then "vae"): read it joined again
            joined = re.sub(r"-\s+", "-", " ".join(block.split()))
            assert f"[--model {', '.join(of_models[option.name])}]" in joined, option.name
        else:
            title = {"data": "Data:", "model": "Model:", "training": "Training:"}[option.group]
            assert flag.search(sections[title]), f"{option.flag} not under {title}"
    assert isinstance(cli.commands["train"], RunCommand)


def test_seed_ranges_read_as_powers_of_two(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    train = " ".join(_help("train", capsys=capsys).split())
    assert re.search(r"--seed INTEGER random seed[^[]*\[default: 0; in \[-2\^63, 2\^64\)\]", train)
    for command in ("eval", "sample", "explore"):
        text = " ".join(_help(command, capsys=capsys).split())
        assert "-2^63 ≤ x ≤ 2^64 − 1" in text and "9223372036854775808" not in text, command
    assert aevb_cli("sample", "no-such-run", "--seed", str(2**64)) == 2  # the range itself is unchanged


def test_progress_line_fits_80_columns_with_the_run_name_loss_and_epoch(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    out = tmp_path / "a-folder-with-a-long-path" / "digits-run-with-a-long-name"
    capsys.readouterr()
    assert aevb_cli("train", "--epochs", "2", "--latent-dim", "2", "--hidden", "8", "--log-every", "5",
                    "--out", out) == 0
    printed = capsys.readouterr()
    err = printed.err
    lines = [line for line in re.split(r"[\r\n]", err) if "%|" in line]
    assert lines and all(len(line) <= 80 for line in lines), max(lines, key=len)
    name = short_name(out.name)
    assert len(name) == NAME_WIDTH and name.endswith("…") and str(tmp_path) not in err
    recorded = [line for line in lines if " loss " in line]
    assert recorded and all(line.startswith(f"{name} loss ") for line in recorded)  # the loss first, whole
    assert re.match(rf"{re.escape(name)} loss -?\d+\.\d\d epoch 2/2 100%", lines[-1])
    assert any(" epoch 1/2 " in line for line in lines)
    assert "epoch 1: val ELBO" in printed.out + printed.err  # the epoch's line, above the bar


@pytest.mark.parametrize("value, shown", [(27.123, "27.12"), (-5432.11, "-5432.1"), (123456.7, "123457")])
def test_loss_is_shown_as_wide_as_it_needs(value, shown):
    assert number(value) == shown
