"""Checkpoint folders: atomic save, latest/best pointers, finding and reading them back."""
