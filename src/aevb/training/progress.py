"""The progress display of ``aevb train``: one line that keeps the loss in view in an 80-column terminal.

    mnist loss 98.31 epoch 3/10  27%|███▌            | 00:04<00:11, rec 84.10 kl 14.21 41k img/s

The run is named by its folder's name (``runs/mnist`` → ``mnist``), cut to
:data:`NAME_WIDTH` characters, never by the data's path; the loss and the
epoch follow it, so that a narrow terminal cuts the line's tail (the terms
and the speed), not the loss.  The width is the terminal's, followed as it
changes; where standard error is no terminal, ``COLUMNS`` or 80.
"""

from __future__ import annotations

import shutil
import sys

# characters of the run's name shown; a longer name keeps its start and ends in "…"
NAME_WIDTH = 16
BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}"


def short_name(name: str, width: int = NAME_WIDTH) -> str:
    """``name`` cut to ``width`` characters, the cut marked by "…"."""
    return name if len(name) <= width else name[:width - 1] + "…"


def number(value: float) -> str:
    """A loss in nats, as wide as it needs and no wider: 27.12, 5432.1, 123457."""
    return f"{value:.2f}" if abs(value) < 1000 else f"{value:.1f}" if abs(value) < 10000 else f"{value:.0f}"


def rate(images_per_s: float) -> str:
    return f"{images_per_s / 1000:.0f}k" if images_per_s >= 10000 else f"{images_per_s:.0f}"


class ProgressBar:
    """The training's progress line (tqdm) on standard error: the run's name, the loss, the epoch, then the rest."""

    def __init__(self, name: str, total_steps: int, done_steps: int, steps_per_epoch: int):
        from tqdm.auto import tqdm  # looks for Jupyter when imported: only runs that show a bar pay for it

        self.name = short_name(name)
        self.steps_per_epoch = steps_per_epoch
        self.epochs = max(1, -(-total_steps // steps_per_epoch))  # the last one may be part of an epoch (--steps)
        self.loss: float | None = None
        # a terminal's width is followed as it changes; elsewhere (a log file, a test) COLUMNS or 80
        width = {"dynamic_ncols": True} if sys.stderr.isatty() else {"ncols": shutil.get_terminal_size().columns}
        self.bar = tqdm(total=total_steps, initial=done_steps, unit="step", bar_format=BAR_FORMAT, file=sys.stderr,
                        desc=self._description(done_steps), **width)

    def _epoch(self, step: int) -> int:
        """The epoch that step number ``step`` (counted from 1) belongs to."""
        return min(self.epochs, (max(step, 1) - 1) // self.steps_per_epoch + 1)

    def _description(self, step: int) -> str:
        epoch = self._epoch(step)
        loss = "" if self.loss is None else f" loss {number(self.loss)}"
        return f"{self.name}{loss} epoch {epoch}/{self.epochs}"

    def update(self, step: int) -> None:
        """One step done; ``step``: the steps done now."""
        if self._epoch(step) != self._epoch(step - 1):
            self.bar.set_description_str(self._description(step), refresh=False)
        self.bar.update(1)

    def show(self, record: dict, step: int) -> None:
        """A record of ``metrics.jsonl``'s: its loss first, then its terms and the speed."""
        self.loss = record["loss"]
        self.bar.set_description_str(self._description(step), refresh=False)
        self.bar.set_postfix_str(f"rec {number(record['reconstruction'])} kl {number(record['kl'])} "
                                 f"{rate(record['images_per_s'])} img/s")

    def write(self, line: str) -> None:
        """A line printed above the bar (an epoch's validation, early stopping)."""
        self.bar.write(line)

    def close(self) -> None:
        self.bar.close()
