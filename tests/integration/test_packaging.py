"""Installing Warren like HAProxy: a wheel and an sdist, a Debian package, the systemd unit.

The wheel and the sdist are built once per session (`python -m build`), the
.deb once from that wheel (packaging/deb/build). The .deb is then really
installed on this machine with apt-get, verified, started from the package as
the `warren` user with the unit's capabilities and a notify socket (systemd is
not PID 1 here), and purged; a lock keeps two test runs from doing that at
the same time.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from pathlib import Path

import pytest
import trio
from packaging.requirements import Requirement

from tests.viplab import REPO
from tests.warrenproc import WarrenProcess

PYTHON = sys.executable
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
DECLARED = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
DEB_LOCK = "/run/lock/warren-deb-test.lock"
APT = ["apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=600"]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def run(argv, timeout: float = 600, **options) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **options)
    assert done.returncode == 0, f"{argv}: {done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="session")
def dist(tmp_path_factory) -> Path:
    """The wheel and the sdist, built once."""
    out = tmp_path_factory.mktemp("dist")
    run([PYTHON, "-m", "build", "--outdir", str(out), str(REPO)])
    return out


@pytest.fixture(scope="session")
def deb(dist, tmp_path_factory) -> Path:
    """The Debian package, built once from the session's wheel."""
    if shutil.which("dpkg-deb") is None or not Path("/usr/bin/python3").exists():
        pytest.skip("needs dpkg-deb and Debian's python3")
    build = tmp_path_factory.mktemp("debbuild")
    pip = str(Path(PYTHON).parent / "pip")
    done = run([str(REPO / "packaging/deb/build")], env={**os.environ, "DIST": str(dist), "BUILD": str(build),
                                                          "PIP": pip})
    return Path(done.stdout.strip().splitlines()[-1])


def the_wheel(dist: Path) -> Path:
    """The session's wheel: compiled for this interpreter (proxy/_native.py)."""
    (wheel,) = dist.glob(f"warren-{VERSION}-*.whl")
    return wheel


def test_the_wheel_and_sdist_declare_exactly_the_dependencies(dist):
    wheel = the_wheel(dist)
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(f"warren-{VERSION}.dist-info/METADATA").decode()
        names = archive.namelist()
    requires = [line.split(": ", 1)[1] for line in metadata.splitlines()
                if line.startswith("Requires-Dist: ") and "extra ==" not in line]
    assert {str(Requirement(r)) for r in requires} == {str(Requirement(r)) for r in DECLARED}
    assert "proxy/importer/__init__.py" in names and "proxy/sdnotify.py" in names
    with tarfile.open(dist / f"warren-{VERSION}.tar.gz") as sdist:
        members = sdist.getnames()
    assert f"warren-{VERSION}/pyproject.toml" in members and f"warren-{VERSION}/proxy/cli.py" in members


def test_the_wheel_installs_into_a_clean_virtualenv_with_a_working_warren(dist, tmp_path):
    venv = tmp_path / "venv"
    run([PYTHON, "-m", "venv", str(venv)])
    run([str(venv / "bin/pip"), "install", "-q", str(the_wheel(dist))])
    warren = str(venv / "bin/warren")
    assert run([warren, "version"]).stdout.strip() == f"warren {VERSION}"
    run([warren, "check", str(REPO / "conf/warren.toml")], cwd=tmp_path)
    data = REPO / "tests/data/import"
    imported = run([warren, "import", str(data / "clean-haproxy.cfg"), "--keepalived",
                    str(data / "clean-keepalived.conf")])
    assert "[vip.amqp]" in imported.stdout
    run([str(venv / "bin/pip"), "check"])
    installed = run([str(venv / "bin/python"), "-c", "import proxy.app, proxy.importer, proxy.vip.service, "
                     "proxy.backends.resolve, proxy.stats_ui; print('ok')"], cwd=tmp_path)
    assert installed.stdout.strip() == "ok"  # every module imports with only the declared dependencies
    # The connection path runs compiled, from the wheel alone (no source checkout beside it).
    native = run([str(venv / "bin/python"), "-c", "import proxy.app, proxy._native as n; "
                  "print(len(n.compiled()), len(n.MODULES))"], cwd=tmp_path)
    compiled, listed = native.stdout.split()
    assert compiled == listed != "0"


def test_the_debian_package_holds_the_venv_unit_user_runtime_dir_conffile_and_certs_dir(deb):
    info = run(["dpkg-deb", "--info", str(deb)]).stdout
    assert "Package: warren" in info and "Depends: python3.11" in info
    contents = run(["dpkg-deb", "--contents", str(deb)]).stdout
    for path in ("./opt/warren/bin/warren", "./opt/warren/bin/python", "./usr/bin/warren -> /opt/warren/bin/warren",
                 "./etc/warren/warren.toml", "./lib/systemd/system/warren.service",
                 "./usr/lib/sysusers.d/warren.conf", "./usr/lib/tmpfiles.d/warren.conf", "./etc/warren/certs/"):
        assert path in contents, path
    with tempfile.TemporaryDirectory() as control:
        run(["dpkg-deb", "--control", str(deb), control])
        assert Path(control, "conffiles").read_text().split() == ["/etc/warren/warren.toml"]
        for script in ("postinst", "prerm", "postrm"):
            run(["sh", "-n", str(Path(control, script))])  # valid shell


