"""docker-compose.yml, Dockerfile and .env.example agree with each other and with the code: every
command is a real CLI command, every variable is documented, nothing has a default password, and
services start in order. (There is no Docker engine here; tests/integration/test_topology.py runs
the same services as local processes.)"""

from __future__ import annotations

import shlex

import click
import pytest
import typer

from services.cli import app
from services.config import ConfigError, Settings
from services.queue import SOFT_SHUTDOWN_S
from tests.compose import (
    DOCKERFILE,
    MissingVariable,
    compose_variables,
    dockerfile_stages,
    interpolate,
    load_compose,
    read_env_file,
    service_environment,
    stage_lines,
)
from tests.servers import REPO

OUR_SERVICES = {"migrate", "worker", "worker-gpu", "dashboard"}
SECRETS = {"POSTGRES_PASSWORD", "REDIS_PASSWORD"}
SIGN_IN_SECRETS = {"FITSCOPE_OIDC_CLIENT_SECRET", "FITSCOPE_OIDC_COOKIE_SECRET"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def filled_env() -> dict[str, str]:
    """.env.example with its required secrets filled in, as a user's .env would be."""
    return {**read_env_file(), **{name: "s3cret" for name in SECRETS}}


def test_the_topology_has_every_service(compose):
    assert set(compose["services"]) == {"redis", "postgres", "migrate", "worker", "worker-gpu", "dashboard",
                                        "flower"}
    assert compose["services"]["worker-gpu"]["profiles"] == ["gpu"]
    assert compose["services"]["flower"]["profiles"] == ["monitor"]
    assert {"redis-data", "postgres-data"} <= set(compose["volumes"])


@pytest.mark.parametrize("service", sorted(OUR_SERVICES))
def test_each_service_runs_a_real_cli_command(compose, service):
    command = compose["services"][service]["command"]
    assert command[0] == "fitscope"
    cli: click.Command = typer.main.get_command(app)
    args = list(command[1:])
    while isinstance(cli, click.Group):
        name = args.pop(0)
        assert name in cli.commands, f"{service}: `fitscope {name}` is not a command"
        cli = cli.commands[name]
    cli.make_context(f"fitscope {command[1]}", args)  # raises on an unknown option or a bad value


def test_every_variable_is_documented_in_env_example_and_every_documented_one_is_used(compose):
    used, documented = set(compose_variables(compose)), set(read_env_file())
    assert used - documented == set(), "add these to .env.example"
    assert documented - used == set(), "remove these from .env.example, or use them"


def test_fitscope_variables_are_real_settings_with_valid_values(compose, filled_env):
    fields = {f"FITSCOPE_{name.upper()}" for name in Settings.model_fields}
    for service in OUR_SERVICES:
        environment = service_environment(compose, service, filled_env)
        environment.pop("REMAP_SIGTERM", None)  # Celery's own (test_docker_stop_re_queues_running_trials)
        assert set(environment) <= fields, f"{service}: {set(environment) - fields} are not settings"
        Settings(**{key.removeprefix("FITSCOPE_").lower(): value for key, value in environment.items()})
    documented = {name for name in read_env_file() if name.startswith("FITSCOPE_")}
    assert documented <= fields


def test_there_is_no_default_password(compose, filled_env):
    variables = compose_variables(compose)
    for secret in SECRETS:
        assert variables[secret] == {":?"}, f"every use of {secret} must be ${{{secret}:?...}}"
        assert read_env_file()[secret] == "", f".env.example must leave {secret} empty"
        with pytest.raises(MissingVariable, match=secret):
            interpolate(compose, {**filled_env, secret: ""})
    assert "s3cret" in service_environment(compose, "worker", filled_env)["FITSCOPE_DATABASE_URL"]
    assert compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")


def test_the_dashboard_refuses_to_start_without_sign_in_and_starts_with_it(compose, filled_env, monkeypatch):
    # Its settings, not compose, refuse: the other services start without an identity provider.
    from services.signin import required_config

    for secret in SIGN_IN_SECRETS:
        assert read_env_file()[secret] == "", f".env.example must leave {secret} empty"
    environment = service_environment(compose, "dashboard", filled_env)
    assert {name for name in environment if name.startswith("FITSCOPE_OIDC_")} == {
        "FITSCOPE_OIDC_SERVER_METADATA_URL", "FITSCOPE_OIDC_CLIENT_ID", "FITSCOPE_OIDC_CLIENT_SECRET",
        "FITSCOPE_OIDC_REDIRECT_URI", "FITSCOPE_OIDC_COOKIE_SECRET"}
    for service in OUR_SERVICES - {"dashboard"}:  # the secrets go only where they are used
        assert not any(name.startswith("FITSCOPE_OIDC_") for name in service_environment(compose, service, filled_env))
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match="would listen on 0.0.0.0, beyond this machine, without sign-in"):
        required_config(Settings())
    signed_in = {**filled_env, "FITSCOPE_OIDC_SERVER_METADATA_URL": "https://accounts.google.com/.well-known/"
                 "openid-configuration", "FITSCOPE_OIDC_CLIENT_ID": "id", "FITSCOPE_OIDC_CLIENT_SECRET": "s3cret",
                 "FITSCOPE_OIDC_COOKIE_SECRET": "c" * 64,
                 "FITSCOPE_OIDC_REDIRECT_URI": "http://localhost:8501/oauth2callback"}
    for name, value in service_environment(compose, "dashboard", signed_in).items():
        monkeypatch.setenv(name, value)
    assert required_config(Settings()).redirect_uri == "http://localhost:8501/oauth2callback"


