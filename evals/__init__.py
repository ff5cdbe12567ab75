"""Evaluation: benchmark tasks (GSM8K, CommonsenseQA), decoding and leaderboard tables."""
