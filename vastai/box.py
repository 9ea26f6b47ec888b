"""Remote GPU boxes: rent one with the `vastai` client, sync the repo and secrets, launch runs, fetch results.

Every command is an argument list run without a local shell. ssh always hands its command to the remote
shell, so every remote command line comes from `remote_script`: a fixed template from this file whose slots
are filled with shlex-quoted values. Nothing else here builds shell text.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import posixpath
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from argparser import Parser, add_fields, coerce_all, read_config_file
from sparse_coding.config import Config, option
from sparse_coding.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = Path(__file__).resolve().parent / "box.yaml"
LOG_NAME, PID_NAME, EXIT_NAME = "launch.log", "launch.pid", "launch.exit"
SSH_FIELDS = "ssh"
RENT_FIELDS = "rent"


def _opt(default: Any, help: str, group: str, **bounds: Any) -> Any:
    return option(default, help, group=group, **bounds)


@dataclass
class BoxConfig(Config):
    """How to reach the box and what to rent; every field is a flag and a key of the config file."""

    host: str | None = _opt(None, "box address (on vast.ai: ssh_host of `vastai show instance`)", SSH_FIELDS)
    port: int = _opt(22, "ssh port", SSH_FIELDS, gt=0, lt=65536)
    user: str = _opt("root", "ssh login name", SSH_FIELDS)
    key: str | None = _opt(None, "private key file (default: whatever ssh picks)", SSH_FIELDS)
    known_hosts: str | None = _opt(None, "known_hosts file (default: ~/.ssh/known_hosts)", SSH_FIELDS)
    connect_timeout: int = _opt(10, "seconds ssh waits for the box to answer", SSH_FIELDS, gt=0)
    remote_dir: str = _opt("sparse_coding", "project folder on the box: absolute, or relative to the home", SSH_FIELDS)
    local_dir: str = _opt(str(REPO_ROOT), "local project: synced up, results fetched to its outputs/", SSH_FIELDS)
    secrets_file: str = _opt("~/.config/sparse_coding/secrets.env", "local file of KEY=value lines", SSH_FIELDS)
    remote_secrets: str = _opt(
        ".config/sparse_coding/secrets.env", "secrets path on the box (launch reads it)", SSH_FIELDS
    )
    tmux_socket: str = _opt("sparse_coding", "tmux server name (tmux -L) for detached runs", SSH_FIELDS)
    vastai: str = _opt("vastai", "the vast.ai client executable (default: $VASTAI_BIN or vastai)", RENT_FIELDS)
    gpu: str = _opt("RTX_3090", "GPU model as vast.ai names it (spaces become underscores)", RENT_FIELDS)
    num_gpus: int = _opt(1, "GPUs per box", RENT_FIELDS, gt=0)
    max_price: float = _opt(0.5, "price cap in $/hour for the whole box", RENT_FIELDS, gt=0)
    disk: int = _opt(40, "disk in GB", RENT_FIELDS, gt=0)
    image: str = _opt("pytorch/pytorch:latest", "docker image the box starts from", RENT_FIELDS)
    instance_id: int | None = _opt(None, "the rented instance (rent --write_config stores it)", RENT_FIELDS)


FIELDS = {f.name: f for f in dataclasses.fields(BoxConfig)}


def load_config(config_path: str | None, flags: dict[str, Any]) -> BoxConfig:
    """Gives the config: defaults < $VASTAI_BIN < config file (default vastai/box.yaml if present) < flags."""
    path = config_path or (str(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else None)
    values = coerce_all(BoxConfig, read_config_file(path) if path else {}, f"config file {path!r}")
    values.update(flags)
    return dataclasses.replace(BoxConfig(vastai=os.environ.get("VASTAI_BIN") or "vastai"), **values)


# ---- pure builders: argument lists and remote shell text ---------------------------------------------------------


class RemotePath(str):
    """A path on the box: absolute, or relative to the login's home (how rsync and ssh both read it)."""

    def __new__(cls, path: str) -> RemotePath:
        path = path.strip()
        if path in ("~", ""):
            path = "."
        elif path.startswith("~/"):
            path = path[2:]  # rsync --protect-args does no tilde expansion; the home is where relative paths start
        if "\0" in path or "\n" in path:
            raise UserError(f"remote path {path!r} holds a newline or NUL")
        return super().__new__(cls, path)

    def join(self, *parts: str) -> RemotePath:
        return RemotePath(posixpath.join(self, *parts))


