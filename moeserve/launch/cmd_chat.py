"""``moeserve chat``: an interactive terminal client that streams the reply as it is generated.

It talks to a running ``moeserve serve`` over the OpenAI chat API (the server applies the model's chat
template) or, with ``--raw``, over the token RPC with the plain text as the prompt (for base/code models).
A reasoning model's reasoning (``reasoning_content``, from ``--reasoning-parser``) is shown dimmed before
the answer on a terminal (``NO_COLOR`` turns that off), and kept out of the conversation history.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
from collections.abc import Iterator
from urllib.parse import urlparse

from moeserve.errors import UserError

NEEDS_ENGINE_ARGS = False


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("chat", help="interactive streaming chat with a running server")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's HTTP address")
    p.add_argument("--rpc", default="tcp://127.0.0.1:5555", help="the server's RPC address (with --raw)")
    p.add_argument("--raw", action="store_true", help="no chat template: each line is a prompt, over the RPC")
    p.add_argument("--api-key", default=None, help="default: the MOESERVE_API_KEY environment variable")
    p.add_argument("--model", default=None, help="model id (default: the server's first)")
    p.add_argument("--system", default=None, help="a system message (default: none)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per reply, at most")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy")
    return p


class HttpChat:
    def __init__(self, url: str, api_key: str | None, model: str | None):
        u = urlparse(url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.model = model or self._first_model()

    def _request(self, method: str, path: str, body: dict | None = None) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
        try:
            conn.request(method, path, json.dumps(body) if body is not None else None, self.headers)
            resp = conn.getresponse()
        except OSError as e:
            raise UserError(f"cannot reach the server at http://{self.host}:{self.port} ({e}); start one with "
                            "moeserve serve, or give its address with --url") from e
        if resp.status != 200:
            raise UserError(f"HTTP {resp.status}: {resp.read().decode(errors='replace')}")
        return resp

    def _first_model(self) -> str:
        return json.loads(self._request("GET", "/v1/models").read())["data"][0]["id"]

    def stream(self, messages: list[dict], max_tokens: int, temperature: float) -> Iterator[tuple[str, str]]:
        """(kind, text) pieces: kind is "reasoning" or "content" (tool calls are shown as content)."""
        resp = self._request("POST", "/v1/chat/completions", {
            "model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
            "stream": True})
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise UserError(chunk["error"]["message"])
            for choice in chunk["choices"]:
                delta = choice["delta"]
                if delta.get("reasoning_content"):
                    yield "reasoning", delta["reasoning_content"]
                for call in delta.get("tool_calls") or []:
                    fn = call.get("function", {})
                    yield "content", f"[tool call {fn.get('name') or ''}] {fn.get('arguments') or ''}"
                yield "content", delta.get("content") or ""


class ReplyPrinter:
    """Writes a streamed reply: reasoning dimmed (or plain, off a terminal) and apart from the answer."""

    DIM, RESET = "\x1b[2m", "\x1b[0m"

    def __init__(self, out, color: bool):
        self.out, self.color = out, color
        self.kind = "content"
        self.answer: list[str] = []

    def write(self, kind: str, text: str) -> None:
        if not text:
            return
        if kind != self.kind:
            if kind == "reasoning":
                self.out.write(self.DIM if self.color else "")
            else:  # the reasoning is over: the answer starts on its own line
                self.out.write((self.RESET if self.color else "") + "\n")
            self.kind = kind
        if kind == "content":
            self.answer.append(text)
        self.out.write(text)
        self.out.flush()

    def end(self) -> None:
        if self.kind == "reasoning" and self.color:
            self.out.write(self.RESET)
        self.out.write("\n")


def run(args: argparse.Namespace) -> int:
    key = args.api_key or os.environ.get("MOESERVE_API_KEY") or None
    interactive = sys.stdin.isatty()
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    chat = None if args.raw else HttpChat(args.url, key, args.model)
    client = None
    if args.raw:
        from moeserve.client import Client

        client = Client(args.rpc, api_key=key)
    if interactive:
        print("moeserve chat: /reset clears the conversation, /quit or Ctrl-D ends it", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            break
        if line.strip() in ("/quit", "/exit"):
            break
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        pieces: Iterator[tuple[str, str]]
        if client is not None:
            pieces = (("content", f.get("text_delta", "")) for f in client.generate(
                line, max_tokens=args.max_tokens, temperature=args.temperature))
        else:
            assert chat is not None
            messages.append({"role": "user", "content": line})
            pieces = chat.stream(messages, args.max_tokens, args.temperature)
        printer = ReplyPrinter(sys.stdout, sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
        for kind, piece in pieces:
            printer.write(kind, piece)
        printer.end()
        if client is None:
            messages.append({"role": "assistant", "content": "".join(printer.answer)})
    if client is not None:
        client.close()
    return 0
