"""A private PostgreSQL server in a directory: for tests, and for users without a DBA.

The guide says a PostgreSQL APDB "requires a database to already exist"; this
module makes one on the local machine with Debian's ``postgresql`` package
(``/usr/lib/postgresql/<version>/bin``; ``./dev`` installs it):

- ``initdb`` a cluster in ``DIR`` (password authentication only, UTF-8, C locale),
- start it listening on **127.0.0.1 only**, on a free port, with Unix sockets
  disabled (no dependence on ``/var/run/postgresql``),
- create a login role with a random password and databases owned by it
  (``btree_gist`` enabled where a butler registry will live),
- stop it (and optionally delete it).

Passwords never appear in URLs, configs, logs or command lines: they are
written to the db-auth file that lsst.utils' ``DbAuth`` reads (and through it
dax_apdb and the butler registry) — ``$LSST_DB_AUTH`` or
``~/.lsst/db-auth.yaml``, mode 600 — as entries
``{url: postgresql://USER@127.0.0.1:PORT, password: ...}``. The URLs this
module hands out (`PostgresServer.url`) carry no password.

PostgreSQL refuses to run as root; when called as root the server runs as the
``postgres`` system user (``nobody`` if absent) via ``runuser``. If that user
cannot reach ``DIR`` (e.g. pytest's 0700 temporary folders), the cluster lives
in a private folder under the system temp dir and ``DIR/server.json`` records where.

Command line::

    python -m diapipe.apdb.postgres_server start DIR --database apdb --registry-database registry
    python -m diapipe.apdb.postgres_server status DIR
    python -m diapipe.apdb.postgres_server stop DIR [--remove]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = [
    "PostgresServer",
    "PostgresServerError",
    "PostgresUnavailableError",
    "db_auth_path",
    "find_postgres_bin",
    "load_server",
    "main",
    "start_server",
]

HOST = "127.0.0.1"
STATE_FILE = "server.json"
_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class PostgresUnavailableError(RuntimeError):
    """PostgreSQL's server binaries (initdb, pg_ctl) are not installed."""


class PostgresServerError(RuntimeError):
    """The server could not be initialised, started or stopped."""


