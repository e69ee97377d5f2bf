"""How long ``aevb --help`` and ``aevb train --help`` take, each in a fresh process (target: under 0.5 s).

    .venv/bin/python bench/cli_help.py [--runs 10] [--all]

``--help`` must answer at once: the CLI imports torch only inside the
commands that need it, and ``aevb train --help`` reads the models' options
from their source (:mod:`aevb.registry`).  Each command runs ``--runs`` times
in a new process (the installed ``aevb`` script when there is one, else
``python -m aevb.cli``); the table shows the best and the median wall time,
and whether the process imported torch.  The best is the figure to compare
with the target: the others wait for a busy machine.  ``--all`` adds the
``--help`` of every other command.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 0.5
SCRIPT = Path(sys.executable).with_name("aevb")
AEVB = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "aevb.cli"]
# run after the command in the same process, to tell whether it imported torch
TORCH_PROBE = ("import sys\nfrom aevb.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
               "print('torch' in sys.modules)\n")


def wall_times(args: list[str], runs: int) -> list[float]:
    """Wall times in seconds of ``aevb ARGS``, one fresh process each; fails on a non-zero exit status."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([*AEVB, *args], cwd=ROOT, capture_output=True, check=True, timeout=60)
        times.append(time.perf_counter() - start)
    return times


def imports_torch(args: list[str]) -> bool:
    probe = TORCH_PROBE.format(argv=args)
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True,
                          timeout=60)
    return proc.stdout.strip().splitlines()[-1] == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="processes per command (default 10)")
    parser.add_argument("--all", action="store_true", help="also time the --help of every other command")
    options = parser.parse_args()
    commands = [["--help"], ["train", "--help"]]
    if options.all:
        from aevb.cli import cli

        commands += [[name, "--help"] for name in cli.commands if name != "train"]
    print(f"{' '.join(AEVB)}: {options.runs} runs each, target < {TARGET_S} s")
    print(f"{'command':<24} {'best s':>7} {'median s':>9} {'torch':>6} {'met':>4}")
    for args in commands:
        times = wall_times(args, options.runs)
        best, median = min(times), statistics.median(times)
        torch = imports_torch(args)
        met = "yes" if best < TARGET_S and not torch else "NO"
        print(f"{'aevb ' + ' '.join(args):<24} {best:>7.3f} {median:>9.3f} {'yes' if torch else 'no':>6} {met:>4}")


if __name__ == "__main__":
    main()
