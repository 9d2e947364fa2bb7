"""Every queue message is checked before the worker acts on it.

A message that is not a well-formed fitscope job (not JSON, not base64, too large, an unknown task,
arguments of the wrong shape or type) is logged once, copied to the dead-letter list
``fitscope.dead`` on the broker (newest first, the last :data:`DEAD_LETTER_KEEP`; read it with
``valkey-cli LRANGE fitscope.dead 0 -1``) and dropped; the worker carries on with the next message.

Where this hooks in, and why there: Celery's consumer only survives an unknown task name or a
body it cannot decode as a whole. A body of ``{"x": 1}`` raises ValueError inside the task
strategy, and an envelope that is not JSON (or a JSON list) fails inside kombu's Redis channel
before Celery sees it; both end the worker ("Unrecoverable error"). So the check sits in the
transport, between Redis and Celery: :class:`ValidatingTransport` (the worker's
``broker_transport``) sees each envelope as it leaves Redis (BRPOP already removed it there, so
dropping it needs no acknowledgement) and hands Celery only envelopes whose body matches
:data:`TASK_SCHEMAS`.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from kombu.transport import redis as kombu_redis

from services.models import MAX_ID
from services.queue import MAX_JOB_TRIALS, QUEUES, RUN_JOB_TASK

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 * 1024  # a job of 4096 ids is ~50 KB; anything larger was not sent by fitscope
DEAD_LETTER_KEY = "fitscope.dead"
DEAD_LETTER_KEEP = 1000
_DEAD_LETTER_EXCERPT = 2000  # characters of the rejected envelope kept for the operator


class BadMessage(ValueError):
    """A message that is not a fitscope job; the text says what is wrong with it, in one sentence."""


def _trial_id_problem(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return f"a trial id must be a whole number, got {type(value).__name__}"
    if not 1 <= value <= MAX_ID:
        return f"a trial id must be from 1 to {MAX_ID}, got {value}"
    return None


def _trial_id_list(args: list) -> str | None:
    if len(args) != 1 or not isinstance(args[0], list):
        return "takes 1 argument, a list of trial ids"
    if not 1 <= len(args[0]) <= MAX_JOB_TRIALS:
        return f"takes 1 to {MAX_JOB_TRIALS} trial ids, got {len(args[0])}"
    return next((problem for value in args[0] if (problem := _trial_id_problem(value))), None)


@dataclass(frozen=True)
class TaskSchema:
    args: Callable[[list], str | None]  # the problem with the positional arguments, or None
    kwargs: dict[str, type]  # optional keyword arguments and their types; no others


# THE table of what a worker accepts: one task, a job of one or more trial ids.
TASK_SCHEMAS: dict[str, TaskSchema] = {
    RUN_JOB_TASK: TaskSchema(args=_trial_id_list, kwargs={"takeover": bool}),
}


def check_envelope(envelope: object) -> None:
    """Raise :class:`BadMessage` unless ``envelope`` (a kombu Redis message, decoded from JSON) is a
    Celery protocol-2 message for a task in :data:`TASK_SCHEMAS` with arguments it accepts."""
    if not isinstance(envelope, dict):
        raise BadMessage(f"the envelope is a JSON {type(envelope).__name__}, not an object")
    size = len(envelope.get("body") or "") if isinstance(envelope.get("body"), str) else 0
    if size > MAX_MESSAGE_BYTES:
        raise BadMessage(f"the body is {size} bytes, over the cap of {MAX_MESSAGE_BYTES}")
    size = len(json.dumps(envelope))  # headers and properties too; fitscope's own are a few hundred bytes
    if size > 2 * MAX_MESSAGE_BYTES:
        raise BadMessage(f"the envelope is {size} bytes, over the cap of {2 * MAX_MESSAGE_BYTES}")
    properties, headers = envelope.get("properties"), envelope.get("headers")
    if not isinstance(properties, dict) or not isinstance(properties.get("delivery_tag"), str):
        raise BadMessage("the envelope has no properties.delivery_tag")
    if not isinstance(headers, dict):
        raise BadMessage("the envelope has no headers (not a Celery protocol-2 message)")
    task = headers.get("task")
    if task not in TASK_SCHEMAS:
        raise BadMessage(f"unknown task {str(task)[:80]!r}; this worker runs {', '.join(sorted(TASK_SCHEMAS))}")
    if envelope.get("content-type") != "application/json":
        raise BadMessage(f"content type {str(envelope.get('content-type'))[:80]!r} is not application/json")
    body = _body_bytes(envelope, properties)
    try:
        decoded = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise BadMessage("the body is not JSON") from None
    if not (isinstance(decoded, list) and len(decoded) == 3 and isinstance(decoded[0], list)
            and isinstance(decoded[1], dict) and isinstance(decoded[2], dict)):
        raise BadMessage("the body is not [args, kwargs, options]")
    args, kwargs, _options = decoded
    schema = TASK_SCHEMAS[task]
    if problem := schema.args(args):
        raise BadMessage(f"{task} {problem}")
    for name, value in kwargs.items():
        expected = schema.kwargs.get(name)
        if expected is None:
            raise BadMessage(f"{task} takes no argument {str(name)[:40]!r}")
        if type(value) is not expected:
            raise BadMessage(f"{task} argument {name!r} must be {expected.__name__}, got {type(value).__name__}")


def _body_bytes(envelope: dict, properties: dict) -> bytes:
    body = envelope.get("body")
    if not isinstance(body, str):
        raise BadMessage("the body is not text")
    encoding = properties.get("body_encoding")
    if encoding == "base64":
        try:
            return base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise BadMessage("the body is not valid base64") from None
    if encoding in (None, "utf-8"):
        return body.encode()
    raise BadMessage(f"body encoding {str(encoding)[:40]!r} is not base64")


def dead_letter(client, *, queue: str | None, reason: str, raw: str) -> None:
    """Log the rejected message once and keep an excerpt where an operator can read it."""
    log.error("dropped a message from queue %s: %s (kept in the broker list %s)", queue or "?", reason,
              DEAD_LETTER_KEY)
    record = json.dumps({"at": time.time(), "queue": queue, "reason": reason,
                         "excerpt": raw[:_DEAD_LETTER_EXCERPT], "bytes": len(raw)})
    try:
        with client.pipeline() as pipe:
            pipe.lpush(DEAD_LETTER_KEY, record).ltrim(DEAD_LETTER_KEY, 0, DEAD_LETTER_KEEP - 1).execute()
    except Exception as exc:  # the message is dropped either way; losing the copy must not stop the worker
        log.warning("could not keep the dropped message in %s (%s)", DEAD_LETTER_KEY, type(exc).__name__)


class ValidatingChannel(kombu_redis.Channel):
    """kombu's Redis channel, except that an envelope that is not JSON is dropped, not raised."""

    def _brpop_read(self, **options):
        try:
            return super()._brpop_read(**options)
        except (json.JSONDecodeError, UnicodeDecodeError):
            # kombu decodes the envelope just before delivering it; BRPOP has already taken it off
            # the list, so there is nothing to acknowledge and nothing left to copy.
            dead_letter(self.client, queue=None, reason="the envelope is not JSON", raw="")
            return True


