"""The checks every request passes before it is queued: the engine's own (`validate()`, the
sampler name) and the server's limits. A bad request fails here in milliseconds with a 400
naming the field, instead of failing in the queue behind other jobs."""
from __future__ import annotations

from PIL import Image

from ..pipelines.request import GenerationRequest, InvalidRequest
from ..sampling import sampler_spec
from .errors import RequestError
from .settings import Limits


def check_request(request: GenerationRequest, limits: Limits) -> GenerationRequest:
    try:
        request.validate()
        sampler_spec(request.sampler)
    except (InvalidRequest, ValueError, TypeError) as error:
        raise RequestError(str(error)) from None
    for name in ("width", "height"):
        value = getattr(request, name)
        if value is not None and value > limits.max_side:
            raise RequestError(f"{name}={value}: this server makes images up to {limits.max_side} pixels a side")
    if request.steps > limits.max_steps:
        raise RequestError(f"steps={request.steps}: this server runs at most {limits.max_steps} steps")
    images = request.batch_size * request.batch_count
    if images > limits.max_images:
        raise RequestError(f"{request.batch_size} x {request.batch_count} = {images} images: this server makes at "
                           f"most {limits.max_images} images per request (batch size x batch count)")
    return request


def check_canvas(image: Image.Image, name: str, limits: Limits) -> None:
    """A canvas the server built (an outpainted one) obeys the upload limit too."""
    if max(image.size) > limits.max_side:
        raise RequestError(f"{name}: the canvas would be {image.size[0]}x{image.size[1]}; this server takes "
                           f"images up to {limits.max_side} pixels a side")