def find_postgres_bin() -> Path:
    """The folder holding ``initdb`` and ``pg_ctl`` (newest Debian version first).

    ``$DIAPIPE_PG_BIN`` overrides the search; then ``/usr/lib/postgresql/*/bin``,
    then ``PATH``. Raises `PostgresUnavailableError` naming what to install.
    """
    candidates = []
    if os.environ.get("DIAPIPE_PG_BIN"):
        candidates.append(Path(os.environ["DIAPIPE_PG_BIN"]))

    def version(path):
        try:
            return float(Path(path).parent.name)
        except ValueError:
            return 0.0

    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)]
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(os.path.realpath(on_path)).parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    raise PostgresUnavailableError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found in /usr/lib/postgresql/*/bin or on PATH: "
        "install Debian's `postgresql` package (`./dev setup` does) or set DIAPIPE_PG_BIN"
    )


def db_auth_path(path: str | os.PathLike | None = None) -> Path:
    """The db-auth file DbAuth reads: ``path``, else ``$LSST_DB_AUTH``, else ``~/.lsst/db-auth.yaml``."""
    if path is not None:
        return Path(path).expanduser()
    return Path(os.environ.get("LSST_DB_AUTH", "~/.lsst/db-auth.yaml")).expanduser()


def _auth_url(user: str, port: int) -> str:
    # no database path: the entry matches every database of this server
    return f"postgresql://{user}@{HOST}:{port}"


def _read_auth(path: Path) -> list[dict]:
    import yaml

    if not path.exists():
        return []
    entries = yaml.safe_load(path.read_text()) or []
    if not isinstance(entries, list):
        raise PostgresServerError(f"{path} is not a db-auth file (expected a YAML list of {{url, password}})")
    return entries


def _write_auth(path: Path, entries: list[dict]) -> None:
    """Write the db-auth list atomically, mode 600 from the first byte."""
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as stream:
        yaml.safe_dump(entries, stream, default_flow_style=False)
    os.replace(tmp, path)
    os.chmod(path, 0o600)


def _set_auth(path: Path, creds: dict[str, str], port: int, drop_port: int | None = None) -> None:
    ours = {_auth_url(user, port) for user in creds}
    if drop_port is not None:
        ours |= {_auth_url(user, drop_port) for user in creds}
    kept = [e for e in _read_auth(path) if e.get("url") not in ours]
    _write_auth(path, [{"url": _auth_url(u, port), "password": p} for u, p in creds.items()] + kept)


def _get_password(path: Path, user: str, port: int) -> str:
    from lsst.utils.db_auth import DbAuth

    # read the file ourselves: DbAuth(path) would prefer $LSST_DB_AUTH over ``path``
    try:
        return DbAuth(authList=_read_auth(path)).getAuth("postgresql", user, HOST, port, "postgres")[1]
    except Exception as err:  # noqa: BLE001 - DbAuthError or a malformed file: one message
        raise PostgresServerError(f"no password for {_auth_url(user, port)} in {path}: {err}") from None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _server_user() -> str | None:
    """The OS user to run the server as (None: ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise PostgresServerError("running as root, but neither a `postgres` nor a `nobody` user exists to run the server")


def _as_user(run_as: str | None, argv: list[str]) -> list[str]:
    if run_as is None:
        return argv
    if shutil.which("runuser"):
        return ["runuser", "-u", run_as, "--", *argv]
    if shutil.which("setpriv"):
        entry = pwd.getpwnam(run_as)
        return ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups", *argv]
    raise PostgresServerError("running as root and neither runuser nor setpriv is available to drop privileges")


def _run(argv: list[str], what: str, timeout: float = 120) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd="/", check=False)
    except subprocess.TimeoutExpired as err:
        raise PostgresServerError(f"{what} timed out after {timeout} s") from err
    if result.returncode != 0:
        raise PostgresServerError(f"{what} failed (exit {result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def _reachable_by(run_as: str, folder: Path) -> bool:
    probe = _as_user(run_as, ["test", "-w", str(folder), "-a", "-x", str(folder)])
    return subprocess.run(probe, check=False).returncode == 0


@dataclass
class PostgresServer:
    """A running (or stopped) private server; its state lives in ``root/server.json``.

    Connect with `url` (no password; DbAuth supplies it from `auth_file`).
    """

    root: Path
    cluster_dir: Path  #: holds ``data/`` and ``postgres.log``; == root unless relocated
    port: int
    user: str
    bin_dir: Path
    auth_file: Path
    run_as: str | None = None
    superuser: str = "postgres"
    databases: list[str] = field(default_factory=list)

    host = HOST

    @property
    def data_dir(self) -> Path:
        return self.cluster_dir / "data"

    @property
    def log_file(self) -> Path:
        return self.cluster_dir / "postgres.log"

    def url(self, database: str, *, driver: str | None = "psycopg2") -> str:
        """``postgresql+psycopg2://USER@127.0.0.1:PORT/DATABASE`` (never a password).

        ``driver=None`` gives the bare ``postgresql://`` form (the guide's make_apdb.py
        takes that; diapipe rewrites it to psycopg2).
        """
        scheme = "postgresql" if not driver else f"postgresql+{driver}"
        return f"{scheme}://{self.user}@{HOST}:{self.port}/{database}"

    # -- state -------------------------------------------------------------------
    def save(self) -> None:
        state = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        (self.root / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")

    def is_running(self) -> bool:
        try:
            self._pg_ctl(["status"], "pg_ctl status", timeout=30)
        except PostgresServerError:
            return False
        return True

    def _pg_ctl(self, args: list[str], what: str, timeout: float = 120) -> str:
        argv = [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args]
        return _run(_as_user(self.run_as, argv), what, timeout)

    # -- SQL -----------------------------------------------------------------------
    def connect(self, database: str = "postgres", *, superuser: bool = False):
        """A psycopg2 connection (autocommit), password from the db-auth file."""
        import psycopg2

        user = self.superuser if superuser else self.user
        conn = psycopg2.connect(
            host=HOST,
            port=self.port,
            user=user,
            dbname=database,
            password=_get_password(self.auth_file, user, self.port),
            connect_timeout=10,
        )
        conn.autocommit = True
        return conn

    def create_database(self, name: str, *, btree_gist: bool = False, exist_ok: bool = False) -> str:
        """Create database ``name`` owned by `user`; ``btree_gist`` for a butler registry.

        Returns `url` of the new database.
        """
        if not _NAME_RE.match(name):
            raise ValueError(f"database name {name!r}: use lower-case letters, digits and _")
        conn = self.connect(superuser=True)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone():
                    if not exist_ok:
                        raise PostgresServerError(f"database {name} already exists on port {self.port}")
                else:
                    cur.execute(f'CREATE DATABASE "{name}" OWNER "{self.user}" ENCODING \'UTF8\' TEMPLATE template0')
        finally:
            conn.close()
        if btree_gist:
            conn = self.connect(name, superuser=True)
            try:
                with conn.cursor() as cur:
                    cur.execute("CREATE EXTENSION IF NOT EXISTS btree_gist")
            finally:
                conn.close()
        if name not in self.databases:
            self.databases.append(name)
            self.save()
        return self.url(name)

    def drop_database(self, name: str) -> None:
        conn = self.connect(superuser=True)
        try:
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            conn.close()
        if name in self.databases:
            self.databases.remove(name)
            self.save()

    # -- lifecycle -----------------------------------------------------------------
    def start(self, *, attempts: int = 5) -> None:
        """Start on the recorded port, or on a new free one if it is taken."""
        if self.is_running():
            return
        old_port = self.port
        for attempt in range(attempts):
            if attempt or not _port_is_free(self.port):
                self.port = _free_port()
            (self.data_dir / "diapipe.conf").write_text(
                f"listen_addresses = '{HOST}'\nport = {self.port}\nunix_socket_directories = ''\n"
            )
            try:
                self._pg_ctl(["-l", str(self.log_file), "-w", "-t", "60", "start"], "pg_ctl start")
                break
            except PostgresServerError as err:
                tail = self.log_file.read_text()[-2000:] if self.log_file.exists() else ""
                if "could not bind" in tail or "already in use" in tail:
                    continue
                raise PostgresServerError(f"{err}\n{self.log_file}:\n{tail}") from None
        else:
            raise PostgresServerError(f"could not find a free port after {attempts} attempts")
        if self.port != old_port:
            creds = {u: _get_password(self.auth_file, u, old_port) for u in (self.superuser, self.user)}
            _set_auth(self.auth_file, creds, self.port, drop_port=old_port)
        self.save()

    def stop(self, *, remove: bool = False) -> None:
        """Stop the server (fast shutdown). ``remove``: also delete the cluster and its db-auth entries."""
        if self.data_dir.exists() and self.is_running():
            self._pg_ctl(["-m", "fast", "-w", "-t", "60", "stop"], "pg_ctl stop")
        if remove:
            path = self.auth_file
            if path.exists():
                ours = {_auth_url(u, self.port) for u in (self.superuser, self.user)}
                _write_auth(path, [e for e in _read_auth(path) if e.get("url") not in ours])
            shutil.rmtree(self.cluster_dir, ignore_errors=True)
            (self.root / STATE_FILE).unlink(missing_ok=True)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def load_server(root: str | os.PathLike) -> PostgresServer:
    """The server whose state is in ``root/server.json``."""
    root = Path(root).resolve()
    try:
        state = json.loads((root / STATE_FILE).read_text())
    except FileNotFoundError:
        raise PostgresServerError(f"no PostgreSQL server in {root} (no {STATE_FILE}); run `start` first") from None
    for key in ("root", "cluster_dir", "bin_dir", "auth_file"):
        state[key] = Path(state[key])
    return PostgresServer(**state)


def start_server(
    root: str | os.PathLike,
    *,
    user: str = "diapipe",
    databases: tuple[str, ...] = (),
    registry_databases: tuple[str, ...] = (),
    auth_file: str | os.PathLike | None = None,
    port: int | None = None,
    durable: bool = True,
) -> PostgresServer:
    """Initialise (if needed) and start a server in ``root``; create role and databases.

    Parameters
    ----------
    root : path-like
        Folder for the cluster (created). Re-running on an existing one restarts it.
    user : `str`
        Login role that owns the databases (its random password goes to ``auth_file``).
    databases, registry_databases : `tuple` [`str`]
        Databases to create; ``registry_databases`` also get ``btree_gist``
        (needed by a daf_butler PostgreSQL registry).
    auth_file : path-like, optional
        db-auth file to write; default `db_auth_path` ($LSST_DB_AUTH or ~/.lsst/db-auth.yaml).
    port : `int`, optional
        Port to listen on; default a free one.
    durable : `bool`
        False turns off fsync (tests: faster, but a crash can corrupt the cluster).
    """
    if not _NAME_RE.match(user):
        raise ValueError(f"role name {user!r}: use lower-case letters, digits and _")
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if (root / STATE_FILE).exists():
        server = load_server(root)
        server.start()
    else:
        server = _init_cluster(root, user, db_auth_path(auth_file), port, durable)
    for name in databases:
        server.create_database(name, exist_ok=True)
    for name in registry_databases:
        server.create_database(name, btree_gist=True, exist_ok=True)
    return server


def _init_cluster(root: Path, user: str, auth_file: Path, port: int | None, durable: bool) -> PostgresServer:
    bin_dir = find_postgres_bin()
    run_as = _server_user()
    cluster_dir = root
    if run_as is not None:
        if not _reachable_by(run_as, root):
            cluster_dir = Path(tempfile.mkdtemp(prefix="diapipe-pg-"))
        entry = pwd.getpwnam(run_as)
        os.chown(cluster_dir, entry.pw_uid, entry.pw_gid)
        os.chmod(cluster_dir, 0o700)
    passwords = {"postgres": secrets.token_urlsafe(24), user: secrets.token_urlsafe(24)}
    server = PostgresServer(
        root=root,
        cluster_dir=cluster_dir,
        port=port or _free_port(),
        user=user,
        bin_dir=bin_dir,
        auth_file=auth_file,
        run_as=run_as,
    )
    pwfile = cluster_dir / ".initdb-pw"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as stream:
        stream.write(passwords["postgres"] + "\n")
    try:
        if run_as is not None:
            entry = pwd.getpwnam(run_as)
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        argv = [
            str(bin_dir / "initdb"),
            "-D", str(server.data_dir),
            "-U", "postgres",
            f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256",
            "--auth-local=scram-sha-256",
            "-E", "UTF8",
            "--no-locale",
        ]  # fmt: skip
        if not durable:
            argv.append("--no-sync")
        _run(_as_user(run_as, argv), "initdb", timeout=300)
    finally:
        pwfile.unlink(missing_ok=True)
    settings = ["include_if_exists = 'diapipe.conf'"]
    if not durable:
        settings += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
    with open(server.data_dir / "postgresql.conf", "a") as conf:
        conf.write("\n# diapipe.apdb.postgres_server\n" + "\n".join(settings) + "\n")
    # only 127.0.0.1 may connect, with a password
    (server.data_dir / "pg_hba.conf").write_text(
        "# diapipe.apdb.postgres_server: TCP from 127.0.0.1 only, SCRAM passwords\n"
        f"host all all {HOST}/32 scram-sha-256\n"
    )
    if run_as is not None:
        entry = pwd.getpwnam(run_as)
        for path in (server.data_dir / "postgresql.conf", server.data_dir / "pg_hba.conf"):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    _set_auth(auth_file, {"postgres": passwords["postgres"]}, server.port)
    server.save()
    server.start()
    # CREATE ROLE ... PASSWORD gets a pre-computed SCRAM verifier, so the clear text never
    # reaches the server (a failing statement would be written to its log).
    _create_role(server, user, passwords[user])
    _set_auth(auth_file, {"postgres": passwords["postgres"], user: passwords[user]}, server.port)
    return server


def _scram_verifier(password: str) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores, so the clear password never reaches the server."""
    import base64
    import hashlib
    import hmac

    salt = secrets.token_bytes(16)
    iterations = 4096
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _create_role(server: PostgresServer, user: str, password: str) -> None:
    conn = server.connect(superuser=True)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (user,))
            verb = "ALTER" if cur.fetchone() else "CREATE"
            cur.execute(f'{verb} ROLE "{user}" LOGIN PASSWORD %s', (_scram_verifier(password),))
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diapipe.apdb.postgres_server",
        description="A private PostgreSQL server (127.0.0.1 only) for a PostgreSQL APDB and butler registry.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="initialise (first time) and start the server in DIR")
    start.add_argument("dir")
    start.add_argument("--user", default="diapipe", help="login role owning the databases (default diapipe)")
    start.add_argument("--database", action="append", default=[], help="database to create (repeatable)")
    start.add_argument(
        "--registry-database", action="append", default=[], help="database with btree_gist, for a butler registry"
    )
    start.add_argument("--port", type=int, help="port (default: a free one)")
    start.add_argument("--db-auth", help="db-auth file to write (default $LSST_DB_AUTH or ~/.lsst/db-auth.yaml)")
    stop = sub.add_parser("stop", help="stop the server in DIR")
    stop.add_argument("dir")
    stop.add_argument("--remove", action="store_true", help="also delete the cluster and its db-auth entries")
    status = sub.add_parser("status", help="print the server's URLs and whether it runs")
    status.add_argument("dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            server = start_server(
                args.dir,
                user=args.user,
                databases=tuple(args.database),
                registry_databases=tuple(args.registry_database),
                auth_file=args.db_auth,
                port=args.port,
            )
        else:
            server = load_server(args.dir)
        if args.command == "stop":
            server.stop(remove=args.remove)
            print(f"stopped PostgreSQL in {server.root}" + (" and removed it" if args.remove else ""))
            return 0
        running = server.is_running()
        print(f"PostgreSQL {'running' if running else 'stopped'} on {HOST}:{server.port} (data {server.data_dir})")
        print(f"passwords: {server.auth_file} (read by lsst.utils DbAuth: dax_apdb, butler registry)")
        for name in server.databases:
            print(f"  {name}: {server.url(name)}")
        return 0
    except (PostgresServerError, PostgresUnavailableError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
