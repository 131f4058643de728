"""``python -m apimart_async.testing``: serve a ``FakeApimart`` over HTTP in the foreground.

For benchmarks and demos in another process. Once the socket listens, two lines are
printed (and flushed) to stdout, so a parent process can read the URL even with
``--port 0``: ``APIMART_FAKE_URL=http://HOST:PORT`` first (what benchmarks parse), then
``APIMART_BASE_URL=http://HOST:PORT``, the variable the client and the ``apimart``
command read, so ``export`` of that line points them at the fake. SIGTERM and SIGINT shut the
server down gracefully and exit with status 0. Counters and task timings are at
``GET /_fake/stats``; ``POST /_fake/reset`` zeroes them.

Request recording is off here (it would grow without bound in a long benchmark);
the counters are always kept. The server sends webhook callbacks itself (real HTTP;
``--webhook-rewrite`` routes a public URL to a local listener). With ``--state FILE``
the fake's tasks, uploads, keys and balance survive a restart (even ``kill -9``).
Needs the ``server`` extra (uvicorn).

What can go wrong: invalid options exit with status 2 and argparse's message; a port
already in use exits with status 1 and says so on stderr; nothing but the two URL
lines is ever written to stdout, so a parent can parse them blindly.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import TYPE_CHECKING, NoReturn, TypeVar, cast

from ._fake import FakeApimart, files_origin
from ._options import Latency, Variants, Webhooks
from ._state import canonical_faults

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from types import FrameType

_V = TypeVar("_V")


def build_parser() -> argparse.ArgumentParser:
    """The command line (see ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m apimart_async.testing",
        description="Serve a fake APIMart image API over HTTP (for benchmarks and demos).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port; 0 picks a free one (0)")
    parser.add_argument("--api-key", default="test", help="the accepted Bearer key (test)")
    parser.add_argument(
        "--latency",
        default="fast",
        help="fast | zero | fixed:SECONDS | realistic[:MEDIAN] (fast)",
    )
    parser.add_argument(
        "--time-scale", type=float, default=None, help="real seconds per service second"
    )
    parser.add_argument(
        "--request-latency",
        default=None,
        metavar="LO[,HI]",
        help="real seconds slept before answering each request, uniform in [LO, HI]",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument(
        "--faults",
        default=None,
        metavar="JSON",
        help='Faults fields, e.g. \'{"rate_limit": 0.05, "only": ["submit"]}\', '
        'or per endpoint: \'{"poll": {"server_error": 0.1}}\'',
    )
    parser.add_argument(
        "--variants",
        default=None,
        metavar="JSON",
        help='Variants fields, e.g. \'{"submit_shape": "object", "url_shape": "string"}\'',
    )
    parser.add_argument(
        "--ignore-idempotency",
        action="store_true",
        help="create a new task for every submit, even with a known Idempotency-Key",
    )
    parser.add_argument("--accept-unknown-models", action="store_true", help="accept any model id")
    parser.add_argument(
        "--files-host",
        default=None,
        help="host name in upload/result URLs (default: the other name of loopback)",
    )
    parser.add_argument(
        "--record-requests", action="store_true", help="keep a log of every request"
    )
    parser.add_argument(
        "--no-store-uploads",
        action="store_true",
        help="do not keep uploaded bytes (GETs of upload URLs serve a tiny PNG)",
    )
    parser.add_argument(
        "--balance",
        type=float,
        default=None,
        metavar="USD",
        help="the key's balance; submits it cannot pay are refused with 402 (unlimited)",
    )
    parser.add_argument(
        "--price",
        action="append",
        default=[],
        metavar="MODEL=USD",
        help="price per image of MODEL (repeatable; default: the built-in prices)",
    )
    parser.add_argument(
        "--payment-required-on-reads",
        action="store_true",
        help="answer 402 to reads too while the balance is exhausted",
    )
    parser.add_argument(
        "--webhooks",
        default=None,
        metavar="JSON",
        help='Webhooks fields, e.g. \'{"drop": 0.01, "duplicate": 0.05, "delay": 1}\'',
    )
    parser.add_argument(
        "--webhook-rewrite",
        action="append",
        default=[],
        metavar="FROM=TO",
        help="send callbacks for URLs starting with FROM to TO instead (repeatable)",
    )
    parser.add_argument(
        "--state",
        default=None,
        metavar="FILE",
        help="keep the fake's state in FILE and continue from it if it exists",
    )
    return parser


def fake_from_args(args: argparse.Namespace) -> FakeApimart:
    """Build the fake the parsed command line describes (``ValueError`` if invalid)."""
    latency = Latency.parse(args.latency, time_scale=args.time_scale)
    if args.request_latency:
        low, _, high = str(args.request_latency).partition(",")
        latency = latency.with_request_latency(float(low), float(high or low))
    faults = canonical_faults(_json_object(args.faults, "--faults")) if args.faults else None
    variants = (
        Variants.from_dict(_json_object(args.variants, "--variants")) if args.variants else None
    )
    webhooks = (
        Webhooks.from_dict(_json_object(args.webhooks, "--webhooks")) if args.webhooks else None
    )
    return FakeApimart(
        api_key=args.api_key,
        latency=latency,
        faults=faults,
        variants=variants,
        honour_idempotency=not args.ignore_idempotency,
        accept_unknown_models=args.accept_unknown_models,
        seed=args.seed,
        record_requests=args.record_requests,
        store_uploads=not args.no_store_uploads,
        balance=args.balance,
        prices=_pairs(args.price, "--price", float),
        payment_required_on_reads=args.payment_required_on_reads,
        webhooks=webhooks,
        state_path=args.state,
    )


def webhook_rewrites(args: argparse.Namespace) -> dict[str, str]:
    """The ``--webhook-rewrite FROM=TO`` pairs as a prefix mapping."""
    return _pairs(args.webhook_rewrite, "--webhook-rewrite", str)


def _pairs(items: list[str], option: str, convert: Callable[[str], _V]) -> dict[str, _V]:
    out: dict[str, _V] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{option} needs NAME=VALUE, got {item!r}")
        try:
            out[name] = convert(value)
        except ValueError:
            raise ValueError(f"{option} {item!r}: {value!r} is not valid") from None
    return out


def _json_object(text: str, option: str) -> dict[str, object]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{option} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise TypeError(f"{option} must be a JSON object")
    return cast("dict[str, object]", value)


def _exit_cleanly(signum: int, frame: FrameType | None) -> NoReturn:
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        fake = fake_from_args(args)
        rewrites = webhook_rewrites(args)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    try:
        from uvicorn.config import LOGGING_CONFIG

        from ._server import api_origin, hide_drops, make_server
        from ._sockets import bind
    except ImportError:
        sys.stderr.write("the fake server needs uvicorn: pip install 'apimart-async[server]'\n")
        return 2

    try:
        sock = bind(args.host, args.port)
    except OSError as exc:
        sys.stderr.write(f"cannot listen on {args.host}:{args.port}: {exc}\n")
        return 1
    port: int = sock.getsockname()[1]
    url = api_origin(args.host, port)
    fake.use_files_base_url(files_origin(args.host, port, args.files_host))
    fake.use_webhook_target(rewrite=rewrites or None)

    def announce() -> None:
        sys.stdout.write(f"APIMART_FAKE_URL={url}\nAPIMART_BASE_URL={url}\n")
        sys.stdout.flush()

    server = make_server(fake.app, log_config=LOGGING_CONFIG, graceful_timeout=5, on_ready=announce)
    # uvicorn handles the signals while it runs and re-raises them once it has shut
    # down; these handlers turn that (or a signal before startup) into a clean exit.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    signal.signal(signal.SIGINT, _exit_cleanly)
    try:
        with hide_drops():
            server.run(sockets=[sock])
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
