"""``python -m edgeprune``: the command line."""
from edgeprune.cli import main

main()
