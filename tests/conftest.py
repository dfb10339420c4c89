"""Test-wide settings. Tiny models run faster on one thread, and the suite stays fast when
another process shares this 2-core machine (two threads each would oversubscribe it)."""

import os

os.environ.setdefault(
    "TOKENIZERS_PARALLELISM", "false"
)  # tokenizers' pool after fork warns otherwise

import torch  # noqa: E402

torch.set_num_threads(1)
