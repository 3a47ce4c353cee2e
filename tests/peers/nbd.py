"""The NBD peers: a server (``qemu-nbd`` or ``dirtybits nbd``, same options) and the clients
that talk to it (nbdinfo, nbdcopy, libnbd's Python bindings, QEMU's own nbd driver).

Differential tests serve separate copies of one image with each kind of server and run the same
client against both; ``Served.scrub`` takes out what must differ (socket paths, ports).

    from peers import nbd

    with nbd.serve("dirtybits", img, bitmaps=["b0"], tcp=True) as srv:
        out = nbd.nbdinfo("--map=qemu:dirty-bitmap:b0", srv.uri).stdout

python3-libnbd is built for Debian's ``/usr/bin/python3``, not for the venv's interpreter:
``libnbd(script)`` runs a script there in a subprocess.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import peers
from peers import Arg, Done, Ok

KINDS = ("qemu-nbd", "dirtybits")
SYSTEM_PYTHON = "/usr/bin/python3"  # the interpreter python3-libnbd is built for
CLIENT_TIMEOUT = 60.0  # seconds one client run may take (the images here are a few MiB)


def command(kind: str) -> tuple[str, ...]:
    """The argv prefix of a server of ``kind``: both take qemu-nbd's options."""
    if kind == "qemu-nbd":
        return ("qemu-nbd",)
    if kind == "dirtybits":
        return (*peers.DIRTYBITS, "nbd")
    raise ValueError(f"unknown NBD server kind {kind!r} (one of {KINDS})")


@functools.cache
def dirtybits_has_nbd() -> bool:
    """Whether this checkout's CLI has the ``nbd`` subcommand (the dirtybits side of the
    differential tests skips until it has)."""
    return peers.run(*peers.DIRTYBITS, "nbd", "--help", timeout=60).returncode == 0


@functools.cache
def missing_clients() -> list[str]:
    """The NBD clients the interop tests need that this machine lacks (``scripts/setup``
    installs them)."""
    gone = [t for t in ("nbdinfo", "nbdcopy", "qemu-nbd", "openssl") if not shutil.which(t)]
    if not os.access(SYSTEM_PYTHON, os.X_OK) or peers.run(
            SYSTEM_PYTHON, "-c", "import nbd", timeout=60).returncode != 0:
        gone.append("python3-libnbd")
    return gone


