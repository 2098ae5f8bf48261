"""What an RL run did, from its output dir alone: held-out scores before and after training with their bootstrap
intervals (`metrics.json` "eval", written by `ppo_train.py --eval_dataset_path`), and the per-step curves of the
rewards and the KL to the reference (`log_history.jsonl`, `rlhfkit.checkpoints.LOG_HISTORY`) as a table and `curves.png`.

    python -m rlhfkit.rl.report runs/rlvr/grpo [--require_improvement exact_answer]

`--require_improvement KEY` exits 1 unless the paired interval of after − before for KEY lies above zero (a chain
that must show learning fails loudly otherwise).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rlhfkit.checkpoints import read_log_history

CURVES = ("reward/raw", "kl/k1", "kl/k3", "response/length", "sampling/zero_std_fraction")


def format_interval(entry: dict) -> str:
    return f"{entry['mean']:.3f} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"


def summary_lines(metrics: dict, history: list[dict]) -> list[str]:
    lines = []
    evaluation = metrics.get("eval")
    if evaluation:
        n = next(iter(evaluation.values()))["after"]["n"]
        lines.append(f"held-out ({n} prompts; mean and 95% bootstrap interval over prompts):")
        lines.append(f"{'score':16s} {'before':>24s} {'after':>24s} {'after - before (paired)':>26s}")
        for key, entry in evaluation.items():
            before = format_interval(entry["before"]) if "before" in entry else "n/a (resumed run)"
            delta = format_interval(entry["delta"]) if "delta" in entry else "n/a"
            lines.append(f"{key:16s} {before:>24s} {format_interval(entry['after']):>24s} {delta:>26s}")
    keys = [key for key in history[0] if key.startswith("reward/") and key not in ("reward/raw_std",)] \
        if history else []
    columns = ["step", *dict.fromkeys([*CURVES[:1], *keys, *CURVES[1:]])]
    columns = [c for c in columns if c == "step" or any(c in row for row in history)]
    if history:
        lines.append("")
        lines.append("  ".join(f"{c.split('/')[-1][:12]:>12s}" for c in columns))
        for row in history:
            lines.append("  ".join(f"{row.get(c, float('nan')):12.4g}" for c in columns))
    return lines


def plot_curves(history: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the table above has the same numbers
        return False
    steps = [row["step"] for row in history]
    reward_keys = [key for key in history[0] if key.startswith("reward/") and key not in ("reward/raw_std",)]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in reward_keys:
        left.plot(steps, [row.get(key) for row in history], label=key.split("/", 1)[1])
    left.set_xlabel("step")
    left.set_title("rewards (rollout means)")
    left.legend(fontsize=8)
    for key in ("kl/k1", "kl/k3"):
        right.plot(steps, [row.get(key) for row in history], label=key)
    right.set_xlabel("step")
    right.set_title("KL to the reference, nats per response")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a finished ppo_train.py output dir")
    parser.add_argument("--require_improvement", default=None,
                        help="exit 1 unless the after − before interval of this held-out score excludes zero, above")
    args = parser.parse_args(argv)
    run = Path(args.run_dir)
    if not (run / "metrics.json").is_file():
        print(f"error: {run}: no metrics.json (not a finished ppo_train.py run)", file=sys.stderr)
        return 2
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    history = read_log_history(run)
    lines = summary_lines(metrics, history)
    if history and plot_curves(history, run / "curves.png"):
        lines.append(f"\ncurves: {run / 'curves.png'}")
    text = "\n".join(lines)
    (run / "report.txt").write_text(text + "\n", encoding="utf-8")
    print(text)
    if args.require_improvement:
        delta = (metrics.get("eval") or {}).get(args.require_improvement, {}).get("delta")
        if delta is None:
            print(f"error: {run}: no held-out before/after for '{args.require_improvement}'", file=sys.stderr)
            return 1
        if delta["ci_low"] <= 0:
            print(f"error: held-out {args.require_improvement} did not improve beyond doubt: after − before "
                  f"{format_interval(delta)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
