"""etcd connection settings from the environment, with the Go original's names.

Every variable also has a ``NAME_FILE`` form that reads the value from a file
(surrounding whitespace trimmed), so secrets can come from mounted files.
None of these variables may reach the child: see ``child_environ``.
"""

from __future__ import annotations

import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

VARIABLES = (
    "ETCD_ENDPOINTS",
    "ETCD_USERNAME",
    "ETCD_PASSWORD",
    "ETCD_USERNAME_AND_PASSWORD",
    "ETCD_SERVER_CA",
    "ETCD_CLIENT_CERT",
    "ETCD_CLIENT_KEY",
    "ETCD_INSECURE_SKIP_VERIFY",
)
DEFAULT_ENDPOINT = "http://127.0.0.1:2379"
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"", "0", "false", "no", "off"}


class ConfigError(ValueError):
    """A setting that cannot be used. The message names the variable, never a secret."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    tls: bool

    @property
    def address(self) -> str:
        """The host as gRPC and URLs want it: an IPv6 address in brackets."""
        return f"[{self.host}]" if ":" in self.host else self.host

    def __str__(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.address}:{self.port}"


@dataclass(frozen=True)
class EtcdConfig:
    endpoints: tuple[Endpoint, ...]
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    server_ca: bytes | None = field(default=None, repr=False)  # PEM
    client_cert: bytes | None = field(default=None, repr=False)  # PEM
    client_key: bytes | None = field(default=None, repr=False)  # PEM
    insecure_skip_verify: bool = False

    @property
    def tls(self) -> bool:
        return any(e.tls for e in self.endpoints) or self.server_ca is not None


def env_str(environ: Mapping[str, str], name: str) -> str | None:
    """NAME or the contents of the file NAME_FILE (trimmed); None if neither is set."""
    value = environ.get(name)
    file_name = environ.get(name + "_FILE")
    if value is not None and file_name is not None:
        raise ConfigError(f"both {name} and {name}_FILE are set: use one")
    if file_name is not None:
        path = Path(file_name)
        try:
            if not stat.S_ISREG(path.stat().st_mode):  # a FIFO would hang, a device not end
                raise ConfigError(f"{name}_FILE={file_name!r} is not a regular file")
            return path.read_text().strip()
        except OSError as err:
            raise ConfigError(f"cannot read {name}_FILE={file_name!r}: {err.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{name}_FILE={file_name!r} is not UTF-8 text") from None
    return value


def env_bool(environ: Mapping[str, str], name: str) -> bool:
    text = (env_str(environ, name) or "").strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise ConfigError(f"invalid bool env {name}={text!r}: use true or false")


def env_pem(environ: Mapping[str, str], name: str) -> bytes | None:
    """A PEM value: the PEM text itself, or (as most tools take it) a path to a PEM file."""
    text = env_str(environ, name)
    if not text:
        return None
    if "-----BEGIN" in text:
        return text.encode() + b"\n"
    try:
        return Path(text).read_bytes()
    except OSError as err:
        raise ConfigError(f"{name} is neither PEM nor a readable file: {err.strerror}") from None


def parse_endpoint(text: str, default_tls: bool) -> Endpoint:
    """'http://h:2379', 'https://h:2379' or 'h:2379' (TLS then follows the CA setting)."""
    url = urlsplit(text if "://" in text else f"//{text}")
    if url.scheme not in ("", "http", "https") or not url.hostname:
        raise ConfigError(f"invalid endpoint in ETCD_ENDPOINTS: {text!r}")
    if url.username is not None or url.password is not None:
        raise ConfigError("credentials in ETCD_ENDPOINTS: use ETCD_USERNAME and ETCD_PASSWORD")
    try:
        port = url.port
    except ValueError:
        raise ConfigError(f"invalid port in ETCD_ENDPOINTS: {text!r}") from None
    if port == 0:
        raise ConfigError(f"invalid port in ETCD_ENDPOINTS: {text!r}")
    tls = url.scheme == "https" or (url.scheme == "" and default_tls)
    return Endpoint(url.hostname, port or 2379, tls)


def load(environ: Mapping[str, str]) -> EtcdConfig:
    """Read the connection settings; raise ConfigError naming the bad variable."""
    username = env_str(environ, "ETCD_USERNAME") or None
    password = env_str(environ, "ETCD_PASSWORD") or None
    combined = env_str(environ, "ETCD_USERNAME_AND_PASSWORD")
    if combined:
        if username or password:
            raise ConfigError(
                "ETCD_USERNAME_AND_PASSWORD and ETCD_USERNAME/ETCD_PASSWORD are both set"
            )
        username, sep, password = combined.partition(":")
        if not sep or not username:
            raise ConfigError("ETCD_USERNAME_AND_PASSWORD must be 'user:password'")
    if password and not username:
        raise ConfigError("ETCD_PASSWORD is set but ETCD_USERNAME is not")
    if username and not password:
        raise ConfigError("ETCD_USERNAME is set but ETCD_PASSWORD is not (or is empty)")
    server_ca = env_pem(environ, "ETCD_SERVER_CA")
    client_cert = env_pem(environ, "ETCD_CLIENT_CERT")
    client_key = env_pem(environ, "ETCD_CLIENT_KEY")
    if (client_cert is None) != (client_key is None):
        raise ConfigError("ETCD_CLIENT_CERT and ETCD_CLIENT_KEY must be set together")
    default_tls = server_ca is not None or client_cert is not None
    endpoints_text = env_str(environ, "ETCD_ENDPOINTS") or DEFAULT_ENDPOINT
    endpoints = tuple(
        parse_endpoint(part.strip(), default_tls)
        for part in endpoints_text.split(",")
        if part.strip()
    )
    if not endpoints:
        raise ConfigError("ETCD_ENDPOINTS names no endpoint")
    return EtcdConfig(
        endpoints=endpoints,
        username=username,
        password=password or None,
        server_ca=server_ca,
        client_cert=client_cert,
        client_key=client_key,
        insecure_skip_verify=env_bool(environ, "ETCD_INSECURE_SKIP_VERIFY"),
    )


SYSTEMD = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")  # for us, not for the child


def child_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment for the child: ours, less every etcd setting and its _FILE form.

    The child is nginx, not the etcd admin: it never sees etcd credentials;
    nor systemd's notify socket, which is ours (its READY=1 would be taken as ours).
    """
    secret = set(VARIABLES) | {name + "_FILE" for name in VARIABLES} | set(SYSTEMD)
    return {name: value for name, value in environ.items() if name not in secret}
