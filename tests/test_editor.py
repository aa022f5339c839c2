"""The loop: determinism, zero score gradient for an identity edit, divergence, callbacks."""
import pytest
import torch

from cpds_exp.editor import DivergenceError, EditCallbacks
from helpers import make_editor, make_image


def run_edit(stack, prompts=("a cat", "a dog"), **settings):
    editor = make_editor(stack, **settings)
    result = editor.edit(make_image(), [prompts[0]], [prompts[1]])
    return editor, result.latents, result.final


@pytest.mark.parametrize("score,use_cut", [("dds", False), ("pds", True)])
def test_same_seed_same_result(tiny_stack, score, use_cut):
    _, a, _ = run_edit(tiny_stack, score=score, use_cut=use_cut, iterations=4, lr=0.5, seed=7)
    _, b, _ = run_edit(tiny_stack, score=score, use_cut=use_cut, iterations=4, lr=0.5, seed=7)
    _, c, _ = run_edit(tiny_stack, score=score, use_cut=use_cut, iterations=4, lr=0.5, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("score", ["dds", "pds"])
def test_identity_edit_leaves_the_latent_unchanged(tiny_stack, score):
    """Source prompt = target prompt and z_src = z_trg: the score gradient is zero at every step."""
    editor, latents, last = run_edit(tiny_stack, prompts=("a cat", "a cat"), score=score, use_cut=False,
                                     iterations=5, lr=10.0)
    start = editor.encode_images(make_image())
    assert torch.allclose(latents, start, atol=1e-6)
    assert last["score/grad_norm"] < 1e-4


def test_real_edit_moves_the_latent_and_logs_every_iteration(tiny_stack):
    logs, snaps = [], []
    editor = make_editor(tiny_stack, score="pds", use_cut=True, iterations=6, snapshot_every=2, lr=0.8)
    result = editor.edit(make_image(), ["a cat"], ["a dog"],
                         EditCallbacks(on_log=logs.append, on_snapshot=lambda i, img: snaps.append((i, img.shape))))
    latents, last = result.latents, result.final
    assert not torch.allclose(latents, editor.encode_images(make_image()))
    assert [m["iteration"] for m in logs] == [1, 2, 3, 4, 5, 6]
    layer_keys = {f"cut/{name}" for name in editor.layer_names}
    assert {"t", "score/grad_norm", "cut/total", "time/iteration_s"} | layer_keys <= set(last)
    assert last["cut/total"] == pytest.approx(sum(last[k] for k in layer_keys), rel=1e-5)
    assert 50 <= last["t"] < 950
    assert snaps == [(2, (1, 3, 64, 64)), (4, (1, 3, 64, 64))]  # the final iteration is the result


def test_divergence_names_the_iteration(tiny_stack):
    editor = make_editor(tiny_stack, score="dds", use_cut=False, iterations=5, lr=3e38)
    with pytest.raises(DivergenceError) as info:
        editor.edit(make_image(), ["a cat"], ["a dog"])
    assert info.value.iteration == 1


def test_batched_rows_get_their_own_timesteps(tiny_stack):
    editor = make_editor(tiny_stack, score="dds", use_cut=True, iterations=2, lr=0.1, n_patches=8)
    images = torch.cat([make_image(0), make_image(1)])
    logged = []
    latents = editor.edit(images, ["a cat", "a cat"], ["a dog", "a cow"], EditCallbacks(on_log=logged.append)).latents
    assert latents.shape == (2, 4, 8, 8)
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(50, 950, (2,), generator=gen)
    assert t[0] != t[1] and logged[0]["t"] == pytest.approx(t.float().mean().item())


def test_matched_step_cds_takes_cpds_steps(tiny_stack):
    """SPEC §2: CPDS at lr 0.8 = CDS at lr 0.1 with the DDS term × 8·λ(t) and w_cut × 8."""
    _, cpds, _ = run_edit(tiny_stack, score="pds", use_cut=True, iterations=5, lr=0.8, n_patches=16)
    _, matched, _ = run_edit(tiny_stack, score="dds", use_cut=True, iterations=5, lr=0.1, n_patches=16,
                             lambda_weighting=True, score_weight=8.0, cut_weight=8.0)
    editor, plain_cds, _ = run_edit(tiny_stack, score="dds", use_cut=True, iterations=5, lr=0.1, n_patches=16)
    moved = (cpds - editor.encode_images(make_image())).abs().max()
    # equal up to float32 rounding of PDS's general form (its z-terms cancel only numerically)
    assert (cpds - matched).abs().max() < 1e-3 * moved
    assert (cpds - plain_cds).abs().max() > 0.1 * moved
