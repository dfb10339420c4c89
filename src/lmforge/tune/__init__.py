"""Hyper-parameter search: the space (space.py) and the trials (study.py); the command is recipes/tune.py."""
