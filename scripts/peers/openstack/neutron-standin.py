#!/usr/bin/env python3
# A minimal stand-in for the Neutron API, for the pcg test stack: Nova needs a network endpoint
# in the catalog to create and show servers. It answers every GET of a collection with an empty
# list (servers are created with "networks": "none"), the version documents, and 404 otherwise.
# Usage: neutron-standin.py PORT   (listens on 127.0.0.1 only)
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        path = self.path.split("?", 1)[0].rstrip("/")
        port = self.server.server_address[1]
        if path in ("", "/v2.0") and path == "":
            self._send(200, {"versions": [{"id": "v2.0", "status": "CURRENT", "links": [
                {"rel": "self", "href": f"http://127.0.0.1:{port}/v2.0/"}]}]})
            return
        if path == "/v2.0":
            self._send(200, {"resources": []})
            return
        parts = [p for p in path.split("/") if p]
        if len(parts) == 2 and parts[0] == "v2.0":
            name = parts[1].replace("-", "_")
            self._send(200, {name: []})
            return
        self._send(404, {"NeutronError": {"type": "NotFound", "message": f"{path} not found", "detail": ""}})

    def do_POST(self):
        self._send(404, {"NeutronError": {"type": "NotFound", "message": "not supported by the stand-in", "detail": ""}})

    do_PUT = do_POST
    do_DELETE = do_POST

    def log_message(self, fmt, *args):
        sys.stderr.write("%s %s\n" % (self.command, self.path))


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
