"""``serve``: start a real Triton Inference Server on a ``--target triton-text`` handoff dir.

The server is the ``tritonserver`` binary shipped in the ``nvidia-pytriton`` wheel (the ``serve``
extra), with its Python backend; it runs on CPU (it logs that CUDA and DCGM are absent and goes on)::

    handoff dir ──► checks (hashes, config.pbtxt vs serving.json and the graph, ports free)
        ──► backend dir (a temp dir: libtriton_python.so + the stub built for this Python)
        ──► the stub's Python environment (below) ──► tritonserver --model-repository HANDOFF/model_repository
        ──► ready (GET /v2/health/ready) ──► serve until Ctrl-C / SIGTERM ──► SIGINT to the server, which
            finishes in-flight requests (--exit-timeout-secs), then exits ──► any stub still running
            (a server that was killed leaves them) is killed and its /dev/shm region removed

The stub's environment. Triton starts each model instance in a separate stub process that embeds
Python in isolated mode: PYTHONPATH is ignored, and ``sys.prefix`` is found from the first
``python3`` on PATH. So the server is started with the environment's ``bin`` first on PATH (as
pytriton does) and, for the stub's ``libpython``, that interpreter's LIBDIR on LD_LIBRARY_PATH.
The stubs in nvidia-pytriton 0.7 predate numpy 2 (its pybind11 reads numpy 1.x's array layout):
under numpy 2 a TYPE_STRING input arrives as copies of its first byte and the stub dies. When the
running environment has numpy 2, :func:`python_env` therefore builds (once, cached) a small overlay
environment: a venv of this interpreter holding only ``numpy<2``, whose ``.pth`` appends the running
environment's site-packages (onnxruntime, tokenizers). ``--python-env DIR`` names another environment.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from cahp_deploy.errors import CahpError

log = logging.getLogger(__name__)

INSTALL_HINT = ("install the `serve` extra: pip install 'cahp-deploy[serve]' (or, to keep numpy 2 in this "
                "environment, pip install --no-deps 'nvidia-pytriton>=0.7,<0.8')")
#: the stub's numpy; see the module docstring
STUB_NUMPY = "numpy>=1.26,<2"
#: what the text model imports inside the stub
STUB_MODULES = ("numpy", "onnxruntime", "tokenizers")
#: seconds Triton waits for in-flight requests when told to stop
EXIT_TIMEOUT_S = 10


def triton_dist() -> Path:
    """The ``tritonserver`` dir inside the installed nvidia-pytriton wheel, or a one-line error."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise CahpError(f"no Triton server: the nvidia-pytriton package is not installed; {INSTALL_HINT}")
    dist = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    if not (dist / "bin" / "tritonserver").is_file():
        raise CahpError(f"{dist}/bin/tritonserver is missing (a broken nvidia-pytriton install?); {INSTALL_HINT}")
    return dist


def _libs(dist: Path) -> list[Path]:
    """nvidia-pytriton's bundled shared libraries (libcudart and friends the stub links against)."""
    return [p for p in (dist.parent.parent / "nvidia_pytriton.libs", dist / "external_libs") if p.is_dir()]


def stub_path(dist: Path, version: str | None = None) -> Path:
    version = version or f"{sys.version_info[0]}.{sys.version_info[1]}"
    stubs = dist / "python_backend_stubs"
    path = stubs / version / "triton_python_backend_stub"
    if not path.is_file():
        have = sorted(p.name for p in stubs.iterdir()) if stubs.is_dir() else []
        raise CahpError(f"nvidia-pytriton has no Python backend stub for Python {version} (it has {', '.join(have)}); "
                        "run cahp-deploy under one of those Python versions")
    return path


def backend_dir(dist: Path, into: Path) -> Path:
    """``into/python/``: the Python backend with the stub for this interpreter's version (links, no copies)."""
    py = into / "python"
    py.mkdir(parents=True, exist_ok=True)
    src = dist / "backends" / "python"
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        (py / name).symlink_to(src / name)
    (py / "triton_python_backend_stub").symlink_to(stub_path(dist))
    return into


