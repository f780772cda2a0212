"""A readable listing of the recipe schema: every key, its type, default and help (`memft schema`)."""

from __future__ import annotations

import types
from typing import Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from memft.errors import RecipeError
from memft.train import recipe as recipe_module
from memft.train.recipe import _members, _tag


def _type_name(annotation) -> str:
    """A field's type as a reader writes it: `one of a, b` for a choice, `list[str] | 'all-linear'`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(str(choice) for choice in args)
    if origin in (Union, types.UnionType):
        return " | ".join(" | ".join(repr(c) for c in get_args(a)) if get_origin(a) is Literal
                          else _type_name(a) for a in args)
    if annotation is type(None):
        return "None"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _default(field) -> str:
    if field.default is not PydanticUndefined:
        return repr(field.default)
    if field.default_factory is not None:
        value = field.default_factory()
        return repr(value.name if isinstance(value, BaseModel) and "name" in type(value).model_fields else value)
    return "(required)"


def _lines(model: type[BaseModel], prefix: str) -> list[str]:
    out = []
    for key, field in model.model_fields.items():
        members = _members(field.annotation)
        if len(members) > 1:
            out.append(f"{prefix}{key}: one of the methods below, chosen by {prefix}{key}.name")
            for member in members:
                out.append(f"  [{prefix}{key}.name: {_tag(member)}] {member.model_fields['name'].description}")
                out += ["  " + line for line in _lines(member, f"{prefix}{key}.") if ".name " not in line]
        elif members and key != "name":
            out.append(f"{prefix}{key}: {field.description or ''}")
            out += _lines(members[0], f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key} ({_type_name(field.annotation)}, default {_default(field)}): "
                       f"{field.description or ''}")
    return out


def describe_schema(section: str | None = None) -> str:
    Recipe = recipe_module.Recipe  # the methods registered now  # noqa: N806
    if section is None:
        return "\n".join(_lines(Recipe, ""))
    if section not in Recipe.model_fields:
        raise RecipeError(f"There is no recipe section '{section}'. Sections: {', '.join(Recipe.model_fields)}.")
    return "\n".join(line for line in _lines(Recipe, "") if line.lstrip().startswith(("[" + section, section)))
