"""Online RL for `ppo_train.py`: the estimators and objectives (pure tensor math) and the PPO loop's pieces.
Imports the core, never another family."""
