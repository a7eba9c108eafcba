"""genret: the `genret` command line (cli/main.py) and every command's wiring."""
