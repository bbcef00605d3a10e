"""unimm's expert kernels: a grouped GEMM over expert-sorted rows (``experts.py``, with the
Triton kernel in ``grouped_gemm.py`` and the plain-torch oracle in ``reference.py``).

This folder installs as ``unimm.kernels`` (pyproject's package-dir). Run from the repository
root, Python also finds it as a top-level ``kernels``: the import name of Hugging Face's
hub-kernels package, which transformers probes for by importing it. Under that name it defines
nothing, because a second import of ``experts.py`` would register the ``unimm::grouped_mm*``
custom ops again and replace the op objects that ``unimm.kernels`` and the activation
checkpointing policy hold (selective checkpointing would then recompute every expert GEMM).
"""

if __name__ == "unimm.kernels":
    from .experts import BACKENDS, GROUPED_GEMM_OPS, grouped_mm, swiglu_experts

    __all__ = ["BACKENDS", "GROUPED_GEMM_OPS", "grouped_mm", "swiglu_experts"]