@dataclass
class Served:
    """A running NBD server: ``uri`` is what libnbd clients (nbdinfo, nbdcopy) take,
    ``image_opts`` what QEMU's nbd driver takes."""

    kind: str
    proc: subprocess.Popen[str]
    name: str  # the export name ("" = the default export)
    sock: Path | None = None  # a unix socket, or
    port: int | None = None  # a TCP port on 127.0.0.1

    @property
    def uri(self) -> str:
        return self.tls_uri(None)

    def tls_uri(self, certs: Arg | None) -> str:
        """The URI, over TLS with the x509 certificates in ``certs`` (``make_x509``) unless
        ``certs`` is None."""
        s = "s" if certs is not None else ""
        if self.sock is not None:
            query = [f"socket={self.sock}"]
            base = f"nbd{s}+unix:///{self.name}"
        else:
            query = []
            base = f"nbd{s}://127.0.0.1:{self.port}/{self.name}"
        if certs is not None:
            query.append(f"tls-certificates={os.fspath(certs)}")
        return base + ("?" + "&".join(query) if query else "")

    def image_opts(self, *extra: str) -> str:
        """``--image-opts`` of QEMU's nbd driver for this export, ``extra`` (``key=value``)
        appended."""
        where = (f"server.type=unix,server.path={self.sock}" if self.sock is not None
                 else f"server.type=inet,server.host=127.0.0.1,server.port={self.port}")
        return ",".join(["driver=nbd", where, f"export={self.name}", *extra])

    def scrub(self, text: str) -> str:
        """``text`` with this server's socket path or port replaced by a placeholder: what
        must differ between two servers' outputs."""
        if self.sock is not None:
            return text.replace(os.fspath(self.sock), "SOCKET")
        return text.replace(f"127.0.0.1:{self.port}", "127.0.0.1:PORT")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tcp_listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port`` (or on all addresses), read from
    ``/proc/net/tcp``: a probe connection would be a client, and a server without ``-t``
    exits after its first client."""
    wanted = {f"0100007F:{port:04X}", f"00000000:{port:04X}"}
    with open("/proc/net/tcp") as f:
        next(f)  # sl local_address rem_address st ...
        return any(fields[1] in wanted and fields[3] == "0A"  # TCP_LISTEN
                   for fields in (line.split() for line in f))


@contextmanager
def serve(kind: str, image: Arg, *, fmt: str | None = "qcow2", readonly: bool = True,
          bitmaps: Iterable[str] = (), options: Iterable[Arg] = (), tcp: bool = False,
          name: str = "", cwd: Arg | None = None, timeout: float = 10) -> Iterator[Served]:
    """Serve ``image`` with a server of ``kind`` (persistent, ``-t``), each of ``bitmaps``
    exported (``-B``), under export ``name`` (``-x``, when not empty), on a fresh unix socket
    or (``tcp``) on a free port of 127.0.0.1; yields once it listens (within ``timeout``
    seconds, or fails with its stderr). Stopped (SIGTERM, then SIGKILL) and its socket
    removed after."""
    with peers.socket_dir("dirtybits-nbd-") as d, open(d / "stderr", "w+") as err:
        sock, port = (None, free_port()) if tcp else (d / "s", None)
        where = ["-b", "127.0.0.1", "-p", str(port)] if port is not None else ["-k", sock]
        cmd = peers.argv(*command(kind), "-t", *where, *(["-f", fmt] if fmt else []),
                         *(["-r"] if readonly else []), *(["-x", name] if name else []),
                         *[a for b in bitmaps for a in ("-B", b)], *options, image)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, text=True, cwd=cwd)
        try:
            deadline = time.monotonic() + timeout
            while not (peers.listening(sock) if sock is not None
                       else tcp_listening(port or 0)):
                if proc.poll() is not None or time.monotonic() > deadline:
                    peers.stop(proc)
                    err.seek(0)
                    raise AssertionError(f"{' '.join(cmd)} did not come up (exit "
                                         f"{proc.returncode}): {err.read().strip()}")
                time.sleep(0.01)
            yield Served(kind, proc, name, sock, port)
        finally:
            peers.stop(proc)


# ---------------------------------------------------------------------------- clients
def nbdinfo(*args: Arg, ok: Ok = (0,), timeout: float = CLIENT_TIMEOUT) -> Done:
    """``nbdinfo ARGS``."""
    return peers.sh("nbdinfo", *args, ok=ok, timeout=timeout)


def nbdcopy(*args: Arg, ok: Ok = (0,), timeout: float = CLIENT_TIMEOUT) -> Done:
    """``nbdcopy ARGS``."""
    return peers.sh("nbdcopy", *args, ok=ok, timeout=timeout)


def libnbd(script: str, *args: Arg, timeout: float = CLIENT_TIMEOUT) -> str:
    """Run ``script`` (``import nbd`` works there) with ``args`` as ``sys.argv[1:]`` under
    Debian's python3; its stdout (its exit status must be 0)."""
    return peers.sh(SYSTEM_PYTHON, "-c", script, *args, timeout=timeout).stdout


def make_x509(directory: Arg) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate (RSA 2048,
    which GnuTLS in QEMU 7.2 takes), laid out as QEMU's ``tls-creds-x509,dir=`` and libnbd's
    ``tls-certificates=`` expect: ca-cert.pem, server-cert.pem, server-key.pem,
    client-cert.pem, client-key.pem. Returns the directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def openssl(*args: Arg) -> None:
        peers.sh("openssl", *args, cwd=d, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "365",
            "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-subj", "/CN=dirtybits test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    usage = {"server": "serverAuth", "client": "clientAuth"}
    for who, eku in usage.items():
        (d / f"{who}.ext").write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage={eku}\n"
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}-key.pem",
                "-out", f"{who}.csr", "-subj", f"/CN={'localhost' if who == 'server' else who}")
        openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca-cert.pem", "-CAkey",
                "ca-key.pem", "-CAcreateserial", "-days", "365", "-extfile", f"{who}.ext",
                "-out", f"{who}-cert.pem")
        (d / f"{who}.csr").unlink()
        (d / f"{who}.ext").unlink()
    return d
