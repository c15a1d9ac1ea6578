"""etcd-config-dispenser: etcd keys as files, kept current, one snapshot a change.

Usage:
  etcd-config-dispenser --prefix=PREFIX --target=DIR [options]
                        [--include=GLOB]... [--exclude=GLOB]...
                        [--file-mode=RULE]... [--require=KEY]...
                        [--verify-tls=ADDR]... [--] [CMD...]
  etcd-config-dispenser (-h | --help | --version)

Each etcd transaction becomes one snapshot directory under DIR, made live at
once by renaming the DIR/..data symlink; DIR/NAME links to DIR/..data/NAME.
CMD starts after the first snapshot is live, gets SIG after every change,
and has its signals forwarded; the exit code is CMD's. Options end at "--"
or at the first word that is not one: the rest is CMD. Without CMD, the
files are written and kept current until SIGTERM.

Options:
  -p, --prefix=PREFIX    etcd key prefix to read; "/" is added at the end.
  -t, --target=DIR       Directory to write into, created if missing.
  -s, --signal=SIG       Signal for CMD after a change: a name (HUP, SIGHUP,
                         sighup) or a number [default: SIGHUP].
  -m, --mode=MODE        File mode, octal; directories get x where r is set
                         [default: 0600].
  -o, --owner=USER       Owner of the files, a name or a uid (root only).
  -g, --group=GROUP      Group of the files, a name or a gid (root only).
  -c, --check=CHECK      After each change is live and before the signal,
                         run CHECK with sh -c (e.g. "nginx -t"); if it
                         fails, the previous snapshot is put back, CMD is
                         not signalled and the output is logged. Not run
                         for the first snapshot into an empty target.
  --include=GLOB         Take only keys matching GLOB, relative to the
                         prefix ("*" matches "/" too); repeatable.
  --exclude=GLOB         Leave out keys matching GLOB (neither written nor
                         warned about); repeatable; wins over --include.
  --file-mode=RULE       GLOB=MODE[:USER[:GROUP]]: files matching GLOB get
                         MODE (and owner) instead of --mode; the first
                         matching rule wins; repeatable. E.g. "*.key=0600".
  --require=KEY          Publish nothing, start no CMD and do not succeed
                         with --once while KEY (relative to the prefix) is
                         missing; repeatable.
  --on-change=HOOK       After each change is live (and CMD signalled), run
                         HOOK with sh -c, with DISPENSER_REVISION,
                         DISPENSER_WRITTEN and DISPENSER_REMOVED (paths, one
                         a line) in its environment; one at a time, changes
                         meanwhile go to the next run. E.g. "systemctl
                         reload nginx".
  --on-change-timeout=SECS
                         Kill HOOK after this long [default: 60].
  --stale-start=SECS     If etcd has not answered SECS after the start and
                         DIR holds a previous run's snapshot, start CMD with
                         it (/healthz says stale); etcd's data replaces it
                         as soon as it comes.
  --verify-certs         Before a change goes live, check every certificate
                         it touches (found by name: NAME-fullchain.pem +
                         NAME-key.pem, fullchain.pem + privkey.pem, tls.crt
                         + tls.key, NAME.crt + NAME.key): dates, chain
                         order, key match; refused: nothing published.
  --verify-tls=ADDR      HOST:PORT[,SNI]; after the signal for a change that
                         touched a certificate, handshake until the child
                         serves a certificate of the live snapshot; if it
                         still serves the old one after the timeout, log
                         an error (the reload did not take); repeatable.
  --verify-tls-timeout=SECS
                         How long to wait for the reload [default: 10].
  --rollback-on-failure  With --verify-tls: when the reload did not take,
                         put the previous snapshot back and signal again.
  --status-prefix=PFX    Keep PFX/INSTANCE in etcd (under a lease: it goes
                         when this process does) saying what this instance
                         serves: revision, files digest, verification;
                         see etcd-config-ctl status and wait.
  --instance=NAME        This instance's name under --status-prefix
                         (default: the host name).
  --expiry-warning=DUR   Log a warning this long before a delivered
                         certificate expires [default: 14d].
  --once                 Write the snapshot, then exit 0 (1 if none could be
                         written within --timeout); takes no CMD.
  --timeout=SECS         With --once: how long to wait for etcd and for
                         the required keys [default: 60].
  --kill-timeout=SECS    After forwarding SIGTERM, SIGINT or SIGQUIT, wait
                         this long for CMD to exit, then SIGKILL it
                         [default: 10].
  --backoff-max=SECS     Longest wait between retries while etcd is
                         unavailable [default: 30].
  -w, --wait=MIN[:MAX]   After a change, wait until MIN passed without
                         another (at most MAX, default 4*MIN), then write
                         all of them as one snapshot with one signal:
                         "2s", "500ms:5s". Default: every change at once.
  --health-addr=ADDR     Serve /healthz (200 while a snapshot is live and
                         etcd answers, else 503 and why), /livez (200
                         while the dispenser runs: the liveness probe) and
                         /metrics (Prometheus) on HOST:PORT.
  --log-level=LEVEL      debug, info, warning or error [default: info].
  --log-format=FORMAT    text, or json: one object a line [default: text].
  -h, --help             Show this help.
  --version              Show the version.

Every option can also be set in the environment: DISPENSER_ and its name
in capitals, "_" for "-" (DISPENSER_PREFIX, DISPENSER_KILL_TIMEOUT,
DISPENSER_ONCE=true); a repeatable one takes values separated by commas
(DISPENSER_EXCLUDE=production-account,*.bak), DISPENSER_VERIFY_TLS by ";".
A flag on the command line wins.

Environment (each NAME also as NAME_FILE, read from that file; none of
them reaches CMD):
  ETCD_ENDPOINTS         Comma-separated endpoints, "http://h:2379",
                         "https://h:2379" or "h:2379"; default
                         http://127.0.0.1:2379.
  ETCD_USERNAME          User name; no authentication if unset.
  ETCD_PASSWORD          Password: give it as ETCD_PASSWORD_FILE, since
                         the environment stays readable in /proc.
  ETCD_USERNAME_AND_PASSWORD
                         "user:password" in one variable (as a _FILE too).
  ETCD_SERVER_CA         CA bundle to verify the server: PEM, or a file.
  ETCD_CLIENT_CERT       Client certificate for mutual TLS: PEM, or a file.
  ETCD_CLIENT_KEY        Client key for mutual TLS: PEM, or a file.
  ETCD_INSECURE_SKIP_VERIFY
                         true: do not verify the server's certificate.
"""

