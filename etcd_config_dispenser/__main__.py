"""`python -m etcd_config_dispenser` runs the same entry point as the console script."""

from .cli import main

main()
