"""The container interface: what every reader declares and what it hands over.

A reader is one container format (a `torch.save` file, a Hugging Face Trainer folder, a DeepSpeed
folder, ...). `sfckpt.load` asks the registered readers in order (`readers.registry.READERS`):

1. `recognise(path, kind)` — cheap, from names and small files; `kind` is `readers.sniff(path)`.
   The first reader that answers True owns the path; none is asked to open it twice.
2. `open(path, request)` — read the container's structure (never tensor data, never code) and
   return `Opened`: a torch-style object that `layout.find` reads (weights as `TensorRef`s and the
   optimizer's state dict), plus the container's traits.
3. `save_complete(path)` — whether a save at `path` is finished, so that `sfckpt watch` and the
   integrations never read a half-written one.

Adding a container is a new module with a `Reader` subclass and one line in `registry.READERS`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from ..errors import InputError, Words


@dataclass(frozen=True)
class LoadRequest:
    """What the user asked of `load` that a reader may need (which entries, which names)."""

    model_key: str | None = None
    optimizer_key: str | None = None
    strip_prefix: str | None = None

    @property
    def entries_chosen(self) -> bool:
        """Whether the user picked the entries: then a container's own defaults do not apply."""
        return self.model_key is not None or self.optimizer_key is not None


@dataclass(frozen=True)
class ParameterOrder:
    """The model's parameter order where the weights file keeps none but the container's own rule
    rebuilds it (the Trainer's grouping over a model rebuilt from config.json), or why it could not.

    `names is None` with `missing` set: the order exists but this machine could not rebuild it; the
    reason is said only if the mapping needs the order to decide. `rebuild` set: not rebuilt yet
    (`resolved()` does it), since rebuilding imports transformers and `--param-order` or inspect
    never need it."""

    names: tuple[str, ...] | None = None
    group_domains: tuple[frozenset[str], ...] | None = None
    source: str = ""  # how it was obtained, for the report
    missing: Words | None = None  # why it could not be rebuilt
    missing_hint: Words = ""
    rebuild: Callable[[], ParameterOrder] | None = field(default=None, repr=False, compare=False)
    # vets what the rebuild reads as far as that needs no transformers (raises InputError): inspect
    check: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def rebuilt(cls, rebuild: Callable[[], tuple[list[str], list[set[str]]]], source: str,
                check: Callable[[], None] | None = None) -> ParameterOrder:
        """The order `rebuild()` gives (names, and the names each group may hold), or why it failed,
        computed once, when `resolved()` first asks: the failure is said only if the mapping needs the
        order (see reconstruct). `check` refuses at most what `rebuild` refuses, without its imports."""
        @functools.cache
        def run() -> ParameterOrder:
            try:
                names, domains = rebuild()
            except InputError as exc:
                return cls(missing=exc.text, missing_hint=exc.fix)
            return cls(tuple(names), tuple(frozenset(d) for d in domains), source)

        return cls(source=source, rebuild=run, check=check)

    def resolved(self) -> ParameterOrder:
        """This order with its rebuild run (the same object where there is none to run)."""
        return self if self.rebuild is None else self.rebuild()

    def checked(self) -> ParameterOrder | None:
        """Why the rebuild would fail as far as `check` tells without running it (an order with `missing`
        set), or None."""
        try:
            if self.check is not None:
                self.check()
        except InputError as exc:
            return ParameterOrder(missing=exc.text, missing_hint=exc.fix)
        return None


@dataclass(frozen=True)
class Release:
    """What a release folder written from this container holds beside the weights."""

    side_files: tuple[str, ...] = ()  # copied from the checkpoint folder when present (config.json, ...)
    weights_name: str | None = None  # the single weights file's name when the loader needs one (PEFT)
    shardable: bool = True  # False where the loader reads one file only
    note: str | None = None  # what the release lacks to load, said when it is written


@dataclass
class Opened:
    """What a reader hands over: the object to read weights and optimizer state from, and traits."""

    obj: Any
    unloaded: list[str] = field(default_factory=list)  # classes replaced by placeholders, never imported
    container: str | None = None  # None: `layout.find` names it (torch.save, lightning)
    notes: list[str] = field(default_factory=list)  # what inspect says about the container
    ties_visible: bool = True  # False where tied weights are saved as separate copies (DCP, gathered FSDP)
    default_dtype: str | None = None  # output dtype without --dtype (DeepSpeed: the module's 16-bit dtype)
    release: Release = field(default_factory=Release)
    order: ParameterOrder | None = None
    names_are_final: bool = False  # names are what the framework loads (PEFT): no --strip-prefix hint
    model_key: str | None = None  # the container's default entries where it holds several pairs
    optimizer_key: str | None = None
    accumulated: list[str] = field(default_factory=list)  # statistics gathered at y, by name (Keras BatchNorm)


class Reader:
    """One container format. Subclasses set `name` and implement `recognise` and `open`."""

    name: ClassVar[str] = ""

    def recognise(self, path: Path, kind: str) -> bool:
        """Whether `path` is this container; `kind` is `readers.sniff(path)` ('folder', 'torch', ...)."""
        raise NotImplementedError

    def open(self, path: Path, request: LoadRequest) -> Opened:
        """The container's structure as `Opened`; no tensor data read, no code run."""
        raise NotImplementedError

    def save_complete(self, path: Path) -> bool:
        """Whether the save at `path` is finished (every file written). Default: it opens."""
        return True
