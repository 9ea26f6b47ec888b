"""The model zoo: every supported HF family, built tiny from its config offline, maps --layer/--layer_loc to the
right module, and the activations we capture (one pass, stopped early) equal the ones the model's own full
forward gives to hooks the test places itself."""

import pytest
import torch
from model_zoo import FAMILIES, save_family

from sparse_coding.errors import ConfigError, ModelError
from sparse_coding.models.language_model import load_language_model
from sparse_coding.models.tokenizer import Tokenizer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    return {name: save_family(root / name, name) for name in FAMILIES}


def _own_forward(lm, fam, tokens):
    """The model's own forward pass, run whole, with output hooks on the modules this test expects at layer 1;
    gives {what: value} and the down projection module."""
    base = lm.base
    seen = {}
    paths = {"attn": fam.module(1, fam.attn), "mlp_out": fam.module(1, fam.mlp_out), "residual": fam.module(1, "")}
    handles = []
    for what, path in paths.items():

        def keep(_m, _i, out, what=what):
            seen[what] = out[0] if isinstance(out, tuple) else out

        handles.append(base.get_submodule(path).register_forward_hook(keep))
    with torch.no_grad():
        lm.model(input_ids=tokens)
    for h in handles:
        h.remove()
    return seen, base.get_submodule(fam.module(1, fam.down))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_layer_locs_equal_the_models_own_forward(zoo, name):
    fam = FAMILIES[name]
    lm = load_language_model(str(zoo[name]), CPU)
    assert lm.family == fam.model_type and lm.head == fam.head
    locs = ("mlp", "mlp_out", "attn", "residual")
    hooks = {loc: lm.hook_for(1, loc) for loc in locs}
    assert hooks["attn"] == fam.module(1, fam.attn) and hooks["residual"] == fam.module(1, "")
    assert hooks["mlp_out"] == fam.module(1, fam.mlp_out)
    tokens = torch.randint(5, 30, (2, 9))
    ours = lm.activations(tokens, list(hooks.values()))  # one pass for all four, stopped after the last
    own, down = _own_forward(lm, fam, tokens)
    B, T = tokens.shape
    for loc in ("attn", "mlp_out", "residual"):
        expected = own[loc].reshape(B, T, -1)
        assert torch.allclose(ours[hooks[loc]], expected, atol=1e-6), loc
    # The neurons are what the down projection reads: fed through it they give its output, whatever the MLP's
    # shape (gated MLPs: act_fn(gate) * up, not act_fn(gate) alone).
    neurons = ours[hooks["mlp"]]
    assert neurons.shape[-1] != 32  # the MLP's width, not d_model
    with torch.no_grad():
        through_down = down(neurons)
    down_out = own["mlp_out"].reshape(B, T, -1)  # in every family the MLP's output is its down projection's
    assert torch.allclose(through_down, down_out, atol=1e-5), "mlp neurons"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_attn_z_is_every_heads_output_before_the_output_projection(zoo, name):
    """--layer_loc attn_z: the output projection's input, n_heads · d_head wide; fed through the projection it
    gives the attention's output."""
    fam = FAMILIES[name]
    lm = load_language_model(str(zoo[name]), CPU)
    hook = lm.hook_for(1, "attn_z")
    assert hook == fam.module(1, fam.out_proj) + ":input"
    tokens = torch.randint(5, 30, (2, 9))
    z = lm.activations(tokens, [hook])[hook]
    own, _ = _own_forward(lm, fam, tokens)
    out_proj = lm.base.get_submodule(fam.module(1, fam.out_proj))
    assert z.shape[-1] % lm.n_heads() == 0 and lm.n_heads() == 4
    with torch.no_grad():
        assert torch.allclose(out_proj(z), own["attn"].reshape(2, 9, -1), atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "bert", "t5"])
