"""unimm's expert kernels: a grouped GEMM over expert-sorted rows (``experts.py``, with the
Triton kernels in ``grouped_gemm.py``, their launches in ``launch.py``, their torch ops in
``triton_ops.py``, the ``auto`` backend policy in ``policy.py`` and the plain-torch oracle in
``reference.py``).

This folder installs as ``unimm.kernels`` (pyproject's package-dir). Run from the repository
root, Python also finds it as a top-level ``kernels``: the import name of Hugging Face's
hub-kernels package, which transformers probes for by importing it. Under that name it defines
nothing, because a second import of ``experts.py`` would register the ``unimm::grouped_mm*``
custom ops again and replace the op objects that ``unimm.kernels`` and the activation
checkpointing policy hold (selective checkpointing would then recompute every expert GEMM).
"""

if __name__ == "unimm.kernels":
    from .experts import BACKENDS, GROUPED_GEMM_OPS, grouped_mm, swiglu_experts, unfused_gate_up
    from .triton_ops import weight_grad_split

    __all__ = ["BACKENDS", "GROUPED_GEMM_OPS", "grouped_mm", "swiglu_experts", "unfused_gate_up", "weight_grad_split"]
