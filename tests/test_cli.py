"""The command line: flags parse, bad flags exit 2 with one line naming the flag."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable

import pytest

from etcd_config_dispenser.cli import USAGE, UsageError, env_name, parse_args, parse_signal
from etcd_config_dispenser.options import Options


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "etcd_config_dispenser", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        ("SIGHUP", signal.SIGHUP),
        ("HUP", signal.SIGHUP),
        ("hup", signal.SIGHUP),
        ("sigusr2", signal.SIGUSR2),
        ("WINCH", signal.SIGWINCH),
        ("1", signal.SIGHUP),
        ("15", signal.SIGTERM),
        ("SIGRTMIN", signal.SIGRTMIN),
    ],
)
def test_any_signal_name_or_number(text: str, expected: signal.Signals) -> None:
    assert parse_signal(text) == expected


def test_defaults_and_the_child_command() -> None:
    options = parse_args(["-p", "/certs", "-t", "out", "--", "nginx", "-g", "daemon off;"])
    assert options.prefix == b"/certs/"
    assert options.target.is_absolute() and options.target.name == "out"
    assert options.signal == signal.SIGHUP
    assert options.mode == 0o600
    assert (options.uid, options.gid) == (-1, -1)
    assert options.command == ["nginx", "-g", "daemon off;"]
    assert options.kill_timeout == 10.0


@pytest.mark.parametrize(
    "argv, command",
    [
        (["-p", "/c", "-t", "t", "sh", "-c", "exit 4"], ["sh", "-c", "exit 4"]),
        (["-p", "/c", "-t", "t", "nginx", "-g", "daemon off;"], ["nginx", "-g", "daemon off;"]),
        (["-p", "/c", "-t", "t", "--", "nginx", "-g", "x"], ["nginx", "-g", "x"]),
        (["-p", "/c", "-t", "t", "-s", "HUP", "postgres", "-c", "a=b"], ["postgres", "-c", "a=b"]),
        (["-p/c", "-tt", "-sHUP", "cmd", "--prefix=/other"], ["cmd", "--prefix=/other"]),
        (["--prefix", "/c", "--target", "t", "cmd", "--", "x"], ["cmd", "--", "x"]),
    ],
    ids=["sh -c", "nginx -g", "--", "postgres -c", "attached values", "child's own --"],
)
def test_options_stop_at_the_first_word_that_is_not_one(
    argv: list[str], command: list[str]
) -> None:
    """As tini, dumb-init and env: the child's flags are the child's, with or without --."""
    options = parse_args(argv)
    assert options.command == command
    assert options.prefix == b"/c/" and options.target.name == "t"


def test_log_level_and_format_in_any_case() -> None:
    options = parse_args(["-p", "/x", "-t", "o", "--log-level=Debug", "--log-format=JSON"])
    assert (options.log_level, options.log_format) == ("DEBUG", "json")


def test_owner_and_group_by_name_and_number() -> None:
    options = parse_args(["-p", "/x", "-t", "o", "--owner=root", "--group=0", "--mode=0644"])
    assert (options.uid, options.gid, options.mode) == (0, 0, 0o644)


@pytest.mark.parametrize(
    "args, flag",
    [
        (["-p", "/x", "-t", "o", "--mode=9z"], "--mode"),
        (["-p", "/x", "-t", "o", "--mode=1777"], "--mode"),
        (["-p", "/x", "-t", "o", "--signal=SIGNOPE"], "--signal"),
        (["-p", "/x", "-t", "o", "--signal=999"], "--signal"),
        (["-p", "/x", "-t", "o", "--signal=KILL"], "--signal: SIGKILL cannot be handled"),
        (["-p", "/x", "-t", "o", "--signal=19"], "--signal: SIGSTOP"),
        (["-p", "/x", "-t", "o", "--owner=no-such-user-here"], "--owner"),
        (["-p", "/x", "-t", "o", "--group=no-such-group-here"], "--group"),
        (["-p", "/x", "-t", "o", "--kill-timeout=soon"], "--kill-timeout"),
        (["-p", "/x", "-t", "o", "--log-level=loud"], "--log-level"),
        (["-p", "/x", "-t", "o", "--once", "--", "nginx"], "--once"),
    ],
)
def test_bad_values_name_the_flag(args: list[str], flag: str) -> None:
    with pytest.raises(UsageError, match=flag):
        parse_args(args)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--prefix=/x", "--mode=9z", "--target=o"], "--mode"),
        (["--prefix=/x", "--target=o", "--signal=NOPE"], "--signal"),
        (["--prefix=/x"], "--target is required"),
        (["-t", "o"], "--prefix is required"),
        ([], "--prefix is required"),
        (["--prefix=/x", "--target=o", "--no-such-flag"], "unknown option --no-such-flag"),
        (["--prefx=/x", "--target=o"], "unknown option --prefx (did you mean --prefix?)"),
        (["--prefix=/x", "--target=o", "--bogus"], "unknown option --bogus"),
        (["-p", "/x", "-t", "o", "--prefix=/y"], "--prefix is given twice"),
        (["-p", "/x", "-t", "o", "-t", "p"], "--target is given twice"),
        (["-p", "/x", "-t", "o", "-x"], "unknown option -x"),
        (["--prefix=/x", "--target=o", "--owner=no-such-user-here"], "--owner"),
        (["-p", "/x", "-t", "o", "--file-mode=*.key"], "--file-mode: '*.key' is not GLOB=MODE"),
        (["-p", "/x", "-t", "o", "--file-mode=*.key=9"], "--file-mode: '9' in '*.key=9'"),
        (["-p", "/x", "-t", "o", "--file-mode=k=0600:nobody-here"], "unknown user"),
        (["-p", "/x", "-t", "o", "--require=../k"], "--require: '../k' has a '..' segment"),
        (
            ["-p", "/x", "-t", "o", "--exclude=*.key", "--require=a.key"],
            "--require: 'a.key' is left out by --include/--exclude",
        ),
        (["-p", "/x", "-t", "o", "--once", "--timeout=soon"], "--timeout: 'soon'"),
        (["-p", "/x", "-t", "o", "--stale-start=-1"], "--stale-start: '-1'"),
        (["-p", "/x", "-t", "o", "--on-change-timeout=x"], "--on-change-timeout: 'x'"),
        (["-p", "/x", "-t", "o", "--on-change=a", "--on-change=b"], "--on-change is given twice"),
        (["-p", "/x", "-t", "o", "--on-change="], "--on-change: must not be empty"),
        (["-p", "/x", "-t", "o", "--stale-start="], "--stale-start: must not be empty"),
        (["-p", "/x", "-t", "o", "--once", "--timeout=0"], "--timeout: must be more than 0"),
        (["-p", "/x", "-t", "o", "--once", "--on-change=x"], "--once: takes no --on-change"),
        (["-p", "/x", "-t", "o", "--verify-tls=nohost", "nginx"], "'nohost' is not HOST:PORT"),
        (["-p", "/x", "-t", "o", "--verify-tls=h:1,.bad", "nginx"], "'.bad' is not a host name"),
        (["-p", "/x", "-t", "o", "--verify-tls=h:1"], "--verify-tls: needs a child (CMD)"),
        (["-p", "/x", "-t", "o", "--rollback-on-failure"], "needs --verify-tls"),
        (["-p", "/x", "-t", "o", "--expiry-warning=soon"], "--expiry-warning: 'soon'"),
    ],
)
def test_bad_flags_exit_2_with_usage_and_no_traceback(args: list[str], needle: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr
    assert "Usage:" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("etcd-config-dispenser: ")


def test_bad_environment_exits_2_naming_the_variable() -> None:
    result = run_cli("-p", "/x", "-t", "o", env={"ETCD_ENDPOINTS": "ftp://h"})
    assert result.returncode == 2
    assert "ETCD_ENDPOINTS" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_is_the_manual() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert result.stdout.strip() == USAGE.strip()
    for flag in ("--prefix", "--target", "--signal", "--mode", "--owner", "--group"):
        assert flag in result.stdout
    for variable in ("ETCD_ENDPOINTS", "ETCD_PASSWORD", "ETCD_SERVER_CA"):
        assert variable in result.stdout


def test_manual_has_no_tabs_and_fits_80_columns() -> None:
    assert "\t" not in USAGE
    assert max(len(line) for line in USAGE.splitlines()) <= 80


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("etcd-config-dispenser ")


@pytest.mark.parametrize(
    "text, expected",
    [("2s", (2.0, 8.0)), ("500ms:5s", (0.5, 5.0)), ("1", (1.0, 4.0)), ("1m:2m", (60.0, 120.0))],
)
def test_wait_min_and_max(text: str, expected: tuple[float, float]) -> None:
    assert parse_args(["-p", "/x", "-t", "o", f"--wait={text}"]).wait == expected


@pytest.mark.parametrize("text", ["soon", "5s:1s", "0s", "-1s", "2s:x"])
def test_bad_wait_names_the_flag(text: str) -> None:
    with pytest.raises(UsageError, match="--wait"):
        parse_args(["-p", "/x", "-t", "o", f"--wait={text}"])


@pytest.mark.parametrize(
    "argv, environ, check",
    [
        ([], {"DISPENSER_PREFIX": "/c", "DISPENSER_TARGET": "t"}, lambda o: o.prefix == b"/c/"),
        (["-p", "/flag"], {"DISPENSER_PREFIX": "/env", "DISPENSER_TARGET": "t"},
         lambda o: o.prefix == b"/flag/"),  # the flag wins
        ([], {"DISPENSER_PREFIX": "/c", "DISPENSER_TARGET": "t", "DISPENSER_KILL_TIMEOUT": "3"},
         lambda o: o.kill_timeout == 3.0),
        ([], {"DISPENSER_PREFIX": "/c", "DISPENSER_TARGET": "t", "DISPENSER_ONCE": "true"},
         lambda o: o.once),
        ([], {"DISPENSER_PREFIX": "/c", "DISPENSER_TARGET": "t", "DISPENSER_ONCE": "false"},
         lambda o: not o.once),
        (["nginx", "-g", "daemon off;"], {"DISPENSER_PREFIX": "/c", "DISPENSER_TARGET": "t"},
         lambda o: o.command == ["nginx", "-g", "daemon off;"]),
        ([], {"DISPENSER_PREFIX": "/c", "DISPENSER_TARGET": "t", "ETCD_PREFIX": "/etcd-own"},
         lambda o: o.prefix == b"/c/"),  # etcd server's own ETCD_<FLAG> names are not ours
    ],
    ids=["env only", "flag wins", "value", "true", "false", "with a child", "not ETCD_"],
)  # fmt: skip
def test_every_flag_can_come_from_the_environment(
    argv: list[str], environ: dict[str, str], check: Callable[[Options], bool]
) -> None:
    assert check(parse_args(argv, environ))


def test_the_manual_names_the_variables() -> None:
    assert env_name("--kill-timeout") == "DISPENSER_KILL_TIMEOUT"
    assert "DISPENSER_KILL_TIMEOUT" in USAGE and "A flag on the command line wins" in USAGE


@pytest.mark.parametrize(
    "environ, needle",
    [
        ({"DISPENSER_MODE": "9z"}, "DISPENSER_MODE (from the environment): --mode"),
        ({"DISPENSER_ONCE": "maybe"}, "DISPENSER_ONCE='maybe': use true or false"),
        ({"DISPENSER_SIGNAL": "NOPE"}, "DISPENSER_SIGNAL (from the environment): --signal"),
    ],
)
def test_a_bad_value_from_the_environment_names_the_variable(
    environ: dict[str, str], needle: str
) -> None:
    result = run_cli(env={"DISPENSER_PREFIX": "/x", "DISPENSER_TARGET": "o", **environ})
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr


def test_repeatable_flags_keep_every_value_and_their_order() -> None:
    options = parse_args(
        ["-p", "/x", "-t", "o", "--file-mode=a*=0600", "--exclude=e1", "--file-mode=*=0644",
         "--exclude=e2", "--include=i*", "--require=i", "--require=/x/i2", "--", "cmd",
         "--exclude=not-ours"]
    )  # fmt: skip
    assert [rule.glob for rule in options.file_rules] == ["a*", "*"]
    assert options.selection.exclude == ("e1", "e2") and options.selection.include == ("i*",)
    assert options.require == ("i", "i2")  # the full key is taken too
    assert options.command == ["cmd", "--exclude=not-ours"]


def test_repeatable_flags_from_the_environment_are_comma_separated() -> None:
    options = parse_args(
        ["-p", "/x", "-t", "o"],
        {"DISPENSER_EXCLUDE": "production-account,*.bak", "DISPENSER_REQUIRE": "a",
         "DISPENSER_FILE_MODE": "*.key=0600"},
    )  # fmt: skip
    assert options.selection.exclude == ("production-account", "*.bak")
    assert options.require == ("a",)
    assert options.file_rules[0].mode == 0o600


def test_verify_tls_from_the_environment_is_separated_by_semicolons() -> None:
    options = parse_args(
        ["-p", "/x", "-t", "o", "nginx"],
        {"DISPENSER_VERIFY_TLS": "127.0.0.1:443,example.com;127.0.0.1:443,example.org"},
    )
    assert [(a.port, a.sni) for a in options.verify_tls] == [
        (443, "example.com"), (443, "example.org")]  # fmt: skip


def test_every_default_in_the_manual_is_parsed() -> None:
    """docopt reads a continuation line that starts with "-" as a new option, and the
    default above it is silently lost: every [default: X] must reach the options."""
    import re

    from docopt import docopt

    args = docopt(USAGE, argv=["-p", "/x", "-t", "o"], options_first=True)
    blocks = re.split(r"\n  (?=-)", USAGE.split("Options:", 1)[1].split("\n\n", 1)[0])
    for block in blocks:
        default = re.search(r"\[default: ([^\]]+)\]", block)
        if default:
            flag = re.search(r"--[\w-]+", block)
            assert flag is not None
            assert args[flag.group()] == default.group(1), block


def test_a_required_key_too_long_for_this_target_is_refused_at_once() -> None:
    """The intake lowers the path limit by the target's length: a --require that it
    would refuse could never arrive, and the child would wait forever."""
    long_key = "/".join(["k" * 200] * 6)  # 1,205 bytes: fine under /t, not under 3,000 t's
    assert parse_args(["-p", "/x", "-t", "/t", f"--require={long_key}"]).require == (long_key,)
    with pytest.raises(UsageError, match=r"--require: .* is longer than"):
        parse_args(["-p", "/x", "-t", "/" + "t" * 3000, f"--require={long_key}"])
