"""`python -m rottenbot_inference` runs the CLI."""

from rottenbot_inference.cli import main

main()
