"""Evaluation: the reward-model benchmarks (one module each), diagnostics, calibration, win-rate judges, bootstrap
intervals and the demo report. Imported by `eval_benchmark.py`, `eval_winrate.py` and `python -m rlhfkit.eval.report`;
imports the core, never another family."""
