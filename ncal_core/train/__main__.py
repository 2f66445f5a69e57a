"""`python -m ncal_core.train` (and `accelerate launch -m ncal_core.train`)."""

from ncal_core.errors import run_cli
from ncal_core.train.loop import main

run_cli(main)
