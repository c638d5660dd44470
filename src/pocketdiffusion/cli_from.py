"""`--from IMAGE.png`: the generation parameters stored in an image (ours, AUTOMATIC1111's, Forge's),
as defaults for the command-line options. Options given on the command line win; only the
others are read from the image, so a field we cannot use is an error only when it is needed."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

# Option (argparse dest) -> (A1111 field, conversion). Values stay text in an infotext.
NUMERIC_FIELDS: dict[str, tuple[str, type]] = {
    "steps": ("Steps", int), "cfg": ("CFG scale", float), "seed": ("Seed", int), "clip_skip": ("Clip skip", int),
    "strength": ("Denoising strength", float), "mask_blur": ("Mask blur", int),
}
# Which options each command reads from the image. The size belongs to generate and edit only:
# inpainting and outpainting work at their (possibly extended) image's size.
FIELDS_BY_COMMAND = {
    "generate": ("prompt", "negative", "steps", "cfg", "sampler", "seed", "clip_skip", "width", "height"),
    "edit": ("prompt", "negative", "steps", "cfg", "sampler", "seed", "clip_skip", "width", "height", "strength"),
    "inpaint": ("prompt", "negative", "steps", "cfg", "sampler", "seed", "clip_skip", "strength", "mask_blur",
                "only_masked"),
    "outpaint": ("prompt", "negative", "steps", "cfg", "sampler", "seed", "clip_skip", "strength", "mask_blur"),
}
# A1111 "Schedule type" values that mean "the sampler's own schedule", which is what we run.
DEFAULT_SCHEDULES = ("", "Automatic")


def defaults_from_image(path: str, command: str, wanted: set[str], warn: Callable[[str], None]) -> dict[str, Any]:
    """{option: value} read from the PNG at `path` for the options in `wanted` (those not given on
    the command line) that `command` takes; `warn` is told what cannot be reproduced."""
    from .pipelines.metadata import read_png_parameters

    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"--from image '{path}' does not exist")
    params = read_png_parameters(file)  # ImageMetadataError when it holds no parameters
    wanted = wanted & set(FIELDS_BY_COMMAND[command])
    return defaults_from_parameters(params, wanted, f"--from '{path}'", warn)


def defaults_from_parameters(params: dict[str, str], wanted: set[str], source: str,
                             warn: Callable[[str], None]) -> dict[str, Any]:
    """{option: value} from parsed infotext fields (metadata.parse_parameters), for `wanted` options."""
    values: dict[str, Any] = {}
    if "prompt" in wanted:
        values["prompt"] = params.get("Prompt", "")
    if "negative" in wanted:
        values["negative"] = params.get("Negative prompt", "")
    for option, (field, kind) in NUMERIC_FIELDS.items():
        if option in wanted and field in params:
            values[option] = _number(params[field], kind, field, option, source)
    if values.get("clip_skip") == 1:
        del values["clip_skip"]  # A1111's "no skip": what the model does by default
    if "sampler" in wanted and "Sampler" in params:
        values["sampler"] = sampler_with_schedule(params["Sampler"], params.get("Schedule type", ""), source, warn)
    if {"width", "height"} <= wanted and "Size-1" in params and "Size-2" in params:
        values["width"] = _number(params["Size-1"], int, "Size", "width", source)
        values["height"] = _number(params["Size-2"], int, "Size", "height", source)
    if "only_masked" in wanted and "Inpaint area" in params:
        values["only_masked"] = params["Inpaint area"] == "Only masked"
    return values


def sampler_with_schedule(name: str, schedule: str, source: str, warn: Callable[[str], None]) -> str:
    """The sampler name to run: A1111 >= 1.9 writes `Sampler: DPM++ 2M, Schedule type: Karras`,
    which we (and older A1111) call "DPM++ 2M Karras"."""
    from .sampling import sampler_spec

    def known(candidate: str) -> bool:
        try:
            sampler_spec(candidate)
        except ValueError:
            return False
        return True

    if not known(name):
        raise ValueError(f"{source} was made with the sampler {name!r}, which pocketdiffusion does not have; "
                         "pick one with --sampler (see --help)")
    if schedule in DEFAULT_SCHEDULES or (schedule == "Karras" and sampler_spec(name)[1]):
        return name
    if schedule == "Karras" and known(f"{name} Karras"):
        return f"{name} Karras"
    warn(f"{source} used the {schedule!r} schedule, which pocketdiffusion does not offer with {name!r}; "
         "using the sampler's default schedule, so the image will differ")
    return name


def _number(text: str, kind: type, field: str, option: str, source: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ValueError(f"{source} has '{field}: {text}', which is not {what}; pass "
                         f"--{option.replace('_', '-')} instead") from None
