"""The model kinds eval_benchmark.py scores, one module each, chosen from the checkpoint (its run_info.json):

    kind                         module                              what is compared
    process reward model         rlhfkit/eval/prm.py                 per-step P(+): step accuracy, best-of-N
    pairwise preference model    rlhfkit/eval/preference_model.py    P(a ≻ b), both orders
    reward model / DPO policy    rlhfkit/eval/reward_scoring.py      one score per response (DPO: implicit reward)

Each `load` returns an object with `record` (the resolved model), `runs(args) -> (runs, skipped)` (which benchmark
runs it can score) and `evaluate(run, directory) -> results` (scores one run and writes its files; `results`
carries its flat `metrics`).
"""

from __future__ import annotations


def load(args, accelerator):

    from rlhfkit.models import resolve_model, torch_dtype
    from rlhfkit.preference_model import is_preference_model
    from rlhfkit.process_reward import is_process_reward_model

    dtype = torch_dtype(args.dtype)
    if is_process_reward_model(args.reward_model_path):  # prm_train.py output
        from rlhfkit.eval import prm

        path, record = resolve_model(args.reward_model_path, role="process reward model")
        return prm.Evaluator(args, accelerator, dtype, path, record)
    path, record = resolve_model(args.reward_model_path, role="reward model")
    if is_preference_model(path):  # pm_train.py output
        from rlhfkit.eval import preference_model

        return preference_model.Evaluator(args, accelerator, dtype, path, record)
    from rlhfkit.eval import reward_scoring

    return reward_scoring.load(args, accelerator, dtype, path, record)
