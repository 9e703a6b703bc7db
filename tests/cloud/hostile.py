"""Hostile requests for the query server, spoken over raw sockets (HTTP) and raw bytes (gRPC), so
that they test whatever server answers on the port: each case says what it sends and what any
correct server must do with it. Shared by the hostile-input tests and the poison load test."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

SMUGGLED = "/v1/models/smuggled"  # the path hidden in a poison request's body; a server that answers it has desynced
SMUGGLED_REQUEST = f"GET {SMUGGLED} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
LEAKS = (b"Traceback", b'File "', b"sys.set_int_max_str_digits", b"Error:", b"recursion")  # Python's words in an error


@dataclass
class Response:
    status: int
    headers: dict[str, list[str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def json(self):
        return json.loads(self.body)


def parse_responses(raw: bytes) -> list[Response]:
    """Every HTTP/1.1 response in ``raw`` (a connection's bytes, to its end)."""
    responses = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        if not sep:
            raise AssertionError(f"a truncated response: {raw[:200]!r}")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        if "chunked" in headers.get("transfer-encoding", [""])[0].lower():
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line, 16)
                body, rest = body + rest[:size], rest[size + 2 :]
                if size == 0:
                    break
        else:
            length = int(headers.get("content-length", ["0"])[0])
            body, rest = rest[:length], rest[length:]
        responses.append(Response(status, headers, body))
        raw = rest
    return responses


def exchange(address: tuple[str, int], data: bytes, timeout: float = 30.0) -> list[Response]:
    """Send ``data`` on a fresh connection, say that nothing more follows (half-close), and read
    every response until the server closes. ``timeout`` bounds each read (a server that waits
    for more bytes fails the case instead of hanging the test)."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        raw = b""
        try:
            while chunk := sock.recv(65536):
                raw += chunk
        except ConnectionResetError:
            pass
    return parse_responses(raw)


def _request(method: str, path: str, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers)
    return head.encode("latin-1") + b"\r\n" + body


# ---------------------------------------------------------------- framing (request smuggling)

COMPLETION = json.dumps({"model": "base", "prompt": "hi", "max_tokens": 1, "temperature": 0}).encode()


def _framing_cases() -> list[tuple[str, bytes, tuple[int, ...]]]:
    """(name, bytes, the statuses a correct server may answer) for requests whose body, read the
    wrong way, holds a second request (:data:`SMUGGLED_REQUEST`)."""
    hidden = COMPLETION + SMUGGLED_REQUEST
    n = len(SMUGGLED_REQUEST)
    return [
        # a body on GET: served or refused, but never read as the next request
        ("GET with a body", _request("GET", "/health", [("Content-Length", str(n))], SMUGGLED_REQUEST), (200, 400)),
        (
            "negative Content-Length",
            _request("POST", "/v1/completions", [("Content-Length", f"-{n}")], SMUGGLED_REQUEST),
            (400,),
        ),
        (
            "two Content-Lengths",
            _request(
                "POST",
                "/v1/completions",
                [("Content-Length", str(len(COMPLETION))), ("Content-Length", str(len(hidden)))],
                hidden,
            ),
            (400,),
        ),
        (
            "Content-Length and Transfer-Encoding",
            _request(
                "POST",
                "/v1/completions",
                [("Content-Length", str(len(hidden) + 5)), ("Transfer-Encoding", "chunked")],
                b"0\r\n\r\n" + hidden,
            ),
            (400,),
        ),
        (
            "signed Content-Length",
            _request("POST", "/v1/completions", [("Content-Length", f"+{len(COMPLETION)}")], hidden),
            (400,),
        ),
        (
            "Content-Length with an underscore",
            _request("POST", "/v1/completions", [("Content-Length", "1_0")], hidden),
            (400,),
        ),
        (
            "Content-Length in other digits",
            _request("POST", "/v1/completions", [("Content-Length", "\u0665".encode().decode("latin-1"))], hidden),
            (400,),
        ),
        (
            "space before the colon",
            _request("POST", "/v1/completions", [("Content-Length ", str(len(hidden)))], hidden),
            (400,),
        ),
        (
            "folded Content-Length",
            _request("POST", "/v1/completions", [("Content-Length", f"\r\n {len(hidden)}")], hidden),
            (400,),
        ),
        (
            "Content-Length of 5000 digits",
            _request("POST", "/v1/completions", [("Content-Length", "9" * 5000)], hidden),
            (400, 413),
        ),
    ]


FRAMING_CASES = _framing_cases()


def check_framing(address: tuple[str, int], name: str, data: bytes, statuses: tuple[int, ...]) -> list[str]:
    """What is wrong with the server's answer to one framing case (empty: nothing)."""
    try:
        responses = exchange(address, data)
    except (OSError, AssertionError) as error:
        return [f"{name}: {type(error).__name__}: {error}"]
    problems = []
    if not responses:
        return [f"{name}: no response"]
    if len(responses) > 1 or any(SMUGGLED.encode() in r.body for r in responses):
        problems.append(f"{name}: the body was read as a request ({[r.status for r in responses]})")
    first = responses[0]
    if first.status not in statuses:
        problems.append(f"{name}: status {first.status}, expected one of {statuses}: {first.body[:200]!r}")
    if first.status >= 400 and any(
        leak in first.body for leak in LEAKS
    ):  # any error body (framing errors may come from an HTTP library)
        problems.append(f"{name}: the error leaks internals: {first.body[:200]!r}")
    return problems


