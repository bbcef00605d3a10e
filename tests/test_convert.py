"""`unimm convert`: DCP <-> Hugging Face, through the CLI, transformers and torchtitan itself.

Two training runs serve the whole file. Each starts from known weights loaded through a
conversion path and trains at learning rate 0, so every checkpoint it writes must hold exactly
those weights: what torchtitan loaded and saved through the state-dict adapter is checked
bit for bit, and the checkpoints are then converted like any trained one.
"""

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from conftest import Start, make_start, run_unimm, small_run_options, starting_weights
from unimm.cli import main
from unimm.convert.dcp_io import DcpCheckpoint, save_model_checkpoint
from unimm.convert.safetensors_io import read_safetensors
from unimm.convert.state_dict_adapter import UnimmStateDictAdapter
from unimm.data.batch import NO_FRAME, TEXT, VISION
from unimm.errors import ConfigError
from unimm.masks import build_attention_mask
from unimm.model.ffn import FFNConfig
from unimm.model.transformer import UnimmModel
from unimm.titan.model_spec import FLAVORS
from unimm.tokenizer import build_tokenizer

pytestmark = pytest.mark.slow


def convert(*args) -> int:
    return main(["convert", *map(str, args)])


def load(checkpoint: Path) -> dict[str, torch.Tensor]:
    return DcpCheckpoint(checkpoint).load()


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@dataclass
class Run:
    start: Start
    out: Path
    log: str

    @property
    def step1(self) -> Path:  # DCP: the run's checkpoint.interval is 1
        return self.out / "checkpoint" / "step-1"

    @property
    def step2(self) -> Path:  # the last step, saved in HF format by torchtitan
        return self.out / "checkpoint" / "step-2"


def train_at_lr_0(recipe: str, out: Path, cache: Path, *extra: str, nproc: int = 1) -> str:
    result = run_unimm(
        "train", "--recipe", recipe, "--out", str(out), "--steps", "2", "--nproc", str(nproc),
        *small_run_options(cache),
        "--optimizer.param-groups.0.optimizer-kwargs.lr", "0", "--checkpoint.interval", "1",
        "--checkpoint.last_save_model_only", "--checkpoint.last_save_in_hf", *extra,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory, data_cache) -> Run:
    """debug_cpu, one process, starting from an HF export via --checkpoint.initial_load_in_hf."""
    root = tmp_path_factory.mktemp("shared")
    start = make_start(root, "debug")
    log = train_at_lr_0(
        "debug_cpu", root / "run", data_cache, "--checkpoint.initial_load_path", str(start.hf),
        "--checkpoint.initial_load_in_hf", "--checkpoint.initial_load_model_only",
    )
    return Run(start, root / "run", log)


@pytest.fixture(scope="session")
def modality_run(tmp_path_factory, data_cache) -> Run:
    """debug_cpu_modality on 2 FSDP ranks, resuming from what `convert from-hf` wrote."""
    root = tmp_path_factory.mktemp("modality")
    start = make_start(root, "debug_modality")
    assert convert("from-hf", "--hf", start.hf, "--out", root / "run") == 0
    log = train_at_lr_0("debug_cpu_modality", root / "run", data_cache, nproc=2)
    return Run(start, root / "run", log)


@pytest.fixture(scope="session")
def moe_start(tmp_path_factory) -> Start:
    return make_start(tmp_path_factory.mktemp("moe"), "debug_moe")


@pytest.fixture(params=["shared", "modality"])
def run(request) -> Run:
    return request.getfixturevalue(f"{request.param}_run")


# -- torchtitan's own HF load and save go through the adapter ------------------------------


def test_torchtitan_loads_and_saves_hf_exactly(run):
    assert "Training starts at step 1" in run.log
    assert_identical(load(run.step1), run.start.weights)
    assert_identical(read_safetensors(run.step2), read_safetensors(run.start.hf))


def test_train_resumes_from_from_hf_output(modality_run):
    assert f"Loading the checkpoint from {modality_run.out / 'checkpoint' / 'step-0'}" in modality_run.log


# -- round trip -------------------------------------------------------------------------------


