"""Evaluation: offline long-context tasks, filler text and scoring."""
