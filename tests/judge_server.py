"""A stand-in OpenAI-compatible judge on 127.0.0.1 for the tests: it reads the two outputs out of
alpaca_eval's prompt and answers `m` or `M` by a rule, and can fail its first requests, ask for a
key, or answer with a malformed body."""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

OUTPUTS = re.compile(r'"output": """(.*?)"""', re.DOTALL)
MODEL = "stand-in-judge"


def _json(body) -> tuple:
    return json.dumps(body).encode(), "application/json"


# Chat replies off the happy path: (body, Content-Type), by what is wrong with them.
MALFORMED_CHAT = {
    "not UTF-8": (b'{"choices": "\xff\xfe"}', "application/json"),
    "plain text": (b"upstream model crashed, try later", "text/plain"),
    "no choices": _json({"id": "x", "object": "chat.completion"}),
    "empty choices": _json({"id": "x", "object": "chat.completion", "choices": []}),
    "null message": _json({"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": None}]}),
}
# /models answered by a web page: a base_url that points at a UI, not at the API (.../v1).
HTML_PAGE = (b"<!doctype html>\n<html><head><title>Chat UI</title></head><body>Sign in</body></html>", "text/html")


class JudgeServer:
    """rule(output_1, output_2) -> "m" or "M"; the first `failures` chat requests get `status`;
    `chat_body` / `models_body` ((bytes, Content-Type)) replace the chat and /models replies;
    with `key`, a request without `Authorization: Bearer KEY` gets 401."""

    def __init__(self, rule, failures=0, status=500, chat_body=None, models_body=None, key=None):
        self.rule, self.failures, self.status = rule, failures, status
        self.chat_body, self.models_body, self.key = chat_body, models_body, key
        self.requests, self.keys = [], set()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status, body):
                self._send(status, *_json(body))

            def _send(self, status, data, content_type):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _refused(self):
                """Without the server's key: 401, as a hosted API answers."""
                if server.key is None or self.headers.get("Authorization") == f"Bearer {server.key}":
                    return False
                self._reply(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}})
                return True

            def do_GET(self):
                if self._refused():
                    return
                if server.models_body is not None:
                    self._send(200, *server.models_body)
                    return
                self._reply(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "test"}]})

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.keys.add(self.headers.get("Authorization"))
                    server.requests.append(request)
                    failing = server.failures > 0
                    server.failures -= failing
                if self._refused():
                    return
                if failing:
                    self._reply(server.status, {"error": {"message": "try again", "type": "server_error"}})
                    return
                if server.chat_body is not None:
                    self._send(200, *server.chat_body)
                    return
                content = request["messages"][-1]["content"]
                first, second = OUTPUTS.findall(content)[-2:]
                answer = server.rule(first, second)
                self._reply(200, {
                    "id": "x", "object": "chat.completion", "created": 0, "model": request["model"],
                    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer}}],
                })

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def chat_requests(self):
        return len(self.requests)


def longer(first: str, second: str) -> str:
    """A length-biased judge."""
    return "M" if len(second) > len(first) else "m"


def always_first(first: str, second: str) -> str:
    """A judge that only sees position."""
    return "m"