def test_redis_is_a_durable_queue_with_a_password_that_stays_off_its_command_line(compose, filled_env):
    redis = compose["services"]["redis"]
    shell, flag, script = interpolate(redis["command"], filled_env)
    assert (shell, flag) == ("sh", "-c")
    words = shlex.split(script.splitlines()[0])
    assert words[:3] == ["exec", "redis-server", "-"]  # its config file is stdin
    options = dict(zip(words[3::2], words[4::2], strict=False))
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] == "always"  # what the README promises: a queued trial is on disk
    assert "appendfsync always" in (REPO / "README.md").read_text()
    assert options["--maxmemory-policy"] == "noeviction"
    assert "s3cret" not in script and "requirepass" not in words  # only its shell knows the value
    assert "requirepass $REDIS_PASSWORD" in script.splitlines()
    assert redis["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")


def test_services_wait_for_healthy_dependencies_and_the_migration(compose):
    services = compose["services"]
    for name in ("redis", "postgres", "dashboard"):
        assert services[name]["healthcheck"]["test"], f"{name} needs a healthcheck"
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("worker", "worker-gpu", "dashboard"):
        depends_on = services[name]["depends_on"]
        assert depends_on["migrate"] == {"condition": "service_completed_successfully"}
        assert depends_on["redis"] == depends_on["postgres"] == {"condition": "service_healthy"}
    for name, service in services.items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits for {dependency}'s missing healthcheck"


def test_queues_and_the_gpu_reservation(compose):
    services = compose["services"]
    assert services["worker"]["command"][-2:] == ["--queues", "cpu"]
    assert services["worker-gpu"]["command"][-2:] == ["--queues", "gpu"]
    assert "deploy" in services["worker"] and "replicas" not in services["worker"]["deploy"]  # --scale decides
    [device] = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and "count" in device


def test_dashboard_port_is_configurable_and_matches_what_it_listens_on(compose, filled_env):
    dashboard = compose["services"]["dashboard"]
    [published] = interpolate(dashboard["ports"], {**filled_env, "DASHBOARD_PORT": "9000"})
    assert published == "127.0.0.1:9000:8501"
    environment = service_environment(compose, "dashboard", filled_env)
    assert environment["FITSCOPE_DASHBOARD_PORT"] == published.rsplit(":", 1)[1]
    assert environment["FITSCOPE_BIND_HOST"] == "0.0.0.0"  # inside its container; published on 127.0.0.1
    assert "8501/_stcore/health" in " ".join(dashboard["healthcheck"]["test"])


