"""Feature capture: SDPA processors match diffusers, one pass equals a separate forward, gradients flow."""
import copy
import dataclasses

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from cpds_exp.conditioning import Conditioning
from cpds_exp.cut import cut_loss
from cpds_exp.errors import CpdsError
from cpds_exp.editing.features import FeatureCapture
from cpds_exp.scores import add_noise
from helpers import make_editor, make_image


def branch_inputs(editor, seed=0):
    g = torch.Generator().manual_seed(seed)
    z_src = editor.encode_images(make_image(seed))
    z_trg = (z_src + 0.1 * torch.randn(z_src.shape, generator=g, dtype=z_src.dtype)).requires_grad_(True)
    noise = torch.randn(z_src.shape, generator=g, dtype=z_src.dtype)
    t = torch.tensor([400])
    emb = {"uncond": editor.encode_prompts([""]), "src": editor.encode_prompts(["a cat"]),
           "trg": editor.encode_prompts(["a dog"])}
    sched = editor.stack.scheduler
    return z_trg, add_noise(z_src, noise, t, sched), add_noise(z_trg, noise, t, sched), t, emb


def test_capturing_processor_matches_diffusers_attention(tiny_stack):
    unet = copy.deepcopy(tiny_stack.unet)
    z, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    capture = FeatureCapture(unet)
    ours = unet(z, t, encoder_hidden_states=cond).sample
    assert len(capture.features()) == 4 and capture.features()[0].shape == (2, 16, 64)
    unet.set_attn_processor(AttnProcessor())
    reference = unet(z, t, encoder_hidden_states=cond).sample
    assert torch.allclose(ours, reference, atol=1e-5)


def test_one_pass_features_equal_a_separate_forward(tiny_stack):
    editor = make_editor(tiny_stack, "cds")
    z_trg, zt_src, zt_trg, t, emb = branch_inputs(editor)
    pred = editor.predict(zt_src, zt_trg, t, emb)
    # a plain forward over all four branches, as the published code's first pass
    capture = FeatureCapture(tiny_stack.unet)
    with torch.no_grad():
        eps = tiny_stack.unet(torch.cat([zt_src, zt_src, zt_trg, zt_trg]), t.repeat(4),
                              **Conditioning.cat([emb["uncond"], emb["src"], emb["uncond"], emb["trg"]]).unet_kwargs()
                              ).sample
    feats = capture.features()
    e_su, e_sc, e_tu, e_tc = eps.chunk(4)
    w = editor.settings.guidance_scale
    assert torch.allclose(pred.eps_src, e_su + w * (e_sc - e_su), atol=1e-4)
    assert torch.allclose(pred.eps_trg, e_tu + w * (e_tc - e_tu), atol=1e-4)
    for ours, whole in zip(pred.ref_feats, feats):
        assert torch.allclose(ours, whole[1:2], atol=1e-5)
    for ours, whole in zip(pred.trg_feats, feats):
        assert torch.allclose(ours.detach(), whole[3:4], atol=1e-5)
    assert all(f.requires_grad for f in pred.trg_feats)
    assert not any(f.requires_grad for f in pred.ref_feats)


def test_cut_gradient_reaches_the_latent_and_matches_finite_differences(tiny_stack):
    z_trg, zt_src, _, t, emb = branch_inputs(make_editor(tiny_stack))
    stack64 = dataclasses.replace(tiny_stack, unet=copy.deepcopy(tiny_stack.unet).double(), dtype=torch.float64)
    editor = make_editor(stack64, "cds")
    emb = {k: v.to(torch.float64) for k, v in emb.items()}
    z_trg = z_trg.detach().double().requires_grad_(True)
    zt_src, noise = zt_src.double(), torch.randn(z_trg.shape, dtype=torch.float64)

    def loss_of(z):
        zt = add_noise(z, noise, t, stack64.scheduler)
        pred = editor.predict(zt_src, zt, t, emb)
        return cut_loss(pred.ref_feats, pred.trg_feats, lambda f, n: torch.arange(n), n_patches=8)

    loss_of(z_trg).backward()
    assert z_trg.grad is not None and z_trg.grad.abs().sum() > 0
    assert all(p.grad is None for p in stack64.unet.parameters())
    direction = torch.randn(z_trg.shape, dtype=torch.float64)
    h = 1e-5
    with torch.no_grad():
        numeric = (loss_of(z_trg + h * direction) - loss_of(z_trg - h * direction)) / (2 * h)
    analytic = (z_trg.grad * direction).sum()
    assert numeric.item() == pytest.approx(analytic.item(), rel=1e-4)


def test_no_unet_parameter_requires_grad(tiny_stack):
    for module in (tiny_stack.unet, tiny_stack.vae, tiny_stack.text_encoder):
        assert not any(p.requires_grad for p in module.parameters())


def test_cut_layers_chosen_by_pattern(tiny_stack):
    editor = make_editor(tiny_stack, cut_layers=("up_blocks.2.*attn1",))
    assert editor.terms["cut"].layer_names == ["up_blocks.2.attentions.0.transformer_blocks.0.attn1",
                                  "up_blocks.2.attentions.1.transformer_blocks.0.attn1"]
    with pytest.raises(CpdsError, match="matches no attention layer"):
        make_editor(tiny_stack, cut_layers=("down_blocks.9.*",))
