"""Evaluation: ``unimm eval``'s suites (held-out perplexity and flow loss, understanding,
generation, captioning, linear probes, MoE routing; ``suites.py``, ``cli.py``), the exact pixel
scorers for the procedural prompts (``scorers.py``) and the MoE routing analysis
(``moe_analysis.py``). See docs/evaluation.md."""
