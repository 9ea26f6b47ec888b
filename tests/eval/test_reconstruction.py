"""CE loss recovered and KL through the model, against references computed here with the models' own losses
(HF's `labels=`) and hooks placed by the test: causal LMs score as before issue 12, masked LMs on masked
positions, excluded tokens keep their activations, and a transcoder splices in place of its module."""

import pytest
import torch
from model_zoo import save_family

from sparse_coding.eval.reconstruction import MASK_FRACTION, ce_and_kl, scoring
from sparse_coding.models.language_model import load_language_model
from sparse_coding.saes import build_sae

CPU = torch.device("cpu")


def _hf_loss(model, module, tokens, labels, replace=None):
    """The model's own loss (HF shifts causal labels itself), with module's output replaced if asked."""
    handle = None
    if replace is not None:
        handle = module.register_forward_hook(lambda m, i, out: replace(out))
    with torch.no_grad():
        out = model(input_ids=tokens, labels=labels)
    if handle is not None:
        handle.remove()
    return out.loss.item(), out.logits


def _on_value(fn):
    """A module-output replacement applying fn to the value, whether the module gives a tensor or a tuple."""
    return lambda out: (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)


def _sae(sae, out, m):
    """SAE m's reconstruction of a module's output [B, T, d]."""
    return sae.reconstruct(out.flatten(0, 1))[m].view_as(out)


def test_a_causal_lm_scores_as_before(hf_folder):
    """At the residual stream after block 0 of a random GPT-2 whose (tied) embeddings are scaled up, so that its
    predictions are sharp and zero ablation moves the loss a lot: a ratio with a small denominator would
    magnify the float32 rounding in HF's own loss."""
    lm = load_language_model(str(hf_folder), CPU)
    with torch.no_grad():
        lm.model.transformer.wte.weight.mul_(10)
    torch.manual_seed(0)
    sae = build_sae("relu", 32, 64, [{"l1_alpha": 0.1}, {"l1_alpha": 1.0}])
    tokens = torch.randint(0, 300, (6, 16))
    ours = ce_and_kl(lm, "h.0", sae, tokens)  # nothing excluded: every position spliced, as before
    block = lm.model.transformer.h[0]
    clean, clean_logits = _hf_loss(lm.model, block, tokens, tokens)
    zero, _ = _hf_loss(lm.model, block, tokens, tokens, _on_value(torch.zeros_like))
    assert abs(zero - clean) > 0.5
    for m in range(2):
        spliced, logits = _hf_loss(lm.model, block, tokens, tokens, _on_value(lambda v, m=m: _sae(sae, v, m)))
        expected = (zero - spliced) / (zero - clean)
        assert ours["ce_loss_recovered"][m].item() == pytest.approx(expected, rel=1e-4)
        assert ours["ce_sae"][m].item() == pytest.approx(spliced, rel=1e-6)
        p, q = clean_logits.log_softmax(-1), logits.log_softmax(-1)
        kl = (p.exp() * (p - q)).sum(-1).mean().item()  # every position, as before
        assert ours["kl"][m].item() == pytest.approx(kl, rel=1e-4)
    assert ours["ce_clean"][0].item() == pytest.approx(clean, rel=1e-6)
    assert ours["ce_zero"][0].item() == pytest.approx(zero, rel=1e-6)


def test_a_masked_lm_scores_masked_positions(tmp_path):
    lm = load_language_model(str(save_family(tmp_path / "bert", "bert")), CPU)
    assert lm.head == "masked"
    tokens = torch.randint(5, 30, (8, 16))
    s = scoring(lm, tokens, [])
    mask_id = lm.tokenizer.special["mask"][1]
    assert torch.equal(s.inputs == mask_id, s.ce) and torch.equal(s.ce, s.kl)
    assert 0.05 < s.ce.float().mean().item() < 0.3 and MASK_FRACTION == 0.15
    torch.manual_seed(0)
    sae = build_sae("relu", 48, 96, [{"l1_alpha": 0.1}])
    hook = lm.hook_for(1, "mlp")  # encoder.layer.1.intermediate
    ours = ce_and_kl(lm, hook, sae, tokens)
    labels = tokens.masked_fill(~s.ce, -100)  # HF's own masked-LM loss: only the masked positions count
    module = lm.base.encoder.layer[1].intermediate
    clean, _ = _hf_loss(lm.model, module, s.inputs, labels)
    zero, _ = _hf_loss(lm.model, module, s.inputs, labels, torch.zeros_like)
    spliced, _ = _hf_loss(lm.model, module, s.inputs, labels, lambda out: _sae(sae, out, 0))
    for key, theirs in (("ce_clean", clean), ("ce_zero", zero), ("ce_sae", spliced)):
        assert ours[key][0].item() == pytest.approx(theirs, rel=1e-5), key


class _Fixed:
    """A one-model "stack" whose output is fn(input)."""

    n_models, d_sae = 1, 8

    def __init__(self, fn):
        self.fn = fn

    def reconstruct(self, x):
        return self.fn(x)


def test_excluded_tokens_keep_their_activations(hf_folder):
    lm = load_language_model(str(hf_folder), CPU)
    tokens = torch.randint(1, 300, (4, 12))
    tokens[:, ::3] = 0  # the separator, excluded
    perfect = ce_and_kl(lm, "h.1.mlp", _Fixed(lambda x: x), tokens, excluded=[0])
    zeros = ce_and_kl(lm, "h.1.mlp", _Fixed(torch.zeros_like), tokens, excluded=[0])
    assert perfect["ce_loss_recovered"][0].item() == pytest.approx(1.0, abs=1e-4)
    everywhere = ce_and_kl(lm, "h.1.mlp", _Fixed(torch.zeros_like), tokens)
    assert everywhere["ce_loss_recovered"][0].item() == pytest.approx(0.0, abs=1e-4)
    # (Zero ablation zeroes the separators too, as SAELens': tests/pipelines/test_evaluate.py checks it against
    # SAELens' own evals; at this last layer their MLP output reaches only their own, unscored, positions.)
    assert zeros["ce_loss_recovered"][0].item() == pytest.approx(0.0, abs=1e-4)


def test_a_transcoder_splices_in_place_of_its_module(hf_folder):
    lm = load_language_model(str(hf_folder), CPU)
    x_hook, y_hook = lm.mlp_transcode_hooks(1)
    mlp = lm.base.h[1].mlp

    def the_mlp(x):  # its parts, not the module itself: that one is hooked while the splice runs
        return mlp.c_proj(mlp.act(mlp.c_fc(x)))

    tokens = torch.randint(0, 300, (4, 12))
    with torch.no_grad():
        exact = ce_and_kl(lm, y_hook, _Fixed(the_mlp), tokens, source=x_hook)
        wrong = ce_and_kl(lm, y_hook, _Fixed(lambda x: the_mlp(x) * 0.5), tokens, source=x_hook)
    assert exact["ce_loss_recovered"][0].item() == pytest.approx(1.0, abs=1e-4) and exact["kl"][0] < 1e-7
    assert wrong["kl"][0] > 1e-5
