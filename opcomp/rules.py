"""Per-layer rule files: TOML that chooses an expression for each parameter of a model.

    [[rule]]
    match = { type = "Conv2d" }          # also: name (glob), ndim, min_numel, max_numel, shape
    use = "fog"
    [[rule]]
    match = { ndim = 1 }
    use = "adamw"
    lr_scale = 0.5
    options = { wd = 0.0 }               # options of a bare operator or preset in `use`
    [default]
    use = "muon(g) | adamw(g)"

The first rule whose every match field holds wins; ``[default]`` is required, so every parameter
is matched. Mistakes are reported naming the file, the rule and the field.
"""

from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import Tensor, nn

from opcomp._resources import data_dir
from opcomp.errors import OpcompError

Scalar = bool | int | float | str


class Match(BaseModel):
    """Conditions on a parameter; all given ones must hold."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: str | list[str] | None = Field(None, description="class name of the owning module")
    name: str | None = Field(None, description="glob on the parameter's full name, e.g. 'blocks.*.attn.*'")
    ndim: Annotated[int, Field(ge=0)] | None = None
    min_numel: Annotated[int, Field(ge=0)] | None = None
    max_numel: Annotated[int, Field(ge=0)] | None = None
    shape: list[int] | None = None

    @field_validator("name")
    @classmethod
    def _well_formed_glob(cls, pattern: str | None) -> str | None:
        if pattern is None:
            return None
        if not pattern:
            raise ValueError("an empty glob matches nothing; write '*' to match every name")
        depth = 0
        for char in pattern:
            depth += {"[": 1, "]": -1}.get(char, 0)
            if depth not in (0, 1):
                raise ValueError(f"malformed glob {pattern!r}: brackets nest or close before they open")
        if depth:
            raise ValueError(f"malformed glob {pattern!r}: '[' is never closed")
        return pattern

    def holds(self, name: str, param: Tensor, module: nn.Module | None) -> bool:
        types = [self.type] if isinstance(self.type, str) else self.type
        return (
            (types is None or (module is not None and type(module).__name__ in types))
            and (self.name is None or fnmatch.fnmatchcase(name, self.name))
            and (self.ndim is None or param.ndim == self.ndim)
            and (self.min_numel is None or param.numel() >= self.min_numel)
            and (self.max_numel is None or param.numel() <= self.max_numel)
            and (self.shape is None or list(param.shape) == self.shape)
        )


class Choice(BaseModel):
    """What a matched parameter runs."""

    model_config = ConfigDict(extra="forbid", strict=True)

    use: str = Field(description="an expression or preset")
    lr_scale: Annotated[float, Field(gt=0.0)] = 1.0
    options: dict[str, Scalar] = Field(default_factory=dict, description="options of a bare name in `use`")


class Rule(Choice):
    match: Match


class RuleFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    rule: list[Rule] = Field(default_factory=list)
    default: Choice


@dataclass(frozen=True)
class Assigned:
    """The rule a parameter got: its label ('rule 2', 'default') and choice."""

    label: str
    choice: Choice


@dataclass(frozen=True)
class Rules:
    path: str
    file: RuleFile

    def assign(self, name: str, param: Tensor, module: nn.Module | None) -> Assigned:
        """The first rule that holds, among those whose name glob can match (:meth:`by_prefix`)."""
        rules = self.file.rule
        for index in self.candidates(name):
            if rules[index].match.holds(name, param, module):
                return Assigned(f"rule {index + 1}", rules[index])
        return Assigned("default", self.file.default)

    def candidates(self, name: str) -> list[int]:
        """Indices, in order, of the rules whose glob's literal start is a start of ``name`` (or that
        match no name): a name is checked against a few rules, not every one of thousands."""
        index = self.by_prefix
        found = [i for length in range(len(name) + 1) for i in index.get(name[:length], ())]
        return sorted(found)

    @cached_property
    def by_prefix(self) -> dict[str, list[int]]:
        """Rule indices by the literal start of their name glob (before its first * ? or [); ''
        for rules that match any name."""
        index: dict[str, list[int]] = {}
        for number, rule in enumerate(self.file.rule):
            pattern = rule.match.name or ""
            literal = (
                len(pattern)
                if not any(c in pattern for c in "*?[")
                else min(pattern.index(c) for c in "*?[" if c in pattern)
            )
            index.setdefault(pattern[:literal] if rule.match.name else "", []).append(number)
        return index

    def where(self, label: str, field: str) -> str:
        section = "[default]" if label == "default" else label
        return f"{self.path}, {section}, field '{field}'"


def is_rule_file(expr) -> bool:
    return isinstance(expr, (str, Path)) and str(expr).endswith(".toml")


def locate(path: str | Path) -> str:
    """The file itself, or else, for a bare file name, the rule file of that name shipped with
    opcomp (``adaptive.toml``). A path with a folder is that file or nothing: a mistyped folder
    never falls through to a shipped file of the same name."""
    if Path(path).exists() or Path(path).name != str(path):
        return str(path)
    shipped = data_dir("presets") / Path(path).name
    return str(shipped) if shipped.exists() else str(path)


def load(path: str | Path) -> Rules:
    """Read and validate a rule file; every mistake names the file, the rule and the field."""
    path = locate(path)
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise OpcompError(f"rule file {path} does not exist") from None
    except IsADirectoryError:
        raise OpcompError(f"rule file {path} is a directory; give the path of a .toml file") from None
    except OSError as error:
        raise OpcompError(f"cannot read rule file {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise OpcompError(f"{path} is not UTF-8 text (byte {error.start}); TOML files are UTF-8") from None
    except tomllib.TOMLDecodeError as error:
        raise OpcompError(f"{path} is not valid TOML: {error}") from None
    except RecursionError:
        raise OpcompError(f"{path} nests arrays or tables too deeply to read; a rule file is two levels deep") from None
    try:
        return Rules(path, RuleFile.model_validate(raw))
    except ValidationError as error:
        raise _rule_error(path, error) from None
    except RecursionError:
        raise OpcompError(f"{path} nests values too deeply; a rule file is two levels deep") from None


def _rule_error(path: str, error: ValidationError) -> OpcompError:
    problem = error.errors()[0]
    location = list(problem["loc"])
    if location == ["default"] and problem["type"] == "missing":
        return OpcompError(
            f'{path}: [default] is missing — every parameter must be matched; add\n  [default]\n  use = "adamw"'
        )
    if location and location[0] == "rule" and len(location) > 1 and isinstance(location[1], int):
        label, field = f"rule {location[1] + 1}", ".".join(str(part) for part in location[2:])
    elif location and location[0] == "default":
        label, field = "[default]", ".".join(str(part) for part in location[1:])
    else:
        label, field = "top level", ".".join(str(part) for part in location)
    message = problem["msg"]
    if problem["type"] == "extra_forbidden":
        message = f"unknown key '{location[-1]}'"
    elif problem["type"] == "value_error":
        message = str(problem.get("ctx", {}).get("error", message))
    else:
        message = message.replace("Input should be", "must be")
    return OpcompError(f"{path}, {label}, field '{field}': {message}")
