"""Scoring generated responses and turning them into training data: `get_rewards.py` (reward model or labeler →
rewards, pairs, best-of-K), `build_pairs.py` (pairs and statistics from existing rewards)."""
