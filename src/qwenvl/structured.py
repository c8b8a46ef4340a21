"""Structured outputs: what a reply must match (a JSON schema, any JSON object, a regex, one of
some strings, or a Lark grammar), as a sampling option.

``SamplingParams(structured=StructuredOutput(json_schema=...))`` constrains every sampled token
to ones that keep the reply inside the language: the engine's sampler masks the others
(``engine/grammar.py``, on llguidance). JSON is written compactly (``", "`` and ``": "``
separators, no other whitespace), so a reply cannot run on in blank space.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from qwenvl.errors import PromptError

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
# llguidance's JSON options: canonical compact JSON, as json.dumps writes it
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class StructuredOutput:
    """One constraint on a reply (exactly one field set).

    Args:
        json_schema: a JSON Schema (dict or JSON text): types, required, enum, const,
            anyOf/oneOf, nullable, min/maxItems, min/maxLength, pattern, nested objects,
            additionalProperties, $ref/$defs. A keyword the engine cannot enforce is refused.
        json_object: any JSON object (OpenAI's ``json_object`` mode).
        regex: the whole reply matches this regular expression.
        choice: the reply is exactly one of these strings.
        grammar: a Lark grammar (llguidance's dialect: ``start:`` rule, terminals in capitals,
            ``%json {...}`` for an embedded schema).
    """

    json_schema: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [f.name for f in fields(self) if getattr(self, f.name) not in (None, False)]
        if len(given) != 1:
            raise PromptError(
                f"a structured output sets exactly one of {', '.join(KINDS)}; got "
                f"{', '.join(given) or 'none'}"
            )
        if isinstance(self.json_schema, str):
            try:
                object.__setattr__(self, "json_schema", json.loads(self.json_schema))
            except ValueError as e:
                raise PromptError(f"json_schema is not valid JSON: {e}") from None
        if self.json_schema is not None and not isinstance(self.json_schema, (dict, bool)):
            raise PromptError("json_schema must be a JSON object")
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(isinstance(c, str) for c in self.choice):
                raise PromptError("choice must be a list of strings")
            if not self.choice:
                raise PromptError("choice must hold at least one string")
            object.__setattr__(self, "choice", tuple(self.choice))
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise PromptError(f"{name} must be a non-empty string")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def key(self) -> str:
        """A canonical text of the constraint: equal constraints compile once."""
        value = getattr(self, self.kind)
        return self.kind + ":" + json.dumps(value, sort_keys=True, ensure_ascii=False)

    def lark(self) -> str:
        """The constraint as one Lark grammar (llguidance's dialect)."""
        if self.json_schema is not None:
            return json_rule(self.json_schema)
        if self.json_object:
            return json_rule({"type": "object"})
        if self.regex is not None:
            return "start: /" + self.regex.replace("/", "\\/") + "/"
        if self.choice is not None:
            return "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in self.choice)
        assert self.grammar is not None
        return self.grammar


def json_rule(schema: Any, rule: str = "start") -> str:
    """A Lark rule matching compact JSON that validates against ``schema``."""
    body = dict(schema) if isinstance(schema, dict) else schema
    if isinstance(body, dict):
        body["x-guidance"] = {**JSON_OPTIONS, **body.get("x-guidance", {})}
    return f"{rule}: %json " + json.dumps(body, ensure_ascii=False)