def _probe(python: Path) -> dict:
    code = ("import json, sys\nout = {'python': '%d.%d' % sys.version_info[:2], 'missing': []}\n"
            f"for m in {STUB_MODULES!r}:\n"
            "    try:\n        mod = __import__(m)\n        out[m] = getattr(mod, '__version__', '?')\n"
            "    except Exception as e:\n        out['missing'].append(m + ': ' + str(e).splitlines()[0])\n"
            "print(json.dumps(out))\n")
    try:
        res = subprocess.run([str(python), "-I", "-c", code], capture_output=True, text=True, timeout=120)
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired) as e:
        raise CahpError(f"{python} does not run ({e}); pass --python-env a virtualenv with {', '.join(STUB_MODULES)}") from e


def _check_env(env: Path, what: str) -> dict:
    python = env / "bin" / "python3"
    if not python.exists():
        raise CahpError(f"{what} {env} has no bin/python3; pass a virtualenv or Python prefix")
    info = _probe(python)
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if info["python"] != here:
        raise CahpError(f"{what} {env} is Python {info['python']}, but this cahp-deploy runs on {here} and the stub is "
                        "chosen for it; use an environment of the same Python version")
    if info["missing"]:
        raise CahpError(f"{what} {env} cannot import what the text model needs: {'; '.join(info['missing'])}")
    if int(str(info["numpy"]).split(".")[0]) >= 2:
        raise CahpError(f"{what} {env} has numpy {info['numpy']}; nvidia-pytriton 0.7's Python stub needs numpy < 2 "
                        "(its TYPE_STRING inputs arrive corrupted under numpy 2)")
    return info


def _cache_root() -> Path:
    base = os.environ.get("CAHP_DEPLOY_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cahp-deploy"


def overlay_env() -> Path:
    """A cached venv of this interpreter holding only ``numpy<2``, the running env's site-packages behind it."""
    site = [p for p in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])]
    key = hashlib.sha256(json.dumps([sys.prefix, sys.version, site, STUB_NUMPY]).encode()).hexdigest()[:12]
    root = _cache_root() / f"triton-python-env-{sys.version_info[0]}.{sys.version_info[1]}-{key}"
    if (root / "ok").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(tmp)], check=True,
                       capture_output=True, text=True)
        tmp_site = Path(subprocess.run([str(tmp / "bin" / "python3"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                       check=True, capture_output=True, text=True).stdout.strip())
        log.warning("installing %s into %s for Triton's Python stub (once)", STUB_NUMPY, root)
        res = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              "--no-warn-conflicts", "--target", str(tmp_site), STUB_NUMPY], capture_output=True, text=True)
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["?"])[-1]
            raise CahpError(f"could not install {STUB_NUMPY} for Triton's Python stub ({last}); pass --python-env a "
                            f"virtualenv of Python {sys.version_info[0]}.{sys.version_info[1]} with numpy<2, onnxruntime "
                            "and tokenizers")
        # .pth lines are appended after the env's own site-packages, so its numpy<2 comes first
        (tmp_site / "zz_cahp_deploy_main_env.pth").write_text("".join(f"{p}\n" for p in site))
        _check_env(tmp, "the stub environment built in")
        (tmp / "ok").write_text(STUB_NUMPY + "\n")
        # venv scripts and pyvenv.cfg name the temp path; the prefix is found from bin/python3's location,
        # so a rename keeps the env working
        try:
            os.replace(tmp, root)
        except OSError:  # built meanwhile by another serve
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def python_env(explicit: str | os.PathLike | None = None) -> Path:
    """The environment Triton's Python stub runs in: ``explicit``, else this one when its numpy is < 2,
    else :func:`overlay_env`."""
    if explicit is not None:
        env = Path(explicit)
        _check_env(env, "--python-env")
        return env
    import numpy

    if int(numpy.__version__.split(".")[0]) < 2:
        return Path(sys.prefix)
    return overlay_env()


def _libpython_dirs() -> list[str]:
    """This interpreter's LIBDIR when it holds a shared libpython (the stub links libpython3.X.so.1.0)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    return [libdir] if libdir and any(Path(libdir).glob("libpython3*.so*")) else []


def check_stub_links(stub: Path, env: dict[str, str]) -> None:
    """A one-line error when the stub's shared libraries (libpython above all) cannot be found."""
    if shutil.which("ldd") is None:
        return
    res = subprocess.run(["ldd", str(stub)], env=env, capture_output=True, text=True)
    missing = [ln.split("=>")[0].strip() for ln in res.stdout.splitlines() if "not found" in ln]
    if missing:
        raise CahpError(f"Triton's Python stub cannot find {', '.join(missing)}; this Python has no shared libpython "
                        "in its LIBDIR: install the shared library of this Python version (e.g. apt install "
                        "libpython3.X) or run cahp-deploy under a Python built with --enable-shared")


