"""What the sidecar itself answers on an HTTP/2 stream: local replies and deadlines.

An `H2Exchange` (proxy/h2_exchange.py) that cannot relay a response answers the stream
here, once, and ends with the outcome that says why:

- a gRPC caller (`content-type: application/grpc...`) gets a gRPC error: a Trailers-Only
  response with `grpc-status` (the reason's code from proxy/grpc.py, or the one given),
  `grpc-message` and `x-tether-error`;
- any other caller gets the reason's status with a JSON body `{"error", "message"}`,
  `x-tether-error` and the request's `x-request-id` (no body to a HEAD), as HTTP/1's
  local replies (proxy/local_reply.py);
- once the response started, nothing can be answered: the stream is reset.

Deadlines (`deadline_passed`): idle (no progress on the stream), the request timeout
(from the request's end to the response head, as HTTP/1), and the caller's
`grpc-timeout`, which bounds the whole call: past it a gRPC caller gets
`grpc-status: 4`, as trailers when the response had started.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from h2.errors import ErrorCodes

from proxy import grpc, local_reply
from proxy import outcome as outcomes
from proxy.outcome import Outcome

if TYPE_CHECKING:
    from proxy.h2_exchange import H2Exchange

Extra = tuple[tuple[bytes, bytes], ...]


def reply(
    ex: H2Exchange,
    kind: type[Outcome],
    reason: str,
    message: str | None,
    *,
    status: int | None = None,
    extra: Extra = (),
    grpc_code: int | None = None,
) -> None:
    """Answer the stream with `reason` and end it (an outcome of `kind`); reset it when
    its response started."""
    from proxy.h2_exchange import RESPONDING

    if ex.state >= RESPONDING:
        ex.conn.reset(ex.sid, ErrorCodes.INTERNAL_ERROR)
        ex.end(outcomes.local(outcomes.Reset, reason, 0))
        return
    code = status if status is not None else local_reply.REPLIES.get(reason, (500, ""))[0]
    rendered = render(ex, reason, message, code, extra, grpc_code)
    out = outcomes.local(kind, reason, ex.status)
    ex.end(out if rendered is None else outcomes.with_grpc(out, rendered))


def budget_reply(ex: H2Exchange, failed: Outcome, message: str) -> None:
    """A failure not retried because the budget is spent: `retry_budget_exhausted`
    (a gRPC caller gets the gRPC status its upstream gave, if any)."""
    code = failed.grpc_status if failed.grpc_status > 0 else None
    status = failed.status if failed.status >= 500 else 503
    reply(
        ex,
        outcomes.LocalReply,
        local_reply.RETRY_BUDGET_EXHAUSTED,
        message,
        status=status,
        grpc_code=code,
    )
    ex.conn.touch()


def render(
    ex: H2Exchange,
    reason: str,
    message: str | None,
    code: int,
    extra: Extra = (),
    grpc_code: int | None = None,
) -> int | None:
    """Write a local reply on the stream: a gRPC error to a gRPC caller (its code is
    returned; `grpc_code` when given, else the reason's), else JSON."""
    text = message or local_reply.REPLIES.get(reason, (500, "internal error"))[1]
    conn, sid = ex.conn, ex.sid
    if ex.grpc:
        headers = grpc.reply_headers(reason, text, code)
        if grpc_code is not None:
            headers[2] = (b"grpc-status", b"%d" % grpc_code)
        conn.send_headers(sid, headers + [(n.lower(), v) for n, v in extra], True)
        ex.status = 200
        return int(headers[2][1])
    body = json.dumps({"error": reason, "message": text}).encode()
    head = [
        (b":status", b"%d" % code),
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"x-tether-error", reason.encode()),
        *[(n.lower(), v) for n, v in extra],  # Location, Retry-After (a route's)
    ]
    if ex.head.request_id is not None:
        head.append((b"x-request-id", ex.head.request_id))
    ex.status = code
    if ex.head.method == b"HEAD":
        conn.send_headers(sid, head, True)
    else:
        conn.send_headers(sid, head, False)
        conn.send_data(sid, body, True)
    return None


def deadline_passed(ex: H2Exchange, now: float) -> None:
    """The stream's deadline passed (it has not ended): end it with the timeout."""
    from proxy.h2_exchange import RESPONDING, T_REQUEST

    call = ex.call_deadline and now >= ex.call_deadline
    which: outcomes.TimeoutKind = "request" if call or ex.timer == T_REQUEST else "idle"
    ex._drop_upstream()
    # As HTTP/1: no response head within the request's (or the call's) time is
    # request_timeout; a stalled stream, or one cut short, upstream_timeout.
    waiting = which == "request" and ex.state < RESPONDING
    reason = local_reply.REQUEST_TIMEOUT if waiting else local_reply.UPSTREAM_TIMEOUT
    if call:
        message = "the call's grpc-timeout passed"
    elif which == "request":
        message = "no response in time"
    else:
        message = f"no progress for {ex.conn.front.timeouts.idle}s"
    if ex.state < RESPONDING:
        grpc_code = render(ex, reason, message, local_reply.REPLIES[reason][0])
        out: Outcome = outcomes.timeout(which, reason, ex.status)
        ex.end(out if grpc_code is None else outcomes.with_grpc(out, grpc_code))
    elif ex.grpc:
        # The response started: a gRPC caller still gets its status, as trailers.
        ex.conn.send_trailers(
            ex.sid,
            [
                (b"grpc-status", b"%d" % grpc.DEADLINE_EXCEEDED),
                (b"grpc-message", message.encode()),
                (b"x-tether-error", reason.encode()),
            ],
        )
        ex.end(outcomes.with_grpc(outcomes.timeout(which, reason, 0), 4))
    else:
        ex.conn.reset(ex.sid, ErrorCodes.CANCEL)
        ex.end(outcomes.timeout(which, reason, 0))
    ex.conn.flush()
