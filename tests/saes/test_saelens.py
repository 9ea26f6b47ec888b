"""SAE folders in the SAELens layout: our loader and SAELens' own both reconstruct identically."""

import json

import pytest
import torch
from sae_lens import SAE as SAELensSAE

from sparse_coding.errors import SAEFolderError
from sparse_coding.saes import build_sae
from sparse_coding.saes.saelens import load_sae, save_sae


def _trained_like(arch, hp, **opts):
    sae = build_sae(arch, 8, 24, [hp, hp], **opts)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.W_enc.add_(0.05 * torch.randn_like(sae.W_enc)) if "W_enc" in dict(sae.named_parameters()) else None
    return sae


@pytest.mark.parametrize(
    "arch,hp,opts",
    [
        ("relu", {"l1_alpha": 0.5}, {}),
        ("relu", {"l1_alpha": 0.5}, {"tied": True}),
        ("relu", {"l1_alpha": 0.5}, {"decoder_bias": False}),
        ("topk", {"k": 4}, {}),
    ],
)
def test_saved_sae_loads_in_saelens_and_here_identically(tmp_path, arch, hp, opts):
    sae = _trained_like(arch, hp, **opts)
    folder = save_sae(
        tmp_path / "sae",
        sae,
        1,
        {"model_name": "toy", "hook_name": "h", "context_size": 1, "dataset_path": "toy"},
        feature_density=torch.rand(24),
    )
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["metadata"]["arch"] == arch and cfg["d_in"] == 8 and cfg["d_sae"] == 24
    x = torch.randn(32, 8)
    with torch.no_grad():
        codes = sae.encode(x)[1]
        x_hat = sae.decode(sae.encode(x))[1]

        theirs = SAELensSAE.load_from_disk(str(folder))
        assert theirs.cfg.metadata.hook_name == "h" and theirs.cfg.metadata.model_name == "toy"  # metadata kept
        assert torch.allclose(theirs.encode(x), codes, atol=1e-5)
        assert torch.allclose(theirs.decode(theirs.encode(x)), x_hat, atol=1e-5)

        ours, _ = load_sae(folder)
        assert torch.allclose(ours.encode(x)[0], codes, atol=1e-6)
        assert torch.allclose(ours.decode(ours.encode(x))[0], x_hat, atol=1e-6)
    assert (folder / "sparsity.safetensors").is_file()


def test_loading_a_folder_that_is_not_an_sae_says_so(tmp_path):
    with pytest.raises(SAEFolderError, match="not an SAE folder"):
        load_sae(tmp_path)
