"""The model stacks: the offline tokenizer, one loading path for saved folders, clear errors."""
import pytest
import torch

from cpds_exp.errors import CpdsError
from cpds_exp.models import CLIP_VOCAB_SIZE, load_stack, resolve_dtype, resolve_device


def test_tiny_stack_has_sds_shape(tiny_stack):
    assert len(tiny_stack.tokenizer) == CLIP_VOCAB_SIZE
    assert tiny_stack.vae_factor == 8 and tiny_stack.latent_scale == pytest.approx(0.18215)
    up_attn1 = [n for n in tiny_stack.unet.attn_processors if n.startswith("up_blocks") and "attn1" in n]
    assert len(up_attn1) == 4
    assert torch.allclose(tiny_stack.scheduler.alphas_cumprod[[0, 999]], torch.tensor([0.99915, 0.0047]), atol=1e-4)


def test_offline_tokenizer_matches_open_clip(tiny_stack):
    import open_clip

    prompt = "a photograph of an astronaut riding a horse, 4k"
    ours = tiny_stack.tokenizer(prompt).input_ids
    theirs = open_clip.get_tokenizer("ViT-B-16")(prompt)[0].tolist()
    assert ours == theirs[: len(ours)]
    padded = tiny_stack.tokenizer(prompt, padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407


def test_saved_tiny_stack_loads_through_the_pretrained_path(tiny_stack, tmp_path):
    tiny_stack.save_pretrained(tmp_path / "tiny-sd")
    loaded = load_stack(str(tmp_path / "tiny-sd"), device="cpu", dtype="float32")
    z, t, ids = torch.randn(1, 4, 8, 8), torch.tensor([300]), tiny_stack.tokenizer(["a cat"], return_tensors="pt").input_ids
    assert loaded.tokenizer(["a cat"], return_tensors="pt").input_ids.tolist() == ids.tolist()
    cond = tiny_stack.text_encoder(ids)[0]
    assert torch.allclose(loaded.text_encoder(ids)[0], cond)
    assert torch.allclose(loaded.unet(z, t, encoder_hidden_states=cond).sample,
                          tiny_stack.unet(z, t, encoder_hidden_states=cond).sample, atol=1e-6)
    assert torch.equal(loaded.scheduler.alphas_cumprod, tiny_stack.scheduler.alphas_cumprod)
    assert loaded.resolution == 64
    assert not any(p.requires_grad for p in loaded.unet.parameters())


def test_unreachable_hub_model_suggests_tiny():
    with pytest.raises(CpdsError, match="model=tiny") as info:
        load_stack("CompVis/stable-diffusion-v1-4", device="cpu")
    assert "\n" not in str(info.value)


def test_missing_local_folder_is_one_line(tmp_path):
    with pytest.raises(CpdsError, match="cannot load model"):
        load_stack(str(tmp_path / "nothing-here"), device="cpu")


def test_device_and_dtype_resolution():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(CpdsError, match="dtype"):
        resolve_dtype("float8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(CpdsError, match="device=cpu"):
            resolve_device("cuda")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_half_precision_runs_load_the_fp16_variant_where_the_folder_has_it(tiny_stack, tmp_path):
    import copy
    import dataclasses

    folder = tmp_path / "sd"
    tiny_stack.save_pretrained(folder)
    full_only = load_stack(str(folder), device="cpu", dtype="float16")  # no variant files yet: the full weights
    assert full_only.unet.dtype == torch.float16
    marked = dataclasses.replace(tiny_stack, unet=copy.deepcopy(tiny_stack.unet),
                                 text_encoder=copy.deepcopy(tiny_stack.text_encoder))
    torch.nn.init.constant_(marked.unet.conv_in.bias, 0.5)  # tells the variant's files from the full ones
    torch.nn.init.constant_(marked.text_encoder.final_layer_norm.bias, 0.25)
    marked.save_pretrained(tmp_path / "variant", variant="fp16")
    for sub in ("unet", "text_encoder"):
        for path in (tmp_path / "variant" / sub).glob("*.fp16.*"):
            (folder / sub / path.name).write_bytes(path.read_bytes())

    def marks(stack):
        return (bool((stack.unet.conv_in.bias == 0.5).all()),
                bool((stack.text_encoder.final_layer_norm.bias == 0.25).all()))

    assert marks(load_stack(str(folder), device="cpu", dtype="float16")) == (True, True)
    assert marks(load_stack(str(folder), device="cpu", dtype="float32")) == (False, False)
    assert marks(load_stack(str(folder), device="cpu", dtype="float16", variant=None)) == (False, False)
    assert marks(full_only) == (False, False)