def test_images_are_built_from_dockerfile_stages_and_the_dashboards_has_no_torch(compose):
    stages = dockerfile_stages()
    migrate, dashboard = compose["services"]["migrate"], compose["services"]["dashboard"]
    # One image for both, built once: migrate only runs it (and must never pull it from a registry).
    assert "build" not in migrate and migrate["pull_policy"] == "never" and migrate["image"] == dashboard["image"]
    for name in OUR_SERVICES - {"migrate"}:
        build = compose["services"][name]["build"]
        assert build["target"] in stages, f"{name}: no stage {build['target']!r} in the Dockerfile"
        for arg in build.get("args", {}):
            assert any(line.strip().startswith(f"ARG {arg}") for line in stage_lines(stages, build["target"]))
    dashboard_stage = "\n".join(stage_lines(stages, "dashboard"))
    assert "TORCH_INDEX_URL" not in dashboard_stage and "not d.startswith('torch')" in dashboard_stage
    worker_stage = "\n".join(stage_lines(stages, "worker"))
    # Only that index: beside PyPI, pip could take PyPI's torch and its CUDA libraries.
    assert '--index-url "${TORCH_INDEX_URL}"' in worker_stage and "--extra-index-url" not in worker_stage
    assert dashboard["build"]["target"] == "dashboard"  # migrations need no torch


def test_every_copy_source_exists_and_the_code_runs_from_app():
    dockerignore = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    for target, lines in dockerfile_stages().items():
        for line in lines[1:]:
            words = line.split()
            if words and words[0] == "COPY" and not any(word.startswith("--from") for word in words):
                for source in words[1:-1]:
                    assert (REPO / source).exists(), f"{target}: COPY {source}: no such file"
                    assert source not in dockerignore, f"{target}: COPY {source}, but .dockerignore leaves it out"
        if target in ("dashboard", "worker"):
            text = "\n".join(lines)
            # The dashboard's example grids are found beside the code (parents[2] / "examples").
            assert "COPY examples examples" in text and "pip install --no-deps -e ." in text
    assert "WORKDIR /app" in DOCKERFILE.read_text()


def test_redis_postgres_and_the_dashboard_are_published_on_this_machine_only_by_default(compose, filled_env):
    defaults = {name: value for name, value in filled_env.items() if not name.endswith("_BIND_ADDRESS")}
    for name in ("redis", "postgres", "dashboard", "flower"):
        for published in interpolate(compose["services"][name]["ports"], defaults):
            assert published.startswith("127.0.0.1:"), f"{name} is published on {published} by default"
    assert {read_env_file()[f"{name}_BIND_ADDRESS"] for name in ("REDIS", "POSTGRES", "DASHBOARD")} == {"127.0.0.1"}


def test_docker_stop_re_queues_running_trials(compose):
    """SIGTERM becomes Celery's cold shutdown (soft for SOFT_SHUTDOWN_S), which puts running trials back
    in the queue; compose must wait for that before its SIGKILL."""
    for name in ("worker", "worker-gpu"):
        service = compose["services"][name]
        assert service["environment"]["REMAP_SIGTERM"] == "SIGQUIT"
        assert service["init"] is True
        assert float(service["stop_grace_period"].removesuffix("s")) >= SOFT_SHUTDOWN_S + 10


def test_training_processes_split_the_containers_cpu_share_unless_told(monkeypatch):
    from worker import celery_app

    monkeypatch.setattr(celery_app, "cpu_quota", lambda: 4)  # compose's `cpus: 4` (WORKER_CPUS)
    assert celery_app.torch_threads(Settings(), 2) == 2
    assert celery_app.torch_threads(Settings(), 8) == 1
    assert celery_app.torch_threads(Settings(torch_threads=3), 2) == 3  # FITSCOPE_TORCH_THREADS wins
    monkeypatch.setattr(celery_app, "cpu_quota", lambda: None)  # no CPU limit: the setting's default
    assert celery_app.torch_threads(Settings(), 1) == Settings().torch_threads