def remote_script(template: str, **values: str | RemotePath | Sequence[str]) -> str:
    """Gives a remote shell line: the trusted template with every value shell-quoted into its {slot}.

    A str becomes one quoted word; a RemotePath too, anchored at "$HOME" when relative so it means the same
    after a `cd`; a list becomes a quoted command line (one word per item).
    """
    quoted = {}
    for name, value in values.items():
        if isinstance(value, RemotePath):
            quoted[name] = shlex.quote(value) if value.startswith("/") else '"$HOME"/' + shlex.quote(value)
        elif isinstance(value, str):
            quoted[name] = shlex.quote(value)
        else:
            quoted[name] = shlex.join(value)
    return template.format(**quoted)


# Remote templates. Only remote_script fills them; slots are always quoted values, never raw text.
BOOTSTRAP = (
    'missing=; for t in rsync make tmux; do command -v $t >/dev/null 2>&1 || missing="$missing $t"; done; '
    "python3 -c 'import ensurepip' >/dev/null 2>&1 || missing=\"$missing python3-venv\"; "
    'if [ -n "$missing" ] && command -v apt-get >/dev/null 2>&1; then '
    "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing; fi; "
    "mkdir -p {dir}"
)
INSTALL = "cd {dir} && make setup"
SECRETS = "umask 077 && mkdir -p {parent} && cat > {tmp} && chmod 600 {tmp} && mv -f {tmp} {path}"
# Runs detached. Output goes to the log from the first line, so even a broken secrets file leaves a trace.
# stdin stays as it is: once a tmux pane's process holds no fd on its terminal, tmux closes the pane and kills it.
RUN = (
    "exec > {log} 2>&1; echo $$ > {pid}; "
    "if [ -f {secrets} ]; then set -a; . {secrets}; set +a; fi; "
    "cd {dir} || exit 1; {command}; echo $? > {exit}"
)
START = "mkdir -p {outputs} && mkdir {run_path} && "
DETACH = {
    "tmux": START + "tmux -L {socket} new-session -d -s {session} {inner}",
    "nohup": START + "(setsid nohup sh -c {inner} > /dev/null 2>&1 < /dev/null &)",
    "auto": START
    + "if command -v tmux > /dev/null 2>&1; then tmux -L {socket} new-session -d -s {session} {inner}; "
    + "else (setsid nohup sh -c {inner} > /dev/null 2>&1 < /dev/null &); fi",
}
LOGS = "cat -- {log}"
# --pid makes tail stop once the run's shell is gone, so following a finished run returns.
FOLLOW = 'if [ -f {pid} ] && [ ! -f {exit} ]; then tail -n +1 -F --pid="$(cat {pid})" -- {log}; else cat -- {log}; fi'
# The whole process group goes (the run's shell leads it); asking the leader first skips a group of zombies.
STOP = (
    'if [ -f {pid} ] && [ ! -f {exit} ] && kill -0 "$(cat {pid})" 2>/dev/null '
    '&& kill -TERM -- -"$(cat {pid})" 2>/dev/null; then echo stopped; else echo not running; fi'
)
NEWEST = {  # newest run folder: any (fetch), or one that `launch` made (logs, stop)
    "any": "cd {dir} && ls -1td -- outputs/*/ 2>/dev/null || true",
    "launched": "cd {dir} && ls -1td -- outputs/*/" + LOG_NAME + " 2>/dev/null || true",
}


def local_path(path: str) -> Path:
    return Path(path).expanduser().resolve()


