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

#: Download sizes for the offline message: float32 parameters x 4 bytes, counted on the architectures
#: (SD v1.x: UNet 860 M, VAE 84 M, text encoder 123 M parameters; CLIP ViT-B/16: 150 M).
SD_DOWNLOAD_SIZE = "SD v1.x in float32: about 4.3 GB"
CLIP_B16_DOWNLOAD_SIZE = "about 600 MB"

OFFLINE_RUN = "model=tiny metrics=random (or debug=fast)"


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
