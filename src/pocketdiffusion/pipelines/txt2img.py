"""txt2img: start from pure noise over the whole schedule."""
from __future__ import annotations

from .stages import Prepared, Setup


def prepare_txt2img(setup: Setup) -> Prepared:
    x = setup.noise(setup.generators) * setup.schedule.init_sigma(setup.sigmas, setup.spec)
    return Prepared(x=x, sigmas=setup.sigmas, finish=setup.decode)
