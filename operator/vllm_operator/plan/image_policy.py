"""Step 0, the image policy: a ``spec.image`` outside the cluster admin's allowlist creates nothing.

A VLLMModel's author chooses the image its pods run, with the namespace's Secrets the spec names
(docs/security.md); ``VLLM_OPERATOR_ALLOWED_IMAGE_REGISTRIES`` lets a cluster admin restrict it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import status as st
from ..config import Config
from ..model import VLLMModel
from .types import Hold, Outcome

# The characters that may follow a repository name in an image reference: a path, a tag, a digest.
_AFTER_REPOSITORY = "/:@"


@dataclass(frozen=True, kw_only=True)
class ImagePolicy(Outcome):
    hold: Hold | None = None  # set when spec.image is refused: nothing may be created


def image_allowed(image: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``image`` starts with one of ``prefixes`` at a path boundary (any image when there are none).

    ``ghcr.io/org/`` and ``ghcr.io/org`` allow ``ghcr.io/org/x:1`` but not ``ghcr.io/org.evil/x``;
    a prefix naming a repository (``ghcr.io/org/runtime``) also allows its tags and digests. The
    match is on the reference as written: ``nginx`` is not normalised to ``docker.io/library/nginx``.
    """
    if not prefixes:
        return True
    for prefix in prefixes:
        base = prefix.rstrip("/")
        if not base:
            continue
        if image == base:
            return True
        if image.startswith(base):
            boundary = image[len(base)]
            # A bare registry (no '/') is followed by a path only: ghcr.io:5000 is another endpoint.
            allowed_after = _AFTER_REPOSITORY if "/" in base else "/"
            if boundary in allowed_after:
                return True
    return False


def check_image(model: VLLMModel, config: Config) -> ImagePolicy:
    image = model.spec.get("image")
    if not image or image_allowed(str(image), config.allowed_image_registries):
        return ImagePolicy()
    allowed = ", ".join(config.allowed_image_registries)
    failure = st.Condition(
        st.FAILED, st.TRUE, "ImageNotAllowed",
        f"spec.image {image!r} is not in the registries this cluster allows ({allowed}); use an image from "
        "one of them, or remove spec.image to use the operator's runtime image",
    )  # fmt: skip
    return ImagePolicy(failures=(failure,), hold=Hold("ImageNotAllowed", "spec.image is not allowed (see Failed)"))
