"""Transcoders: every architecture learns a map from one activation to another (with and without a skip
connection), saves as SAELens' transcoder / skip_transcoder where SAELens has one (and SAELens loads it), and
reloads here."""

import pytest
import torch
from torch import Tensor

from sparse_coding.saes import SAES, build_sae, single_hook_archs
from sparse_coding.saes.saelens import load_sae, save_sae
from sparse_coding.training.trainer import Trainer

KNOBS = {"l1_alpha": 1e-3, "k": 4, "l0_coef": 1e-3}


def _transcoder(arch, skip, d_in=6, d_out=5, d_sae=16):
    return build_sae(arch, d_in, d_sae, [{SAES[arch].knob: KNOBS[SAES[arch].knob]}], d_out=d_out, skip=skip)


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("arch", sorted(single_hook_archs()))
def test_every_architecture_trains_as_a_transcoder(arch, skip):
    assert SAES[arch].trains_transcoders()
    torch.manual_seed(0)
    tc = _transcoder(arch, skip)
    assert tc.W_dec.shape == (1, 16, 5) and tc.b_dec.shape == (1, 5) and not tc.centers_input
    W = torch.randn(6, 5)
    x = torch.randn(4096, 6)
    batch = torch.cat([x, torch.relu(x) @ W], dim=1)  # input and target side by side, as the store gives them
    trainer = Trainer([tc], lr=3e-3)
    first = trainer.step(batch[:512], stats=True)[0]["mse"]
    for i in range(300):
        trainer.step(batch[(i % 8) * 512 : (i % 8 + 1) * 512])
    last = trainer.step(batch[:512], stats=True)[0]["mse"]
    assert last < first / 3, (first, last)
    with torch.no_grad():
        out = tc.reconstruct(x[:8])
    assert out.shape == (1, 8, 5)
    if skip:
        assert tc.W_skip.abs().sum() > 0  # the skip path learned something


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("arch", sorted(single_hook_archs()))
def test_transcoders_save_for_saelens_and_reload(tmp_path, arch, skip):
    torch.manual_seed(1)
    tc = _transcoder(arch, skip)
    with torch.no_grad():
        for p in tc.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(32, 6)
    with torch.no_grad():
        ours = tc.reconstruct(x)[0]
    folder = save_sae(tmp_path / "tc", tc, 0, {"hook_name": "h.1.mlp:input", "hook_name_out": "h.1.mlp"})
    back, cfg = load_sae(folder)
    assert back.transcoder and back.skip == skip and back.d_out == 5 and cfg["d_out"] == 5
    with torch.no_grad():
        assert torch.allclose(back.reconstruct(x)[0], ours, atol=1e-6)
    if SAES[arch].saelens_transcoder is None:  # SAELens has no such transcoder: the folder names ours
        assert cfg["architecture"] == f"{arch}_{'skip_' if skip else ''}transcoder"
        return
    from sae_lens import SAE as SAELensSAE

    assert cfg["architecture"] == SAES[arch].saelens_transcoder[skip]
    loaded = SAELensSAE.load_from_disk(str(folder))
    with torch.no_grad():
        assert torch.allclose(loaded(x), ours, atol=1e-5)


def _step_matches_dense_autograd(tc, reference) -> Tensor:
    """Trains one step of transcoder `tc` (its weights moved off their init) and checks its loss and gradients against
    reference(tc, codes, x, target) by dense autograd, in float64; gives the codes."""
    with torch.no_grad():
        for p in tc.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x, target = torch.randn(9, 6), torch.randn(9, 5)
    out = tc.train_forward(x, target=target)
    out.loss.sum().backward()
    fast = {n: p.grad.clone() for n, p in tc.named_parameters()}
    tc.zero_grad()
    codes = tc.encode(x)
    ref = reference(tc, codes, x, target)
    ref.sum().backward()
    assert torch.allclose(out.loss, ref, rtol=1e-10)
    for n, p in tc.named_parameters():
        assert torch.allclose(fast[n], p.grad, atol=1e-10), n
    return codes


@pytest.mark.parametrize("skip", [False, True])
def test_relu_transcoder_steps_match_dense_autograd(skip, relu_step):
    torch.set_default_dtype(torch.float64)
    try:
        tc = build_sae("relu", 6, 16, [{"l1_alpha": 0.3}, {"l1_alpha": 2.0}], d_out=5, skip=skip)
        codes = _step_matches_dense_autograd(
            tc,
            lambda tc, codes, x, target: (
                (tc.decode(codes, x) - target).pow(2).mean((1, 2)) + tc.l1_alpha / 16 * codes.sum(-1).mean(-1)
            ),
        )
        assert tc.runs_sparse(codes) == (relu_step == "sparse")
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("skip", [False, True])
def test_topk_transcoder_step_matches_dense_autograd(skip):
    """The sparse TopK step (its fused squared error included, whose backward also reaches a skip transcoder's
    W_skip through the target) against FVU by dense autograd, in float64."""
    torch.set_default_dtype(torch.float64)
    try:
        tc = build_sae("topk", 6, 16, [{"k": 2}, {"k": 5}], d_out=5, skip=skip)
        _step_matches_dense_autograd(
            tc,
            lambda tc, codes, x, target: (
                (tc.decode(codes, x) - target).pow(2).sum((1, 2)) / (target - target.mean(0)).pow(2).sum()
            ),
        )
    finally:
        torch.set_default_dtype(torch.float32)
