"""Evaluation: exact pixel scorers for the procedural prompts and the MoE routing analysis."""
