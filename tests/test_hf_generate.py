"""generate() on exported folders: the cache changes the speed, never the text.

Each tiny model is exported once per module through `unimm convert to-hf` and loaded by
transformers from the folder's own modeling code. Its weights are the starting ones with
attention made 5x stronger: at initialisation a token's own embedding drowns what attention
brings, greedy text barely depends on context, and a cache that loses the context (as when
transformers 5.24 renamed ``past_key_values`` to ``cache``) would write the same text.
"""

from dataclasses import dataclass

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BatchEncoding,
    DynamicCache,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from conftest import Start, make_start, starting_weights
from unimm.cli import main
from unimm.titan.model_spec import FLAVORS

# Where generate() looks for the cache in a model's outputs: "cache" since transformers 5.24.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
NEW_TOKENS = 8
PROMPTS = ["A red square on a blue field", "hi", "Two circles"]  # left-padded to the first
MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True),  # seeded in generate()
    "beam": dict(do_sample=False, num_beams=3),
}


@dataclass
class Exported:
    start: Start
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Matmuls this small only wait on a second thread: 10x slower on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["debug", "debug_modality", "debug_moe", "debug_mot"])
def tiny_start(request, tmp_path_factory) -> Start:
    weights = starting_weights(FLAVORS[request.param]())
    for name, tensor in weights.items():
        if ".attention.w" in name:
            tensor.mul_(5.0)
    return make_start(tmp_path_factory.mktemp(request.param), request.param, weights)


@pytest.fixture(scope="module")
def exported(tiny_start) -> Exported:
    model = AutoModelForCausalLM.from_pretrained(tiny_start.hf, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_start.hf, trust_remote_code=True)
    return Exported(tiny_start, model, tokenizer)


def prompts(exported: Exported, texts: list[str]) -> BatchEncoding:
    return exported.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")


@torch.no_grad()
def generate(model, batch, **options) -> torch.Tensor:
    """NEW_TOKENS new tokens per row: no early <eos>, sampling seeded."""
    torch.manual_seed(0)
    return model.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **options)


@torch.no_grad()
def assert_not_degenerate(model, sequences: torch.Tensor, prompt_len: int, greedy: bool) -> None:
    """Not every row stuck on a token (a tiny random model may fall into a token that predicts
    itself: which row does depends on the torch build's arithmetic); greedy rows that are not
    stuck also unlike what a model that forgets its cache writes (each step seeing its own token
    alone, as with a fresh cache per step)."""
    new = sequences[:, prompt_len:]
    moving = torch.tensor([len(set(row)) > 2 for row in new.tolist()])
    assert moving.any(), new
    if greedy:
        forgetful = [new[:, 0]]
        for _ in range(new.shape[1] - 1):
            forgetful.append(model(input_ids=forgetful[-1][:, None], use_cache=False).logits[:, -1].argmax(-1))
        assert (new != torch.stack(forgetful, dim=1)).any(dim=1)[moving].all(), new


@pytest.mark.parametrize("mode", MODES)
def test_cached_generate_writes_the_uncached_text(exported, mode):
    batch = prompts(exported, PROMPTS)
    cached = generate(exported.model, batch, **MODES[mode])
    uncached = generate(exported.model, batch, **MODES[mode], use_cache=False)
    prompt_len = batch.input_ids.shape[1]
    assert cached.shape == (len(PROMPTS), prompt_len + NEW_TOKENS)
    decode = exported.tokenizer.batch_decode
    assert decode(cached, skip_special_tokens=True) == decode(uncached, skip_special_tokens=True)
    torch.testing.assert_close(cached, uncached)
    assert_not_degenerate(exported.model, cached, prompt_len, greedy=mode != "sampling")


def test_left_padded_rows_continue_as_alone(exported):
    padded = generate(exported.model, prompts(exported, PROMPTS), do_sample=False)
    for text, row in zip(PROMPTS, padded):
        alone = generate(exported.model, prompts(exported, [text]), do_sample=False)[0]
        torch.testing.assert_close(row[-len(alone) :], alone)
        assert (row[: -len(alone)] == exported.tokenizer.pad_token_id).all()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("texts", [PROMPTS[:1], PROMPTS], ids=["one", "left_padded"])
