"""Model dimensions as a command-line section: ``--model_size.dim 96 --model_size.n_layers 6 ...``.

torchtitan's ``Trainer.Config`` hides ``model_spec`` from its command-line parser (tyro), since
it holds callables, so no flag reaches the model config. IsoFLOP sweeps need to vary the size
of one recipe from the command line (the same ``--config NAME`` under torchrun and slurm), so a
resizable recipe returns a :class:`SizedTrainer.Config`: its ``model_size`` section is parsed
like any other, and ``__post_init__`` writes it into ``model_spec.model``. tyro constructs the
config from the parsed fields, so the command-line values are the ones applied; applying is
idempotent, so torchtitan's later ``replace``-based copies apply it again harmlessly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from unimm.model.transformer import UnimmModel
from unimm.titan.trainer import UnimmTrainer


@dataclass(kw_only=True, slots=True)
class ModelSize:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden_dim: int
    """Width of the dense (and each modality) FFN. A MoE keeps its granularity: its expert
    width is scaled by the same factor as this width."""

    @classmethod
    def of(cls, model: UnimmModel.Config) -> ModelSize:
        return cls(
            dim=model.dim,
            n_layers=model.n_layers,
            n_heads=model.n_heads,
            n_kv_heads=model.n_kv_heads,
            ffn_hidden_dim=model.ffn.hidden_dim,
        )

    def apply(self, model: UnimmModel.Config) -> UnimmModel.Config:
        """A copy of ``model`` at this size (the input is not changed)."""
        ffn = dataclasses.replace(model.ffn, hidden_dim=self.ffn_hidden_dim)
        if ffn.kind == "moe":
            expert_width = ffn.moe.expert_hidden_dim * self.ffn_hidden_dim // model.ffn.hidden_dim
            ffn.moe = dataclasses.replace(ffn.moe, expert_hidden_dim=expert_width)
        return dataclasses.replace(
            model,
            dim=self.dim,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            ffn=ffn,
        )

    def overrides(self) -> list[str]:
        """The command-line flags that select this size."""
        values = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]
        return [token for name, value in values for token in (f"--model_size.{name}", str(value))]


class SizedTrainer(UnimmTrainer):
    """UnimmTrainer whose model size comes from the ``model_size`` config section."""

    @dataclass(kw_only=True, slots=True)
    class Config(UnimmTrainer.Config):
        model_size: ModelSize
        """Written into ``model_spec.model`` on construction (starts at the recipe's size)."""

        def __post_init__(self) -> None:
            UnimmTrainer.Config.__post_init__(self)  # slots dataclass: no zero-argument super()
            spec = self.model_spec
            self.model_spec = dataclasses.replace(spec, model=self.model_size.apply(spec.model))


def sized(config: UnimmTrainer.Config) -> SizedTrainer.Config:
    """``config`` made resizable; its ``model_size`` starts at the recipe's own size."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    return SizedTrainer.Config(**values, model_size=ModelSize.of(config.model_spec.model))
