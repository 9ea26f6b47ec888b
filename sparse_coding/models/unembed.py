"""The direct path from a hook to the logits, for feature dashboards: which tokens a direction at the hook
promotes and suppresses through the unembedding.

A direction d at the hook reaches the residual stream through the hooked module's output projection when the
hook sits inside an MLP (d_hook ≠ d_model: the projection is found among the parent module's weights by name
and shape: `c_proj`, `W_out`, `down_proj`, `fc2`, ...), or directly when the hook is on the residual stream or a
block's output. Its direct effect on the logits is then W_U · (γ ⊙ r), γ the final norm's scale. The norm's
division by the activation's size and everything downstream of later layers is left out, as in SAE
dashboards' "logit weight distribution"; the effect is a direction's logit lens, not a causal measurement.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import Tensor

from sparse_coding.models.language_model import Hook, LanguageModel

FINAL_NORMS = ("transformer.ln_f", "model.norm", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm")
_OUTPUT = re.compile(r"(^|[._])(c_proj|w_out|down_proj|fc2|dense_4h_to_h)([._]|$)", re.I)  # an MLP's way out


def unembedding(lm: LanguageModel) -> Tensor | None:
    """W_U as [vocab, d_model], or None when the model has no language-model head we can find."""
    model = lm.model
    if hasattr(model, "W_U"):  # TransformerLens: [d_model, vocab]
        return model.W_U.detach().T
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    return None if weight is None or weight.dim() != 2 else weight.detach()


def final_norm_scale(lm: LanguageModel) -> Tensor | None:
    """The final norm's elementwise scale γ [d_model], if the model has one."""
    model = lm.model
    for path in (*FINAL_NORMS, "ln_final"):
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        scale = getattr(mod, "weight", None)
        scale = getattr(mod, "w", None) if scale is None else scale
        return None if scale is None else scale.detach()
    return None


def to_residual(lm: LanguageModel, hook: str, d_hook: int, d_model: int) -> Tensor | None:
    """[d_hook, d_model]: the hooked module's output projection (None when d_hook = d_model: no map needed).
    Raises LookupError when no weight of the parent module looks like one."""
    if d_hook == d_model:
        return None
    module = Hook.parse(lm.resolve_hook(hook)).module  # the base model's path, whichever way the hook was named
    parent = lm.base.get_submodule(module.rsplit(".", 1)[0]) if "." in module else lm.base
    for name, w in parent.named_parameters():
        if w.dim() != 2 or not _OUTPUT.search(name):
            continue
        if tuple(w.shape) == (d_hook, d_model):  # Conv1D / TransformerLens W_out: [in, out]
            return w.detach()
        if tuple(w.shape) == (d_model, d_hook):  # nn.Linear: [out, in]
            return w.detach().T
    raise LookupError(f"no output projection from {d_hook} to {d_model} dimensions next to {hook}")


def logit_effects(lm: LanguageModel, hook: str, d_hook: int) -> Callable[[Tensor], Tensor] | None:
    """Gives directions [n, d_hook] → their direct logit effects [n, vocab], or None where the path is unknown
    (`why_no_logits` says why)."""
    try:
        w_u, proj, scale = _path(lm, hook, d_hook)
    except LookupError:
        return None

    @torch.no_grad()
    def effect(directions: Tensor) -> Tensor:
        r = directions.float() @ proj.float() if proj is not None else directions.float()
        if scale is not None and scale.shape[-1] == r.shape[-1]:
            r = r * scale.float()
        return r @ w_u.float().T

    return effect


def why_no_logits(lm: LanguageModel, hook: str, d_hook: int) -> str | None:
    """Gives why a hook's directions have no logit effects here (None: they have)."""
    try:
        _path(lm, hook, d_hook)
    except LookupError as e:
        return str(e)
    return None


def _path(lm: LanguageModel, hook: str, d_hook: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The unembedding, the projection from the hook to the residual stream and the final norm's scale; raises
    LookupError naming what is missing."""
    w_u = unembedding(lm)
    if w_u is None:
        raise LookupError(f"{lm.name} has no language-model head to read logits through ({lm.head_note})")
    return w_u, to_residual(lm, hook, d_hook, w_u.shape[1]), final_norm_scale(lm)