def error_body_problems(body: bytes) -> list[str]:
    """An OpenAI error body that names what was wrong and leaks no internals."""
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return [f"not an OpenAI error body: {body[:200]!r}"]
    problems = []
    if set(error) != {"message", "type", "param", "code"} or not error["message"]:
        problems.append(f"error body fields {sorted(error)}")
    if any(leak.decode() in error["message"] for leak in LEAKS):
        problems.append(f"the message leaks internals: {error['message'][:200]!r}")
    return problems


# ---------------------------------------------------------------- bodies that used to fail as 500


def deep_json(depth: int) -> bytes:
    return b'{"model": "base", "prompt": "x", "stop": ' + b"[" * depth + b"]" * depth + b"}"


def bad_bodies(context_chars: int) -> list[tuple[str, bytes, int, str]]:
    """(name, body of POST /v1/completions, status, code): bodies that must be refused with 400."""
    return [
        ("JSON nested 100000 deep", b"[" * 100_000, 400, "invalid_json"),
        ("JSON nested 200 deep", deep_json(200), 400, "invalid_json"),
        (
            "integer of 5000 digits",
            b'{"model": "base", "prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}",
            400,
            "invalid_json",
        ),
        (
            "a lone surrogate in the prompt",
            b'{"model": "base", "prompt": "a\\ud800b", "max_tokens": 1}',
            400,
            "invalid_value",
        ),
        (
            "a lone surrogate in a message",
            b'{"model": "base", "messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 1}',
            400,
            "invalid_value",
        ),
        (
            "7 MB prompt",
            json.dumps({"model": "base", "prompt": "ab " * ((7 << 20) // 3), "max_tokens": 1}).encode(),
            400,
            "context_length_exceeded",
        ),
        (
            "7 MB message",
            json.dumps({"model": "base", "messages": [{"role": "user", "content": "ab " * ((7 << 20) // 3)}]}).encode(),
            400,
            "context_length_exceeded",
        ),
        (
            "2 million token ids",
            json.dumps({"model": "base", "prompt": [5] * 2_000_000, "max_tokens": 1}).encode(),
            400,
            "context_length_exceeded",
        ),
        ("a 1 MB model name", json.dumps({"model": "m" * (1 << 20), "prompt": "x"}).encode(), 404, "model_not_found"),
        (
            "a million prompts",
            json.dumps({"model": "base", "prompt": ["x"] * 1_000_000, "max_tokens": 1}).encode(),
            400,
            "invalid_value",
        ),
        (
            "n of a million",
            json.dumps({"model": "base", "prompt": "x", "n": 1_000_000, "max_tokens": 1}).encode(),
            400,
            "invalid_value",
        ),
        (
            "a million token-id prompts",
            json.dumps({"model": "base", "prompt": [[5]] * 1_000_000, "max_tokens": 1}).encode(),
            400,
            "invalid_json",
        ),
    ]


def post(
    address: tuple[str, int], path: str, body: bytes, headers: list[tuple[str, str]] = (), timeout: float = 60.0
) -> Response:
    """One request with a body, on its own connection."""
    responses = exchange(
        address,
        _request(
            "POST", path, [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *headers], body
        ),
        timeout,
    )
    assert len(responses) == 1, [r.status for r in responses]
    return responses[0]


def check_bad_body(address: tuple[str, int], name: str, body: bytes, status: int, code: str) -> list[str]:
    try:
        response = post(address, "/v1/completions" if b'"messages"' not in body[:40] else "/v1/chat/completions", body)
    except (OSError, AssertionError) as error:
        return [f"{name}: {type(error).__name__}: {error}"]
    problems = [f"{name}: {p}" for p in error_body_problems(response.body)]
    if response.status != status:
        return problems + [f"{name}: status {response.status}, expected {status}: {response.body[:200]!r}"]
    if response.json()["error"]["code"] != code:
        problems.append(f"{name}: code {response.json()['error']['code']!r}, expected {code!r}")
    if len(response.body) > 2000:
        problems.append(f"{name}: a {len(response.body)}-byte error body echoes the request")
    return problems


# ---------------------------------------------------------------- admin uploads refused before their body


def early_uploads(taken: str) -> list[tuple[str, str, int]]:
    """(name, PUT path, status) of uploads declaring a 4 GiB body (never sent): a server that reads
    the body before checking what it can check waits for it, and the read times out."""
    return [
        ("a bad job name", "/admin/models/bad%20name!", 400),
        ("an absurd plugin_gain", "/admin/models/fine?plugin_gain=1e308", 400),
        ("a plugin_gain that is not a number", "/admin/models/fine?plugin_gain=nan", 400),
        ("a name already registered", f"/admin/models/{taken}", 409),
    ]


def check_early_upload(address: tuple[str, int], token: str, name: str, path: str, status: int) -> list[str]:
    data = _request("PUT", path, [("Authorization", f"Bearer {token}"), ("Content-Length", str(4 << 30))])
    try:
        with socket.create_connection(address, timeout=20) as sock:
            sock.sendall(data)  # the headers only: the body never comes
            raw = b""
            while chunk := sock.recv(65536):  # the answer, then the server closes (the body was not read)
                raw += chunk
        responses = parse_responses(raw)
    except (OSError, AssertionError, ValueError) as error:
        return [f"{name}: no answer before the body ({type(error).__name__}: {error})"]
    if len(responses) != 1:
        return [f"{name}: {len(responses)} responses"]
    problems = [f"{name}: {p}" for p in error_body_problems(responses[0].body)]
    if responses[0].status != status:
        problems.append(f"{name}: status {responses[0].status}, expected {status}: {responses[0].body[:200]!r}")
    return problems


# ---------------------------------------------------------------- gRPC

GRPC_METHODS = (
    "/offsite.serving.v1.Serving/Generate",
    "/offsite.serving.v1.Serving/GenerateStream",
    "/offsite.serving.v1.Serving/ListModels",
)
MALFORMED_MESSAGES = [
    ("garbage bytes", b"\xff\xff\xff\xff"),
    ("a truncated varint", b"\x20\x80"),
    ("a string field that is not UTF-8", b"\x0a\x02\xc3\x28"),  # field 1 (model), 2 bytes: invalid UTF-8
    ("a length past the end", b"\x12\x7fabc"),
]


def check_grpc_malformed(channel: grpc.Channel) -> list[str]:
    """Every method, every malformed message: INVALID_ARGUMENT (a message naming the type), never INTERNAL."""
    problems = []
    for method in GRPC_METHODS:
        streaming = method.endswith("GenerateStream")
        call: Callable = (channel.unary_stream if streaming else channel.unary_unary)(method)  # bytes in, bytes out
        for name, data in MALFORMED_MESSAGES:
            if method.endswith("ListModels") and name == "a string field that is not UTF-8":
                continue  # ListModelsRequest has no fields: unknown ones are skipped, as protobuf does
            try:
                reply = call(data, timeout=30)
                if streaming:
                    list(reply)
                problems.append(f"{method} with {name}: answered")
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    problems.append(f"{method} with {name}: {error.code()} {error.details()!r}")
    return problems


@dataclass
class Tally:
    """What a hostile client saw: the problems (should be none) and how many of each case it sent."""

    problems: list[str] = field(default_factory=list)
    sent: dict[str, int] = field(default_factory=dict)

    def add(self, case: str, problems: list[str]) -> None:
        self.sent[case] = self.sent.get(case, 0) + 1
        self.problems += problems
