"""etcd settings from the environment: plain dicts in, EtcdConfig or ConfigError out."""

from __future__ import annotations

from pathlib import Path

import pytest

from etcd_config_dispenser.config import (
    VARIABLES,
    ConfigError,
    Endpoint,
    child_environ,
    load,
)


def test_defaults_to_local_etcd_without_auth() -> None:
    config = load({})
    assert config.endpoints == (Endpoint("127.0.0.1", 2379, False),)
    assert config.username is None and config.password is None
    assert not config.tls


@pytest.mark.parametrize(
    "text, endpoints",
    [
        ("h:1234", (Endpoint("h", 1234, False),)),
        ("http://a:1,https://b:2", (Endpoint("a", 1, False), Endpoint("b", 2, True))),
        (" a:1 , b:2 ", (Endpoint("a", 1, False), Endpoint("b", 2, False))),
        ("etcd", (Endpoint("etcd", 2379, False),)),
        ("[::1]:23", (Endpoint("::1", 23, False),)),
        ("https://[::1]", (Endpoint("::1", 2379, True),)),
    ],
)
def test_endpoints(text: str, endpoints: tuple[Endpoint, ...]) -> None:
    assert load({"ETCD_ENDPOINTS": text}).endpoints == endpoints


def test_ipv6_endpoint_keeps_its_brackets_for_grpc() -> None:
    (endpoint,) = load({"ETCD_ENDPOINTS": "[::1]:2379"}).endpoints
    assert endpoint.address == "[::1]" and str(endpoint) == "http://[::1]:2379"


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"ETCD_ENDPOINTS": "ftp://h:1"}, "invalid endpoint"),
        ({"ETCD_ENDPOINTS": "h:notaport"}, "invalid port"),
        ({"ETCD_ENDPOINTS": "h:0"}, "invalid port"),
        ({"ETCD_ENDPOINTS": "http://u:p@h:1"}, "use ETCD_USERNAME"),
        ({"ETCD_ENDPOINTS": ","}, "names no endpoint"),
        ({"ETCD_PASSWORD": "p"}, "ETCD_USERNAME is not"),
        ({"ETCD_USERNAME": "u"}, "ETCD_PASSWORD is not"),
        ({"ETCD_USERNAME_AND_PASSWORD": "u:"}, "ETCD_PASSWORD is not"),
        ({"ETCD_USERNAME_AND_PASSWORD": "nocolon"}, "user:password"),
        ({"ETCD_USERNAME_AND_PASSWORD": "u:p", "ETCD_USERNAME": "u"}, "both set"),
        ({"ETCD_INSECURE_SKIP_VERIFY": "maybe"}, "invalid bool env ETCD_INSECURE_SKIP_VERIFY"),
        ({"ETCD_CLIENT_CERT": "-----BEGIN CERTIFICATE-----x"}, "set together"),
        ({"ETCD_SERVER_CA": "/nonexistent/ca.pem"}, "neither PEM nor a readable file"),
        ({"ETCD_USERNAME_FILE": "/nonexistent"}, "cannot read ETCD_USERNAME_FILE"),
        ({"ETCD_PASSWORD_FILE": "/dev/null"}, "ETCD_PASSWORD_FILE='/dev/null' is not a regular"),
    ],
)
def test_bad_settings_name_the_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(environ)


def test_password_never_in_the_message_or_repr(tmp_path: Path) -> None:
    config = load({"ETCD_USERNAME": "u", "ETCD_PASSWORD": "s3cret"})
    assert config.password == "s3cret"
    assert "s3cret" not in repr(config)
    with pytest.raises(ConfigError) as err:
        load({"ETCD_USERNAME_AND_PASSWORD": "u:s3cret", "ETCD_PASSWORD": "s3cret"})
    assert "s3cret" not in str(err.value)


def test_file_variants_are_read_and_trimmed(tmp_path: Path) -> None:
    (tmp_path / "user").write_text("  alice\n")
    (tmp_path / "pass").write_text("pw with spaces inside\n")
    config = load(
        {"ETCD_USERNAME_FILE": str(tmp_path / "user"), "ETCD_PASSWORD_FILE": str(tmp_path / "pass")}
    )
    assert (config.username, config.password) == ("alice", "pw with spaces inside")


def test_combined_username_and_password() -> None:
    config = load({"ETCD_USERNAME_AND_PASSWORD": "bob:pa:ss"})
    assert (config.username, config.password) == ("bob", "pa:ss")


@pytest.mark.parametrize("name", VARIABLES)
def test_name_and_name_file_together_is_an_error(name: str, tmp_path: Path) -> None:
    (tmp_path / "v").write_text("x")
    with pytest.raises(ConfigError, match=f"both {name} and {name}_FILE"):
        load({name: "x", name + "_FILE": str(tmp_path / "v")})


def test_ca_as_pem_or_as_file_turns_tls_on(tmp_path: Path) -> None:
    pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"
    (tmp_path / "ca.pem").write_text(pem)
    inline = load({"ETCD_SERVER_CA": pem, "ETCD_ENDPOINTS": "h:1"})
    from_file = load({"ETCD_SERVER_CA": str(tmp_path / "ca.pem"), "ETCD_ENDPOINTS": "h:1"})
    assert inline.server_ca is not None and inline.server_ca.startswith(b"-----BEGIN")
    assert from_file.server_ca == pem.encode()
    assert inline.endpoints[0].tls and from_file.endpoints[0].tls


@pytest.mark.parametrize("word, value", [("true", True), ("1", True), ("no", False), ("", False)])
def test_insecure_skip_verify_bool(word: str, value: bool) -> None:
    assert load({"ETCD_INSECURE_SKIP_VERIFY": word}).insecure_skip_verify is value


def test_child_environment_has_no_etcd_setting() -> None:
    environ = {name: "x" for name in VARIABLES}
    environ.update({name + "_FILE": "/f" for name in VARIABLES})
    environ.update({"PATH": "/bin", "ETCDCTL_API": "3", "HOME": "/root"})
    assert child_environ(environ) == {"PATH": "/bin", "ETCDCTL_API": "3", "HOME": "/root"}