def check_connection(cfg: BoxConfig) -> None:
    """Refuses, before anything runs, a config ssh would misread (no host, a host that looks like an option)."""
    if not cfg.host:
        raise UserError(f"no host: pass --host or set host in a config file (see {DEFAULT_CONFIG.name}.example)")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", cfg.host):
        raise UserError(f"host {cfg.host!r} is not a host name or IPv4 address")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", cfg.user):
        raise UserError(f"user {cfg.user!r} is not a login name")
    if not 0 < cfg.port < 65536:
        raise UserError(f"port {cfg.port} is out of range")
    if cfg.key and not local_path(cfg.key).is_file():
        raise UserError(f"ssh key file {cfg.key!r} not found")
    for name in ("key", "known_hosts"):
        if '"' in (getattr(cfg, name) or ""):
            raise UserError(f"{name} path may not contain a double quote")


def ssh_options(cfg: BoxConfig) -> list[str]:
    """Gives ssh's options; BatchMode makes a wrong key fail at once instead of asking for a password."""
    opts = ["-p", str(cfg.port), "-l", cfg.user, "-o", "BatchMode=yes", "-o", f"ConnectTimeout={cfg.connect_timeout}"]
    opts += ["-o", "StrictHostKeyChecking=accept-new", "-o", "ServerAliveInterval=15", "-o", "LogLevel=ERROR"]
    if cfg.key:
        opts += ["-i", str(local_path(cfg.key)), "-o", "IdentitiesOnly=yes"]
    if cfg.known_hosts:
        opts += ["-o", f'UserKnownHostsFile="{local_path(cfg.known_hosts)}"']
    return opts


def ssh_argv(cfg: BoxConfig, script: str) -> list[str]:
    return ["ssh", *ssh_options(cfg), "--", str(cfg.host), script]  # "--": nothing after it is read as an option


def rsync_argv(cfg: BoxConfig, src: str, dst: str, extra: Sequence[str] = ()) -> list[str]:
    """Gives an rsync over our ssh; --protect-args hands paths over verbatim instead of through the remote shell."""
    # rsync splits -e itself, honouring quotes the way shlex.join writes them
    return ["rsync", "-az", "--protect-args", "-e", shlex.join(["ssh", *ssh_options(cfg)]), *extra, src, dst]


def check_run_name(name: str) -> str:
    """Gives the name back if it can be one folder under outputs/; anything else in it is kept literally."""
    if not name or name in (".", "..") or name.startswith("-"):
        raise UserError(f"run name {name!r} is empty, '.', '..' or starts with '-'")
    if "/" in name:
        raise UserError(f"run name {name!r} may not contain '/': it names one folder under outputs/")
    if any(c in name for c in "*?[") or any(ord(c) < 32 for c in name):
        raise UserError(f"run name {name!r} may not contain wildcards (* ? [) or control characters")
    return name


def launch_script(cfg: BoxConfig, run: str, command: Sequence[str], detach: str) -> str:
    """Gives the remote line that starts `command` detached in outputs/<run>/, logging to launch.log there."""
    root = RemotePath(cfg.remote_dir)
    run_path = root.join("outputs", run)
    run_rel = posixpath.join("outputs", run)
    command = [arg.replace("{run_dir}", run_rel) for arg in command]
    inner = remote_script(
        RUN,
        log=run_path.join(LOG_NAME),
        pid=run_path.join(PID_NAME),
        secrets=RemotePath(cfg.remote_secrets),
        dir=root,
        command=command,
        exit=posixpath.join(run_rel, EXIT_NAME),
    )
    session = "run_" + re.sub(r"[^A-Za-z0-9_-]", "_", run)  # tmux turns '.' and ':' in names into other things
    return remote_script(
        DETACH[detach],
        outputs=root.join("outputs"),
        run_path=run_path,
        socket=cfg.tmux_socket,
        session=session,
        inner=inner,
    )


def search_argv(cfg: BoxConfig) -> list[str]:
    gpu = cfg.gpu.replace(" ", "_")
    query = f"gpu_name={gpu} num_gpus={cfg.num_gpus} dph_total<={cfg.max_price} disk_space>={cfg.disk} rentable=true"
    return [cfg.vastai, "search", "offers", query, "--order", "dph_total", "--raw"]


