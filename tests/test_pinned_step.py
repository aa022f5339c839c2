"""One iteration of every method on the tiny model, pinned to values computed before the loss-term
redesign (issue 12): a refactor of the plumbing must not move a single latent.

The numbers came from the editor as of commit 1466e34 (seed 3, 16 patches, the methods' published
learning rates). Tolerances allow float32 kernel differences between CPUs (measured: on an AMD EPYC
with oneDNN's convolutions the sum moves by up to 4e-4 of itself and one latent by 5e-5; with
oneDNN off, back to 2e-4 and 4e-8), far below any change of a weight, a scale or a sign.
"""
import pytest

from helpers import make_editor, make_image

METHODS = {"dds": 0.1, "cds": 0.1, "pds": 0.8, "cpds": 0.8, "cds_matched": 0.1}  # conf/method/*.yaml: lr
#: method: (sum of the latent's change, sum of its absolute change, the first three latent values)
PINNED = {
    "dds": (1.3290054180542938, 31.55343510041712, (0.011502978391945362, -0.06638716906309128, -0.024395296350121498)),
    "cds": (1.3127888069138862, 31.546300814079586, (0.01104685291647911, -0.06651316583156586, -0.024541428312659264)),
    "pds": (0.8938420253252843, 21.224246978599695, (0.00537826307117939, -0.06704654544591904, -0.015615427866578102)),
    "cpds": (0.7632680665119551, 21.17354637075914, (0.001719481311738491, -0.06805454194545746, -0.016769882291555405)),
    "cds_matched": (0.7632443507318385, 21.173274299653713,
                    (0.0017346148379147053, -0.06807931512594223, -0.01671380177140236)),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_one_iteration_matches_the_pinned_latent(tiny_stack, method):
    editor = make_editor(tiny_stack, method, iterations=1, n_patches=16, seed=3, lr=METHODS[method])
    latent = editor.edit(make_image(), ["a cat"], ["a dog"]).latents.double()
    change = latent - editor.encode_images(make_image()).double()
    total, magnitude, first = PINNED[method]
    assert change.sum().item() == pytest.approx(total, rel=1e-3)
    assert change.abs().sum().item() == pytest.approx(magnitude, rel=1e-4)
    assert latent.flatten()[:3].tolist() == pytest.approx(first, abs=2e-4)
