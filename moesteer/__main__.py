"""``python -m moesteer`` runs the command line."""

from moesteer.cli import main

main()