def create_argv(cfg: BoxConfig, offer: str) -> list[str]:
    return [cfg.vastai, "create", "instance", offer, "--image", cfg.image, "--disk", str(cfg.disk), "--ssh", "--raw"]


def show_argv(cfg: BoxConfig, instance: str) -> list[str]:
    return [cfg.vastai, "show", "instance", instance, "--raw"]


def destroy_argv(cfg: BoxConfig, instance: str) -> list[str]:
    return [cfg.vastai, "destroy", "instance", instance]


# ---- running commands ------------------------------------------------------------------------------------------


def _reason(stderr: str) -> str:
    """Gives the stderr line that says why: ssh's own complaint if there is one, else the last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if any(s in line for s in ("ssh:", "Permission denied", "Host key verification failed")):
            return line
    return lines[-1] if lines else "no message"


@dataclass
class Runner:
    """Runs argument lists (never through a local shell); with dry_run it only prints them, one per line."""

    cfg: BoxConfig
    dry_run: bool = False

    def run(self, argv: list[str], what: str, capture: bool = False, stdin: Path | None = None) -> str:
        """Gives the command's stdout when captured ("" otherwise); a failure becomes one UserError line."""
        if self.dry_run:
            print(shlex.join(argv))
            return ""
        try:
            with open(stdin, "rb") if stdin else nullcontext(subprocess.DEVNULL) as f:
                proc = subprocess.run(
                    argv, stdin=f, stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE, text=True
                )
        except FileNotFoundError as e:
            hint = " (pip install vastai, or pass --vastai PATH)" if argv[0] == self.cfg.vastai else ""
            raise UserError(f"{argv[0]!r} not found{hint}") from e
        if proc.returncode != 0:
            reason = _reason(proc.stderr)
            if argv[0] in ("ssh", "rsync") and (proc.returncode == 255 or "ssh:" in reason or "denied" in reason):
                box = f"{self.cfg.user}@{self.cfg.host} port {self.cfg.port}"
                raise UserError(f"{what}: cannot reach {box} over ssh: {reason} (check host, port, user and key)")
            raise UserError(f"{what} failed (exit {proc.returncode}): {reason}")
        sys.stderr.write(proc.stderr)
        return proc.stdout or ""

    def ssh(self, script: str, what: str, capture: bool = False, stdin: Path | None = None) -> str:
        return self.run(ssh_argv(self.cfg, script), what, capture=capture, stdin=stdin)


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{what}: the vastai client did not answer JSON: {text.strip()[:200]!r}") from e


# ---- subcommands -----------------------------------------------------------------------------------------------


def cmd_find(r: Runner, args: argparse.Namespace) -> None:
    out = r.run(search_argv(r.cfg), "searching offers", capture=True)
    if r.dry_run:
        return
    offers = sorted(_json(out, "search offers"), key=lambda o: o.get("dph_total", float("inf")))[: args.limit]
    if not offers:
        print("no offer matches; raise --max_price or pick another --gpu")
    for o in offers:
        print(
            f"{o.get('id')!s:>10}  {o.get('num_gpus')}x {o.get('gpu_name')!s:<12} ${o.get('dph_total', 0):.3f}/h  "
            f"disk {o.get('disk_space', 0):.0f} GB  reliability {o.get('reliability', 0):.3f}  {o.get('geolocation')}"
        )


def wait_running(r: Runner, instance: str, tries: int, backoff: float) -> tuple[str, int]:
    """Gives (ssh host, port) once vast.ai reports the instance running."""
    status = "unknown"
    for attempt in range(tries):
        info = _json(r.run(show_argv(r.cfg, instance), "show instance", capture=True), "show instance")
        info = info[0] if isinstance(info, list) and info else info
        status = info.get("actual_status") or "starting"
        if status == "running" and info.get("ssh_host") and info.get("ssh_port"):
            return str(info["ssh_host"]), int(info["ssh_port"])
        if attempt + 1 < tries:
            print(f"instance {instance}: {status}", file=sys.stderr)
            time.sleep(min(backoff * 2**attempt, 30.0))
    raise UserError(f"instance {instance} is still {status!r} after {tries} checks; `destroy` it if it stays stuck")


