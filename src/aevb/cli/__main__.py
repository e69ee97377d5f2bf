"""``python -m aevb.cli``: the aevb command (as torchrun and the tests start it)."""

from aevb.cli import main

main()