from __future__ import annotations

import difflib
import grp
import logging
import os
import pwd
import re
import signal
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

from docopt import DocoptExit, docopt

from . import __version__, config
from .heap import map_big_blocks
from .keys import InvalidKey, key_to_relpath, normalise_prefix
from .logs import setup_logging
from .options import Options
from .rules import FileRule, KeySelection
from .snapshot import max_key_path
from .tlsverify import Address, split_host_port
from .tlsverify import parse_address as parse_address_sni

log = logging.getLogger("etcd_config_dispenser")
USAGE = __doc__ or ""
PROG = "etcd-config-dispenser"


class UsageError(ValueError):
    """A bad flag. The message names the flag and the value."""


# "  -p, --prefix=PREFIX  ..." in the usage: (short, long, takes a value).
_OPTION_LINE = re.compile(r"^  (?:(-\w), )?(--[\w-]+)(=)?", re.MULTILINE)


def _options() -> dict[str, tuple[str, bool]]:
    """Every option of the usage, short and long: its long name and whether it takes a value."""
    found: dict[str, tuple[str, bool]] = {}
    for short, long, value in _OPTION_LINE.findall(USAGE.split("Options:", 1)[1]):
        for name in (short, long):
            if name:
                found[name] = (long, bool(value))
    return found


def _split(argv: list[str]) -> tuple[list[str], int]:
    """The names of the dispenser's own options, and where the child's words begin: at
    ``--`` or the first word that is not an option (as tini and env do it, so that
    ``... nginx -g 'daemon off;'`` needs no ``--``)."""
    options = _options()
    names: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--" or not arg.startswith("-") or arg == "-":
            break
        name = arg.split("=", 1)[0] if arg.startswith("--") else arg[:2]
        names.append(name)
        value_follows = name in options and options[name][1] and arg == name
        i += 2 if value_follows else 1
    return names, i