def cmd_rent(r: Runner, args: argparse.Namespace) -> None:
    offer = args.offer
    if offer is None:
        out = r.run(search_argv(r.cfg), "searching offers", capture=True)
        if r.dry_run:
            offer = "<cheapest offer>"
        else:
            offers = _json(out, "search offers")
            if not offers:
                raise UserError(f"no {r.cfg.gpu} offer at or under ${r.cfg.max_price}/h with {r.cfg.disk} GB disk")
            offer = str(min(offers, key=lambda o: o.get("dph_total", float("inf")))["id"])
    out = r.run(create_argv(r.cfg, str(offer)), "creating the instance", capture=True)
    if r.dry_run:
        r.run(show_argv(r.cfg, "<new instance>"), "show instance")
        return
    created = _json(out, "create instance")
    instance = str(created.get("new_contract") or "") if isinstance(created, dict) else ""
    if not instance:
        raise UserError(f"create instance gave no instance id: {out.strip()[:200]!r}")
    print(f"rented instance {instance} from offer {offer}; waiting for it to start")
    host, port = wait_running(r, instance, args.tries, args.backoff)
    print(f"instance {instance} is running: ssh -p {port} root@{host}")
    if args.write_config:
        path = Path(args.write_config)
        data = read_config_file(str(path)) if path.is_file() else {}
        data.update(host=host, port=port, user="root", instance_id=int(instance))
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        print(f"wrote {path}")


def cmd_destroy(r: Runner, args: argparse.Namespace) -> None:
    if r.cfg.instance_id is None:
        raise UserError("no instance: pass --instance_id or set instance_id in the config file")
    r.run(destroy_argv(r.cfg, str(r.cfg.instance_id)), "destroying the instance")


def cmd_wait(r: Runner, args: argparse.Namespace) -> None:
    argv = ssh_argv(r.cfg, remote_script("true"))
    if r.dry_run:
        print(shlex.join(argv))
        return
    reason = ""
    for attempt in range(1, args.tries + 1):
        proc = subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        if proc.returncode == 0:
            print(f"ssh answers at {r.cfg.user}@{r.cfg.host} port {r.cfg.port}")
            return
        reason = _reason(proc.stderr)
        if attempt < args.tries:
            delay = min(args.backoff * 2 ** (attempt - 1), 30.0)
            print(f"waiting for ssh ({attempt}/{args.tries}, next try in {delay:.1f}s): {reason}", file=sys.stderr)
            time.sleep(delay)
    box = f"{r.cfg.user}@{r.cfg.host} port {r.cfg.port}"
    raise UserError(f"no ssh answer from {box} after {args.tries} tries: {reason} (check host, port, user and key)")


def cmd_setup(r: Runner, args: argparse.Namespace) -> None:
    local = local_path(r.cfg.local_dir)
    if not local.is_dir():
        raise UserError(f"local project folder {str(local)!r} not found")
    root = RemotePath(r.cfg.remote_dir)
    r.ssh(remote_script(BOOTSTRAP, dir=root), "preparing the box")
    excludes = ["--filter=:- .gitignore", "--exclude=/.git"]
    secrets = local_path(r.cfg.secrets_file)
    if secrets.is_relative_to(local):  # a secrets file kept in the repo never travels with the code
        excludes.append("--exclude=/" + secrets.relative_to(local).as_posix())
    dest = f"{r.cfg.host}:{root}/"
    r.run(rsync_argv(r.cfg, f"{local}/", dest, excludes), "syncing the project")
    print(f"synced {local} to {r.cfg.host}:{root}")
    if not args.no_install:
        r.ssh(remote_script(INSTALL, dir=root), "make setup on the box")
        print("installed (make setup) on the box")


