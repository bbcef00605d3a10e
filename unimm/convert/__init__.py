"""Checkpoint conversion between torchtitan DCP and Hugging Face formats (`unimm convert`).

state_dict_adapter: the one native <-> HF name mapping (also torchtitan's adapter);
architecture: which model a DCP checkpoint holds; dcp_io / safetensors_io: weights in and out;
hf_config, hf_tokenizer, model_card: the other files of an HF folder; hf_model: the modeling
code the folder carries; to_hf / from_hf: the two directions; staging: all-or-nothing output.
"""
