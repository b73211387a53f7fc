"""A stand-in OpenAI-compatible judge on 127.0.0.1 for the tests: it reads the two outputs out of
alpaca_eval's prompt and answers `m` or `M` by a rule, and can fail its first requests."""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

OUTPUTS = re.compile(r'"output": """(.*?)"""', re.DOTALL)
MODEL = "stand-in-judge"


class JudgeServer:
    """rule(output_1, output_2) -> "m" or "M"; the first `failures` chat requests get `status`."""

    def __init__(self, rule, failures=0, status=500):
        self.rule, self.failures, self.status = rule, failures, status
        self.requests, self.keys = [], set()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._reply(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "test"}]})

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.keys.add(self.headers.get("Authorization"))
                    server.requests.append(request)
                    failing = server.failures > 0
                    server.failures -= failing
                if failing:
                    self._reply(server.status, {"error": {"message": "try again", "type": "server_error"}})
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
