"""The README.md of an exported folder: what the model is and how to load it."""

from __future__ import annotations

from pathlib import Path

from unimm.convert.architecture import Architecture
from unimm.model.ffn import FFNConfig

_UNIMM_USE = '''```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{path}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{path}", trust_remote_code=True)
prompt = tokenizer("A red square", return_tensors="pt")
print(tokenizer.decode(model.generate(**prompt, max_new_tokens=40)[0], skip_special_tokens=True))

# The flow head on a mixed row: text tokens, then one frame of {latent_dim}-wide latent patches
# at flow time t (t = 1 is clean), under the hybrid mask (causal text, bidirectional frame).
L, patches = 8, 4
modality = torch.tensor([[0] * (L - patches) + [1] * patches])
frame_ids = torch.where(modality == 1, 0, -1)
mask = model.hybrid_attention_mask(torch.zeros_like(modality), frame_ids)
out = model.forward_flow(
    input_ids=torch.full((1, L), tokenizer.pad_token_id), latents=torch.randn(1, L, {latent_dim}),
    timesteps=torch.full((1, L), 0.5), modality=modality, attention_mask=mask,
)
out.flow[modality == 1]  # the flow-matching prediction for each patch
```

{understanding}Rows longer than the {max_seq_len} positions the model was trained on (prompt and generated
tokens together) raise a ValueError.

`unimm convert from-hf --hf {path} --out RUN_DIR` turns this folder back into a torchtitan
checkpoint (`RUN_DIR/checkpoint/step-0`) that `unimm train` starts from.'''

_LLAMA_USE = '''```python
from transformers import AutoTokenizer, LlamaForCausalLM

model = LlamaForCausalLM.from_pretrained("{path}")
tokenizer = AutoTokenizer.from_pretrained("{path}")
prompt = tokenizer("A red square", return_tensors="pt")
print(tokenizer.decode(model.generate(**prompt, max_new_tokens=40)[0], skip_special_tokens=True))
```

This is the text backbone only: the visual adapters (input projections, timestep embedding)
and the flow head are not in this folder. `--format unimm` exports them too.

The model was trained on rows of up to {max_seq_len} positions (`max_position_embeddings`).
Stock Llama code refuses no length: `generate()` stops there by default and the tokenizer
truncates there with `truncation=True`, but a longer `max_new_tokens` or input only logs a
warning and runs on positions the model never saw.'''


def _feed_forward(ffn: FFNConfig) -> str:
    if ffn.kind == "moe":
        moe = ffn.moe
        return f"{moe.top_k} of {moe.num_experts} experts of width {moe.expert_hidden_dim} (shared experts: {moe.shared})"
    if ffn.kind == "modality":
        return f"one SwiGLU for text, one for vision, width {ffn.hidden_dim}"
    if ffn.kind == "mot":
        return (
            f"Mixture of Transformers: one SwiGLU (width {ffn.hidden_dim}), attention projections and norms "
            "for text, another for vision; one attention over all tokens"
        )
    return f"SwiGLU, width {ffn.hidden_dim}"


_UNDERSTANDING_USE = '''This is a dual-encoder model: it reads images it is asked about (image to text) as
{understanding_dim}-wide latents of a second, understanding encoder, through its own input projection
`understanding_proj` and with no flow time, and generates images in the {latent_dim}-wide latent space
above. Pass such a frame to `forward_flow` as `understanding` (True at its positions) and
`understanding_latents` (the understanding encoder's latents there, normalised with that encoder's
statistics); its `latents` and `timesteps` are not read and the flow head predicts nothing there:

```python
understanding = modality == 1  # the frame above, read instead of generated
out = model.forward_flow(
    input_ids=torch.full((1, L), tokenizer.pad_token_id), latents=torch.zeros(1, L, {latent_dim}),
    timesteps=torch.ones(1, L), modality=modality, attention_mask=mask,
    understanding=understanding, understanding_latents=torch.randn(1, L, {understanding_dim}),
)
out.logits[modality == 0]  # next-token logits of the text around it, e.g. a caption
```

'''


def model_card(arch: Architecture, fmt: str, checkpoint: Path, dtype: str, folder_name: str) -> str:
    model = arch.model
    tags = ["unimm", "text-generation"] + (["llama"] if fmt == "llama" else ["multimodal", "flow-matching"])
    understanding = ""
    if model.understanding_dim and fmt != "llama":
        understanding = _UNDERSTANDING_USE.format(latent_dim=model.latent_dim, understanding_dim=model.understanding_dim)
    use = (_LLAMA_USE if fmt == "llama" else _UNIMM_USE).format(
        path=folder_name, latent_dim=model.latent_dim, max_seq_len=model.max_seq_len, understanding=understanding
    )
    understanding_row = (
        f"| understanding latent width (dual encoder) | {model.understanding_dim} |\n"
        if model.understanding_dim and fmt != "llama"
        else ""
    )
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [{", ".join(tags)}]
---

# {folder_name}

A unimm model (Transfusion family): one decoder-only transformer over text tokens and visual
latents, trained with next-token prediction on text and flow matching on visual latents.
Converted by `unimm convert to-hf --format {fmt}` from the torchtitan checkpoint
`{checkpoint}` ({arch.source}).

| | |
| --- | --- |
| layers | {model.n_layers} |
| width | {model.dim} |
| attention heads (query / key-value) | {model.n_heads} / {model.n_kv_heads} |
| feed-forward | {_feed_forward(model.ffn)} |
| vocabulary | {model.vocab_size} |
| RoPE base | {model.rope_theta:g} |
| longest sequence trained | {model.max_seq_len} |
| visual latent width | {model.latent_dim} |
{understanding_row}| weights | {dtype} |

## Use

{use}
"""