def test_hooks_are_accepted_as_the_base_model_or_the_head_class_names_them(zoo, name):
    fam = FAMILIES[name]
    lm = load_language_model(str(zoo[name]), CPU)
    base_path = fam.module(0, fam.mlp_out)
    assert lm.resolve_hook(base_path) == base_path
    if lm.model is not lm.base:  # the head class prefixes the base model's paths (model., bert., ...)
        prefixed = f"{lm.model.base_model_prefix}.{base_path}"
        assert lm.resolve_hook(prefixed) == base_path
        assert lm.resolve_hook(prefixed + ":input") == base_path + ":input"
    with pytest.raises(ModelError, match="no module"):
        lm.resolve_hook(base_path + ".nope")
    with pytest.raises(ModelError, match="input"):
        lm.resolve_hook(base_path + ":output")


def test_gated_mlp_neurons_are_gate_times_up(zoo):
    lm = load_language_model(str(zoo["llama"]), CPU)
    mlp = lm.base.layers[1].mlp
    tokens = torch.randint(5, 30, (2, 9))
    acts = lm.activations(tokens, ["layers.1.post_attention_layernorm", lm.hook_for(1, "mlp")])
    x = acts["layers.1.post_attention_layernorm"]
    with torch.no_grad():
        expected = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    assert torch.allclose(acts["layers.1.mlp.down_proj:input"], expected, atol=1e-6)


def test_t5_loads_its_encoder_only(zoo):
    lm = load_language_model(str(zoo["t5"]), CPU)
    names = [n for n, _ in lm.model.named_modules()]
    assert not any("decoder" in n for n in names) and lm.hook_for(1, "mlp").startswith("encoder.block.1.")
    assert lm.head is None and "encoder" in lm.head_note


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "distilbert"])
def test_a_checkpoint_saved_without_its_head_has_no_head(tmp_path, name):
    """GPT-2's head is tied to its embeddings, so loading it fills the head without a missing key: the
    checkpoint's declared class (GPT2Model) is what says it was saved without one."""
    lm = load_language_model(str(save_family(tmp_path / name, name, with_head=False)), CPU)
    assert lm.head is None and lm.head_note
    assert lm.model is lm.base  # no randomly initialised head is kept around


def test_a_missing_head_weight_means_no_head(tmp_path):
    """A checkpoint that declares an LM head but lacks its weights (the loading info reports them missing)."""
    import json

    from safetensors.torch import load_file, save_file

    folder = save_family(tmp_path / "llama", "llama")
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("lm_head")}, folder / "model.safetensors")
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    lm = load_language_model(str(folder), CPU)
    assert lm.head is None and "lm_head.weight" in lm.head_note


def test_separators_and_special_tokens(zoo):
    bert = load_language_model(str(zoo["bert"]), CPU).tokenizer
    assert bert.separator() == ("[SEP]", bert.token_to_id("[SEP]"))  # no BOS/EOS: its separator
    assert bert.separator("[CLS]")[0] == "[CLS]"
    assert set(bert.excluded_ids("default")) == {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    assert set(bert.excluded_ids("cls,sep,bos")) == {"[CLS]", "[SEP]"}  # a kind it lacks is skipped
    assert bert.excluded_ids("none") == {}
    with pytest.raises(ConfigError, match="not a single token"):
        bert.separator("no-such-token")
    llama = load_language_model(str(zoo["llama"]), CPU).tokenizer
    assert llama.separator()[0] == "</s>"
    bare = Tokenizer(encode_batch=lambda t: [], decode_tokens=lambda ids: [], name="bare")
    with pytest.raises(ModelError, match="--doc_separator"):
        bare.separator()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward(zoo, dtype):
    full = load_language_model(str(zoo["llama"]), CPU)
    half = load_language_model(str(zoo["llama"]), CPU, dtype)
    tokens = torch.randint(5, 30, (2, 9))
    hook = full.hook_for(1, "residual")
    a, b = full.activations(tokens, [hook])[hook], half.activations(tokens, [hook])[hook]
    assert b.dtype == dtype and torch.allclose(a, b.float(), atol=0.05, rtol=0.05)
