"""The models a server offers by name: the one it was started with plus those
`pocketdiffusion models` lists. Requests choose among these names only, never a path: a
request must not make the server open files the operator did not offer."""
from __future__ import annotations

import os

from ..catalog import ModelRef, all_models, resolve
from .errors import RequestError


class ModelList:
    def __init__(self, default: str | os.PathLike):
        served = resolve(default)
        self.default = served.name
        self._refs: dict[str, ModelRef] = {served.name: served}
        for ref in all_models():
            self._refs.setdefault(ref.name, ref)

    def names(self) -> list[str]:
        return list(self._refs)

    def ref(self, name: str) -> ModelRef:
        return self._refs[self.check(name)]

    def check(self, name: str | None) -> str:
        """`name` if this server offers it (None = the default model), else a 400 listing them.
        A1111 clients send titles such as "model.safetensors [hash]": the name before a space
        or a bracket is matched too."""
        if name is None or name == "":
            return self.default
        if not isinstance(name, str):
            raise RequestError(f"model: expected a model name, got {type(name).__name__}")
        for candidate in (name, name.split(" [")[0], os.path.splitext(name.split(" [")[0])[0]):
            if candidate in self._refs:
                return candidate
        raise RequestError(f"model {name!r} is not offered by this server; the models are: "
                           f"{', '.join(self._refs)} (names only: paths are not accepted)")

    def load_argument(self, name: str) -> str:
        """What `pocketdiffusion.load` takes for this model: the embedded models by name (that
        picks their UNet subfolder), every other model by its path."""
        ref = self.ref(name)
        return ref.name if ref.embedded else str(ref.path)
