"""unimm: a unified multimodal pretraining stack (text next-token prediction and visual flow
matching in one transformer) on torchtitan."""

from .titan import compat as _compat  # noqa: F401  (mends torch 2.11 before torchtitan loads: see its doc)
