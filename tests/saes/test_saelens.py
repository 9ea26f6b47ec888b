"""SAE folders in the SAELens layout: our loader and SAELens' own both reconstruct identically."""

import importlib
import json

import pytest
import torch
from sae_lens import SAE as SAELensSAE
from safetensors.torch import load_file

from sparse_coding.errors import SAEFolderError
from sparse_coding.saes import SAES, build_sae
from sparse_coding.saes.saelens import load_sae, save_sae


def _trained_like(arch, hp, **opts):
    sae = build_sae(arch, 8, 24, [hp, hp], **opts)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.W_enc.add_(0.05 * torch.randn_like(sae.W_enc)) if "W_enc" in dict(sae.named_parameters()) else None
        if sae.free_decoder:  # rows of different norms, as training leaves them
            sae.W_dec.mul_(torch.rand(*sae.W_dec.shape[:2], 1) * 10 + 0.5)
        for name in ("threshold", "r_mag", "b_mag"):  # the architectures' own parameters and buffers
            if hasattr(sae, name):
                getattr(sae, name).uniform_(0.0, 0.1)
    return sae


@pytest.mark.parametrize(
    "arch,hp,opts",
    [
        ("relu", {"l1_alpha": 0.5}, {}),
        ("relu", {"l1_alpha": 0.5}, {"tied": True}),
        ("relu", {"l1_alpha": 0.5}, {"decoder_bias": False}),
        ("topk", {"k": 4}, {}),
        ("topk", {"k": 4}, {"decoder_init_norm": 0.1}),
        ("batchtopk", {"k": 4}, {}),
        ("batchtopk", {"k": 4}, {"decoder_init_norm": 0.1}),
        ("matryoshka", {"k": 4}, {"matryoshka_widths": [6, 12]}),
        ("jumprelu", {"l0_coef": 0.5}, {}),
        ("jumprelu", {"l0_coef": 0.5}, {"decoder_init_norm": 0.1}),
        ("gated", {"l1_alpha": 0.5}, {}),
        ("relu", {"l1_alpha": 0.5}, {"decoder_init_norm": 0.1}),
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
        assert type(ours) is type(sae) and ours.hparams(0) == sae.hparams(1)
        assert torch.allclose(ours.encode(x)[0], codes, atol=1e-6)
        assert torch.allclose(ours.decode(ours.encode(x))[0], x_hat, atol=1e-6)
        assert (codes > 0).any() and (codes == 0).any()  # the comparison saw firing and silent latents
    assert (folder / "sparsity.safetensors").is_file()


SAELENS_TRAINING = {  # SAELens' own training class and config for each of our architectures
    "relu": ("standard_sae", "StandardTrainingSAE", {}),
    "topk": ("topk_sae", "TopKTrainingSAE", {"k": 4}),
    "batchtopk": ("batchtopk_sae", "BatchTopKTrainingSAE", {"k": 4}),
    "matryoshka": (
        "matryoshka_batchtopk_sae",
        "MatryoshkaBatchTopKTrainingSAE",
        {"k": 4, "matryoshka_widths": [6, 24]},
    ),
    "jumprelu": ("jumprelu_sae", "JumpReLUTrainingSAE", {}),
    "gated": ("gated_sae", "GatedTrainingSAE", {}),
}


@pytest.mark.parametrize("arch", sorted(SAELENS_TRAINING))
def test_our_folder_is_the_one_saelens_writes(tmp_path, arch):
    """Same cfg.json fields, architecture names and tensors (names, shapes) as SAELens' save_inference_model."""
    module, name, fields = SAELENS_TRAINING[arch]
    mod = importlib.import_module(f"sae_lens.saes.{module}")
    theirs = getattr(mod, name)(getattr(mod, name + "Config")(d_in=8, d_sae=24, **fields))
    theirs.save_inference_model(tmp_path / "theirs")
    hp = {"k": 4} if "k" in fields else {SAES[arch].knob: 0.5}
    save_sae(tmp_path / "ours", build_sae(arch, 8, 24, [hp]), 0, {"model_name": "toy", "hook_name": "h"})
    cfgs = [json.loads((tmp_path / who / "cfg.json").read_text()) for who in ("theirs", "ours")]
    assert cfgs[0].keys() == cfgs[1].keys() and cfgs[0]["architecture"] == cfgs[1]["architecture"]
    for key in ("training_architecture",):
        assert cfgs[0]["metadata"][key] == cfgs[1]["metadata"][key]
    tensors = [load_file(tmp_path / who / "sae_weights.safetensors") for who in ("theirs", "ours")]
    assert {k: v.shape for k, v in tensors[0].items()} == {k: v.shape for k, v in tensors[1].items()}


def test_loading_a_folder_that_is_not_an_sae_says_so(tmp_path):
    with pytest.raises(SAEFolderError, match="not an SAE folder"):
        load_sae(tmp_path)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_a_free_topk_decoder_trains_as_saelens_rescaled_one(arch):
    """With a free decoder our TopK family is SAELens' `rescale_acts_by_decoder_norm`: the same raw parameters give
    SAELens' training codes and reconstruction (each latent ranked and decoded as if its row had unit norm)."""
    module, name, fields = SAELENS_TRAINING[arch]
    mod = importlib.import_module(f"sae_lens.saes.{module}")
    cfg = getattr(mod, name + "Config")(d_in=8, d_sae=24, rescale_acts_by_decoder_norm=True, **fields)
    theirs = getattr(mod, name)(cfg)
    ours = _trained_like(arch, {"k": 4}, decoder_init_norm=0.1)
    with torch.no_grad():
        for n in ("b_enc", "W_dec", "b_dec"):
            getattr(theirs, n).copy_(getattr(ours, n)[0])
        theirs.W_enc.copy_(ours.W_enc[0].T)
        x = torch.randn(32, 8)
        codes, _ = theirs.encode_with_hidden_pre(x)
        if arch == "topk":
            mine = ours.encode(x)
        else:  # the training selection, over the batch (encode uses the inference threshold)
            vals, idx = ours.select(ours.pre_acts(x))
            mine = torch.zeros(2, 32 * 24).scatter_(-1, idx, vals).view(2, 32, 24)
        assert torch.allclose(mine[0], codes, atol=1e-5)
        assert torch.allclose(ours.decode(mine)[0], theirs.decode(codes), atol=1e-5)
        norms = ours.W_dec.norm(dim=-1)
        assert norms.max() > 3 * norms.min()  # rows of different norms: the rescale mattered


def test_a_free_relu_trains_as_saelens_standard_sae(relu_step):
    """With a free decoder our relu is SAELens' standard SAE down to the optimiser: from the same weights, on the
    same batches, our Trainer (l1_alpha = l1_coefficient · d_sae / d_in; its default clip and Adam ε, which are
    SAELens' on our loss's scale) and SAELens' SAETrainer end at the same weights. Every step's gradient is
    clipped, so a wrong bound would show; so would a wrong ε, on the rarely firing latents."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from sparse_coding.training.trainer import Trainer

    d, f, coef, steps, B, lr = 16, 64, 3.0, 40, 256, 3e-3
    torch.manual_seed(0)
    batches = torch.randn(steps, B, d) * torch.linspace(0.1, 4, d) + 1  # no centring needed: b_dec learns it
    theirs = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d, d_sae=f, l1_coefficient=coef))
    ours = build_sae("relu", d, f, [{"l1_alpha": coef * f / d}], decoder_init_norm=0.1)
    # Our init is SAELens' (same distribution): rows at norm 0.1, the encoder their transpose, both biases 0.
    assert torch.allclose(ours.W_dec.norm(dim=-1), torch.full((1, f), 0.1)) and torch.equal(ours.W_enc, ours.W_dec)
    assert not ours.b_enc.any() and not ours.b_dec.any()
    with torch.no_grad():
        for n in ("b_enc", "W_dec", "b_dec"):
            getattr(ours, n)[0].copy_(getattr(theirs, n))
        ours.W_enc[0].copy_(theirs.W_enc.T)
    trainer = Trainer([ours], lr=lr)
    clipped = 0
    for x in batches:
        out = ours.train_forward(x, stats=False)  # (the same step the trainer takes next, to see the clip bind)
        grads = torch.autograd.grad(out.loss.sum(), list(ours.parameters()))
        clipped += float(torch.cat([g.flatten() for g in grads]).norm()) > ours.default_grad_clip()
        trainer.step(x)
    cfg = SAETrainerConfig(total_training_samples=steps * B, train_batch_size_samples=B, lr=lr, lr_end=lr)
    SAETrainer(cfg, theirs, iter(batches)).fit()
    assert clipped == steps
    for n in ("b_enc", "W_dec", "b_dec"):
        assert torch.allclose(getattr(ours, n)[0], getattr(theirs, n), rtol=1e-3, atol=2e-5), n
    assert torch.allclose(ours.W_enc[0], theirs.W_enc.T, rtol=1e-3, atol=2e-5)
