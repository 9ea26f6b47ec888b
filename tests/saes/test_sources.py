"""SAEs from elsewhere (saes/sources.py): one SAELens folder, a Hugging Face hub repository (hf:org/repo[/folder])
and a SAELens pretrained release/id, each through the real loading code (huggingface_hub's snapshot_download,
SAELens' registry and from_pretrained) on a local copy laid out as the hub's cache, since no hub is reachable here."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import torch

from sparse_coding.errors import SAEFolderError
from sparse_coding.pipelines.lm_sweep import load_into_stacks
from sparse_coding.saes import build_sae
from sparse_coding.saes.saelens import load_sae, save_sae
from sparse_coding.saes.sources import resolve_sae_source


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline hub cache under tmp_path; gives put(repo_id, folder in repo) → the folder to fill."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("SPARSE_CODING_CACHE", str(tmp_path / "converted"))

    def put(repo_id: str, path: str):
        root = tmp_path / "hub" / ("models--" + repo_id.replace("/", "--"))
        commit = "0123456789abcdef0123456789abcdef01234567"
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(commit)
        folder = root / "snapshots" / commit / path
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    return put


def _trained(arch: str, knob: dict, d: int = 8, f: int = 16):
    sae = build_sae(arch, d, f, [knob])
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
    return sae


def _same(a, b, d: int = 8) -> None:
    x = torch.randn(7, d)
    assert torch.allclose(a.reconstruct(x), b.reconstruct(x), atol=1e-5)


def test_a_hub_repository_folder_loads_through_huggingface_hub(hub):
    sae = _trained("topk", {"k": 3})
    save_sae(hub("org/saes", "layer_1/topk"), sae, 0, {"hook_name": "h.1"})
    folder = resolve_sae_source("hf:org/saes/layer_1/topk")
    loaded, cfg = load_sae(folder)
    _same(sae, loaded)
    assert cfg["metadata"]["hook_name"] == "h.1"
    with pytest.raises(SAEFolderError, match="cannot fetch org/missing from the Hugging Face hub"):
        resolve_sae_source("hf:org/missing")
    with pytest.raises(SAEFolderError, match="hf:org/repo"):
        resolve_sae_source("hf:justone")


def test_a_saelens_pretrained_release_loads_through_saelens_registry(hub):
    """gpt2-small-res-jb is a real release in SAELens' registry; its repository's folder holds our local copy."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    lookup = get_pretrained_saes_directory()["gpt2-small-res-jb"]
    theirs = StandardSAE(StandardSAEConfig(d_in=8, d_sae=16))
    with torch.no_grad():
        for p in (theirs.W_enc, theirs.W_dec, theirs.b_enc):
            p.normal_()
    theirs.save_model(str(hub(lookup.repo_id, lookup.saes_map["blocks.0.hook_resid_pre"])))
    folder = resolve_sae_source("gpt2-small-res-jb/blocks.0.hook_resid_pre")
    ours, _ = load_sae(folder)
    x = torch.randn(7, 8)
    assert torch.allclose(ours.reconstruct(x)[0], theirs.decode(theirs.encode(x)), atol=1e-5)
    assert resolve_sae_source("gpt2-small-res-jb/blocks.0.hook_resid_pre") == folder  # converted once, then reused
    with pytest.raises(SAEFolderError, match="has no SAE 'blocks.99'"):
        resolve_sae_source("gpt2-small-res-jb/blocks.99")


@pytest.mark.parametrize("source", ["folder", "one_sae", "hub"])
def test_load_autoencoders_takes_a_run_one_sae_or_a_hub_folder(hub, tmp_path, source):
    saved = [_trained("relu", {"l1_alpha": a}) for a in (0.1, 1.0)]
    where = hub("org/run", "saes") if source == "hub" else tmp_path / "run" / "saes"
    for s in saved:
        save_sae(where / s.name(0), s, 0, {})
    spec = {"folder": str(tmp_path / "run"), "one_sae": str(where / saved[1].name(0)), "hub": "hf:org/run/saes"}
    stack = build_sae("relu", 8, 16, [{"l1_alpha": 0.1}, {"l1_alpha": 1.0}])
    names = load_into_stacks([stack], spec[source])
    assert names == ([saved[1].name(0)] if source == "one_sae" else [s.name(0) for s in saved])
    for m, s in enumerate(saved):
        if s.name(0) in names:
            assert torch.equal(stack.W_dec[m], s.W_dec[0])
