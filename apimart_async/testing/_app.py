"""The fake APIMart service as one raw ASGI 3 application.

Both ways of running the fake (the in-process httpx transport and uvicorn) call this
same app, so their behaviour cannot drift. It is plain Python on purpose: no
framework, no pydantic, small dicts through ``json.dumps``, routing by string
comparison, so that in a benchmark the client, not the fake, is what is measured.

One request goes through: routing -> fault decision (script, then probability) ->
counters and recording -> optional request latency -> either a fault response or the
real handler (auth, validation, state change) -> optional after-the-fact fault
(stall, drop, malformed body) -> the response. The faults that say "nothing was done"
(reset, 429, 5xx, channel failure, error in 200) never reach a handler, so they never
create a task; the ambiguous ones (stall, drop_after_submit, malformed_json) run the
handler first. Which shape each body takes is chosen by ``Variants``.

Endpoints: uploads, submits (which reserve the task's price, or answer 402), task
queries (English messages unless ``language`` says otherwise), result files, the
balance reads of §10 (``/v1/balance``, ``/v1/user/balance`` and their aliases) and
``GET /v1/model-schema`` (``_schema``). The same body a task query answers is what a
webhook callback carries (``task_data``). An ASGI server that runs the app's lifespan
gets a webhook sender for as long as it runs (``_webhooks``).

What can go wrong: the app raises ``ConnectionDrop`` on purpose to drop a connection
(see ``_asgi``); any other exception escaping it is a bug in the fake.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qs, quote

import anyio

from ._asgi import ConnectionDrop, DropKind, Message, Receive, Scope, Send
from ._billing import CREDITS_PER_USD
from ._images import RESULT_PNG, sniff_image_type
from ._multipart import MultipartError, boundary_of, parse_multipart
from ._options import ENDPOINTS, Endpoint, Fault
from ._schema import OPERATION, describes, model_schema
from ._state import (
    MODELS,
    UNKNOWN_MODEL,
    RecordedRequest,
    State,
    StoredUpload,
    canonical_faults,
)
from ._webhooks import open_sender, payload_bytes

if TYPE_CHECKING:
    from ._billing import Balance
    from ._task import FakeTask

__all__ = ["FILES_PREFIX", "MAX_UPLOAD_BYTES", "App"]

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
RESULT_TTL = 86_400
RESPONSE_VERSION_HEADER = "x-apimart-response-version"

UPLOAD_PATH = "/v1/uploads/images"
SUBMIT_PATH = "/v1/images/generations"
TASKS_PREFIX = "/v1/tasks/"
FILES_PREFIX = "/f/"
ADMIN_PREFIX = "/_fake/"
SCHEMA_PATH = "/v1/model-schema"
# §10: the key's balance and the account's, each with an alias outside /v1.
BALANCE_PATHS = frozenset({"/v1/balance", "/balance", "/v1/user/balance", "/user/balance"})

# Documented per-status error types (apimart-api.md §7.1).
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "payment_required",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "bad_gateway",
    503: "server_error",
    504: "server_error",
}
# String codes for Variants(error_code="string"); a real 400 was seen with code "".
_STRING_CODE_BY_STATUS = {
    400: "",
    402: "insufficient_balance",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    413: "file_too_large",
    429: "rate_limit_exceeded",
    500: "internal_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}
_DEFAULT_MESSAGES = {
    400: "Bad request",
    402: "insufficient balance",
    403: "You do not have permission to use this model",
    404: "Not found",
    409: "Conflict",
    429: "Rate limit exceeded, please try again later",
    500: "Internal server error",
    502: "Bad gateway",
    503: "Please wait and try again later",
    504: "Gateway timeout",
}
_CHANNEL_FAILED_MESSAGE = "Please wait and try again later. Thank you for your patience!"
_BALANCE_FAILED_MESSAGE = "Failed to get token info"
# §6.1: English by default; the documented Chinese text with language=zh. Languages we
# have no observed text for get the English one.
_INVALID_TASK_MESSAGES = {"en": "Invalid task ID", "zh": "无效的任务ID"}

_JSON = b"application/json"
_HTML = b"text/html; charset=utf-8"
_TEXT = b"text/plain; charset=utf-8"
_TRUNCATED_SEED = b'{"code":200,"data":{"status":"completed"}}'
_MALFORMED_HTML = (
    b"<html><head><title>502 Bad Gateway</title></head><body>"
    b"<center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
)


@dataclass(slots=True)
class _Response:
    status: int
    body: bytes
    content_type: bytes = _JSON
    headers: list[tuple[bytes, bytes]] | None = None
    # Wait for this event (at most this many seconds) before answering.
    hold: tuple[anyio.Event, float] | None = None


class _ClientGone(Exception):
    """The client disconnected before we read its whole request."""


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _json(status: int, obj: object, headers: list[tuple[bytes, bytes]] | None = None) -> _Response:
    return _Response(status, _dumps(obj), _JSON, headers)


# The endpoints faults can be injected on, by route name.
_FAULT_SCOPES: dict[str, Endpoint] = {e: e for e in ENDPOINTS}


def _route(method: str, path: str) -> tuple[Endpoint | str, bool]:
    """The endpoint a request is for, and whether its method is the right one."""
    if path in BALANCE_PATHS:
        return "balance", method == "GET"
    if path == SCHEMA_PATH:
        return "schema", method == "GET"
    if path == SUBMIT_PATH:
        return "submit", method == "POST"
    if path.startswith(TASKS_PREFIX) and "/" not in path[len(TASKS_PREFIX) :]:
        return "poll", method == "GET"
    if path.startswith(FILES_PREFIX):
        return "download", method in ("GET", "HEAD")
    if path == UPLOAD_PATH:
        return "upload", method == "POST"
    if path.startswith(ADMIN_PREFIX):
        return "admin", True
    return "other", True


def _sanitise_filename(filename: str | None, content_type: str) -> str:
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()[:120]
    return name or "upload." + content_type.rpartition("/")[2].replace("jpeg", "jpg")


class App:
    """The ASGI callable (``FakeApimart.app``) over one fake's ``State``."""

    __slots__ = ("state",)

    def __init__(self, state: State) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            try:
                await self._http(scope, receive, send)
            except _ClientGone:
                return
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    # -- the request pipeline -------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        path: str = scope["path"]
        endpoint, method_ok = _route(method, path)
        if endpoint == "admin":
            body = await _read_body(receive)
            await _send(send, self._admin(method, path, _query(scope), body), method)
            return
        state = self.state
        fault: Fault | int | None = None
        scoped = _FAULT_SCOPES.get(endpoint)
        if method_ok and scoped is not None:
            fault = state.next_request_fault(scoped)
            if fault is Fault.CONNECT_ERROR:
                # Never reached the service: no counters, no record, nothing done.
                state.count_fault(fault.value)
                await _drop(send, "connect_error")

        headers = _headers(scope)
        body = await _read_body(receive)
        stats = state.stats
        stats.requests_total += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        if endpoint == "upload":
            stats.uploads += 1
        elif endpoint == "submit":
            stats.submits += 1
        elif endpoint == "poll":
            stats.polls += 1
        elif endpoint == "download":
            stats.downloads += 1
            if "authorization" in headers:
                stats.file_requests_with_auth += 1
        elif endpoint == "balance":
            stats.balance_reads += 1
        elif endpoint == "schema":
            stats.schema_reads += 1

        record: RecordedRequest | None = None
        if state.record_requests:
            auth = headers.get("authorization")
            shown = dict(headers)
            if auth is not None:
                shown["authorization"] = "Bearer ***" if auth.startswith("Bearer ") else "***"
            record = RecordedRequest(
                method=method,
                host=headers.get("host", ""),
                path=path,
                query=_query(scope),
                headers=shown,
                authorized=auth is not None,
                endpoint=endpoint,
                body_size=len(body),
                started=state.clock(),
                idempotency_key=headers.get("idempotency-key"),
            )
            state.requests.append(record)
        fault_name = _fault_name(fault)
        try:
            low, high = state.latency.request_latency
            if high > 0:
                await anyio.sleep(low if low == high else state.rng.uniform(low, high))
            if fault_name is not None:
                state.count_fault(fault_name)
                if record is not None:
                    record.fault = fault_name
            if fault is Fault.RESET:
                await _drop(send, "reset")
            response = self._fault_response(fault, endpoint)
            if response is None:
                if not method_ok:
                    response = self._error(405, f"Method {method} not allowed for {path}")
                else:
                    response = self._handle(endpoint, method, path, scope, headers, body, record)
                if fault is Fault.STALL:
                    seconds = state.faults_by_endpoint[cast("Endpoint", endpoint)].stall_seconds
                    if await _stall(receive, seconds):
                        return  # the client hung up while we held the answer back
                if fault is Fault.DROP_AFTER_SUBMIT:
                    await _drop(send, "drop_after")
                if fault is Fault.MALFORMED_JSON:
                    response = self._malformed(response)
                if response.hold is not None:
                    # Webhooks.callback_first: the callback goes out before this answer.
                    event, bound = response.hold
                    with anyio.move_on_after(bound):
                        await event.wait()
            if record is not None:
                record.status = response.status
            stats = state.stats
            stats.status_counts[response.status] = stats.status_counts.get(response.status, 0) + 1
            if response.status == 402:
                stats.payment_required += 1
            await _send(send, response, method)
        finally:
            state.stats.in_flight -= 1
            if record is not None:
                record.finished = state.clock()

    def _handle(
        self,
        endpoint: str,
        method: str,
        path: str,
        scope: Scope,
        headers: dict[str, str],
        body: bytes,
        record: RecordedRequest | None,
    ) -> _Response:
        if endpoint == "download":
            return self._download(path, method)
        if endpoint == "other":
            return self._error(404, f"Invalid URL ({method} {path})")
        denied = self._check_auth(headers, balance=endpoint == "balance")
        if denied is not None:
            return denied
        if endpoint == "balance":
            return self._balance()
        if endpoint == "submit":
            return self._submit(headers, body, record)
        if self.state.reads_refused():
            # Observed: a key with nothing left gets 402 even on reads (§7.2); opt-in.
            return self._error(402, _DEFAULT_MESSAGES[402])
        if endpoint == "poll":
            return self._poll(path[len(TASKS_PREFIX) :], _query(scope))
        if endpoint == "schema":
            return self._schema(_query(scope))
        return self._upload(headers, body, record)

    # -- errors and faults ----------------------------------------------------------

    def _error(
        self, status: int, message: str, *, code: str | None = None, type: str | None = None
    ) -> _Response:
        """The service's error envelope for *status*, shaped by ``Variants.error_code``.

        A fixed string *code* (``get_channel_failed``, ``idempotency_key_reused``) is
        sent as is, whatever the variant.
        """
        text = f"{message} (request id: {self.state.request_id()})"
        shape = self.state.variants.error_code
        if code is not None:
            error: object = {"code": code, "message": text, "param": "", "type": type}
        elif shape == "int":
            error = {
                "code": status,
                "message": text,
                "param": "",
                "type": _TYPE_BY_STATUS.get(status, "apimart_error"),
            }
        elif shape == "string":
            code_text = _STRING_CODE_BY_STATUS.get(status, "")
            error = {"code": code_text, "message": text, "param": "", "type": "apimart_error"}
        else:
            error = text
        return _json(status, {"error": error})

    def _fault_response(self, fault: Fault | int | None, endpoint: str) -> _Response | None:
        """The response of a fault that means "nothing was done", else None."""
        if fault is None:
            return None
        state = self.state
        if isinstance(fault, int):
            return self._error(fault, _DEFAULT_MESSAGES.get(fault, "Error"))
        faults = state.faults_by_endpoint[cast("Endpoint", endpoint)]
        if fault is Fault.RATE_LIMIT:
            response = self._error(429, _DEFAULT_MESSAGES[429])
            if faults.retry_after is not None:
                response.headers = [(b"retry-after", _retry_after(faults.retry_after))]
            return response
        if fault is Fault.SERVER_ERROR:
            status = state.rng.choice(faults.server_error_statuses)
            return self._error(status, _DEFAULT_MESSAGES.get(status, "Server error"))
        if fault is Fault.CHANNEL_FAILED:
            status = state.rng.choice(faults.channel_failed_statuses)
            return self._error(
                status, _CHANNEL_FAILED_MESSAGE, code="get_channel_failed", type="apimart_error"
            )
        if fault is Fault.ERROR_IN_200:
            response = self._error(500, "upstream service error")
            response.status = 200
            return response
        if fault is Fault.BALANCE_FAILED:
            return _json(200, {"success": False, "message": _BALANCE_FAILED_MESSAGE})
        return None

    def _malformed(self, response: _Response) -> _Response:
        """A 200 a broken gateway might send instead: truncated JSON or an HTML page."""
        if self.state.rng.random() < 0.5:
            body = response.body if response.content_type == _JSON else _TRUNCATED_SEED
            return _Response(200, body[: max(1, len(body) // 2)], _JSON)
        return _Response(200, _MALFORMED_HTML, _HTML)

    def _check_auth(self, headers: dict[str, str], *, balance: bool = False) -> _Response | None:
        auth = headers.get("authorization")
        rid = self.state.request_id()
        if auth is None or not auth.strip():
            message = f"API key is required (request id: {rid})"
            return _json(401, {"error": {"message": message, "type": "apimart_error"}})
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or key.strip() != self.state.api_key:
            message = f"invalid API key (request id: {rid})"
            if balance:  # the /v1/balance variant has no code and no param (§7.2)
                return _json(401, {"error": {"message": message, "type": "apimart_error"}})
            error = {"code": "", "message": message, "param": "", "type": "apimart_error"}
            return _json(401, {"error": error})
        return None

    # -- endpoints ------------------------------------------------------------------

    def _upload(
        self, headers: dict[str, str], body: bytes, record: RecordedRequest | None
    ) -> _Response:
        boundary = boundary_of(headers.get("content-type", ""))
        if boundary is None:
            return self._error(400, "Missing file field")
        try:
            parts = parse_multipart(body, boundary)
        except MultipartError:
            return self._error(400, "Missing file field")
        part = next((p for p in parts if p.name == "file"), None)
        if part is None:
            return self._error(400, "Missing file field")
        data = part.data
        if record is not None:
            record.filename = part.filename
        if len(data) > MAX_UPLOAD_BYTES:
            return self._error(413, "File too large (max 20MB)")
        content_type = sniff_image_type(data)
        if content_type is None:
            return self._error(
                400, "Unsupported file format; supported formats: JPEG, PNG, WebP, GIF"
            )
        state = self.state
        name = _sanitise_filename(part.filename, content_type)
        unix = state.unix()
        key = f"image/{int(unix * 1000)}-{state.rng.getrandbits(32):08x}-{name}"
        state.add_upload(
            key,
            StoredUpload(
                data if state.store_uploads else RESULT_PNG,
                content_type if state.store_uploads else "image/png",
            ),
        )
        return _json(
            200,
            {
                "url": f"{state.files_base_url}{FILES_PREFIX}{quote(key)}",
                "filename": name,
                "content_type": content_type,
                "bytes": len(data),
                "created_at": int(unix),
            },
        )

    def _submit(
        self, headers: dict[str, str], body: bytes, record: RecordedRequest | None
    ) -> _Response:
        try:
            parsed: object = json.loads(body)
        except ValueError:
            return self._error(400, "Invalid JSON body")
        if not isinstance(parsed, dict):
            return self._error(400, "The request body must be a JSON object")
        data = cast("dict[str, Any]", parsed)
        if record is not None:
            record.json_body = data
        state = self.state

        model = data.get("model")
        if not isinstance(model, str) or not model:
            return self._error(400, "model is required")
        rules = MODELS.get(model)
        if rules is None:
            if not state.accept_unknown_models:
                return self._error(400, f"model {model} is not supported")
            rules = UNKNOWN_MODEL
        prompt = data.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            return self._error(400, "prompt is required")
        n = data.get("n", 1)
        if type(n) is not int:
            return self._error(400, "n must be a number, not a string or other type")
        if not 1 <= n <= rules.max_n:
            return self._error(400, f"n must be between 1 and {rules.max_n} for {model}")
        raw_urls = data.get("image_urls")
        if raw_urls is None:
            urls: tuple[str, ...] = ()
        elif isinstance(raw_urls, list) and all(isinstance(u, str) for u in raw_urls):  # pyright: ignore[reportUnknownVariableType]
            urls = tuple(cast("list[str]", raw_urls))
        else:
            return self._error(400, "image_urls must be an array of strings")
        if rules.family == "imagen" and urls:
            return self._error(400, "google_imagen4 currently supports text-to-image only")
        if rules.family == "flux" and len(urls) > rules.max_images:
            return self._error(400, f"{model} supports at most 1 input image")
        if len(urls) > rules.max_images:
            return self._error(400, f"{model} supports at most {rules.max_images} input images")

        raw_webhook = data.get("webhook")
        if raw_webhook is not None and not isinstance(raw_webhook, str):
            return self._error(400, "webhook must be a string (a public http(s) base URL)")
        webhook = raw_webhook.strip() if raw_webhook else None

        key = headers.get("idempotency-key")
        body_hash = ""
        honour = state.honour_idempotency and key is not None
        if key is not None:
            if honour and not (1 <= len(key) <= 191 and all(33 <= ord(c) <= 126 for c in key)):
                return self._error(400, "Idempotency-Key must be 1-191 visible ASCII characters")
            canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            body_hash = hashlib.sha256(canonical.encode()).hexdigest()
        if honour and key is not None:
            previous = state.idempotency.get(key)
            if previous is not None:
                previous_hash, task_id = previous
                if previous_hash != body_hash:
                    state.stats.conflicts += 1
                    return self._error(
                        409,
                        "Idempotency-Key was already used with a different request body",
                        code="idempotency_key_reused",
                        type="invalid_request_error",
                    )
                state.stats.replays += 1
                task = state.tasks[task_id]
                if record is not None:
                    record.task_id = task.id
                return _json(200, task.submit_response, [(b"idempotency-replayed", b"true")])

        # The price is reserved now and refunded if the task fails (§6.2, §7.3).
        if not state.can_afford(state.price_micro(model, rules) * n):
            return self._error(402, _DEFAULT_MESSAGES[402])
        shape = state.variants.submit_shape
        if shape == "auto":
            shape = "versioned" if RESPONSE_VERSION_HEADER in headers else "list"
        task = state.create_task(
            model=model,
            prompt=prompt,
            n=n,
            image_urls=urls,
            rules=rules,
            idempotency_key=key,
            body_hash=body_hash,
            register_key=honour,
            answer=lambda t: self._submit_body(t, shape),
            webhook=webhook,
            instant=shape == "result",
        )
        if record is not None:
            record.task_id = task.id
        if shape == "result" and task.terminal:
            task.detected_at = task.created_at  # the answer itself reports the end
        extra: list[tuple[bytes, bytes]] | None = None
        if honour:
            extra = [(b"idempotency-replayed", b"false")]
        response = _json(200, task.submit_response, extra)
        if state.webhooks.callback_first:
            response.hold = state.dispatch.hold_for(task)
        return response

    def _submit_body(self, task: FakeTask, shape: str) -> dict[str, Any]:
        state = self.state
        if shape == "list":
            return {"code": 200, "data": [{"status": "submitted", "task_id": task.id}]}
        if shape == "object":
            return {
                "code": 200,
                "data": {
                    "created": task.created_unix,
                    "id": task.id,
                    "model": task.model,
                    "object": "image.generation.task",
                    "progress": 0,
                    "status": "pending",
                    "task_info": {"can_cancel": True, "estimated_time": task.estimated_time},
                    "type": "image",
                },
            }
        if shape == "top_level":
            return {"id": task.id, "status": "submitted"}
        if shape == "result" and task.terminal:
            # §3.3 D, synchronous: the finished task itself, as a query would show it.
            data = {"object": "generation.result", **self.task_data(task, state.clock())}
            return {"code": 200, "request_id": state.request_id(), "data": data}
        return {
            "code": 200,
            "request_id": state.request_id(),
            "data": {"id": task.id, "status": "submitted", "object": "generation.task"},
        }

    def _poll(self, task_id: str, query: str) -> _Response:
        state = self.state
        task = state.tasks.get(task_id)
        if task is None:
            language = parse_qs(query).get("language", ["en"])[0] if query else "en"
            message = _INVALID_TASK_MESSAGES.get(language, _INVALID_TASK_MESSAGES["en"])
            return self._error(400, message)
        now = state.clock()
        data = self.task_data(task, now)
        task.polls += 1
        by_task = state.stats.polls_by_task
        by_task[task_id] = by_task.get(task_id, 0) + 1
        if data["status"] in ("completed", "failed") and task.detected_at is None:
            task.detected_at = now
        return _json(200, {"code": 200, "data": data})

    def task_data(self, task: FakeTask, now: float) -> dict[str, Any]:
        """The ``data`` of a task query at clock time *now* (also a webhook's payload)."""
        state = self.state
        variants = state.variants
        status, progress = task.phase(now, variants, state.task_faults.unknown_status)
        data: dict[str, Any] = {
            "id": task.id,
            "status": status,
            "progress": progress,
            "created": task.created_unix,
            "estimated_time": task.estimated_time,
        }
        if status in ("completed", "failed"):
            completed = task.completed_unix
            data["completed"] = completed
            data["actual_time"] = completed - task.created_unix
            ok = status == "completed"
            if variants.include_cost:
                # A failed task is refunded: it reports zero cost (§6.1).
                data["cost"] = task.cost if ok else 0
                data["credits_cost"] = round(task.cost * CREDITS_PER_USD, 6) if ok else 0
            if ok:
                data["result"] = {"images": self._images(task, completed + RESULT_TTL)}
            else:
                data["error"] = self._task_error(task.reason or "task failed")
        return data

    def task_payload(self, task: FakeTask) -> bytes:
        """A webhook callback's body: exactly what ``GET /v1/tasks/{id}`` answers now."""
        return payload_bytes({"code": 200, "data": self.task_data(task, self.state.clock())})

    def _balance(self) -> _Response:
        """§10: ``{"success": true, "remain_balance", "used_balance", "unlimited_quota"}``."""
        state = self.state
        return _json(200, balance_body(state.balance(), state.variants.unlimited_balance))

    def _schema(self, query: str) -> _Response:
        state = self.state
        params = parse_qs(query)
        model = params.get("model", [""])[0].strip()
        operation = params.get("operation", [OPERATION])[0]
        if not model:
            return self._error(400, "model is required")
        known = model in MODELS or describes(model)
        if not known and not state.accept_unknown_models:
            return self._error(404, f"model {model} not found")
        if operation != OPERATION:
            return self._error(
                400, f"model {model} does not support operation {operation}; use {OPERATION}"
            )
        rules = MODELS.get(model, UNKNOWN_MODEL)
        return _json(
            200,
            model_schema(model, generic_n=rules.max_n, generic_images=rules.max_images),
        )

    def _images(self, task: FakeTask, expires_at: int) -> list[dict[str, Any]]:
        state = self.state
        urls = state.result_urls(task)
        shape = state.variants.url_shape
        entries: list[dict[str, Any]]
        if shape == "list":
            entries = [{"url": urls}]
        elif shape == "string":
            entries = [{"url": u} for u in urls]
        else:
            entries = [{"url": [u]} for u in urls]
        if state.variants.include_expires_at:
            for entry in entries:
                entry["expires_at"] = expires_at
        return entries

    def _task_error(self, reason: str) -> object:
        shape = self.state.variants.error_code
        if shape == "int":
            return {"code": 500, "message": reason, "type": "task_failed"}
        if shape == "string":
            return {"code": "task_failed", "message": reason, "type": "task_failed", "param": ""}
        return reason

    def _download(self, path: str, method: str) -> _Response:
        key = path[len(FILES_PREFIX) :]
        state = self.state
        stored = state.uploads.get(key)
        if stored is not None:
            return _Response(200, stored.data, stored.content_type.encode())
        if key.startswith("image/task_") and key.endswith(".png"):
            task_id, _, index = key[len("image/") : -len(".png")].rpartition("_")
            task = state.tasks.get(task_id)
            if task is not None and index.isdigit() and int(index) < task.n:
                return _Response(200, RESULT_PNG, b"image/png")
        return _Response(404, b"404 page not found", _TEXT)

    # -- lifespan -------------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """Run a webhook sender for as long as the server runs (unless one runs already).

        The server's own loop is the one that runs the app, so the sender and the
        state it reads live on one loop, as they must (see ``_webhooks``).
        """
        if (await receive())["type"] != "lifespan.startup":
            return
        state = self.state
        async with contextlib.AsyncExitStack() as stack:
            with contextlib.suppress(RuntimeError):  # a sender of the caller's runs already
                await stack.enter_async_context(
                    open_sender(
                        state,
                        self.task_payload,
                        transport=state.webhook_transport,
                        rewrite=state.webhook_rewrite,
                    )
                )
            await send({"type": "lifespan.startup.complete"})
            await _until_shutdown(receive)
        await send({"type": "lifespan.shutdown.complete"})

    # -- admin ----------------------------------------------------------------------

    def _admin(self, method: str, path: str, query: str, body: bytes) -> _Response:
        state = self.state
        name = path[len(ADMIN_PREFIX) :]
        params = parse_qs(query)
        if name == "stats" and method == "GET":
            include = params.get("tasks", ["1"])[0] not in ("0", "false", "no")
            return _json(200, state.snapshot(include_tasks=include))
        if name == "reset" and method == "POST":
            if params.get("all", ["0"])[0] in ("1", "true", "yes"):
                state.reset()
            else:
                state.reset_stats()
            return _json(200, {"ok": True})
        if name in ("script", "faults", "balance") and method == "POST":
            return self._admin_configure(name, body)
        return _json(404, {"error": {"message": f"unknown admin path {path}", "type": "fake"}})

    def _admin_configure(self, name: str, body: bytes) -> _Response:
        state = self.state
        try:
            spec = json.loads(body or b"{}")
            if not isinstance(spec, dict):
                raise TypeError("expected a JSON object")
            spec = cast("dict[str, Any]", spec)
            if name == "script":
                state.add_script(str(spec["endpoint"]), spec.get("steps", []))
            elif name == "balance":
                state.set_balance(spec["remaining"])
            else:
                state.set_faults(canonical_faults(spec))
        except (ValueError, KeyError, TypeError) as exc:
            return _json(400, {"error": {"message": str(exc), "type": "fake"}})
        return _json(200, {"ok": True})


# -- ASGI plumbing --------------------------------------------------------------------


def _headers(scope: Scope) -> dict[str, str]:
    raw: list[tuple[bytes, bytes]] = scope["headers"]
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw}


def _query(scope: Scope) -> str:
    query: bytes = scope.get("query_string", b"")
    return query.decode("latin-1")


def _fault_name(fault: Fault | int | None) -> str | None:
    if fault is None:
        return None
    return fault.value if isinstance(fault, Fault) else f"http_{fault}"


def _retry_after(seconds: float) -> bytes:
    # HTTP's delta-seconds is a non-negative integer: a fraction is rounded up, so a
    # client that waits what it is told never comes back too early.
    return str(math.ceil(seconds)).encode()


def balance_body(balance: Balance, unlimited_shape: str) -> dict[str, Any]:
    """The success body of ``GET /v1/balance`` (§10) for *balance*."""
    remaining: float = -1 if balance.remaining is None else balance.remaining
    unlimited = balance.unlimited
    if unlimited and unlimited_shape == "flag":
        remaining = 0  # only the flag says unlimited; the amount means nothing
    return {
        "success": True,
        "remain_balance": remaining,
        "used_balance": balance.used,
        "unlimited_quota": unlimited and unlimited_shape != "minus_one",
    }


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk: bytes = message.get("body", b"")
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _send(send: Send, response: _Response, method: str) -> None:
    headers = [
        (b"content-type", response.content_type),
        (b"content-length", str(len(response.body)).encode()),
    ]
    if response.headers:
        headers.extend(response.headers)
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    body = b"" if method == "HEAD" else response.body
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _drop(send: Send, kind: DropKind) -> None:
    """Start a response we never finish, then tell the host to drop the connection."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", _JSON), (b"content-length", b"64")],
        }
    )
    raise ConnectionDrop(kind)


async def _stall(receive: Receive, seconds: float) -> bool:
    """Hold the answer back for *seconds*; True if the client disconnected meanwhile."""
    with anyio.move_on_after(seconds):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return True
    return False


async def _until_shutdown(receive: Receive) -> None:
    while (await receive())["type"] != "lifespan.shutdown":
        pass
