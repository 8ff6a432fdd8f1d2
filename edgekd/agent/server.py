"""The agent's HTTP service: receives a verified export bundle, times it on this device, answers with the numbers.

Security model (the agent runs models for whoever holds the token, on a board that may sit on a shared network):
- binds 127.0.0.1 unless --host says otherwise (reach it through an SSH tunnel); every request needs the token
  (`Authorization: Bearer TOKEN`, compared in constant time), checked before any byte of a body is read;
- an upload is refused on its Content-Length before it is read when it exceeds the cap, and the bytes read are
  counted against the cap as well; it is one uncompressed tar of flat, regular, known files, written only into a
  fresh folder under the work folder (no paths, no '..', no links, no devices, no duplicates);
- nothing from an upload is executed: the artifact's sha256 must match the manifest and it is only loaded by a
  known runtime (ONNX Runtime, LiteRT); the TensorRT bundle's build script runs only on an agent started with
  --allow-tensorrt-build;
- one job runs at a time in a child process (bench.py); waiting jobs queue up to --queue, beyond that 503;
  connections are capped and time out; every error is one JSON line {"error": "..."};
- whatever happens to a request (bad input, a client killed mid-upload, a runtime crash), its upload and job
  folder are removed and the agent keeps serving.
Standard library and numpy only (bench.py imports the runtimes in the child).
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import ipaddress
import json
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from . import bench
from .protocol import (API_VERSION, DEFAULT_PORT, INFO_PATH, MANIFEST, MAX_FILES, PROFILE_PATH, REFERENCE_INPUT,
                       REQUEST, TRT_FILES, ProtocolError, check_name, validate_manifest, validate_request)

BENCH_SCRIPT = Path(bench.__file__).resolve()
TOKEN_ENV = "EDGEKD_AGENT_TOKEN"
DEFAULTS = {"host": "127.0.0.1", "port": DEFAULT_PORT, "max_upload_mb": 64, "queue": 16, "job_timeout_s": 900,
            "max_connections": 64, "socket_timeout_s": 30}
MIN_TOKEN_CHARS = 16
DRAIN_LIMIT = 1 << 20  # bytes of a refused body read and dropped, so the client sees the answer, not a reset


class Agent:
    """The service: an HTTP server (one thread per connection, capped) in front of one job worker thread."""

    def __init__(self, work_dir: str | Path | None = None, token: str | None = None, *, host: str = DEFAULTS["host"],
                 port: int = DEFAULTS["port"], max_upload_bytes: int = DEFAULTS["max_upload_mb"] << 20,
                 queue_size: int = DEFAULTS["queue"], allow_tensorrt_build: bool = False,
                 job_timeout_s: float = DEFAULTS["job_timeout_s"], max_connections: int = DEFAULTS["max_connections"],
                 socket_timeout_s: float = DEFAULTS["socket_timeout_s"], log=None):
        if token is not None and len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"the token must have at least {MIN_TOKEN_CHARS} characters")
        if queue_size < 1 or max_upload_bytes < 1:
            raise ValueError("--queue and --max-upload-mb must be at least 1")
        self.token = token or secrets.token_urlsafe(32)
        self.token_generated = token is None
        self.own_work_dir = work_dir is None
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="edgekd-agent-")).resolve()
        self.uploads, self.jobs_dir = self.work_dir / "uploads", self.work_dir / "jobs"
        for d, prefix in ((self.uploads, "upload-"), (self.jobs_dir, "job-")):
            d.mkdir(parents=True, mode=0o700, exist_ok=True)
            for leftover in d.glob(prefix + "*"):  # of an agent that was killed; only names this agent makes
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        self.max_upload_bytes = max_upload_bytes
        self.allow_tensorrt_build = allow_tensorrt_build
        self.job_timeout_s = job_timeout_s
        self.queue_size = queue_size
        self.jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.identity = bench.device_identity()
        self.runtimes = bench.runtimes_available()
        self.counts = {"served": 0, "refused": 0, "failed": 0}
        self._lock = threading.Lock()
        self.httpd = _Server((host, port), _Handler, self, max_connections, socket_timeout_s)
        self.host, self.port = self.httpd.server_address[:2]
        self._serving = False
        self._worker = threading.Thread(target=self._work, name="edgekd-agent-worker", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in str(self.host) else self.host
        return f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        self._serving = True
        self.httpd.serve_forever(poll_interval=0.2)

    def start(self) -> threading.Thread:
        """Serve in a background thread (tests, tools); stop with shutdown()."""
        self._serving = True  # before the thread runs: a shutdown() right away must still stop it
        thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                  name="edgekd-agent-http", daemon=True)
        thread.start()
        return thread

    def shutdown(self, timeout_s: float = 10.0) -> None:
        if self._serving:  # socketserver's shutdown() waits forever for a loop that never ran
            self.httpd.shutdown()
        self.httpd.server_close()
        try:
            self.jobs.put(None, timeout=timeout_s)  # the worker's stop signal, after the jobs already queued
        except queue.Full:
            pass
        self._worker.join(timeout_s)
        if self.own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def info(self) -> dict:
        rss, peak = bench.rss_bytes()
        return {"agent": {"api": API_VERSION, "pid": os.getpid(), "rss_bytes": rss, "peak_rss_bytes": peak,
                          "queue": {"waiting": self.jobs.qsize(), "size": self.queue_size}, **self.counts,
                          "max_upload_bytes": self.max_upload_bytes,
                          "tensorrt_build": self.allow_tensorrt_build},
                "device": self.identity, "clocks": bench.clocks(), "runtimes": self.runtimes}

    # ---------------------------------------------------------------------------------------------- jobs
    def submit(self, job_dir: Path) -> dict:
        """Queue a prepared job folder and wait for its result; the worker removes the folder when done."""
        done = threading.Event()
        slot: dict = {}
        queued = time.perf_counter()
        try:
            self.jobs.put_nowait((job_dir, done, slot))
        except queue.Full:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise ProtocolError(f"busy: {self.queue_size} jobs are waiting; retry later", 503) from None
        if not done.wait((self.queue_size + 1) * (self.job_timeout_s + 5)):
            raise ProtocolError("the job did not finish in time", 504)
        if "error" in slot:
            raise ProtocolError(slot["error"], slot.get("status", 422))
        slot["result"]["queue_wait_s"] = round(slot["started"] - queued, 3)
        return slot["result"]

    def _work(self) -> None:
        while True:
            item = self.jobs.get()
            if item is None:
                return
            job_dir, done, slot = item
            slot["started"] = time.perf_counter()
            try:
                slot.update(self._run(job_dir))
            except Exception as e:  # never let one job stop the worker
                slot.update(error=f"the agent failed to run the job ({type(e).__name__})", status=500)
            finally:
                shutil.rmtree(job_dir, ignore_errors=True)
                done.set()

    def _run(self, job_dir: Path) -> dict:
        env = dict(os.environ, TMPDIR=str(job_dir), PYTHONDONTWRITEBYTECODE="1")
        with open(job_dir / "stderr.log", "wb") as err:
            try:
                proc = subprocess.run([sys.executable, str(BENCH_SCRIPT), str(job_dir)], cwd=job_dir, env=env,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                      timeout=self.job_timeout_s)
            except subprocess.TimeoutExpired:
                return {"error": f"the job ran longer than {self.job_timeout_s:g} s and was stopped", "status": 504}
        result_file = job_dir / "result.json"
        if not result_file.is_file():
            how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
            return {"error": f"the runtime crashed ({how}) before it reported", "status": 500}
        result = json.loads(result_file.read_text())
        if "error" in result:
            return {"error": result["error"], "status": 422}
        result["device"] = self.identity
        return {"result": result}

    # ------------------------------------------------------------------------------------------- uploads
    def receive(self, rfile, length: int) -> Path:
        """Read exactly `length` bytes into a temp file under uploads/, counting them; removed on any failure."""
        fd, name = tempfile.mkstemp(dir=self.uploads, prefix="upload-", suffix=".tar")
        path = Path(name)
        try:
            received = 0
            with os.fdopen(fd, "wb") as f:
                while received < length:
                    chunk = rfile.read(min(1 << 16, length - received))
                    if not chunk:
                        raise ProtocolError(f"the upload ended after {received:,} of {length:,} bytes")
                    received += len(chunk)
                    if received > self.max_upload_bytes:  # cannot happen past the Content-Length check; belt and braces
                        raise ProtocolError(f"the upload exceeds {self.max_upload_bytes:,} bytes", 413)
                    f.write(chunk)
            return path
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    def unpack(self, upload: Path) -> Path:
        """The tar's files into a fresh job folder, after every check; the folder is removed on any failure."""
        job_dir = Path(tempfile.mkdtemp(dir=self.jobs_dir, prefix="job-"))
        try:
            self._extract(upload, job_dir)
            self._verify(job_dir)
            return job_dir
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise

    def _extract(self, upload: Path, job_dir: Path) -> None:
        allowed = {MANIFEST, REQUEST, REFERENCE_INPUT, *TRT_FILES}
        seen: set[str] = set()
        total = 0
        try:
            tar = tarfile.open(upload, mode="r:")  # uncompressed only: the extracted size stays within the upload's
        except (tarfile.TarError, OSError):
            raise ProtocolError("the upload must be an uncompressed tar archive") from None
        with tar:
            try:
                for member in tar:
                    if len(seen) >= MAX_FILES:
                        raise ProtocolError(f"the upload has more than {MAX_FILES} files")
                    name = check_name(member.name)
                    if not member.isreg():
                        raise ProtocolError(f"{name}: only regular files are accepted (no links, directories or devices)")
                    if name in seen:
                        raise ProtocolError(f"{name} appears twice in the upload")
                    if name not in allowed and not name.endswith((".onnx", ".tflite")):
                        raise ProtocolError(f"unexpected file {name}: an upload holds {MANIFEST}, {REQUEST}, the "
                                            "artifact and optionally reference inputs")
                    total += member.size
                    if total > self.max_upload_bytes:
                        raise ProtocolError(f"the files in the upload exceed {self.max_upload_bytes:,} bytes", 413)
                    seen.add(name)
                    source = tar.extractfile(member)
                    # O_EXCL | O_NOFOLLOW: never through a link, never over a file
                    fd = os.open(job_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                    with os.fdopen(fd, "wb") as out:
                        shutil.copyfileobj(source, out, 1 << 16)
            except tarfile.TarError as e:
                raise ProtocolError(f"the upload is not a valid tar archive ({str(e)[:80]})") from None
        missing = [n for n in (MANIFEST, REQUEST) if n not in seen]
        if missing:
            raise ProtocolError(f"the upload has no {', '.join(missing)}")

    def _verify(self, job_dir: Path) -> None:
        manifest = validate_manifest(_json(job_dir / MANIFEST))
        request = validate_request(_json(job_dir / REQUEST))
        art = manifest["artifact"]
        artifact = job_dir / art["file"]
        if not artifact.is_file():
            raise ProtocolError(f"the manifest's artifact {art['file']} is not in the upload")
        extra = [p.name for p in job_dir.iterdir() if p.suffix in (".onnx", ".tflite") and p.name != art["file"]]
        if extra:
            raise ProtocolError(f"unexpected file {extra[0]}: only the manifest's artifact may be uploaded")
        digest = hashlib.sha256()
        with open(artifact, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if artifact.stat().st_size != art["bytes"] or not hmac.compare_digest(digest.hexdigest(), art["sha256"]):
            raise ProtocolError(f"{art['file']} does not match its manifest (sha256 {digest.hexdigest()[:12]}..., "
                                f"manifest {art['sha256'][:12]}...): the artifact was changed or damaged; re-export it")
        job = {"request": request, "allow_tensorrt": self.allow_tensorrt_build}
        (job_dir / "job.json").write_text(json.dumps(job))


def _json(path: Path):
    if path.stat().st_size > 1 << 20:
        raise ProtocolError(f"{path.name} is larger than 1 MiB")
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ProtocolError(f"{path.name} is not valid JSON") from None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, handler, agent: Agent, max_connections: int, socket_timeout_s: float):
        self.agent = agent
        self.slots = threading.BoundedSemaphore(max_connections)
        self.socket_timeout_s = socket_timeout_s
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):  # too many open connections: answer at once, start no thread
            try:
                request.settimeout(2)
                request.sendall(_raw_response(503, "busy: too many connections; retry later"))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def _raw_response(status: int, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.0 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\nRetry-After: 1\r\n\r\n")
    return head.encode() + body


class _Handler(BaseHTTPRequestHandler):
    server_version = "edgekd-agent"
    sys_version = ""

    def setup(self):
        self.timeout = self.server.socket_timeout_s  # a client that stalls is dropped, its upload removed
        super().setup()

    @property
    def agent(self) -> Agent:
        return self.server.agent

    def log_message(self, format, *args):  # one line per request, never the token or a body
        self.agent.log(f"{self.address_string()} {format % args}")

    def send_error(self, code, message=None, explain=None):  # the base class's HTML errors, as one JSON line
        self._reply(code, {"error": message or HTTPStatus(code).phrase})

    def _reply(self, status: int, payload: dict) -> None:
        body = (json.dumps(payload) + "\n").encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            if status == 503:
                self.send_header("Retry-After", "1")
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the client is gone; nothing to tell it
        self.close_connection = True

    def _authorised(self) -> bool:
        given = self.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme != "Bearer" or not token:
            raise ProtocolError("missing token: send the header 'Authorization: Bearer TOKEN' (printed by the agent)", 401)
        if not hmac.compare_digest(token.strip().encode(), self.agent.token.encode()):
            raise ProtocolError("wrong token", 401)
        return True

    def _drain(self) -> None:
        """Read and drop (a bounded part of) a refused body, so the client can read the answer."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return
        left = min(max(length, 0), DRAIN_LIMIT)
        try:
            self.connection.settimeout(1.0)
            while left > 0:
                chunk = self.rfile.read(min(1 << 16, left))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _handle(self, route) -> None:
        try:
            payload = route()
            self.agent.count("served")
            self._reply(200, payload)
        except ProtocolError as e:
            self.agent.count("refused" if e.status < 500 or e.status == 503 else "failed")
            if self.command == "POST" and getattr(self, "_unread_body", True):
                self._drain()
            self._reply(e.status, {"error": str(e)})
        except (ConnectionError, TimeoutError, socket.timeout) as e:  # the client went away mid-request
            self.agent.count("refused")
            self.agent.log(f"{self.address_string()} connection lost ({type(e).__name__}); upload removed")
            self.close_connection = True

    def do_GET(self):
        if self.path != INFO_PATH:
            self._handle(lambda: _not_found(self.path))
            return
        self._handle(lambda: self._authorised() and self.agent.info())

    def do_POST(self):
        self._unread_body = True
        if self.path != PROFILE_PATH:
            self._handle(lambda: _not_found(self.path))
            return
        self._handle(self._profile)

    def _profile(self) -> dict:
        self._authorised()
        if self.headers.get("Transfer-Encoding"):
            raise ProtocolError("send the upload with a Content-Length (no chunked transfer encoding)", 411)
        raw = self.headers.get("Content-Length")
        if raw is None or not raw.isdigit():
            raise ProtocolError("a Content-Length header is required", 411)
        length = int(raw)
        if length > self.agent.max_upload_bytes:
            raise ProtocolError(f"the upload is {length:,} bytes; this agent accepts at most "
                                f"{self.agent.max_upload_bytes:,} (--max-upload-mb)", 413)
        upload = self.agent.receive(self.rfile, length)
        self._unread_body = False
        try:
            job_dir = self.agent.unpack(upload)
        finally:
            upload.unlink(missing_ok=True)
        return self.agent.submit(job_dir)

    def do_PUT(self):
        self._handle(_method_not_allowed)

    do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_PUT


def _not_found(path: str):
    raise ProtocolError(f"no such endpoint {path[:60]!r}: use GET {INFO_PATH} or POST {PROFILE_PATH}", 404)


def _method_not_allowed():
    raise ProtocolError(f"use GET {INFO_PATH} or POST {PROFILE_PATH}", 405)


# ---------------------------------------------------------------------------------------------- command line

def read_token(token_file: str | None) -> str | None:
    """The token from --token-file or $EDGEKD_AGENT_TOKEN (not a command-line value: `ps` would show it)."""
    if token_file:
        try:
            token = Path(token_file).expanduser().read_text().strip()
        except OSError as e:
            raise ValueError(f"cannot read the token file {token_file} ({e.strerror})") from None
    else:
        token = os.environ.get(TOKEN_ENV, "").strip() or None
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the token must have at least {MIN_TOKEN_CHARS} characters")
    return token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(host: str = DEFAULTS["host"], port: int = DEFAULTS["port"], token_file: str | None = None,
        work_dir: str | None = None, max_upload_mb: int = DEFAULTS["max_upload_mb"], queue_size: int = DEFAULTS["queue"],
        allow_tensorrt_build: bool = False, job_timeout_s: float = DEFAULTS["job_timeout_s"]) -> None:
    """Start the agent and serve until interrupted (what `edgekd agent` and `python -m edgekd.agent` run)."""
    agent = Agent(work_dir, read_token(token_file), host=host, port=port, max_upload_bytes=max_upload_mb << 20,
                  queue_size=queue_size, allow_tensorrt_build=allow_tensorrt_build, job_timeout_s=job_timeout_s)
    say = agent.log
    say(f"edgekd agent listening on {agent.url} (work folder {agent.work_dir})")
    say(f"runtimes: {', '.join(agent.runtimes) or 'none found (install onnxruntime or ai-edge-litert)'}; TensorRT "
        f"builds: {'on (bundle build scripts run)' if allow_tensorrt_build else 'off (--allow-tensorrt-build)'}")
    if agent.token_generated:
        say(f"token: {agent.token}")
        say(f"on the host: edgekd profile RUN --target T --device {agent.url} --token {agent.token}")
    if not is_loopback(str(agent.host)):
        say(f"warning: listening on {agent.host}, not loopback: anyone who reaches this port with the token can run "
            "models here; prefer the default 127.0.0.1 and an SSH tunnel (ssh -L 8765:127.0.0.1:8765 board)")
    if threading.current_thread() is threading.main_thread():  # SIGTERM (systemd, kill) stops it as Ctrl-C does
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        agent.serve_forever()
    except KeyboardInterrupt:
        say("stopping")
    finally:
        agent.shutdown()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edgekd.agent", description="Benchmark agent: times edgekd export bundles on this device for "
        "`edgekd profile --device`.", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m edgekd.agent\n  EDGEKD_AGENT_TOKEN=$(cat ~/.edgekd-token) python -m edgekd.agent "
               "--port 9000\n  python -m edgekd.agent --allow-tensorrt-build --work-dir /tmp/edgekd-agent")
    d = DEFAULTS
    parser.add_argument("--host", default=d["host"], help="address to bind (default: %(default)s; anything else "
                        "exposes the agent to the network)")
    parser.add_argument("--port", type=int, default=d["port"], help="TCP port, 0 for any free one (default: %(default)s)")
    parser.add_argument("--token-file", help=f"file holding the token (default: ${TOKEN_ENV}, else a new token is "
                        "generated and printed)")
    parser.add_argument("--work-dir", help="folder for uploads and jobs (default: a new temporary folder, removed at exit)")
    parser.add_argument("--max-upload-mb", type=int, default=d["max_upload_mb"],
                        help="largest upload accepted, MiB (default: %(default)s)")
    parser.add_argument("--queue", type=int, default=d["queue"], help="jobs that may wait behind the running one; more "
                        "get 503 (default: %(default)s)")
    parser.add_argument("--job-timeout", type=float, default=d["job_timeout_s"],
                        help="seconds one job may run (default: %(default)s)")
    parser.add_argument("--allow-tensorrt-build", action="store_true",
                        help="run a TensorRT bundle's build_engine.sh with trtexec (executes the bundle's script; "
                             "default: off)")
    args = parser.parse_args(argv)
    try:
        run(args.host, args.port, args.token_file, args.work_dir, args.max_upload_mb, args.queue,
            args.allow_tensorrt_build, args.job_timeout)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