def server_env(dist: Path, env: Path) -> dict[str, str]:
    out = os.environ.copy()
    out["PATH"] = f"{env / 'bin'}{os.pathsep}{out.get('PATH', '')}"
    libs = _libpython_dirs() + [str(p) for p in _libs(dist)]
    if out.get("LD_LIBRARY_PATH"):
        libs.append(out["LD_LIBRARY_PATH"])
    out["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    out.pop("PYTHONPATH", None)  # ignored by the stub anyway; keeps the server's own view plain
    return out


def check_port(port: int, flag: str) -> None:
    """A one-line error when ``port`` cannot be bound (Triton listens on all addresses)."""
    if not 1 <= int(port) <= 65535:
        raise CahpError(f"{flag} {port} is not a TCP port (1-65535)")
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # as the server binds: a port left in TIME_WAIT by a stopped server is free, a listening one is not
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("0.0.0.0", int(port)))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise CahpError(f"{flag} {port} is taken (another server is listening there); choose a free port") from None
        raise CahpError(f"{flag} {port} cannot be used ({e.strerror})") from None
    finally:
        s.close()


def load_handoff(handoff_dir: str | os.PathLike) -> tuple[Path, dict]:
    """(model repository, handoff.json) of a ``triton-text`` handoff dir, checked (hashes, config vs graph)."""
    from cahp_deploy.handoff.verify import HANDOFF_FILE, load_record, verify_handoff

    root = Path(handoff_dir)
    if not root.is_dir():
        raise CahpError(f"handoff dir {root} does not exist; write one with `cahp-deploy handoff ARTIFACT --out {root} "
                        "--target triton-text`")
    if not (root / HANDOFF_FILE).is_file():
        raise CahpError(f"{root} is not a handoff dir (no {HANDOFF_FILE}); write one with `cahp-deploy handoff ARTIFACT "
                        "--target triton-text`")
    rec = load_record(root)
    if rec.get("target") != "triton-text":
        why = (" (its model needs Triton's ONNX Runtime backend, which the nvidia-pytriton server lacks)"
               if rec.get("target") == "triton" else "")
        raise CahpError(f"{root} was handed off as --target {rec.get('target')}{why}; `serve` serves --target "
                        "triton-text handoffs")
    verify_handoff(root, smoke=False)
    return root / "model_repository", rec


def _get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0


