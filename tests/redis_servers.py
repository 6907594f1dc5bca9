"""Real Redis deployments for tests, each started in a temp folder on free loopback ports and stopped
afterwards: a 3-master Redis Cluster, a master + replicas watched by 3 sentinels, and a TLS server
with a CA, server and client certificates made here (``cryptography``) and an ACL user."""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import free_port, require_service
from tests.waiting import wait_until

HOST = "127.0.0.1"


def need_binaries() -> None:
    for name in ("redis-server", "redis-cli"):
        if shutil.which(name) is None:
            require_service(name, f"the {name} binary is not on PATH")


def client(port: int, **kwargs: Any) -> Any:
    import redis

    return redis.Redis(host=HOST, port=port, socket_timeout=2, socket_connect_timeout=2, **kwargs)


def answers(port: int, **kwargs: Any) -> bool:
    import redis

    try:
        return bool(client(port, **kwargs).ping())
    except (redis.RedisError, OSError):
        return False


class Servers:
    """redis-server processes of one deployment; ``stop`` ends every one this object started."""

    def __init__(self, folder: Path) -> None:
        need_binaries()
        self.folder = folder
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        workdir = self.folder / name
        workdir.mkdir(parents=True, exist_ok=True)
        log = (workdir / "log").open("wb")
        proc = subprocess.Popen(["redis-server", *args], stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
        self.procs.append(proc)
        return proc

    def wait_answering(self, name: str, port: int, **kwargs: Any) -> None:
        """Until the server started as ``name`` answers PING; its log in the error when it does not."""
        try:
            wait_until(lambda: answers(port, **kwargs), timeout=10)
        except AssertionError:
            log = (self.folder / name / "log").read_text(errors="replace")[-2000:]
            raise AssertionError(f"redis-server {name} on port {port} did not answer:\n{log}") from None

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


def plain(port: int) -> list[str]:
    return ["--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]


class ClusterServers(Servers):
    """Three masters with every slot assigned (``redis-cli --cluster create``), no replicas."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.ports = [free_port() for _ in range(3)]
        self.url = "redis+cluster://" + ",".join(f"{HOST}:{port}" for port in self.ports)

    def start(self) -> ClusterServers:
        for port in self.ports:
            # the bus port is a free port too (the default, port + 10000, may be taken or > 65535)
            bus = ["--cluster-port", str(free_port())]
            self.spawn(
                f"node{port}", [*plain(port), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", *bus]
            )
        for port in self.ports:
            self.wait_answering(f"node{port}", port)
        nodes = [f"{HOST}:{port}" for port in self.ports]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *nodes, "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )

        def ready() -> bool:
            for port in self.ports:
                info = client(port).execute_command("CLUSTER", "INFO").decode()
                if "cluster_state:ok" not in info or "cluster_known_nodes:3" not in info:
                    return False
            return True

        wait_until(ready, timeout=20, interval=0.1)
        return self


class SentinelServers(Servers):
    """A master, ``replicas`` replicas, and three sentinels that monitor the master as ``MASTER``."""

    MASTER = "gwmaster"

    def __init__(self, folder: Path, replicas: int = 1) -> None:
        super().__init__(folder)
        self.master_port = free_port()
        self.replica_ports = [free_port() for _ in range(replicas)]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.url = "sentinel://" + ",".join(f"{HOST}:{p}" for p in self.sentinel_ports) + f"/{self.MASTER}/0"

    def start(self) -> SentinelServers:
        self.spawn("master", plain(self.master_port))
        self.wait_answering("master", self.master_port)
        for port in self.replica_ports:
            self.spawn(f"replica{port}", [*plain(port), "--replicaof", HOST, str(self.master_port)])
            self.wait_answering(f"replica{port}", port)
        wait_until(lambda: self.replicas_online(self.master_port) == len(self.replica_ports), timeout=10)
        for port in self.sentinel_ports:
            conf = self.folder / f"sentinel{port}.conf"
            conf.write_text(
                f"port {port}\nbind {HOST}\n"
                f"sentinel monitor {self.MASTER} {HOST} {self.master_port} 2\n"
                f"sentinel down-after-milliseconds {self.MASTER} 2000\n"
                f"sentinel failover-timeout {self.MASTER} 10000\n"
                f"sentinel parallel-syncs {self.MASTER} {len(self.replica_ports)}\n"
            )
            self.spawn(f"sentinel{port}", [str(conf), "--sentinel"])

        def watching() -> bool:
            for port in self.sentinel_ports:
                try:
                    state = client(port).sentinel_master(self.MASTER)
                except Exception:
                    return False
                # the sentinels find each other through hello messages later (every 2 s); a forced
                # failover needs no vote, and the test waits for all of them to agree after it
                if int(state["num-slaves"]) != len(self.replica_ports):
                    return False
            return True

        wait_until(watching, timeout=20, interval=0.1)
        return self

    def replicas_online(self, port: int) -> int:
        info = client(port).info("replication")
        return sum(1 for key, value in info.items() if key.startswith("slave") and value.get("state") == "online")

    def master_address(self) -> tuple[str, int]:
        host, port = client(self.sentinel_ports[0]).execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.MASTER)
        return host.decode(), int(port)

    def failover(self) -> None:
        """``SENTINEL FAILOVER``: a replica is promoted although the master is healthy."""
        client(self.sentinel_ports[0]).execute_command("SENTINEL", "FAILOVER", self.MASTER)

    def settled_after_failover(self, old_master: int) -> bool:
        """Every sentinel names the same new master, it is a master, and a replica replicates from it
        (the other replicas at once; the old master rejoins as one when a sentinel next sees it)."""
        named = set()
        for port in self.sentinel_ports:
            _, p = client(port).execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.MASTER)
            named.add(int(p))
        if len(named) != 1 or old_master in named:
            return False
        new = named.pop()
        return client(new).info("replication")["role"] == "master" and self.replicas_online(new) >= 1


class TLSServer(Servers):
    """One server reachable only over TLS (client certificates required) with an ACL user ``gw``
    (password ``PASSWORD``) limited to ``NAMESPACE:*`` keys, and an ``admin`` user for the test."""

    PASSWORD = "gw-secret-1"
    ADMIN_PASSWORD = "admin-secret-1"
    NAMESPACE = "kgtls"

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.port = free_port()
        self.url = f"rediss://gw@{HOST}:{self.port}/0"
        self.tls_dir = folder / "tls"
        self.ca, self.cert, self.key = (self.tls_dir / n for n in ("ca.pem", "client.pem", "client.key"))
        self.other_ca = self.tls_dir / "other-ca.pem"

    def start(self) -> TLSServer:
        self.tls_dir.mkdir(parents=True, exist_ok=True)
        make_certificates(self.tls_dir)
        conf = self.folder / "redis-tls.conf"
        conf.write_text(
            f'port 0\ntls-port {self.port}\nbind {HOST}\nsave ""\nappendonly no\n'
            f"tls-cert-file {self.tls_dir / 'server.pem'}\ntls-key-file {self.tls_dir / 'server.key'}\n"
            f"tls-ca-cert-file {self.ca}\ntls-auth-clients yes\n"
            "user default off\n"
            f"user gw on >{self.PASSWORD} ~{self.NAMESPACE}:* +@all -@dangerous\n"
            f"user admin on >{self.ADMIN_PASSWORD} ~* &* +@all\n"
        )
        self.spawn("tls", [str(conf)])
        self.wait_answering("tls", self.port, **self.admin_kwargs())
        return self

    def admin_kwargs(self) -> dict[str, Any]:
        return {
            "ssl": True,
            "ssl_ca_certs": str(self.ca),
            "ssl_certfile": str(self.cert),
            "ssl_keyfile": str(self.key),
            "username": "admin",
            "password": self.ADMIN_PASSWORD,
        }

    def admin(self) -> Any:
        return client(self.port, **self.admin_kwargs())


def make_certificates(folder: Path) -> None:
    """A CA; a server certificate for 127.0.0.1/localhost and a client certificate, both signed by it;
    and a second CA that signed neither (to show that an unknown server is refused)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )

    def ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    ca_key, ca_cert = ca("kimi-gateway test CA")
    (folder / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _, other = ca("some other CA")
    (folder / "other-ca.pem").write_bytes(other.public_bytes(serialization.Encoding.PEM))
    for who, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(f"kimi-gateway test {who}"))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if who == "server":
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]),
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        (folder / f"{who}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(key, folder / f"{who}.key")
