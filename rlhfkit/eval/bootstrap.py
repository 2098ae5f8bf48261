"""The bootstrap statistics live in the core, `rlhfkit/bootstrap.py` (the RL stage uses them too, and families never
import each other); this name keeps the eval family's imports working."""

from rlhfkit.bootstrap import Interval, bootstrap_mean_ci, paired_differences, per_prompt_means  # noqa: F401
