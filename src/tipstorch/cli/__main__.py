"""``python -m tipstorch.cli ...`` (and ``torchrun -m tipstorch.cli ...``)."""

from tipstorch.cli import main

main()
