"""Every error a user can cause, in one place; the CLI maps each type to an exit code.

A user-facing error says what was wrong, where (file:line, key, field) and what to do. Internal
invariants are assertions, not these. Exit codes (``cli.py``): 2 for bad usage, config or
checkpoint paths (the command as typed cannot work), 1 for runtime failures (bad data found
while running, a diverging run), 130 for an interrupt after a checkpoint was written.
"""

from __future__ import annotations

from pathlib import Path


class LmforgeError(Exception):
    """Base of every user-facing error; ``exit_code`` is what the CLI returns for it."""

    exit_code = 1


class ConfigError(LmforgeError, ValueError):
    """A config or command line that cannot be used. The message names the key and what is allowed."""

    exit_code = 2


class CheckpointError(LmforgeError, ValueError):
    """A checkpoint path that cannot be used; the message says what is missing or damaged."""

    exit_code = 2


class DataError(LmforgeError, ValueError):
    """Input data that cannot be used as given; the message says where and what to do."""

    exit_code = 1


class NonFiniteLossError(LmforgeError, RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient; the message lists likely causes."""

    exit_code = 1


class TrainingInterrupted(LmforgeError, RuntimeError):
    """SIGINT/SIGTERM arrived; a checkpoint was written (``checkpoint``) before stopping."""

    exit_code = 130

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint saved to {checkpoint}")
        self.step, self.checkpoint = step, checkpoint
