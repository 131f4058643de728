"""Building the client the command line asks for: the real API, or the embedded fake.

Configuration comes from flags, then ``APIMART_API_KEY`` / ``APIMART_BASE_URL`` (the
client reads those itself). ``--fake`` (and ``apimart demo``) use an in-process
``FakeApimart`` whose clock and the client's poll schedule are scaled by the same
*time_scale*, so a "15 s" task takes 1.5 s and is polled on the same, faster, schedule.

The embedded fake keeps its state (tasks, uploads, idempotency keys, balance) in the
command's output folder, ``FAKE_STATE_NAME`` in ``--out DIR`` (``task``: its
``--download`` folder, default the current directory), so stopping a ``--fake`` run
and starting it again continues the same tasks, as a real service would.
``--fake-balance USD`` gives the fake key a limited balance (402 once it is spent); on
a rerun it tops the kept balance up to USD.

``Runtime`` is what the command line does not choose: tests pass a ``FakeApimart`` of
their own (to read its counters afterwards) and an event spy.

A batch watches its own submits through the client's ``SubmittingEvent`` (every
attempt's ``Idempotency-Key`` and exact body, just before it goes on the wire), so the
journal can tell "never sent" from "maybe created a task".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast, get_args

from apimart_async import (
    DEFAULT_WAIT_TIMEOUT,
    AsyncApimart,
    Limits,
    MissingAPIKeyError,
    PollPolicy,
    RetryPolicy,
)
from apimart_async.testing import Endpoint, FakeApimart, Faults, FaultsSpec, Latency

from ._args import FAKE_STATE_NAME

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable
    from pathlib import Path

    from apimart_async import Event

__all__ = [
    "DEFAULT_FAKE_SCALE",
    "FAKE_API_KEY",
    "ClientOptions",
    "Runtime",
    "UsageError",
    "make_client",
    "make_fake",
]

FAKE_API_KEY = "fake"
"""The embedded fake's key (a journal made with ``--fake`` is bound to it)."""
DEFAULT_FAKE_SCALE = 0.1
"""Real seconds per service second in the embedded fake: a 15 s task takes 1.5 s."""
# The fake's request latency, in service seconds.
_FAKE_REQUEST_LATENCY = (0.2, 1.0)
_MIN_FAKE_WAIT = 60.0
_MISSING_KEY = (
    "no API key. Set it with `export APIMART_API_KEY=sk-...` (or pass --api-key KEY); "
    "to try things without one, add --fake or run `apimart demo`"
)


class UsageError(Exception):
    """A problem with the command line or the configuration (exit status 2)."""


@dataclass
class Runtime:
    """What the command line does not choose (tests set these)."""

    fake: FakeApimart | None = None
    """Use this fake instead of the network (as ``--fake`` does, but a persistent one)."""
    on_event: Callable[[Event], object] | None = None
    """Called with every client event, after the journal has recorded it."""


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """The client-related flags of one command."""

    api_key: str | None = None
    base_url: str | None = None
    fake: bool = False
    fake_latency: str | None = None
    fake_faults: str | None = None
    fake_balance: float | None = None
    time_scale: float | None = None
    seed: int = 0
    poll_rps: float | None = None
    timeout: float | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ClientOptions:
        """Pick the fields this command has out of *args*."""
        names = cls.__dataclass_fields__
        return cls(**{n: getattr(args, n) for n in names if getattr(args, n, None) is not None})


def make_fake(options: ClientOptions, state_dir: Path | None = None) -> FakeApimart:
    """The embedded fake ``--fake`` describes (realistic latency, scaled, no faults),
    keeping its state in *state_dir* (created if needed) when given."""
    scale = options.time_scale or DEFAULT_FAKE_SCALE
    try:
        if options.fake_latency:
            # fast and zero mean what they say; other profiles run 1/scale times faster.
            own = options.fake_latency in ("fast", "zero") and not options.time_scale
            latency = Latency.parse(options.fake_latency, time_scale=None if own else scale)
        else:
            low, high = _FAKE_REQUEST_LATENCY
            latency = Latency.realistic(
                time_scale=scale, request_latency=(low * scale, high * scale)
            )
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--fake-latency: {exc}") from None
    try:
        faults = _faults(options.fake_faults) if options.fake_faults else None
    except (ValueError, TypeError) as exc:
        # The fake's own words name its class ("Faults.rate_limit"): name the flag.
        raise UsageError(f"--fake-faults: {str(exc).replace('Faults.', '')}") from None
    state: Path | None = None
    if state_dir is not None:
        state = state_dir / FAKE_STATE_NAME
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the output folder {str(state_dir)!r}: {exc}") from None
    try:
        fake = FakeApimart(
            api_key=FAKE_API_KEY,
            latency=latency,
            faults=faults,
            seed=options.seed,
            balance=options.fake_balance,
            state_path=state,
        )
    except (ValueError, OSError) as exc:
        raise UsageError(
            f"cannot use the fake service's state file {str(state)!r}: {exc} (delete it to "
            "start the fake afresh)"
        ) from None
    if options.fake_balance is not None and state is not None:
        fake.set_balance(options.fake_balance)  # a kept balance wins over the constructor's
    return fake


def _faults(text: str) -> FaultsSpec:
    try:
        data: object = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise TypeError("must be a JSON object of fault probabilities")
    spec = cast("dict[str, Any]", data)
    if spec and all(k in get_args(Endpoint) for k in spec):
        return {k: Faults.from_dict(v) for k, v in spec.items()}  # type: ignore[misc]
    return Faults.from_dict(spec)


def make_client(
    options: ClientOptions, runtime: Runtime, *, state_dir: Path | None = None
) -> tuple[AsyncApimart, FakeApimart | None]:
    """The client for *options*, and the fake it talks to (None for the real API).

    *state_dir*: where ``--fake`` keeps the embedded fake's state (the output folder).
    Raises ``UsageError`` for a missing key or a bad base URL.
    """
    fake = runtime.fake or (make_fake(options, state_dir) if options.fake else None)
    limits = Limits(poll_rate=options.poll_rps) if options.poll_rps else None
    kwargs: dict[str, Any] = {"limits": limits, "wait_timeout": options.timeout}
    if fake is not None:
        scale = options.time_scale or fake.latency.time_scale or 1.0
        kwargs.update(
            transport=fake.transport(),
            api_key=fake.api_key,
            poll=PollPolicy().scaled(scale),
            retry=RetryPolicy(wait_initial=0.5 * scale, wait_max=20 * scale, wait_jitter=scale),
            limits=limits or Limits(poll_rate=10_000.0, poll_burst=1_000),
            # Scaled like the fake's clock, but never below a minute of real time: a
            # loaded machine's overheads do not shrink with the scale.
            wait_timeout=options.timeout or max(DEFAULT_WAIT_TIMEOUT * scale, _MIN_FAKE_WAIT),
        )
    else:
        kwargs.update(api_key=options.api_key, base_url=options.base_url)
        if options.time_scale:  # for benchmarks and tests against a local fake server
            kwargs["poll"] = PollPolicy().scaled(options.time_scale)
        if options.timeout is None:
            del kwargs["wait_timeout"]
    if kwargs["limits"] is None:
        del kwargs["limits"]
    try:
        client = AsyncApimart(**kwargs)
    except MissingAPIKeyError:
        raise UsageError(_MISSING_KEY) from None
    except ValueError as exc:
        text = str(exc)
        if text.startswith("base_url"):  # the client's own name for it
            text = "--base-url (or APIMART_BASE_URL)" + text.removeprefix("base_url")
        raise UsageError(text) from None
    return client, fake
