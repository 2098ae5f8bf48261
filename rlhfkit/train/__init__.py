"""Offline training: the reward-model and DPO trainers (TRL subclasses on the pairwise forward), MORE, the losses
they share, and SFT data. Imported by `rm_train.py`, `dpo_train.py` and `sft_train.py` only; imports the core."""
