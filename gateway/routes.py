"""The route table, built at start-up from the contracts' ``google.api.http`` annotations.

Nobody writes a route by hand: every method that carries an ``HttpRule`` (and its
``additional_bindings``) becomes a ``Route`` with a compiled path template.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor, message_factory

_VARIABLE = re.compile(r"\{([a-zA-Z_][\w.]*)(?:=([^}]*))?\}")


@dataclass(frozen=True)
class Route:
    http_method: str  # GET, POST, ...
    template: str  # e.g. /v1/accounts/{user_id}/holds/{hold_id}:capture
    pattern: re.Pattern[str]
    path_fields: tuple[str, ...]  # field path of each capture group, in order
    body: str  # "" (no body), "*" (the whole message) or a field name
    service: str  # full service name
    method: str  # method name
    input_type: type[Any]
    output_type: type[Any]
    server_streaming: bool
    client_streaming: bool

    @property
    def full_method(self) -> str:
        return f"/{self.service}/{self.method}"

    def match(self, path: str) -> dict[str, str] | None:
        found = self.pattern.fullmatch(path)
        if found is None:
            return None
        return {field: value for field, value in zip(self.path_fields, found.groups(), strict=False)}


def _segment_regex(segment_pattern: str) -> str:
    parts = []
    for piece in segment_pattern.split("/"):
        if piece == "**":
            parts.append(r".+")
        elif piece == "*":
            parts.append(r"[^/:]+")  # a ':' starts the custom verb (AIP-136), never part of a value
        else:
            parts.append(re.escape(piece))
    return "/".join(parts)


def compile_template(template: str) -> tuple[re.Pattern[str], tuple[str, ...]]:
    """Compile a google.api.http path template into a regex and the field path of each group."""
    fields: list[str] = []
    regex = []
    pos = 0
    for found in _VARIABLE.finditer(template):
        regex.append(re.escape(template[pos : found.start()]))
        fields.append(found.group(1))
        regex.append("(" + _segment_regex(found.group(2) or "*") + ")")
        pos = found.end()
    regex.append(re.escape(template[pos:]))
    return re.compile("".join(regex)), tuple(fields)


def _rule_bindings(rule: http_pb2.HttpRule) -> Iterable[tuple[str, str, str]]:
    kind = rule.WhichOneof("pattern")
    if kind == "custom":
        yield rule.custom.kind.upper(), rule.custom.path, rule.body
    elif kind:
        yield kind.upper(), getattr(rule, kind), rule.body
    for extra in rule.additional_bindings:
        yield from _rule_bindings(extra)


def routes_for(service: descriptor.ServiceDescriptor) -> list[Route]:
    routes = []
    for method in service.methods:
        options = method.GetOptions()
        if not options.HasExtension(annotations_pb2.http):
            continue
        for http_method, template, body in _rule_bindings(options.Extensions[annotations_pb2.http]):
            pattern, fields = compile_template(template)
            routes.append(
                Route(
                    http_method=http_method,
                    template=template,
                    pattern=pattern,
                    path_fields=fields,
                    body=body,
                    service=service.full_name,
                    method=method.name,
                    input_type=message_factory.GetMessageClass(method.input_type),
                    output_type=message_factory.GetMessageClass(method.output_type),
                    server_streaming=method.server_streaming,
                    client_streaming=method.client_streaming,
                )
            )
    return routes


def build_routes(modules: Iterable[tuple[ModuleType, str]]) -> list[Route]:
    """All routes of the named services; literal paths sort before templated ones."""
    routes: list[Route] = []
    for module, service_name in modules:
        routes.extend(routes_for(module.DESCRIPTOR.services_by_name[service_name]))
    seen: dict[tuple[str, str], Route] = {}
    for route in routes:
        key = (route.http_method, route.template)
        if key in seen:
            raise ValueError(f"route {key} is declared by both {seen[key].full_method} and {route.full_method}")
        seen[key] = route
    # Prefer the most specific template: more literal characters first.
    return sorted(routes, key=lambda r: -len(_VARIABLE.sub("", r.template)))


class Router:
    """Finds the route of ``method path`` with one regex search per request.

    Each HTTP method's templates are joined, most specific first, into one alternation of named
    groups; the group that matched names the route, and the groups inside it are its path values.
    A path that matches under another method only is a 405 with those methods in ``Allow``.
    """

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = list(routes)
        by_method: dict[str, list[Route]] = {}
        for route in self.routes:
            by_method.setdefault(route.http_method, []).append(route)
        self._tables: dict[str, tuple[re.Pattern[str], dict[str, tuple[Route, int]]]] = {}
        for http_method, group in by_method.items():
            alternatives = []
            where: dict[str, tuple[Route, int]] = {}
            offset = 1
            for index, route in enumerate(group):
                name = f"r{index}"
                alternatives.append(f"(?P<{name}>{route.pattern.pattern})")
                where[name] = (route, offset)
                offset += 1 + route.pattern.groups
            self._tables[http_method] = (re.compile("|".join(alternatives)), where)

    def _match(self, http_method: str, path: str) -> tuple[Route, dict[str, str]] | None:
        table = self._tables.get(http_method)
        if table is None:
            return None
        pattern, where = table
        found = pattern.fullmatch(path)
        if found is None:
            return None
        route, offset = where[found.lastgroup]  # type: ignore[index]
        if not route.path_fields:
            return route, {}
        values = found.groups()[offset : offset + len(route.path_fields)]
        return route, dict(zip(route.path_fields, values, strict=True))

    def find(self, http_method: str, path: str) -> tuple[Route | None, dict[str, str], list[str]]:
        """The route and its path values; else (None, {}, the methods this path allows)."""
        found = self._match(http_method, path)
        if found is not None:
            return found[0], found[1], [http_method]
        allowed = [other for other in self._tables if other != http_method and self._match(other, path) is not None]
        return None, {}, allowed