def cmd_secrets(r: Runner, args: argparse.Namespace) -> None:
    src = local_path(r.cfg.secrets_file)
    if not src.is_file():
        raise UserError(f"secrets file {str(src)!r} not found (KEY=value lines, e.g. WANDB_API_KEY=...)")
    if src.stat().st_mode & 0o077 and not r.dry_run:
        src.chmod(0o600)
        print(f"tightened {src} to mode 0600", file=sys.stderr)
    dst = RemotePath(r.cfg.remote_secrets)
    script = remote_script(
        SECRETS, parent=RemotePath(posixpath.dirname(dst) or "."), tmp=RemotePath(dst + ".tmp"), path=dst
    )
    r.ssh(script, "copying secrets", capture=True, stdin=src)  # contents go through stdin only, never argv or logs
    if not r.dry_run:
        print(f"secrets copied to {r.cfg.host}:{dst} (mode 0600)")


def newest_run(r: Runner, kind: str) -> str:
    """Gives the newest folder name under outputs/ on the box."""
    out = r.ssh(remote_script(NEWEST[kind], dir=RemotePath(r.cfg.remote_dir)), "finding the newest run", capture=True)
    if r.dry_run:
        return "<newest run>"
    first = out.split("\n", 1)[0]
    name = first.removesuffix("/" + LOG_NAME) if kind == "launched" else first.rstrip("/")
    if not name.startswith("outputs/"):
        raise UserError(f"no run folders under {r.cfg.remote_dir}/outputs on the box")
    return name.removeprefix("outputs/")


def cmd_launch(r: Runner, args: argparse.Namespace) -> None:
    command = getattr(args, "command", [])
    command = command[1:] if command[:1] == ["--"] else command
    if not command:
        raise UserError("no command to launch: give it after --, e.g. launch --name smoke -- python run.py")
    run = check_run_name(f"{datetime.now():%Y%m%d_%H%M%S}_{check_run_name(args.name)}")
    r.ssh(launch_script(r.cfg, run, command, args.detach), "launching the run", capture=True)
    if not r.dry_run:
        print(f"launched; log in {r.cfg.remote_dir}/outputs/{run}/{LOG_NAME}", file=sys.stderr)
        print(run)  # the run folder's name alone on stdout, for RUN=$(python -m vastai launch ...)


def cmd_logs(r: Runner, args: argparse.Namespace) -> None:
    run = check_run_name(args.run) if args.run else newest_run(r, "launched")
    run_path = RemotePath(r.cfg.remote_dir).join("outputs", run)
    paths = dict(log=run_path.join(LOG_NAME), pid=run_path.join(PID_NAME), exit=run_path.join(EXIT_NAME))
    try:
        r.ssh(remote_script(FOLLOW if args.follow else LOGS, **paths), f"reading the log of {run}")
    except KeyboardInterrupt:
        print(f"\nstopped following; {run} goes on", file=sys.stderr)


def cmd_fetch(r: Runner, args: argparse.Namespace) -> None:
    run = check_run_name(args.run) if args.run else newest_run(r, "any")
    dest = local_path(r.cfg.local_dir) / "outputs" / run
    if not r.dry_run:
        dest.parent.mkdir(parents=True, exist_ok=True)
    src = f"{r.cfg.host}:{RemotePath(r.cfg.remote_dir).join('outputs', run)}/"
    r.run(rsync_argv(r.cfg, src, f"{dest}/"), f"fetching {run}")
    if not r.dry_run:
        print(f"fetched {run} into {dest}")


def cmd_stop(r: Runner, args: argparse.Namespace) -> None:
    run = check_run_name(args.run) if args.run else newest_run(r, "launched")
    run_path = RemotePath(r.cfg.remote_dir).join("outputs", run)
    out = r.ssh(remote_script(STOP, pid=run_path.join(PID_NAME), exit=run_path.join(EXIT_NAME)), "stop", capture=True)
    if not r.dry_run:
        print(f"{run}: {out.strip()}")


