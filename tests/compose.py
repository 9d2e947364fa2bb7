"""Read docker-compose.yml and .env.example as Docker Compose would, for the tests that check the
team topology without a Docker engine: interpolation of ${VAR}, ${VAR:-default} and ${VAR:?error},
and a service's command and environment."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tests.servers import REPO

COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "Dockerfile"
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}; $$ is a literal $.
_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


class MissingVariable(ValueError):
    """A ${VAR:?message} whose variable is unset or empty: compose refuses to start."""


def load_compose(path: Path = COMPOSE_FILE) -> dict:
    return yaml.safe_load(path.read_text())


def compose_variables(compose: dict) -> dict[str, set[str]]:
    """Every variable the file's values interpolate, with the operators it is used with ('' for plain)."""
    found: dict[str, set[str]] = {}

    def walk(value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(key)
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str):
            for match in _VARIABLE.finditer(value):
                if match["name"]:
                    found.setdefault(match["name"], set()).add(match["op"] or "")

    walk(compose)
    return found


def read_env_file(path: Path = ENV_EXAMPLE) -> dict[str, str]:
    """NAME=value lines of an .env file (comments and blank lines skipped)."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def interpolate(value, env: dict[str, str]):
    """Compose's interpolation of one value (strings inside lists and dicts too)."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match["name"], match["op"], match["arg"]
        current = env.get(name)
        unset_or_empty = not current if op and op.startswith(":") else current is None
        if op in (":-", "-") and unset_or_empty:
            return arg
        if op in (":?", "?") and unset_or_empty:
            raise MissingVariable(f"{name}: {arg}")
        return current or ""

    return _VARIABLE.sub(substitute, value)


def service_environment(compose: dict, service: str, env: dict[str, str]) -> dict[str, str]:
    """The environment compose gives a service's container, interpolated, as strings."""
    environment = compose["services"][service].get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {key: str(value) for key, value in interpolate(environment, env).items()}


def dockerfile_stages(path: Path = DOCKERFILE) -> dict[str, list[str]]:
    """Each named build stage's lines, with the stage it starts FROM as its first line."""
    stages: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in path.read_text().splitlines():
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line.strip(), re.IGNORECASE)
        if match:
            current = stages.setdefault(match[2] or f"stage{len(stages)}", [])
            current.append(match[1])
        elif current is not None:
            current.append(line)
    return stages


def stage_lines(stages: dict[str, list[str]], target: str) -> list[str]:
    """A stage's lines and those of every stage it builds FROM."""
    lines = []
    while target in stages:
        lines = stages[target][1:] + lines
        target = stages[target][0]
    return lines
