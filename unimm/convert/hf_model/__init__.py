"""The files an exported Hugging Face folder carries as remote code (torch + transformers only).

`unimm convert to-hf` copies them next to the weights; they are a package here only so that
they install with unimm.
"""
