"""Steering and ablation through an SAE: change chosen latents' contribution to the hooked activation and nothing
else. The activation x becomes x + Σ_j (z'_j − z_j) · W_dec[j] for the edited latents j (z their codes on x,
z' the edited values), which is the SAE's reconstruction with the edit plus its reconstruction error x − x̂,
untouched; so an empty edit leaves the activation, and the logits, exactly as they were.

Modes: "add" (z' = z + value: the decoder vector scaled by value added everywhere), "clamp" (z' = value at every
position), "ablate" (z' = 0; the value is ignored).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from sparse_coding.errors import ConfigError
from sparse_coding.models.language_model import LanguageModel
from sparse_coding.saes import SAE

MODES = ("add", "clamp", "ablate")


def parse_edits(spec: str, d_sae: int) -> dict[int, float]:
    """'12=5,40=-2.5' → {12: 5.0, 40: -2.5}; every latent must exist in an SAE of d_sae latents."""
    edits = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        latent, eq, value = part.partition("=")
        try:
            j, v = int(latent), float(value) if eq else 0.0
        except ValueError:
            raise ConfigError(f"--steer takes LATENT=VALUE[,LATENT=VALUE...], got {part!r}") from None
        if not 0 <= j < d_sae:
            raise ConfigError(f"--steer latent {j} is not in 0..{d_sae - 1}")
        edits[j] = v
    return edits


@torch.no_grad()
def edit_activation(sae: SAE, act: Tensor, edits: Mapping[int, float], mode: str = "add") -> Tensor:
    """act [..., d_in] → the activation with the edited latents' contribution changed (model 0 of the stack)."""
    if mode not in MODES:
        raise ConfigError(f"steering mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not edits:
        return act
    flat = act.reshape(-1, act.shape[-1]).float()
    idx = torch.tensor(list(edits), device=act.device)
    values = torch.tensor(list(edits.values()), device=act.device, dtype=flat.dtype)
    z = sae.encode(flat)[0][:, idx]  # [N, k]
    new = {"add": z + values, "clamp": values.expand_as(z), "ablate": torch.zeros_like(z)}[mode]
    delta = (new - z) @ sae.decoder()[0][idx].to(flat.dtype)  # [N, d_in]
    return (flat + delta).to(act.dtype).reshape(act.shape)


def steer(
    model: LanguageModel, sae: SAE, hook: str, edits: Mapping[int, float], mode: str = "add"
) -> Callable[[Tensor], Tensor]:
    """Gives tokens [B, T] → logits [B, T, V] of `model` with the latents' edit applied at `hook` everywhere."""
    return lambda tokens: model.logits(tokens, hook, lambda act, _source: edit_activation(sae, act, edits, mode))


def next_token_table(logits: Tensor, decode: Callable[[list[int]], list[str]], top: int) -> list[dict[str, object]]:
    """The `top` most likely next tokens after the last position of logits [T, V]: [{token, id, p}]."""
    probs = logits[-1].float().softmax(-1)
    p, ids = probs.topk(top)
    return [{"token": s, "id": int(i), "p": float(q)} for s, i, q in zip(decode(ids.tolist()), ids, p, strict=True)]