@pytest.fixture
def deb_lock():
    """One test run at a time installs and purges the package on this machine."""
    with open(DEB_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _processes_from(prefix: str) -> list[int]:
    """Processes whose program (argv[0]) lies under ``prefix``; not those that merely name
    it (a package being built elsewhere on the machine runs .../staging/opt/warren/bin/pip)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(prefix.encode()):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@needs_root
@pytest.mark.netns
async def test_the_package_installs_verifies_starts_as_warren_and_purges_cleanly(deb, deb_lock, tmp_path):
    user_existed = subprocess.run(["getent", "passwd", "warren"], capture_output=True).returncode == 0
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    namespace = f"wdeb{os.getpid() % 100000}"
    shared = Path(tempfile.mkdtemp(prefix="warren-deb-"))
    shared.chmod(0o755)
    try:
        run([*APT, "install", "--no-install-recommends", str(deb)], env=environment)
        assert run(["getent", "passwd", "warren"]).stdout.split(":")[6].strip() == "/usr/sbin/nologin"
        conffile = Path("/etc/warren/warren.toml").stat()
        assert oct(conffile.st_mode & 0o777) == "0o640" and conffile.st_gid == int(
            run(["getent", "group", "warren"]).stdout.split(":")[2])
        assert Path("/run/warren").is_dir()
        certs = Path("/etc/warren/certs").stat()  # docs/deployment.md#certificates
        assert oct(certs.st_mode & 0o7777) == "0o750" and (certs.st_uid, certs.st_gid) == (0, conffile.st_gid)
        verify = subprocess.run(["systemd-analyze", "verify", "/lib/systemd/system/warren.service"],
                                capture_output=True, text=True, timeout=60)
        assert verify.returncode == 0 and "warren.service" not in verify.stderr, verify.stderr
        run(["/usr/bin/warren", "check", "/etc/warren/warren.toml"])
        await _start_like_the_unit(namespace, shared)
    finally:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)
        purge = subprocess.run([*APT, "purge", "warren"], capture_output=True, text=True, timeout=600,
                               env=environment)
        if not user_existed:
            subprocess.run(["userdel", "warren"], capture_output=True, timeout=30)
        shutil.rmtree(shared, ignore_errors=True)
    assert purge.returncode == 0, purge.stderr
    for gone in ("/opt/warren", "/usr/bin/warren", "/lib/systemd/system/warren.service", "/etc/warren/warren.toml",
                 "/etc/warren/certs", "/usr/lib/sysusers.d/warren.conf", "/run/warren"):
        assert not os.path.lexists(gone), gone
    assert _processes_from("/opt/warren/") == []


async def _start_like_the_unit(namespace: str, shared: Path) -> None:
    """`/usr/bin/warren run` as the warren user with the unit's capabilities and a notify socket,
    in a network namespace of its own (the example's ports stay private)."""
    subprocess.run(["ip", "netns", "add", namespace], check=True, capture_output=True, timeout=30)
    subprocess.run(["ip", "-n", namespace, "link", "set", "lo", "up"], check=True, capture_output=True, timeout=30)
    notify_path = str(shared / "notify.sock")
    notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await notify.bind(notify_path)
    os.chmod(notify_path, 0o666)
    caps = "+net_bind_service,+net_admin,+net_raw"
    warren = WarrenProcess(Path("/etc/warren/warren.toml"))
    warren.command = ["/usr/bin/warren"]
    warren.prefix = ["ip", "netns", "exec", namespace, "setpriv", "--reuid", "warren", "--regid", "warren",
                     "--init-groups", "--no-new-privs", "--inh-caps", caps, "--ambient-caps", caps,
                     "--bounding-set", f"-all,{caps}"]
    warren.env = {"PATH": "/usr/bin:/bin", "NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "2000000",
                  "PYTHONDONTWRITEBYTECODE": "1"}
    with trio.fail_after(60):
        async with warren, trio.open_nursery() as nursery:
            nursery.start_soon(warren.start, nursery)
            while b"READY=1" not in await notify.recv(4096):
                pass
            started = await warren.wait_for("warren.started")
            assert started["listeners"] == {"amqp": ["127.0.0.1:5670"]}
            warren.signal(signal.SIGTERM)
            assert await warren.process.wait() == 0
            nursery.cancel_scope.cancel()
    notify.close()