def _check_flags(argv: list[str]) -> None:
    """One line for what docopt would say badly: an unknown flag (and what it may have
    meant), or a flag given twice."""
    options = _options()
    seen: set[str] = set()
    for name in _split(argv)[0]:
        if name not in options:
            close = difflib.get_close_matches(name, [o for o in options if o.startswith("--")], 1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UsageError(f"unknown option {name}{hint}")
        long = options[name][0]
        if long in seen and long not in REPEATABLE:
            raise UsageError(f"{long} is given twice")
        seen.add(long)


def _missing_flag(argv: list[str]) -> str | None:
    """docopt's message for a missing required flag names none: name it."""
    given = argv[: _split(argv)[1]]
    if any(arg in ("-h", "--help", "--version") for arg in given):
        return None
    for long, short in (("--prefix", "-p"), ("--target", "-t")):
        if not any(arg.startswith((long, short)) for arg in given):
            return f"{long} is required"
    return None


def parse_signal(text: str) -> signal.Signals:
    """'HUP', 'SIGHUP', 'sighup' or '1'; not one a program cannot handle."""
    if text.isdigit():
        try:
            sig = signal.Signals(int(text))
        except ValueError:
            raise UsageError(f"--signal: unknown signal number {text}") from None
    else:
        name = text.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        try:
            sig = signal.Signals[name]
        except KeyError:
            raise UsageError(f"--signal: unknown signal {text!r}") from None
    if sig in (signal.SIGKILL, signal.SIGSTOP):
        raise UsageError(f"--signal: {sig.name} cannot be handled, so it cannot mean 'reload'")
    return sig


def parse_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise UsageError(f"--mode: {text!r} is not an octal mode like 0600") from None
    if not 0 <= mode <= 0o777:
        raise UsageError(f"--mode: {text!r} is outside 0000..0777")
    return mode


def parse_id(text: str | None, flag: str, lookup_name: str) -> int:
    """A user or group, by name or number; -1 when not given."""
    if text is None:
        return -1
    if text.isdigit():
        return int(text)
    try:
        if lookup_name == "user":
            return pwd.getpwnam(text).pw_uid
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise UsageError(f"{flag}: unknown {lookup_name} {text!r}") from None


def parse_seconds(text: str, flag: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < 86400:
        raise UsageError(f"{flag}: {text!r} is not a number of seconds")
    return seconds


def parse_positive(text: str, flag: str) -> float:
    """Seconds that must not be 0: a timeout of 0 would fail or kill every time."""
    seconds = parse_seconds(text, flag)
    if seconds == 0:
        raise UsageError(f"{flag}: must be more than 0")
    return seconds


def parse_duration(text: str, flag: str) -> float:
    """'500ms', '2s', '1m', '6h', '14d' or a number of seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    number, unit = text, "s"
    for suffix in ("ms", "s", "m", "h", "d"):
        if text.endswith(suffix):
            number, unit = text[: -len(suffix)], suffix
            break
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < 366 * 86400:
        raise UsageError(f"{flag}: {text!r} is not a duration like 500ms, 2s, 1m or 14d")
    return seconds


def parse_wait(text: str | None) -> tuple[float, float] | None:
    """consul-template's wait: 'MIN' or 'MIN:MAX'; MAX defaults to 4*MIN."""
    if text is None:
        return None
    low_text, _, high_text = text.partition(":")
    low = parse_duration(low_text, "--wait")
    high = parse_duration(high_text, "--wait") if high_text else 4 * low
    if high < low or low <= 0:
        raise UsageError(f"--wait: {text!r} needs 0 < MIN <= MAX")
    return low, high


def parse_address(text: str | None) -> tuple[str, int] | None:
    """'HOST:PORT' (or ':PORT' for every address)."""
    if text is None:
        return None
    try:
        return split_host_port(text)
    except ValueError as err:
        raise UsageError(f"--health-addr: {err}") from None


def parse_file_rule(text: str) -> FileRule:
    """--file-mode=GLOB=MODE[:USER[:GROUP]]; the last "=" separates (a glob may hold one)."""
    glob, sep, spec = text.rpartition("=")
    if not sep or not glob:
        raise UsageError(f"--file-mode: {text!r} is not GLOB=MODE[:USER[:GROUP]]")
    mode_text, _, owner = spec.partition(":")
    user, _, group = owner.partition(":")
    try:
        mode = parse_mode(mode_text)
    except UsageError:
        raise UsageError(f"--file-mode: {mode_text!r} in {text!r} is not an octal mode") from None
    uid = parse_id(user or None, "--file-mode", "user")
    gid = parse_id(group or None, "--file-mode", "group")
    if os.geteuid() != 0 and (uid not in (-1, os.geteuid()) or gid not in (-1, os.getegid())):
        raise UsageError(f"--file-mode: {text!r}: changing the owner needs root")
    return FileRule(glob, mode, uid, gid)


def parse_required(
    keys: list[str], prefix: bytes, selection: KeySelection, max_path: int
) -> tuple[str, ...]:
    """--require: keys relative to the prefix (the full key is accepted too), which the
    key rules and --include/--exclude must let through, or they could never arrive."""
    required = []
    for key in keys:
        raw = key.encode("utf-8", "surrogateescape")
        full = raw if raw.startswith(prefix) else prefix + raw.lstrip(b"/")
        try:
            rel = key_to_relpath(full, prefix, max_path)  # as the intake will judge it
        except InvalidKey as err:
            raise UsageError(f"--require: {key!r} {err}") from None
        if not selection.takes(rel):
            raise UsageError(f"--require: {key!r} is left out by --include/--exclude")
        required.append(rel)
    return tuple(required)


def parse_tls_address(text: str) -> Address:
    try:
        return parse_address_sni(text)
    except ValueError as err:
        raise UsageError(f"--verify-tls: {err}") from None


def parse_status_prefix(text: str | None, prefix: bytes) -> bytes | None:
    """Not inside the config prefix, nor around it: the status would become files."""
    if text is None:
        return None
    status = normalise_prefix(text)
    if status == b"/" or status.startswith(prefix) or prefix.startswith(status):
        raise UsageError(f"--status-prefix: {text!r} overlaps --prefix; choose a separate one")
    return status


def parse_instance(text: str | None) -> str:
    name = socket.gethostname() if text is None else text
    if not name or "/" in name or not name.isprintable():
        raise UsageError(f"--instance: {name!r} must be a non-empty name without '/'")
    return name


def parse_choice(text: str, flag: str, choices: tuple[str, ...]) -> str:
    if text not in choices:
        raise UsageError(f"{flag}: {text!r} is not one of {', '.join(choices)}")
    return text


REPEATABLE = ("--include", "--exclude", "--file-mode", "--require", "--verify-tls")
ENV_PREFIX = "DISPENSER_"  # not ETCD_: etcd server reads ETCD_<FLAG> itself
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def env_name(long: str) -> str:
    """--kill-timeout -> DISPENSER_KILL_TIMEOUT."""
    return ENV_PREFIX + long[2:].upper().replace("-", "_")


def _with_environment(
    argv: list[str], environ: Mapping[str, str]
) -> tuple[list[str], dict[str, str]]:
    """``argv`` with the options set only in the environment put first (a flag wins), and
    which option came from which variable."""
    given = {_options()[n][0] for n in _split(argv)[0] if n in _options()}
    added: list[str] = []
    origin: dict[str, str] = {}
    for long, takes_value in sorted(set(_options().values())):
        value = environ.get(env_name(long))
        if value is None or long in given or long in ("--help", "--version"):
            continue
        origin[long] = env_name(long)
        if long in REPEATABLE:
            separator = ";" if long == "--verify-tls" else ","  # its values hold a comma
            added += [f"{long}={item}" for item in value.split(separator) if item]
        elif takes_value:
            added.append(f"{long}={value}")
        elif value.strip().lower() in TRUE_WORDS:
            added.append(long)
        elif value.strip().lower() not in FALSE_WORDS:
            raise UsageError(f"{env_name(long)}={value!r}: use true or false")
    return added + argv, origin


def parse_args(argv: list[str] | None, environ: Mapping[str, str] | None = None) -> Options:
    """The docopt usage above is the one source of the flags; raise UsageError.

    A bad value that came from the environment is named by its variable too.
    """
    argv, origin = _with_environment(argv or [], environ or {})
    try:
        return _parse(argv)
    except UsageError as err:
        var = next((v for flag, v in origin.items() if str(err).startswith(flag)), None)
        raise UsageError(f"{var} (from the environment): {err}" if var else str(err)) from None


def _parse(argv: list[str]) -> Options:
    _check_flags(argv)
    try:
        args = docopt(USAGE, argv=argv, version=f"{PROG} {__version__}", options_first=True)
    except DocoptExit as err:
        raise UsageError(_missing_flag(argv) or str(err).splitlines()[0]) from None
    uid = parse_id(args["--owner"], "--owner", "user")
    gid = parse_id(args["--group"], "--group", "group")
    if os.geteuid() != 0 and (uid not in (-1, os.geteuid()) or gid not in (-1, os.getegid())):
        raise UsageError("--owner/--group: changing the owner needs root")
    level = args["--log-level"].upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise UsageError(f"--log-level: unknown level {args['--log-level']!r}")
    if not args["--prefix"].strip("/") and args["--prefix"] != "/":
        raise UsageError("--prefix: must not be empty")
    if not args["--target"]:
        raise UsageError("--target: must not be empty")
    if args["--once"] and args["CMD"]:
        raise UsageError("--once: takes no command")
    if args["--verify-tls"] and not args["CMD"]:
        raise UsageError("--verify-tls: needs a child (CMD) to signal; a sidecar's reload is "
                         "its --on-change hook's, which it cannot wait for")  # fmt: skip
    if args["--rollback-on-failure"] and not args["--verify-tls"]:
        raise UsageError("--rollback-on-failure: needs --verify-tls (what failure?)")
    if args["--once"] and args["--on-change"] is not None:
        raise UsageError("--once: takes no --on-change (a hook outlives a --once run)")
    for flag in ("--on-change", "--stale-start"):
        if args[flag] == "":
            raise UsageError(f"{flag}: must not be empty")
    prefix = normalise_prefix(args["--prefix"])
    selection = KeySelection(tuple(args["--include"]), tuple(args["--exclude"]))
    return Options(
        selection=selection,
        file_rules=tuple(parse_file_rule(rule) for rule in args["--file-mode"]),
        require=parse_required(
            args["--require"], prefix, selection, max_key_path(Path(args["--target"]).absolute())
        ),
        on_change=args["--on-change"],
        on_change_timeout=parse_positive(args["--on-change-timeout"], "--on-change-timeout"),
        stale_start=(
            parse_seconds(args["--stale-start"], "--stale-start")
            if args["--stale-start"] is not None
            else None
        ),
        timeout=parse_positive(args["--timeout"], "--timeout"),
        verify_certs=args["--verify-certs"],
        verify_tls=tuple(parse_tls_address(text) for text in args["--verify-tls"]),
        verify_tls_timeout=parse_positive(args["--verify-tls-timeout"], "--verify-tls-timeout"),
        rollback_on_failure=args["--rollback-on-failure"],
        status_prefix=parse_status_prefix(args["--status-prefix"], prefix),
        instance=parse_instance(args["--instance"]),
        expiry_warning=parse_duration(args["--expiry-warning"], "--expiry-warning"),
        prefix=prefix,
        target=Path(args["--target"]).absolute(),
        signal=parse_signal(args["--signal"]),
        mode=parse_mode(args["--mode"]),
        uid=uid,
        gid=gid,
        once=args["--once"],
        kill_timeout=parse_seconds(args["--kill-timeout"], "--kill-timeout"),
        backoff_max=parse_seconds(args["--backoff-max"], "--backoff-max"),
        wait=parse_wait(args["--wait"]),
        check=args["--check"] or None,
        health_addr=parse_address(args["--health-addr"]),
        log_level=level,
        log_format=parse_choice(args["--log-format"].lower(), "--log-format", ("text", "json")),
        command=args["CMD"],
    )


def main(argv: list[str] | None = None) -> NoReturn:
    """Parse -> configure -> run -> exit with the child's code."""
    try:
        options = parse_args(sys.argv[1:] if argv is None else argv, os.environ)
    except UsageError as err:
        usage = USAGE.split("\n\n")[1]
        print(f"{PROG}: {err}\n{usage}\nSee '{PROG} --help'.", file=sys.stderr)
        sys.exit(2)
    setup_logging(options.log_level, options.log_format)
    try:
        etcd = config.load(os.environ)
    except config.ConfigError as err:
        log.error("%s", err)
        sys.exit(2)
    map_big_blocks()  # before etcd3 and gRPC allocate anything (see heap)
    from .app import run  # imports etcd3 and grpc: only once the flags are good

    sys.exit(run(options, etcd))
