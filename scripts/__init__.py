"""make demo and make bench: run as python -m scripts.demo / scripts.bench from the root."""