def test_static_cache_writes_the_uncached_text(exported, texts, attention):
    """For a static cache, transformers would build the mask itself: none for an unpadded SDPA
    prompt (the model must size its own to the cache's keys), additive floats for eager."""
    model = exported.model
    if attention != "sdpa":
        model = AutoModelForCausalLM.from_pretrained(
            exported.start.hf, trust_remote_code=True, attn_implementation=attention
        ).eval()
    batch = prompts(exported, texts)
    static = generate(model, batch, do_sample=False, cache_implementation="static")
    torch.testing.assert_close(static, generate(model, batch, do_sample=False, use_cache=False))
    assert_not_degenerate(model, static, batch.input_ids.shape[1], greedy=True)


@torch.no_grad()
@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_cached_steps_match_the_full_forward(exported, name):
    """Prefill, then one token at a time through a cache passed under either name, against one
    forward over the whole left-padded batch."""
    model, batch = exported.model, prompts(exported, PROMPTS)
    steps = torch.randint(0, 256, (len(PROMPTS), 4), generator=torch.Generator().manual_seed(0))
    tokens = torch.cat([batch.input_ids, steps], dim=1)
    padding = torch.cat([batch.attention_mask, torch.ones_like(steps)], dim=1)
    full = model(input_ids=tokens, attention_mask=padding).logits

    P, cache = batch.input_ids.shape[1], DynamicCache()
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **{name: cache})
    logits = [out.logits]
    for i in range(steps.shape[1]):
        assert out.get(CACHE_NAME) is cache and cache.get_seq_length() == P + i
        out = model(input_ids=steps[:, i : i + 1], attention_mask=padding[:, : P + i + 1], **{name: cache})
        logits.append(out.logits)
    real = padding.bool()
    torch.testing.assert_close(torch.cat(logits, dim=1)[real], full[real], rtol=1e-5, atol=1e-5)
    # the last step's logits come from what the cache holds: without it they differ
    alone = model(input_ids=steps[:, -1:], use_cache=False).logits
    assert not torch.allclose(alone, full[:, -1:], atol=1e-2)
    with pytest.raises(ValueError, match="not both"):
        model(input_ids=steps, cache=DynamicCache(), past_key_values=DynamicCache())


@torch.no_grad()
@pytest.mark.parametrize("tiny_start", ["debug"], indirect=True)
@pytest.mark.filterwarnings("ignore:Using the model-agnostic default `max_length`")
def test_inputs_past_max_seq_len_are_refused(exported):
    model, limit = exported.model, exported.model.config.max_position_embeddings
    assert limit == FLAVORS["debug"]().max_seq_len
    fits = torch.randint(0, 256, (1, limit), generator=torch.Generator().manual_seed(0))
    assert model(input_ids=fits).logits.shape[1] == limit
    too_long = rf"{limit + 1} positions \(0 cached \+ {limit + 1} new\) exceed the model's max_seq_len={limit}"
    with pytest.raises(ValueError, match=too_long):
        model(input_ids=torch.cat([fits, fits[:, :1]], dim=1))

    prompt = fits[:, : limit - 4]
    # generate() stops at max_position_embeddings by default ...
    assert model.generate(prompt, do_sample=False, min_length=limit).shape[1] == limit
    # ... and is refused past it when asked for more
    with pytest.raises(ValueError, match=rf"{limit + 1} positions \({limit} cached \+ 1 new\) exceed .*={limit}"):
        model.generate(prompt, do_sample=False, max_new_tokens=8, min_new_tokens=8)


@torch.no_grad()
@pytest.mark.parametrize("tiny_start", ["debug"], indirect=True)
@pytest.mark.filterwarnings("ignore:Using the model-agnostic default `max_length`")
def test_llama_export_carries_the_limit_where_stock_transformers_reads_it(tiny_start, tmp_path):
    """A stock LlamaForCausalLM refuses no length; its config, its tokenizer and generate()'s
    default length stop at max_seq_len."""
    out = tmp_path / "llama"
    assert main(["convert", "to-hf", "--ckpt", str(tiny_start.dcp), "--out", str(out), "--format", "llama"]) == 0
    llama = LlamaForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    limit = FLAVORS["debug"]().max_seq_len
    assert llama.config.max_position_embeddings == tokenizer.model_max_length == limit
    assert tokenizer("ab" * limit, truncation=True, return_tensors="pt").input_ids.shape[1] == limit
    prompt = torch.randint(0, 256, (1, limit - 4), generator=torch.Generator().manual_seed(0))
    assert llama.generate(prompt, do_sample=False, min_length=limit).shape[1] == limit