def cmd_ssh(r: Runner, args: argparse.Namespace) -> None:
    argv = ["ssh", *ssh_options(r.cfg), "--", str(r.cfg.host)]
    if r.dry_run:
        print(shlex.join(argv))
        return
    sys.exit(subprocess.call(argv))  # interactive: no pipes, the terminal is the user's


COMMANDS = {
    "find": (cmd_find, RENT_FIELDS, "list offers matching --gpu, --num_gpus, --max_price, --disk"),
    "rent": (cmd_rent, RENT_FIELDS, "rent the cheapest matching offer (or --offer ID) and wait until it runs"),
    "destroy": (cmd_destroy, RENT_FIELDS, "destroy the rented instance (irreversible: its disk goes too)"),
    "wait": (cmd_wait, SSH_FIELDS, "wait until ssh answers (bounded retries with backoff)"),
    "setup": (cmd_setup, SSH_FIELDS, "rsync the repo (honouring .gitignore) to the box, then `make setup` there"),
    "secrets": (cmd_secrets, SSH_FIELDS, "copy the secrets file to the box, mode 0600 on both ends"),
    "launch": (cmd_launch, SSH_FIELDS, "start a command detached; output in outputs/<timestamp>_<name>/launch.log"),
    "logs": (cmd_logs, SSH_FIELDS, "print (or --follow) the log of a launched run (default: the newest)"),
    "fetch": (cmd_fetch, SSH_FIELDS, "rsync a run folder (default: the newest under outputs/) back here"),
    "stop": (cmd_stop, SSH_FIELDS, "stop a launched run (default: the newest)"),
    "ssh": (cmd_ssh, SSH_FIELDS, "open a shell on the box"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m vastai",
        description="Rent a vast.ai GPU box, copy the project and secrets there, launch runs, fetch results.",
    )
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")
    for name, (_, group, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help, argument_default=argparse.SUPPRESS)
        p.error = parser.error  # type: ignore[method-assign]  # one line, exit 2, like every user error
        p.add_argument("--config", help=f"YAML or JSON file of the fields below (default: {DEFAULT_CONFIG} if present)")
        p.add_argument("--dry_run", "--dry-run", action="store_true", help="print the commands, one per line; run none")
        add_fields(p, BoxConfig, only=lambda f, g=group: f.metadata["group"] == g, dashed_aliases=True)
        if name in ("wait", "rent"):
            p.add_argument("--tries", type=int, default=30 if name == "wait" else 60, help="how many checks")
            p.add_argument("--backoff", type=float, default=2.0, help="first pause in seconds; doubles, up to 30")
        if name == "find":
            p.add_argument("--limit", type=int, default=20, help="how many offers to list")
        if name == "rent":
            p.add_argument("--offer", default=None, help="offer id from `find` (default: the cheapest match)")
            p.add_argument("--write_config", "--write-config", default=None, help="store host/port/instance here")
        if name == "setup":
            p.add_argument("--no_install", "--no-install", action="store_true", default=False, help="sync only")
        if name == "launch":
            p.add_argument("--name", default="run", help="run name; the folder is outputs/<timestamp>_<name>")
            p.add_argument("--detach", choices=["auto", "tmux", "nohup"], default="auto", help="tmux if present")
            p.add_argument("command", nargs=argparse.REMAINDER, help="after --: the command; {run_dir} = its folder")
        if name in ("logs", "fetch", "stop"):
            p.add_argument("--run", default=None, help="run folder name under outputs/ (default: the newest)")
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", default=False, help="follow until the run ends")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    values = vars(args)
    dry_run = values.pop("dry_run", False)
    flags = {k: values.pop(k) for k in list(values) if k in FIELDS}
    cfg = load_config(values.pop("config", None), flags)
    handler, group, _ = COMMANDS[args.subcommand]
    if group == SSH_FIELDS:
        check_connection(cfg)
    handler(Runner(cfg, dry_run), args)


if __name__ == "__main__":
    from utils import run_main

    run_main(main)
