"""What the terminal shows: the progress line of `aevb train` at 80 columns (the run's short name, the loss first,
the epoch), `aevb train --help` in the option groups the configuration declares, seeds' ranges in words, and help
text for every option of every command."""

from __future__ import annotations

import re

import pytest

from aevb.training.progress import NAME_WIDTH, number, short_name
from conftest import aevb_cli


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
