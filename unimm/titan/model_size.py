"""Model dimensions as a command-line section: ``--model_size.dim 96 --model_size.n_layers 6 ...``.

torchtitan's ``Trainer.Config`` hides ``model_spec`` from its command-line parser (tyro), since
it holds callables, so no flag reaches the model config. IsoFLOP sweeps need to vary the size
of one recipe from the command line (the same ``--config NAME`` under torchrun and slurm), so a
resizable recipe returns a :class:`SizedTrainer.Config`: its ``model_size`` section is parsed
like any other, and ``__post_init__`` writes it into ``model_spec.model``. tyro constructs the
config from the parsed fields, so the command-line values are the ones applied; applying is
idempotent, so torchtitan's later ``replace``-based copies apply it again harmlessly.

A recipe fitted to its data (:func:`fit_to_data`, e.g. ``mixture``) also takes the vocabulary,
the latent width and the longest row from the run's data instead of the recipe: the tokenizer
(``--tokenizer.path``, its special tokens included), the shards' manifest
(``--dataloader.shards``) and ``--training.seq_len``. The same rule runs wherever the config is
parsed (``unimm train``'s checks, every torchrun worker, ``unimm params``/``sample``/``convert``),
and it depends only on the config and those files, so all of them build the same model.
``--model_size.vocab_size`` / ``latent_dim`` / ``max_seq_len`` still set a value explicitly;
one that contradicts the data (a vocabulary smaller than the tokenizer, another latent width
than the manifest's, a row shorter than seq_len) is a ConfigError naming both. That check
runs in ``unimm train``'s preflight and when the trainer is built, not while the config is
parsed: tyro turns any ValueError raised there into its own usage message.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path

from unimm.errors import ConfigError
from unimm.model.transformer import UnimmModel
from unimm.titan.trainer import UnimmTrainer
from unimm.tokenizer import Tokenizer

# Model fields a recipe fitted to its data derives; 0 in ModelSize leaves them to the recipe/data.
DATA_FIELDS = ("vocab_size", "latent_dim", "max_seq_len")


@dataclass(kw_only=True, slots=True)
class ModelSize:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden_dim: int
    """Width of the dense (and each modality) FFN. A MoE keeps its granularity: its expert
    width is scaled by the same factor as this width."""
    vocab_size: int = 0
    """Token ids; 0: the recipe's (a recipe fitted to its data: the tokenizer's)."""
    latent_dim: int = 0
    """Width of a visual latent; 0: the recipe's (fitted: the manifest's)."""
    max_seq_len: int = 0
    """Longest row the model holds (RoPE table); 0: the recipe's (fitted: --training.seq_len)."""

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
        explicit = {name: getattr(self, name) for name in DATA_FIELDS if getattr(self, name)}
        return dataclasses.replace(
            model,
            dim=self.dim,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            ffn=ffn,
            **explicit,
        )

    def overrides(self) -> list[str]:
        """The command-line flags that select this size."""
        values = [
            (f.name, getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name not in DATA_FIELDS or getattr(self, f.name)
        ]
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


@dataclass(frozen=True)
class DataFit:
    """The data-derived model fields of a fitted recipe, and where each came from."""

    vocab_size: int
    latent_dim: int
    max_seq_len: int
    origins: tuple[str, str, str]

    def describe(self) -> str:
        values = (self.vocab_size, self.latent_dim, self.max_seq_len)
        return ", ".join(f"{name} {value} ({origin})" for name, value, origin in zip(DATA_FIELDS, values, self.origins))


@functools.lru_cache(maxsize=16)
def _tokenizer_size(config_json: str, stamp: tuple) -> int:
    return Tokenizer(Tokenizer.Config(**json.loads(config_json))).get_vocab_size()


def tokenizer_size(config: Tokenizer.Config) -> int:
    """Ids of the tokenizer, its added special tokens included (loaded once per file version)."""
    path = Path(config.path).expanduser() if config.path else None
    stamp = (path.stat().st_mtime_ns, path.stat().st_size) if path is not None and path.exists() else ()
    return _tokenizer_size(json.dumps(dataclasses.asdict(config), sort_keys=True), stamp)


def _manifest(shards: str) -> tuple[Path, dict] | None:
    """The shards' manifest.json, or None when there is none to read (the loader's checks
    then report what is wrong with the folder)."""
    path = Path(shards).expanduser() / "manifest.json"
    try:
        return path, json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def data_fit(config: UnimmTrainer.Config, size: ModelSize, *, strict: bool = True) -> DataFit:
    """Vocabulary, latent width and max_seq_len for ``config`` from its tokenizer, shards and
    seq_len; explicit ``size`` values win. ``strict``: an explicit value the data contradicts,
    or a tokenizer that cannot be loaded, is a ConfigError; otherwise explicit values are
    taken as given and an unloadable tokenizer leaves the recipe's vocabulary (the loader's
    own checks then name the problem)."""
    loader, seq_len = config.dataloader, config.training.seq_len
    found = _manifest(loader.shards) if loader.shards else None
    tokenizer = config.tokenizer.path or "bytes"
    written = (found[1].get("tokenizer") or {}) if found else {}
    where = (
        f" (the shards of {found[0]} were tokenised with {written.get('path') or 'bytes'!r}, "
        f"{written.get('vocab_size')} ids)"
        if written
        else ""
    )

    try:
        ids = tokenizer_size(config.tokenizer)
    except ConfigError:
        if strict:
            raise
        ids = config.model_spec.model.vocab_size
    if strict and size.vocab_size and size.vocab_size < ids:
        raise ConfigError(
            f"--model_size.vocab_size={size.vocab_size} is smaller than the tokenizer: {tokenizer!r} has {ids} ids "
            f"with its special tokens{where}; leave --model_size.vocab_size out to take {ids}"
        )
    vocab = (size.vocab_size, "--model_size.vocab_size") if size.vocab_size else (ids, f"tokenizer {tokenizer}")

    if found:
        data_width = found[1].get("latent_dim") or 0
        encoder = (found[1].get("encoder") or {}).get("name", "?")
        data_origin = f"{found[0]}, encoder {encoder}"
        what = f"{found[0]}: its shards hold latents {data_width} wide (encoder {encoder})"
    elif loader.shards:
        data_width, data_origin, what = 0, "", ""
    else:
        data_width = 3 * loader.patch * loader.patch
        data_origin = f"procedural raw-pixel patches of {loader.patch}x{loader.patch}"
        what = f"the procedural data (dataloader.shards is empty): its {data_origin} are {data_width} wide"
    if strict and size.latent_dim and data_width and size.latent_dim != data_width:
        raise ConfigError(
            f"--model_size.latent_dim={size.latent_dim} contradicts {what}; "
            f"leave --model_size.latent_dim out to take {data_width}"
        )
    if size.latent_dim:
        latent = (size.latent_dim, "--model_size.latent_dim")
    elif data_width:
        latent = (data_width, data_origin)
    else:  # text-only shards (or none yet): no latents to fit
        latent = (config.model_spec.model.latent_dim, "the recipe's; the data has no latents")

    if strict and size.max_seq_len and size.max_seq_len < seq_len:
        raise ConfigError(
            f"--model_size.max_seq_len={size.max_seq_len} is shorter than --training.seq_len={seq_len}: "
            "the model could not hold a row; leave --model_size.max_seq_len out to take seq_len"
        )
    rows = (size.max_seq_len, "--model_size.max_seq_len") if size.max_seq_len else (seq_len, "--training.seq_len")
    return DataFit(vocab[0], latent[0], rows[0], (vocab[1], latent[1], rows[1]))


class DataFittedTrainer(SizedTrainer):
    """SizedTrainer whose vocabulary, latent width and max_seq_len come from its data."""

    @dataclass(kw_only=True, slots=True)
    class Config(SizedTrainer.Config):
        def __post_init__(self) -> None:
            SizedTrainer.Config.__post_init__(self)
            fit = data_fit(self, self.model_size, strict=False)
            model = dataclasses.replace(
                self.model_spec.model, vocab_size=fit.vocab_size, latent_dim=fit.latent_dim, max_seq_len=fit.max_seq_len
            )
            self.model_spec = dataclasses.replace(self.model_spec, model=model)

        def data_fit(self) -> DataFit:
            """The fitted values and their origins; a ConfigError if the data contradicts
            an explicit value (``unimm train``'s preflight calls it)."""
            return data_fit(self, self.model_size)

    def __init__(self, config: Config):
        config.data_fit()  # the check again in each worker: torchrun may be started without unimm train
        super().__init__(config)


def fit_to_data(config: UnimmTrainer.Config) -> DataFittedTrainer.Config:
    """``config`` made resizable (``--model_size.*``) and fitted to its data (see the module docs)."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    values["model_size"] = ModelSize.of(config.model_spec.model)
    return DataFittedTrainer.Config(**values)
