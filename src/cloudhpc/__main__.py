"""`python -m cloudhpc` runs the CLI."""

from cloudhpc.cli.main import main

main()