def _set_pdeathsig() -> None:
    """The server gets SIGTERM when its parent dies (Linux), so a killed `serve` leaves no orphan. The
    kernel ties this to the parent *thread*: set only when the main thread starts the server."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def reap_stubs(backends: Path) -> int:
    """Kill the Python stubs a dead server left behind; remove their shared-memory regions; return how many.

    Measured: when tritonserver is SIGKILLed its stubs keep running (reparented, ignoring SIGTERM), each
    holding its model and a 1 MiB /dev/shm region. They are found by their executable, which lives in
    this server's own backend dir.
    """
    import psutil

    n = 0
    prefix = str(backends)
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if not cmd or not cmd[0].startswith(prefix):
            continue
        try:
            proc.kill()
            proc.wait(10)
            n += 1
        except (psutil.NoSuchProcess, psutil.TimeoutExpired):
            continue
        for arg in cmd[1:4]:
            if arg.startswith("triton_python_backend_shm_region"):
                Path("/dev/shm", arg).unlink(missing_ok=True)
    return n


class TritonServer:
    """One tritonserver process on a triton-text handoff dir. Use as a context manager, or start()/stop().

    ``log_path`` receives the server's output (default: a temp file, kept after the server stops).
    """

    def __init__(self, handoff_dir, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002, *,
                 python_env_dir=None, log_path=None, exit_timeout_s: int = EXIT_TIMEOUT_S):
        self.repository, self.record = load_handoff(handoff_dir)
        self.name = self.record["name"]
        self.ports = {"--http-port": int(http_port), "--grpc-port": int(grpc_port), "--metrics-port": int(metrics_port)}
        if len(set(self.ports.values())) != 3:
            raise CahpError(f"--http-port, --grpc-port and --metrics-port must differ (got {', '.join(map(str, self.ports.values()))})")
        self.dist = triton_dist()
        stub_path(self.dist)  # this Python has a stub, before building anything
        self.python_env_dir = python_env_dir
        self.log_path = Path(log_path) if log_path else None
        self.exit_timeout_s = exit_timeout_s
        self.proc: subprocess.Popen | None = None
        #: stubs of this server found running after it exited, and killed (see :func:`reap_stubs`)
        self.reaped = 0
        self._tmp: Path | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['--http-port']}"

    def command(self, backends: Path) -> list[str]:
        cmd = [str(self.dist / "bin" / "tritonserver"), "--model-repository", str(self.repository.resolve()),
               "--backend-directory", str(backends), "--exit-timeout-secs", str(self.exit_timeout_s)]
        if (self.dist / "caches").is_dir():
            cmd += ["--cache-directory", str(self.dist / "caches")]
        for flag, port in self.ports.items():
            cmd += [flag, str(port)]
        return cmd

    def start(self, ready_timeout_s: float = 180) -> "TritonServer":
        for flag, port in self.ports.items():
            check_port(port, flag)
        env = python_env(self.python_env_dir)
        self._tmp = Path(tempfile.mkdtemp(prefix="cahp-serve-"))
        backends = backend_dir(self.dist, self._tmp / "backends")
        if self.log_path is None:
            self.log_path = self._tmp.parent / f"cahp-serve-{self.name}-{self.ports['--http-port']}.log"
        self._log = open(self.log_path, "wb")
        senv = server_env(self.dist, env)
        check_stub_links(backends / "python" / "triton_python_backend_stub", senv)
        self.proc = subprocess.Popen(self.command(backends), env=senv, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_set_pdeathsig if threading.current_thread() is threading.main_thread()
                                     else None)
        try:
            self.wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def errors(self, n: int = 3) -> str:
        """The server log's last error lines (Triton marks them with a leading E)."""
        if not self.log_path or not self.log_path.is_file():
            return ""
        lines = self.log_path.read_bytes().decode("utf-8", "replace").splitlines()
        errs = [ln for ln in lines if ln.startswith("E") or "error:" in ln.lower() or "error while" in ln]
        return " | ".join(e.strip()[:300] for e in errs[-n:])

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CahpError(f"tritonserver exited (code {self.proc.returncode}) before it was ready: "
                                f"{self.errors() or 'no error line'}; full log: {self.log_path}")
            if _get(f"{self.url}/v2/health/ready") == 200:
                return
            time.sleep(0.25)
        raise CahpError(f"tritonserver was not ready after {timeout_s:.0f} s; log: {self.log_path}")

    def ready(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and _get(f"{self.url}/v2/health/ready") == 200

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGINT (Triton finishes in-flight requests, then exits), SIGKILL after ``timeout_s``; the exit code."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(timeout_s if timeout_s is not None else self.exit_timeout_s + 15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            code = self.proc.returncode
        if self._tmp is not None:
            self.reaped += reap_stubs(self._tmp / "backends")
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        return code

    def __enter__(self) -> "TritonServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _interrupt(signum, frame):  # SIGTERM stops `serve` as Ctrl-C does
    raise KeyboardInterrupt


def serve(handoff_dir, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002, *, python_env_dir=None,
          log_path=None, ready_timeout_s: float = 180, on_ready=None) -> int:
    """Serve until Ctrl-C or SIGTERM (then stop the server cleanly and return 0); a server that dies on its
    own is a :class:`CahpError` naming its last error line."""
    server = TritonServer(handoff_dir, http_port, grpc_port, metrics_port, python_env_dir=python_env_dir,
                          log_path=log_path)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    # Ctrl-C even where the shell started us with SIGINT ignored (a background job)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        server.start(ready_timeout_s)
        if on_ready is not None:
            on_ready(server)
        code = server.proc.wait()
        raise CahpError(f"tritonserver exited on its own (code {code}): {server.errors() or 'no error line'}; "
                        f"log: {server.log_path}")
    except KeyboardInterrupt:
        server.stop()
        return 0
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
