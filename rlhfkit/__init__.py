"""rlhfkit: what the stage scripts share (data formats, losses, checkpoints, DeepSpeed configs, model loading).

Importing this package never needs a GPU, vLLM, flash-attn or DeepSpeed; asking for them without them raises
a one-line `UserError` (see `rlhfkit.cli`).
"""

__version__ = "0.1.0"

from .errors import UserError  # noqa: E402,F401