class ValidatingTransport(kombu_redis.Transport):
    """kombu's Redis transport whose every delivered message passed :func:`check_envelope`."""

    Channel = ValidatingChannel

    def _deliver(self, message, queue):
        if queue in QUEUES:
            try:
                check_envelope(message)
            except BadMessage as exc:
                raw = json.dumps(message)[:_DEAD_LETTER_EXCERPT] if _jsonable(message) else repr(message)[:200]
                dead_letter(self._dead_letter_client(), queue=queue, reason=str(exc), raw=raw)
                return
        super()._deliver(message, queue)

    def _dead_letter_client(self):
        return next(channel.client for channel in self.channels if channel)


def _jsonable(value: object) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def use_validating_transport(app) -> None:
    """Make ``app`` (the worker's Celery app) read its messages through :class:`ValidatingTransport`
    and refuse remote-control commands (fitscope sends none; any local process could)."""
    from urllib.parse import urlsplit

    scheme = urlsplit(app.conf.broker_url).scheme
    app.conf.broker_transport = f"{__name__}:ValidatingTransport"
    if scheme == "rediss" and not app.conf.broker_use_ssl:
        import ssl

        # What kombu does for rediss:// without options (it checks no certificate) but no longer
        # implied once the transport is named; certificates are checked where broker_use_ssl says so.
        app.conf.broker_use_ssl = {"ssl_cert_reqs": ssl.CERT_NONE}
    app.conf.worker_enable_remote_control = False
