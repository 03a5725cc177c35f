"""Evaluation: real-text corpora, long-context tasks, scoring and reports."""
