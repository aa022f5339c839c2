"""The fused step (3B branches in one no-grad pass, B with a graph, one backward) takes the same
steps as a plain transcription of SPEC §2 with four UNet calls and a second forward for the CUT."""
import copy

import pytest
import torch

from cpds_exp.cut import cut_loss
from cpds_exp.editing.editor import RowRandom
from cpds_exp.editing.features import FeatureCapture
from cpds_exp.scores import add_noise, dds_grad, pds_grad, score_scale
from cpds_exp.editing.selectors import RandomSelector
from helpers import make_editor, make_image


def plain_edit(stack, image, source, target, score, use_cut, iterations, lr, seed, n_patches):
    """SPEC §2 as the published code does it, one call per branch."""
    unet = copy.deepcopy(stack.unet)
    capture = FeatureCapture(unet)
    helper = make_editor(stack, "dds")
    emb = {k: helper.encode_prompts([p]) for k, p in (("uncond", ""), ("src", source), ("trg", target))}
    z_src = helper.encode_images(image)
    z_trg = z_src.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([z_trg], lr=lr)
    random, selector = RowRandom([seed], z_src.device), RandomSelector(seed=seed)
    sched = stack.scheduler

    def eps(z, t, cond):
        return unet(z, t, **cond.unet_kwargs()).sample

    for _ in range(iterations):
        t = random.timesteps(50, 950)
        noise = random.noise(z_src.shape)
        zt_src, zt_trg = add_noise(z_src, noise, t, sched), add_noise(z_trg, noise, t, sched)
        with torch.no_grad():
            e_su = eps(zt_src, t, emb["uncond"])
            e_sc = eps(zt_src, t, emb["src"])
            ref = capture.features()
            e_tu = eps(zt_trg, t, emb["uncond"])
            e_tc = eps(zt_trg, t, emb["trg"])
        e_src, e_trg = e_su + 7.5 * (e_sc - e_su), e_tu + 7.5 * (e_tc - e_tu)
        if score == "dds":
            g = dds_grad(e_src, e_trg)
        else:
            g = pds_grad(z_src, z_trg.detach(), noise, random.noise(z_src.shape, posterior=True), e_src, e_trg, t,
                         t - 1, sched)
        optimizer.zero_grad()
        loss = score_scale(*z_trg.shape[-2:]) * (z_trg * g).sum()
        if use_cut:
            eps(zt_trg, t, emb["trg"])  # the published second forward, with a graph
            loss = loss + 3.0 * cut_loss(ref, capture.features(), selector, n_patches=n_patches)
        loss.backward()
        optimizer.step()
    return z_trg.detach(), z_src


@pytest.mark.parametrize("score,use_cut", [("dds", False), ("pds", False), ("dds", True), ("pds", True)])
def test_fused_step_equals_plain_step(tiny_stack, score, use_cut):
    image = make_image(5)
    plain, start = plain_edit(tiny_stack, image, "a cat", "a dog", score, use_cut, 4, 0.5, 21, 8)
    method = {("dds", False): "dds", ("pds", False): "pds", ("dds", True): "cds", ("pds", True): "cpds"}[score, use_cut]
    editor = make_editor(tiny_stack, method, iterations=4, lr=0.5, n_patches=8)
    fused = editor.edit(image, ["a cat"], ["a dog"], seeds=[21]).latents
    moved = (plain - start).abs().max()
    assert moved > 0.05
    assert (fused - plain).abs().max() < 2e-4 * moved
