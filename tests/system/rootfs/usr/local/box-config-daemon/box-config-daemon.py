"""Stand-in of the original OPQ box-config-daemon: the box's page on port 8888, reading and
writing the box config, and an Update Box button that runs updater/updater.sh in the background
with the config's updates_ep, its output appended to /var/log/opq/box_update.log."""
import json
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CONFIG = sys.argv[1]
PORT = int(sys.argv[2])
LOG = "/var/log/opq/box_update.log"
PAGE = b"""<!doctype html><title>OPQ Box</title><h1>OPQ Box</h1>
<button onclick="fetch('/box_update',{method:'POST',body:'{}'}).then(r=>r.text()).then(t=>document.getElementById('o').textContent=t)">Update Box</button>
<pre id=o></pre>"""


def read_config():
    with open(CONFIG) as f:
        return json.load(f)


class Handler(BaseHTTPRequestHandler):
    def answer(self, code, body, ctype="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/":
            self.answer(200, PAGE, "text/html")
        elif self.path == "/box_config":
            self.answer(200, {"box_config": read_config()})
        elif self.path == "/box_update/log":
            try:
                with open(LOG, "rb") as f:
                    self.answer(200, f.read()[-16384:], "text/plain")
            except OSError:
                self.answer(200, b"", "text/plain")
        else:
            self.answer(404, {"error": "Path [%s] not found" % self.path})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        if self.path == "/box_update":
            ep = read_config()["updates_ep"]
            log = open(LOG, "ab")
            subprocess.Popen(["/bin/bash", "/usr/local/box-config-daemon/updater/updater.sh", ep],
                             cwd="/home/pi", stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
            self.answer(200, {"status": "Update started from %s" % ep})
        else:
            self.answer(404, {"error": "Path [%s] not found" % self.path})


print("box-config-daemon on port %d with config %s" % (PORT, CONFIG))
ThreadingHTTPServer(("", PORT), Handler).serve_forever()
