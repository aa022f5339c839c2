"""Whether weights can be downloaded, decided once per process with at most one quick request.

Without a network, huggingface_hub retries every request five times with back-off before it falls
back to its cache, so a run needing SD, CLIP and LPIPS weights spent about a minute before failing.
HF_HUB_OFFLINE, or else one request without retries, decides instead; when the hub does not answer,
huggingface_hub is put in its own offline mode (what HF_HUB_OFFLINE=1 selects) for the rest of the
process, so cached weights load at once, missing ones fail at once, and the error names every way on.
"""
from __future__ import annotations

import functools
import textwrap

from cpds_exp.errors import CpdsError

#: Parameters (millions) of the SD components an edit downloads, counted on the architectures built
#: from their configs: SD v1.x UNet 859.5 + VAE 83.7 + CLIP ViT-L text encoder 123.1; SD 2.x UNet 865.9
#: + VAE + OpenCLIP ViT-H text encoder 340.4; SDXL UNet 2567.5 + VAE + both text encoders (123.1 + 694.7).
SD_FAMILIES = {"SD v1.x": 1066.2, "SD 2.x": 1290.0, "SDXL": 3468.8}
MODEL_FAMILIES = {
    "CompVis/stable-diffusion-v1-4": "SD v1.x", "stable-diffusion-v1-5/stable-diffusion-v1-5": "SD v1.x",
    "runwayml/stable-diffusion-v1-5": "SD v1.x",
    "stabilityai/stable-diffusion-2-1": "SD 2.x", "stabilityai/stable-diffusion-2-1-base": "SD 2.x",
    "stabilityai/stable-diffusion-xl-base-1.0": "SDXL",
}
CLIP_B16_DOWNLOAD_SIZE = "about 600 MB"

OFFLINE_RUN = "model=tiny metrics=random (or debug=fast)"


def download_size(pretrained: str, half: bool = False) -> str | None:
    """What loading a known model downloads (float16 weights for a half-precision run), else None."""
    family = MODEL_FAMILIES.get(pretrained)
    if family is None:
        return None
    gigabytes = SD_FAMILIES[family] * 1e6 * (2 if half else 4) / 1e9
    return f"{family} in {'float16' if half else 'float32'}: about {gigabytes:.1f} GB"


def one_line(err: BaseException, width: int = 200) -> str:
    """An exception's first line, shortened at a word boundary (never cut mid-word)."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return textwrap.shorten(first, width, placeholder=" ...")


@functools.lru_cache(maxsize=None)
def offline_reason() -> str | None:
    """Why nothing can be downloaded (HF_HUB_OFFLINE, or the hub did not answer one request), else None.

    A failed request switches huggingface_hub to offline mode for this process (see the module)."""
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as err:  # whatever huggingface_hub's HTTP client raises (it changed: requests, httpx)
        constants.HF_HUB_OFFLINE = True  # read at every request: cache only, no retries
        return f"{constants.ENDPOINT} did not answer: {one_line(err, 120)}"
    return None


def is_hub_id(name: str) -> bool:
    """True for a name the hub could hold ('org/name'); a path such as /data/sd is not one."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def weights_unavailable(what: str, size: str | None, reason: str, alternatives: str = "") -> CpdsError:
    """The one line for weights that are neither cached nor downloadable: every way forward."""
    sized = f" ({size})" if size else ""
    return CpdsError(f"cannot load {what}{sized}: it is not in the cache and this machine is offline ({reason}); "
                     f"run offline with {OFFLINE_RUN}{alternatives}, or connect once to download and cache it")
