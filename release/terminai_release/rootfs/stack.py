"""The layers and profiles of the guest root filesystem, read from
``images/rootfs/layers.toml``: what each layer installs, what it stands on,
and which layers make each profile.

A layer stands on the base or on the one layer it names in ``depends``
(a layer is the difference from one full tree, so the layers form chains);
its *stack* is that chain, bottom first. Every profile must list a
closed set (each layer's dependencies are in it), so that a profile's
layers, mounted in their stack order, are exactly the trees each layer
was built on.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from terminai_shim.manifest import LAYER_NAME

from ..errors import BuildError

LAYERS_FILE = "images/rootfs/layers.toml"
BASE = "base"  # the name the base goes by in a stack; never a layer's name


@dataclass(frozen=True)
class LayerSpec:
    name: str
    description: str
    depends: tuple[str, ...]
    packages: tuple[str, ...]
    # The base's removals this layer brings back: package names or the
    # base's ``remove_files`` patterns, exactly as written there.
    restore: tuple[str, ...]


@dataclass(frozen=True)
class Stack:
    layers: dict[str, LayerSpec]  # in file order
    profiles: dict[str, tuple[str, ...]]
    default_profile: str

    def below(self, name: str) -> tuple[str, ...]:
        """The layers ``name`` is built on, bottom first (the base not included)."""
        return self.order(self.layers[name].depends)

    def order(self, names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
        """``names`` and everything they depend on, dependencies first, ties in file order."""
        wanted: set[str] = set()

        def visit(n: str) -> None:
            if n not in self.layers:
                raise BuildError(f"unknown layer {n!r}", hint=f"the layers are {', '.join(self.layers)}")
            if n not in wanted:
                wanted.add(n)
                for d in self.layers[n].depends:
                    visit(d)

        for n in names:
            visit(n)
        done: list[str] = []
        while len(done) < len(wanted):
            for n in self.layers:
                if n in wanted and n not in done and all(d in done for d in self.layers[n].depends):
                    done.append(n)
        return tuple(done)

    def profile(self, name: str) -> tuple[str, ...]:
        if name not in self.profiles:
            raise BuildError(f"unknown profile {name!r}", hint=f"the profiles are {', '.join(self.profiles)}")
        return self.profiles[name]


def load_stack(repo: Path) -> Stack:
    path = repo / LAYERS_FILE
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise BuildError(f"cannot read {LAYERS_FILE}: {exc}", hint="fix the file's TOML") from None
    layers: dict[str, LayerSpec] = {}
    for name, body in data.get("layers", {}).items():
        if not LAYER_NAME.match(name) or name == BASE:
            raise BuildError(f"{LAYERS_FILE}: {name!r} is not a layer name", hint="lower-case letters, digits, -")
        unknown = set(body) - {"description", "depends", "packages", "restore"}
        if unknown:
            raise BuildError(f"{LAYERS_FILE}: layer {name} has unknown keys {sorted(unknown)}")
        if len(body.get("depends", [])) > 1:
            raise BuildError(f"{LAYERS_FILE}: layer {name} stands on more than one layer",
                             hint="a layer is the difference from one tree: make the layers a chain")  # fmt: skip
        for dep in body.get("depends", []):
            if dep not in layers:
                raise BuildError(f"{LAYERS_FILE}: layer {name} depends on {dep!r}, which is not a layer above it",
                                 hint="a layer names only layers defined before it (so no cycle can form)")  # fmt: skip
        if not body.get("packages"):
            raise BuildError(f"{LAYERS_FILE}: layer {name} installs no packages")
        layers[name] = LayerSpec(name, str(body.get("description", "")), tuple(body.get("depends", [])),
                                 tuple(body["packages"]), tuple(body.get("restore", [])))  # fmt: skip
    stack = Stack(layers, {}, str(data.get("default_profile", "")))
    for name, members in data.get("profiles", {}).items():
        if not LAYER_NAME.match(name):
            raise BuildError(f"{LAYERS_FILE}: {name!r} is not a profile name")
        ordered = stack.order(members)
        if set(ordered) != set(members):
            missing = sorted(set(ordered) - set(members))
            raise BuildError(f"{LAYERS_FILE}: profile {name} lacks {missing}, which its layers stand on",
                             hint="list every layer a profile needs")  # fmt: skip
        stack.profiles[name] = ordered
    if stack.default_profile not in stack.profiles:
        raise BuildError(f"{LAYERS_FILE}: default_profile {stack.default_profile!r} is not a profile")
    return stack
