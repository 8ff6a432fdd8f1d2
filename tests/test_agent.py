"""The benchmark agent on loopback: measurements, security (token, upload cap, tampered artifacts, path traversal,
concurrent and killed clients), and `edgekd profile --device` / `--serial` (a pseudo-terminal plays the device).

Every agent is started on port 0 in a thread and always shut down; every socket has a timeout and every thread
join a bound. Tests marked slow need the real int8 TFLite export (onnx2tf + TFLite Micro).
"""
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgekd import api
from edgekd.agent import protocol
from edgekd.agent.server import Agent
from edgekd.cli import main
from edgekd.config import OptimConfig, TrainConfig
from edgekd.errors import EdgekdError
from edgekd.export.firmware import PREFIX, fnv1a32, pattern
from edgekd.profile import device, serial_bench

TOKEN = "t0ken-for-the-loopback-tests"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A small student trained for one epoch on 256 digits (the weights only need to be a real model's)."""
    run = tmp_path_factory.mktemp("agent") / "run"
    api.train(TrainConfig(run_dir=str(run), data="digits", resolution=32, student="mobilenetv3_small_050",
                          student_options={"low_res_stem": False}, teacher=None, method="ce", epochs=1, batch_size=64, limit=256,
                          optim=OptimConfig(lr=0.1, warmup_epochs=0.5), seed=0, checkpoint_interval_s=1e9))
    return run


@pytest.fixture(scope="module")
def onnx_bundle(run_dir):
    return api.export(run_dir, format="onnx", verify_images=64).bundle


@pytest.fixture
def sandbox(tmp_path):
    """The agent's work folder lives in sandbox/work; everything else in sandbox must stay untouched."""
    root = tmp_path / "sandbox"
    (root / "work").mkdir(parents=True)
    return root


@pytest.fixture
def agent(sandbox):
    a = Agent(sandbox / "work", TOKEN, port=0, queue_size=1, max_upload_bytes=4 << 20, socket_timeout_s=2.0,
              log=lambda line: None)
    a.start()
    yield a
    a.shutdown(timeout_s=30)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def assert_clean(agent: Agent, sandbox: Path, before: set[str] | None = None) -> None:
    """No upload or job left in the work folder, nothing new outside it, and the agent still answers."""
    deadline = time.monotonic() + 20
    while (list(agent.uploads.iterdir()) or list(agent.jobs_dir.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.05)  # a dropped connection is noticed by its handler thread a moment later
    assert not list(agent.uploads.iterdir()) and not list(agent.jobs_dir.iterdir())
    if before is not None:
        assert tree(sandbox) == before
    assert device.info(agent.url, TOKEN)["agent"]["api"] == protocol.API_VERSION


def raw_request(agent: Agent, head: str, body: bytes = b"", *, timeout: float = 10.0) -> tuple[int, dict]:
    with socket.create_connection((agent.host, agent.port), timeout=timeout) as s:
        s.sendall(head.encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    payload = data.split(b"\r\n\r\n", 1)[1]
    assert payload.count(b"\n") <= 1  # one JSON line
    return status, json.loads(payload)


def post(agent: Agent, body: bytes, token: str = TOKEN) -> tuple[int, dict]:
    head = (f"POST {protocol.PROFILE_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return raw_request(agent, head, body)


def bundle_files(bundle: Path, **request) -> dict:
    manifest = json.loads((bundle / "manifest.json").read_text())
    req = protocol.validate_request({"runs": 5, "min_seconds": 0.0, **request})
    return device.upload_files(bundle, manifest, req, device.reference_inputs(manifest))


def tar_with(members: list[tarfile.TarInfo], contents: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info in members:
            data = contents.get(info.name, b"")
            if info.isreg():
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------- the agent itself

def test_the_agent_imports_neither_torch_nor_the_rest_of_edgekd():
    code = ("import sys, edgekd.agent.server, edgekd.agent.bench; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or (m.startswith('edgekd.') and not "
            "m.startswith('edgekd.agent'))); print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stdout + out.stderr


def test_measures_on_loopback_and_agrees_with_the_host(agent, onnx_bundle, sandbox):
    before = tree(sandbox)
    m = device.measure(onnx_bundle, agent.url, TOKEN, runs=20, warmup=2, min_seconds=0.0)
    assert m["runtime"] == "onnxruntime" and m["where"] == "device" and m["runs"] >= 20
    assert 0 < m["p50_ms"] <= m["p90_ms"] <= m["p99_ms"] and m["throughput_per_s"] > 0
    assert m["peak_rss_bytes"] > m["baseline_rss_bytes"] > 0
    assert m["agreement"]["agrees"] and m["agreement"]["inputs"] == device.REFERENCE_INPUTS
    assert m["agreement"]["max_abs_diff"] <= 1e-3 and m["device"]["machine"] and m["bundle"]["format"] == "onnx"
    assert_clean(agent, sandbox, before)


def test_throughput_at_a_batch(agent, run_dir, tmp_path):
    dynamic = api.export(run_dir, format="onnx", dynamic_batch=True, out_dir=tmp_path, verify_images=64).bundle
    m = device.measure(dynamic, agent.url, TOKEN, runs=10, batch=4, min_seconds=0.0)
    assert m["batch"] == 4 and m["agreement"]["agrees"] and m["runs"] >= 10
    # images per second over the timed calls: 4 per call, so above 4 / the slowest call and below 4 / the fastest
    assert 4e3 / m["p99_ms"] * 0.5 < m["throughput_per_s"] <= 4e3 / m["min_ms"]


def test_info_needs_the_token(agent):
    head = f"GET {protocol.INFO_PATH} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    assert raw_request(agent, head + "\r\n") == (401, {"error": "missing token: send the header 'Authorization: "
                                                              "Bearer TOKEN' (printed by the agent)"})
    assert raw_request(agent, head + "Authorization: Bearer nope\r\n\r\n") == (401, {"error": "wrong token"})
    status, info = raw_request(agent, head + f"Authorization: Bearer {TOKEN}\r\n\r\n")
    assert status == 200 and "onnxruntime" in info["runtimes"] and info["agent"]["queue"]["size"] == 1
    assert raw_request(agent, head.replace(protocol.INFO_PATH, "/etc/passwd") + f"Authorization: Bearer {TOKEN}\r\n\r\n")[0] == 404
    assert raw_request(agent, head.replace("GET", "DELETE") + f"Authorization: Bearer {TOKEN}\r\n\r\n")[0] == 405


@pytest.mark.parametrize("token", [None, "wrong-token-of-enough-length"])
def test_upload_without_the_right_token_is_refused_before_its_body_is_read(agent, sandbox, token):
    before = tree(sandbox)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = f"POST {protocol.PROFILE_PATH} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 3000000\r\n\r\n"
    status, payload = raw_request(agent, head)  # no body is sent: the answer must not wait for it
    assert status == 401 and "token" in payload["error"]
    assert_clean(agent, sandbox, before)


def test_oversized_upload_is_refused_on_its_content_length(agent, sandbox):
    before = tree(sandbox)
    head = (f"POST {protocol.PROFILE_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Length: {agent.max_upload_bytes + 1}\r\n\r\n")
    status, payload = raw_request(agent, head)
    assert status == 413 and "accepts at most" in payload["error"]
    status, payload = raw_request(agent, head.replace(f"Content-Length: {agent.max_upload_bytes + 1}\r\n", ""))
    assert status == 411
    assert_clean(agent, sandbox, before)


def test_the_client_checks_the_agents_upload_cap_first(onnx_bundle, sandbox):
    small = Agent(sandbox / "work", TOKEN, port=0, max_upload_bytes=1 << 20, log=lambda line: None)
    small.start()
    try:
        with pytest.raises(EdgekdError, match=r"accepts at most 1,048,576: start it with a larger --max-upload-mb"):
            device.measure(onnx_bundle, small.url, TOKEN, runs=5)
    finally:
        small.shutdown(timeout_s=30)


def test_tampered_artifact_is_refused(agent, onnx_bundle, sandbox, tmp_path):
    before = tree(sandbox)
    files = bundle_files(onnx_bundle)
    name = json.loads((onnx_bundle / "manifest.json").read_text())["artifact"]["file"]
    data = bytearray(Path(files[name]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    status, payload = post(agent, protocol.pack({**files, name: bytes(data)}))
    assert status == 400 and "does not match its manifest" in payload["error"]
    manifest = json.loads((onnx_bundle / "manifest.json").read_text())
    manifest["artifact"]["file"] = "other.onnx"
    status, payload = post(agent, protocol.pack({**files, protocol.MANIFEST: json.dumps(manifest).encode()}))
    assert status == 400 and "is not in the upload" in payload["error"]
    assert_clean(agent, sandbox, before)


def _member(name: str, kind=tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize("member, message", [
    (_member("../escaped.txt"), "is not allowed"),
    (_member("ABSOLUTE"), "is not allowed"),  # replaced by an absolute path inside the test's tmp_path
    (_member("sub/file.json"), "is not allowed"),
    (_member(".hidden"), "is not allowed"),
    (_member("link.onnx", tarfile.SYMTYPE, "/etc/passwd"), "only regular files"),
    (_member("hard.onnx", tarfile.LNKTYPE, "manifest.json"), "only regular files"),
    (_member("dir", tarfile.DIRTYPE), "only regular files"),
    (_member("fifo.onnx", tarfile.FIFOTYPE), "only regular files"),
    (_member("notes.txt"), "unexpected file notes.txt"),
])
def test_path_traversal_links_and_strange_members_are_refused(agent, onnx_bundle, sandbox, tmp_path, member, message):
    before = tree(sandbox)
    outside = tmp_path / "outside.txt"
    if member.name == "ABSOLUTE":
        member.name = str(outside)
    files = {n: (v.read_bytes() if isinstance(v, Path) else v) for n, v in bundle_files(onnx_bundle).items()}
    infos = [_member(n) for n in files] + [member]
    status, payload = post(agent, tar_with(infos, {**files, member.name: b"payload"}))
    assert status == 400 and message in payload["error"], payload
    assert not outside.exists() and not (sandbox / "escaped.txt").exists() and not (sandbox / "work" / "escaped.txt").exists()
    assert_clean(agent, sandbox, before)


@pytest.mark.parametrize("change, message", [
    (lambda f: f.update({protocol.REQUEST: b"{not json"}), "request.json is not valid JSON"),
    (lambda f: f.update({protocol.REQUEST: b'{"runs": 5, "shell": "rm -rf /"}'}), "unknown field(s) shell"),
    (lambda f: f.update({protocol.REQUEST: b'{"runs": -1}'}), "runs must be a int from 5 to 100000"),
    (lambda f: f.update({protocol.REQUEST: b'{"runtime": "bash"}'}), "runtime must be one of"),
    (lambda f: f.update({protocol.MANIFEST: b'{"format": "pickle"}'}), "format must be one of"),
    (lambda f: f.pop(protocol.REQUEST), "the upload has no request.json"),
])
def test_bad_requests_are_one_line_errors(agent, onnx_bundle, sandbox, change, message):
    before = tree(sandbox)
    files = bundle_files(onnx_bundle)
    change(files)
    status, payload = post(agent, protocol.pack(files))
    assert status == 400 and message in payload["error"], payload
    assert_clean(agent, sandbox, before)


def test_uploads_that_are_no_plain_tar_are_refused(agent, onnx_bundle, sandbox):
    import gzip

    before = tree(sandbox)
    body = protocol.pack(bundle_files(onnx_bundle))
    for blob in (gzip.compress(body), b"\x00" * 10 + b"not a tar at all" * 100):
        status, payload = post(agent, blob)
        assert status == 400 and "tar" in payload["error"], payload
    assert_clean(agent, sandbox, before)


def test_a_job_the_runtime_refuses_is_a_one_line_error(agent, onnx_bundle, sandbox):
    before = tree(sandbox)
    for request, message in (({"batch": 4}, "static batch of 1"), ({"runtime": "litert"}, "cannot run a onnx bundle"),
                             ({"runtime": "tensorrt"}, "cannot run a onnx bundle")):
        status, payload = post(agent, protocol.pack(bundle_files(onnx_bundle, **request)))
        assert status == 422 and message in payload["error"], payload
    assert_clean(agent, sandbox, before)


@pytest.mark.parametrize("how", ["reset", "close", "stall"])
def test_a_client_killed_mid_upload_leaves_nothing_behind(agent, onnx_bundle, sandbox, how):
    before = tree(sandbox)
    body = protocol.pack(bundle_files(onnx_bundle))
    head = (f"POST {protocol.PROFILE_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    s = socket.create_connection((agent.host, agent.port), timeout=10)
    s.sendall(head.encode() + body[: len(body) // 2])
    time.sleep(0.3)  # the agent is now writing the upload
    assert list(agent.uploads.iterdir())  # ... to its work folder, and only there
    if how == "reset":  # SO_LINGER 0: the kernel sends RST, as when a process is killed mid-write
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    elif how == "close":
        s.close()
    else:  # a client that hangs: the agent's socket timeout (2 s here) drops it
        time.sleep(agent.httpd.socket_timeout_s + 1)
    assert_clean(agent, sandbox, before)
    if how == "stall":
        s.close()
    assert device.measure(onnx_bundle, agent.url, TOKEN, runs=5, min_seconds=0.0)["agreement"]["agrees"]


def test_concurrent_clients_queue_one_job_at_a_time_and_get_503_when_full(agent, onnx_bundle, sandbox):
    before = tree(sandbox)
    n = 6
    results: list = [None] * n
    barrier = threading.Barrier(n, timeout=30)

    def client(i: int, retry: float) -> None:
        barrier.wait()
        try:
            results[i] = device.measure(onnx_bundle, agent.url, TOKEN, runs=5, min_seconds=0.0, busy_retry_s=retry)
        except EdgekdError as e:
            results[i] = str(e)

    for retry in (0.0, 120.0):  # without retrying, a full queue answers 503; retrying clients all get through
        threads = [threading.Thread(target=client, args=(i, retry)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads)
        done = [r for r in results if isinstance(r, dict)]
        busy = [r for r in results if isinstance(r, str) and "HTTP 503" in r and "busy" in r]
        assert len(done) + len(busy) == n and all(r["agreement"]["agrees"] for r in done)
        if retry:
            assert len(done) == n
        else:
            assert done and busy  # one runs, one waits, the rest are told to come back
    assert_clean(agent, sandbox, before)


def test_agent_command_line_starts_prints_its_token_and_stops_on_sigterm(tmp_path):
    work = tmp_path / "work"
    proc = subprocess.Popen([sys.executable, "-m", "edgekd.agent", "--port", "0", "--work-dir", str(work)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while not any(line.startswith("token:") for line in lines) and time.monotonic() < deadline:
            lines.append(proc.stderr.readline().strip())
        url = next(line.split()[4] for line in lines if line.startswith("edgekd agent listening on"))
        token = next(line.split()[1] for line in lines if line.startswith("token:"))
        assert len(token) >= 40 and "127.0.0.1" in url
        assert device.info(url, token)["agent"]["api"] == protocol.API_VERSION
        with pytest.raises(EdgekdError, match="HTTP 401"):
            device.info(url, "x" * 40)
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    assert work.is_dir() and not list((work / "jobs").iterdir())


def test_short_token_is_refused(tmp_path):
    (tmp_path / "token").write_text("short")
    out = subprocess.run([sys.executable, "-m", "edgekd.agent", "--token-file", str(tmp_path / "token"), "--port", "0"],
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.strip() == "error: the token must have at least 16 characters"


# ---------------------------------------------------------------------------------- edgekd profile --device

def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_profile_with_device_stores_the_measurement_beside_the_estimate(agent, onnx_bundle, tmp_path):
    out = cli("profile", onnx_bundle, "--target", "jetson-nano", "--device", agent.url, "--token", TOKEN,
              "--runners", "none", "--device-runs", "10", "--out", tmp_path)
    assert out.exit_code == 0, out.output
    report = json.loads((tmp_path / "jetson-nano" / "onnx-fp32.json").read_text())
    m = report["latency"]["device"]
    assert m["runtime"] == "onnxruntime" and m["agreement"]["agrees"] and report["measured"]["device_p50_ms"] == m["p50_ms"]
    assert report["fits"]["latency"] == (m["p50_ms"] <= 20.0) and "latency_estimate" in report["fits"]
    md = (tmp_path / "jetson-nano" / "report.md").read_text()
    assert "device p50 ms (measured)" in md and "outputs agree with this host" in md
    assert (tmp_path / "jetson-nano" / "report.png").stat().st_size > 10_000


@pytest.mark.parametrize("args, message", [
    (["--device", "URL", "--token", TOKEN, "--calibrate"], "measured with onnxruntime, but jetson-nano runs tensorrt"),
    (["--device", "URL"], "--device needs the agent's token"),
    (["--device", "URL", "--token", "wrong-token-of-enough-length"], "HTTP 401): wrong token"),
    (["--device", "URL", "--token", TOKEN, "--serial", "/dev/null"], "pass either --device URL"),
    (["--calibrate"], "--calibrate fits the target to device measurements"),
    (["--device", "ftp://x", "--token", TOKEN], "--device takes http://HOST:PORT"),
])
def test_profile_device_errors_are_one_line(agent, onnx_bundle, tmp_path, monkeypatch, args, message):
    monkeypatch.delenv("EDGEKD_AGENT_TOKEN", raising=False)
    out = cli("profile", onnx_bundle, "--target", "jetson-nano", "--runners", "none", "--no-plot", "--out", tmp_path,
              *[agent.url if a == "URL" else a for a in args])
    assert out.exit_code == 2 and message in out.output and "Traceback" not in out.output, out.output
    assert len(out.output.strip().splitlines()) <= 2  # the progress line and the error


def test_a_run_without_the_targets_export_names_the_command(agent, run_dir, tmp_path):
    out = cli("profile", run_dir, "--target", "raspberry-pi-4", "--device", agent.url, "--token", TOKEN,
              "--runners", "none", "--out", tmp_path)
    assert out.exit_code == 2 and f"run `edgekd export {run_dir} --target raspberry-pi-4` first" in out.output


# ------------------------------------------------------------------------------- serial: a pty plays a device

TRANSCRIPT = [  # what the firmware prints, with a boot banner and a reset in between (recorded format, not a board)
    "boot: clock 480 MHz",
    f"{PREFIX} v1 begin model=m-int8 model_len=100 model_fnv1a=deadbeef arena_bytes=90000 cpu_hz=480000000 runs=3 warmup=1",
    f"{PREFIX} v1 begin model=m-int8 model_len=100 model_fnv1a=deadbeef arena_bytes=90000 cpu_hz=480000000 runs=3 warmup=1",
    f"{PREFIX} v1 arena used=81234",
    f"{PREFIX} v1 run i=0 cycles=4800000",
    "some other log line",
    f"{PREFIX} v1 run i=1 cycles=4900000",
    f"{PREFIX} v1 run i=2 cycles=5000000",
    f"{PREFIX} v1 output values=-128,12,-3,127,0,5,-7,1,2,3",
    f"{PREFIX} v1 end status=ok",
]


def play(lines: list[str], delay: float = 0.01, every_s: float = 0.5):
    """A pseudo-terminal whose other end writes `lines` again and again (as the firmware repeats its benchmark, so
    the reader may open the port at any time: pyserial drops what arrived before it opened)."""
    master, slave = os.openpty()
    name = os.ttyname(slave)
    os.set_blocking(master, False)  # nobody reading: output is lost, as on a UART with nothing attached
    stop = threading.Event()

    def writer():
        for _ in range(600):  # bounded: at most 600 repetitions
            for line in lines:
                if stop.is_set():
                    return
                try:
                    os.write(master, (line + "\r\n").encode())
                except BlockingIOError:
                    pass
                time.sleep(delay)
            if stop.wait(every_s):
                return

    thread = threading.Thread(target=writer, daemon=True)
    thread.stop = stop
    thread.start()
    return name, thread, (master, slave)


def close(thread, fds):
    thread.stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive()
    for fd in fds:
        os.close(fd)


def test_serial_reader_takes_the_last_complete_run_from_a_pty():
    name, thread, fds = play(TRANSCRIPT)
    try:
        lines = serial_bench.read_lines(name, timeout_s=20)
    finally:
        close(thread, fds)
    run = serial_bench.parse(lines)
    assert run["cycles"] == [4800000, 4900000, 5000000] and run["cpu_hz"] == 480_000_000 and run["arena_used"] == 81234
    assert run["output"][:4] == [-128, 12, -3, 127] and run["model_fnv1a"] == 0xDEADBEEF and lines[0].startswith(PREFIX)


def test_a_port_opened_mid_run_skips_that_runs_tail(monkeypatch):
    import serial

    master, slave = os.openpty()

    class OpenedMidRun(serial.Serial):
        def open(self):
            super().open()  # flushes what arrived before; then the rest of a run whose `begin` line went by
            os.write(master, "".join(line + "\r\n" for line in TRANSCRIPT[3:] + TRANSCRIPT).encode())

    monkeypatch.setattr(serial, "Serial", OpenedMidRun)
    try:
        lines = serial_bench.read_lines(os.ttyname(slave), timeout_s=20)
    finally:
        os.close(master), os.close(slave)
    assert lines[0].split()[2] == "begin" and len(lines) == len([t for t in TRANSCRIPT if t.startswith(PREFIX)]) - 1
    assert serial_bench.parse(lines)["cycles"] == [4800000, 4900000, 5000000]


@pytest.mark.parametrize("lines, message", [
    (TRANSCRIPT[:2] + [f"{PREFIX} v1 error stage=allocate"], "stopped at stage 'allocate'"),
    (TRANSCRIPT[:5] + TRANSCRIPT[-1:], "incomplete benchmark: 1 of 3 runs, no output line"),
    ([line.replace(" v1 ", " v9 ") for line in TRANSCRIPT], "prints format v9"),
    (TRANSCRIPT[:4] + [f"{PREFIX} v1 run i=0 cycles=lots"] + TRANSCRIPT[-1:], "malformed firmware line"),
])
def test_bad_firmware_output_is_one_line_error(lines, message):
    with pytest.raises(EdgekdError, match=message):
        serial_bench.parse(lines)


def test_a_silent_port_times_out_with_advice():
    name, thread, fds = play(["garbage without the prefix"])
    try:
        with pytest.raises(EdgekdError, match=r"no complete benchmark from .* within 1 s \(0 EDGEKD-BENCH lines"):
            serial_bench.read_lines(name, timeout_s=1)
    finally:
        close(thread, fds)
    with pytest.raises(EdgekdError, match="cannot open the serial port /dev/edgekd-no-such-port"):
        serial_bench.read_lines("/dev/edgekd-no-such-port", timeout_s=1)


def test_the_input_pattern_and_hash_match_the_firmwares_arithmetic():
    # xorshift32 (13, 17, 5) from 0x2545F491, worked out by hand for the first state: the top byte is 0xE1 = -31
    s = 0x2545F491
    s ^= (s << 13) & 0xFFFFFFFF
    s ^= s >> 17
    s ^= (s << 5) & 0xFFFFFFFF
    assert s >> 24 == 0xE1 and pattern(1)[0] == -31 and len(set(pattern(4096).tolist())) > 200
    assert fnv1a32(b"") == 0x811C9DC5 and fnv1a32(b"a") == 0xE40C292C and fnv1a32(b"abc") == 0x1A47E90B


HARNESS = r"""
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
namespace {
%s
}  // namespace
int main() {
  static int8_t x[4096];
  FillPattern(x, sizeof(x), 0x2545F491u);
  for (size_t i = 0; i < sizeof(x); ++i) printf("%%d%%c", x[i], i + 1 < sizeof(x) ? ',' : '\n');
  static unsigned char bytes[1000];
  for (int i = 0; i < 1000; ++i) bytes[i] = static_cast<unsigned char>(i * 7);
  char line[128];
  char* p = PutHex32(line, Fnv1a(bytes, 1000));
  p = Put(p, " ");
  p = PutU32(p, 4294967295u);
  const int32_t values[] = {INT32_MIN, -128, -1, 0, 127};
  for (int32_t v : values) PutI32(Put(p, " "), v), p += __builtin_strlen(p);
  puts(line);
  return 0;
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_the_firmwares_helpers_compute_what_the_host_expects(tmp_path):
    """The board-independent part of main.cc, compiled with g++ on its own: the input pattern and model hash the
    host recomputes, and the number formatting of the printed lines."""
    from edgekd.export.firmware import HELPERS

    (tmp_path / "h.cc").write_text(HARNESS % HELPERS)
    subprocess.run(["g++", "-std=c++11", "-Wall", "-Wextra", "-Werror", "-pedantic", "h.cc", "-o", "h"], cwd=tmp_path,
                   check=True, capture_output=True, timeout=120)
    first, second = subprocess.run([str(tmp_path / "h")], capture_output=True, text=True, timeout=30).stdout.splitlines()
    assert [int(v) for v in first.split(",")] == pattern(4096).tolist()
    expected = fnv1a32(bytes((i * 7) & 0xFF for i in range(1000)))
    assert second.split() == [f"{expected:08x}", "4294967295", "-2147483648", "-128", "-1", "0", "127"]


# ----------------------------------------------------------------------- slow: the real int8 export (TFLM, LiteRT)

@pytest.fixture(scope="module")
def int8_bundle(run_dir, tmp_path_factory):
    """`edgekd export RUN --target cortex-m7`: full int8, TFLite Micro, C array and the benchmark firmware."""
    out = tmp_path_factory.mktemp("int8")
    result = cli("export", run_dir, "--target", "cortex-m7", "--out", out, "--verify-images", "64", "--calib-images", "64",
                 "--min-agreement", "0")  # a one-epoch model: its int8 agreement is not what these tests check
    assert result.exit_code == 0, result.output
    return out / "tflite-int8"


@pytest.fixture
def targets_copy(tmp_path, monkeypatch):
    folder = tmp_path / "targets"
    shutil.copytree(REPO / "targets", folder)
    monkeypatch.setenv("EDGEKD_TARGETS_DIR", str(folder))
    return folder


@pytest.mark.slow
def test_export_for_an_mcu_target_writes_the_benchmark_firmware(int8_bundle):
    manifest = json.loads((int8_bundle / "manifest.json").read_text())
    fw = manifest["firmware"]
    main_cc = (int8_bundle / "firmware" / "main.cc").read_text()
    readme = (int8_bundle / "firmware" / "README.md").read_text()
    for op in manifest["tflm"]["ops"]:
        assert f"resolver.Add" in main_cc and op in main_cc
    assert not fw["missing_resolver_ops"] and "#error" not in main_cc and fw["compiled"] is False
    assert f'#include "{manifest["c_array"]["header"]}"' in main_cc and "EDGEKD_DWT_CYCCNT" in main_cc
    assert "EDGEKD_HOST_BUILD" in main_cc and f"MicroMutableOpResolver<{len(manifest['tflm']['ops'])}>" in main_cc
    assert all(word in readme for word in ("STM32Cube", "Arduino", "ESP-IDF", "not compiled or run on a board"))


def transcript_for(bundle: Path, cycles: list[int], cpu_hz: int = 480_000_000, output=None) -> list[str]:
    """The firmware's lines for this bundle: its model's length and hash, the given cycle counts, and the int8
    output TFLite Micro gives for the firmware's input pattern on this host (what a correct board prints)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    data = (bundle / manifest["artifact"]["file"]).read_bytes()
    out = serial_bench.host_output(bundle / manifest["artifact"]["file"], manifest) if output is None else output
    return [f"{PREFIX} v1 begin model=x model_len={len(data)} model_fnv1a={fnv1a32(data):08x} arena_bytes=99999 "
            f"cpu_hz={cpu_hz} runs={len(cycles)} warmup=3", f"{PREFIX} v1 arena used=88888",
            *(f"{PREFIX} v1 run i={i} cycles={c}" for i, c in enumerate(cycles)),
            f"{PREFIX} v1 output values={','.join(str(int(v)) for v in np.asarray(out).reshape(-1))}", f"{PREFIX} v1 end status=ok"]


@pytest.mark.slow
def test_profile_serial_stores_the_board_and_calibrates_the_target(int8_bundle, targets_copy, tmp_path):
    cycles = [9_600_000 + 1000 * i for i in range(20)]  # 20 ms at 480 MHz
    name, thread, fds = play(transcript_for(int8_bundle, cycles))
    try:
        out = cli("profile", int8_bundle, "--target", "cortex-m7", "--serial", name, "--serial-timeout", "60",
                  "--runners", "none", "--calibrate", "--out", tmp_path / "profiles")
    finally:
        close(thread, fds)
    assert out.exit_code == 0, out.output
    report = json.loads((tmp_path / "profiles" / "cortex-m7" / "tflite-int8.json").read_text())
    m = report["latency"]["device"]
    assert m["via"] == "serial" and m["runtime"] == "tflite-micro" and m["agreement"]["agrees"]
    assert m["p50_ms"] == pytest.approx(1e3 * np.median(cycles) / 480e6) and m["arena_used_bytes"] == 88888
    yaml_text = (targets_copy / "cortex-m7.yaml").read_text()
    assert "history:" in yaml_text and "fitted_to: mobilenetv2-0.3@64" in yaml_text
    from edgekd.targets import load_target

    lm = load_target("cortex-m7").latency_model
    assert lm.history[0].cycles_per_mac == 3.528 and lm.cycles_per_mac != 3.528
    fit = [r for r in lm.references if r.role == "fit"]
    assert len(fit) == 1 and fit[0].model == "mobilenetv3_small_050" and fit[0].clock_hz == 480_000_000
    assert report["estimate"]["latency_ms"] == pytest.approx(m["p50_ms"], rel=0.15)  # the new estimate is near it
    assert "Calibrated with `--calibrate`" in (tmp_path / "profiles" / "cortex-m7" / "report.md").read_text()


@pytest.mark.slow
def test_profile_serial_refuses_a_board_running_another_model(int8_bundle, tmp_path):
    lines = transcript_for(int8_bundle, [1000, 1100, 1200], output=np.zeros(10, np.int8))
    lines[0] = " ".join("model_fnv1a=00000001" if t.startswith("model_fnv1a=") else t for t in lines[0].split())
    name, thread, fds = play(lines)
    try:
        out = cli("profile", int8_bundle, "--target", "cortex-m7", "--serial", name, "--serial-timeout", "30",
                  "--runners", "none", "--no-plot", "--out", tmp_path)
    finally:
        close(thread, fds)
    assert out.exit_code == 2 and "the board runs another model" in out.output


@pytest.mark.slow
def test_litert_on_the_agent_and_calibration_of_a_cpu_target(agent, int8_bundle, targets_copy, tmp_path):
    m = device.measure(int8_bundle, agent.url, TOKEN, runs=20, min_seconds=0.0)
    assert m["runtime"] == "litert" and m["agreement"]["agrees"] and "max_abs_diff_lsb" in m["agreement"]
    out = cli("profile", int8_bundle, "--target", "raspberry-pi-4", "--device", agent.url, "--token", TOKEN,
              "--runners", "litert", "--device-runs", "20", "--calibrate", "--out", tmp_path)
    assert out.exit_code == 0, out.output
    from edgekd.targets import load_target

    lm = load_target("raspberry-pi-4").latency_model
    assert [r.role for r in lm.references].count("fit") == 1 and len(lm.history) == 1
    assert "litert" in next(r.source for r in lm.references if r.role == "fit")


@pytest.mark.slow
def test_tensorrt_bundles_run_only_with_the_opt_in_and_trtexec(run_dir, onnx_bundle, sandbox, tmp_path):
    trt = api.export(run_dir, format="tensorrt", precision="fp16", out_dir=tmp_path, verify_images=64).bundle
    for allow, message in ((False, "only on an agent started with --allow-tensorrt-build"), (True, "trtexec was not found")):
        a = Agent(sandbox / "work", TOKEN, port=0, allow_tensorrt_build=allow, log=lambda line: None)
        a.start()
        try:
            if shutil.which("trtexec") is None:
                with pytest.raises(EdgekdError, match=message):
                    device.measure(trt, a.url, TOKEN, runs=5, min_seconds=0.0)
            # without TensorRT the bundle's ONNX can still be timed, labelled as ONNX Runtime
            assert device.measure(trt, a.url, TOKEN, runs=5, min_seconds=0.0, runtime="onnxruntime")["runtime"] == "onnxruntime"
        finally:
            a.shutdown(timeout_s=30)