def round_trip(checkpoint: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    assert convert("to-hf", "--ckpt", checkpoint, "--out", tmp_path / "hf", "--max-shard-gb", "0.001") == 0
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1  # sharded, with an index
    assert convert("from-hf", "--hf", tmp_path / "hf", "--out", tmp_path / "back") == 0
    return load(tmp_path / "back" / "checkpoint" / "step-0")


def test_round_trip_is_bit_exact(run, tmp_path):
    # the modality run's checkpoints were written by 2 processes
    assert_identical(round_trip(run.step1, tmp_path), load(run.step1))


def test_round_trip_of_moe_is_bit_exact(moe_start, tmp_path):
    assert_identical(round_trip(moe_start.dcp, tmp_path), moe_start.weights)


def test_names_map_by_rule_for_any_ffn_variant():
    adapter = UnimmStateDictAdapter(FLAVORS["debug"](), None)
    g = torch.Generator().manual_seed(0)
    native = {
        name: torch.randn(shape, generator=g)
        for name, shape in {
            "layers.0.feed_forward.experts.w1": (4, 128, 16),
            "layers.0.feed_forward.router.gate.weight": (3, 128),
            "layers.0.feed_forward.router.expert_bias": (3,),
            "layers.0.feed_forward.shared_experts.w2.weight": (128, 16),
            "layers.1.attention.text.wq.weight": (128, 128),  # per-modality attention
            "layers.1.feed_forward.ffn.w1.weight": (384, 128),
        }.items()
    }
    hf = adapter.to_hf(native)
    assert "model.layers.0.mlp.experts.gate_proj" in hf
    assert "model.layers.1.self_attn.text.q_proj.weight" in hf
    assert "model.layers.1.mlp.gate_proj.weight" in hf  # Llama's name for the shared FFN
    assert not torch.equal(hf["model.layers.1.self_attn.text.q_proj.weight"], native["layers.1.attention.text.wq.weight"])
    assert_identical(adapter.from_hf(hf), native)
    # a name the rule cannot invert (it would read back as the shared FFN's) is refused
    with pytest.raises(ConfigError, match="no reversible"):
        adapter.to_hf({"layers.0.feed_forward.w1.weight": torch.zeros(1)})


# -- the exported model computes what the native one does ------------------------------------

# one row: text(0-3) frame 0 (4-7) text(8-10) | doc 1: text(11-12) frame 1 (13-15)
MODALITY = [TEXT] * 4 + [VISION] * 4 + [TEXT] * 5 + [VISION] * 3
FRAMES = [NO_FRAME] * 4 + [0] * 4 + [NO_FRAME] * 5 + [1] * 3
DOCS = [0] * 11 + [1] * 5
POSITIONS = list(range(11)) + list(range(5))


def native_outputs(model, tokens, latents, t, modality, documents, frames, positions):
    everywhere = torch.ones(tokens.shape, dtype=torch.bool)
    mask = build_attention_mask(documents, frames, "sdpa")
    out = model(tokens, latents, t, modality, positions, mask, everywhere, everywhere)
    B, L = tokens.shape
    return out[0].view(B, L, -1), out[1].view(B, L, -1)


def rows(batch: int, values: list[int]) -> torch.Tensor:
    return torch.tensor([values] * batch)


@pytest.fixture(params=["shared", "modality", "moe"])
def start(request) -> Start:
    fixture = {"shared": "shared_run", "modality": "modality_run", "moe": "moe_start"}[request.param]
    value = request.getfixturevalue(fixture)
    return value.start if isinstance(value, Run) else value


@torch.no_grad()
def test_exported_model_matches_native(start):
    config = FLAVORS[start.flavor]()
    native = config.build().eval()
    native.load_state_dict(start.weights)
    exported = AutoModelForCausalLM.from_pretrained(start.hf, trust_remote_code=True).eval()
    g = torch.Generator().manual_seed(1)
    B, L = 2, len(MODALITY)
    tokens = torch.randint(0, 256, (B, L), generator=g)
    latents = torch.randn(B, L, config.latent_dim, generator=g)
    t = torch.rand(B, L, generator=g)

    # a batch with images: hybrid mask, two packed documents, per-document positions
    logits, flow = native_outputs(native, tokens, latents, t, rows(B, MODALITY), rows(B, DOCS), rows(B, FRAMES), rows(B, POSITIONS))
    out = exported.forward_flow(
        input_ids=tokens, latents=latents, timesteps=t, modality=rows(B, MODALITY),
        attention_mask=exported.hybrid_attention_mask(rows(B, DOCS), rows(B, FRAMES)), position_ids=rows(B, POSITIONS),
    )
    vision = rows(B, MODALITY) == VISION
    torch.testing.assert_close(out.logits[~vision], logits[~vision], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.flow[vision], flow[vision], rtol=1e-5, atol=1e-5)
    assert flow[vision].abs().mean() > 1e-2

    # text only: the plain causal forward generate() uses
    text = torch.full((B, L), TEXT)
    logits, _ = native_outputs(
        native, tokens, torch.zeros_like(latents), torch.zeros_like(t), text,
        torch.zeros_like(text), torch.full((B, L), NO_FRAME), torch.arange(L).expand(B, L),
    )
    torch.testing.assert_close(exported(input_ids=tokens).logits, logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_llama_export_matches_native_text_logits(shared_run, tmp_path):
    assert convert("to-hf", "--ckpt", shared_run.step1, "--out", tmp_path / "llama", "--format", "llama") == 0
    assert not (tmp_path / "llama" / "modeling_unimm.py").exists()
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    native = FLAVORS["debug"]().build().eval()
    native.load_state_dict(load(shared_run.step1))
    tokens = torch.randint(0, 261, (2, 24), generator=torch.Generator().manual_seed(2))
    B, L = tokens.shape
    text = torch.full((B, L), TEXT)
    logits, _ = native_outputs(
        native, tokens, torch.zeros(B, L, 192), torch.zeros(B, L), text, torch.zeros_like(text),
        torch.full((B, L), NO_FRAME), torch.arange(L).expand(B, L),
    )
    torch.testing.assert_close(llama(tokens).logits, logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_generate_with_the_exported_tokenizer(shared_run):
    model = AutoModelForCausalLM.from_pretrained(shared_run.start.hf, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(shared_run.start.hf, trust_remote_code=True)
    prompt = "A red square"
    assert tokenizer(prompt).input_ids == build_tokenizer().encode(prompt, bos=True)
    single = tokenizer(prompt, return_tensors="pt")
    greedy = dict(max_new_tokens=12, do_sample=False)
    cached = model.generate(**single, **greedy)
    assert cached.shape == (1, single.input_ids.shape[1] + 12)
    torch.testing.assert_close(model.generate(**single, **greedy, use_cache=False), cached)
    # a left-padded row continues as it does alone
    alone = model.generate(**tokenizer("hi", return_tensors="pt"), **greedy)[0]
    batch = tokenizer([prompt, "hi"], return_tensors="pt", padding=True, padding_side="left")
    padded = model.generate(**batch, **greedy)[1]
    torch.testing.assert_close(padded[-len(alone) :], alone)
    assert (padded[: -len(alone)] == tokenizer.pad_token_id).all()
    assert isinstance(tokenizer.decode(cached[0], skip_special_tokens=True), str)


# -- clear refusals, nothing written -------------------------------------------------------


@pytest.mark.parametrize("damage", [".metadata", "__0_0.distcp"])
def test_damaged_checkpoint_is_refused(shared_run, tmp_path, damage, capsys):
    broken = tmp_path / "step-1"
    broken.mkdir()
    for f in shared_run.step1.iterdir():
        if f.name != damage:
            (broken / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "new" / "hf"
    assert convert("to-hf", "--ckpt", broken, "--out", out) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"unimm: error: {broken}") and err.count("\n") == 1  # one line, no traceback
    assert not (tmp_path / "new").exists()


def test_unknown_architecture_is_refused(tmp_path, capsys):
    odd = UnimmModel.Config(vocab_size=261, dim=32, n_layers=1, n_heads=2, n_kv_heads=2,
                            ffn=FFNConfig(hidden_dim=64), max_seq_len=64, latent_dim=8)
    save_model_checkpoint(starting_weights(odd), tmp_path / "odd")
    assert convert("to-hf", "--ckpt", tmp_path / "odd", "--out", tmp_path / "hf") == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "odd") in err and "matches no known architecture" in err
    assert not (tmp_path / "hf").exists()


def test_wrong_recipe_llama_of_modality_and_existing_output_are_refused(shared_run, modality_run, tmp_path, capsys):
    out = tmp_path / "hf"
    assert convert("to-hf", "--ckpt", shared_run.step1, "--out", out, "--recipe", "debug_cpu_modality") == 2
    assert "does not hold the architecture of recipe debug_cpu_modality" in capsys.readouterr().err
    assert convert("to-hf", "--ckpt", modality_run.step1, "--out", out, "--format", "llama") == 2
    assert "--format llama needs a shared (dense) FFN" in capsys.readouterr().err
    assert not out.exists()

    assert convert("to-hf", "--ckpt", shared_run.step1, "--out", out, "--recipe", "debug_cpu") == 0
    assert convert("to-hf", "--ckpt", shared_run.step1, "--out", out) == 2
    assert f"{out} exists" in capsys.readouterr().err
    assert convert("to-hf", "--ckpt", shared_run.step1, "--out", out, "--overwrite", "--dtype", "bf16") == 0
    assert {t.dtype for t in read_safetensors(out).values()} == {torch.bfloat16}
