"""vastai/ box helpers: the ssh side against a real OpenSSH server on loopback, the rental side with a fake client."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from sparse_coding.errors import UserError
from vastai import box

ROOT = Path(__file__).resolve().parents[2]
SSHD = "/usr/sbin/sshd"
HOSTILE = "x; touch pwned_$RANDOM $(touch pwned2) `touch pwned3` 'q\" & echo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """An OpenSSH server on 127.0.0.1 that lets root in with a throwaway key; gives its port and client key."""
    if not (os.path.exists(SSHD) and shutil.which("rsync") and shutil.which("ssh-keygen") and shutil.which("ssh")):
        pytest.skip("OpenSSH server/client or rsync not installed: `make sshd` installs them (needs root and apt)")
    if os.geteuid() != 0:
        pytest.skip("the loopback sshd logs in as root (PermitRootLogin prohibit-password); run the tests as root")
    d = tmp_path_factory.mktemp("sshd")
    keys = d / "client keys"  # a space in the key path exercises rsync's own -e quoting
    keys.mkdir()
    for path in (d / "host_key", keys / "id", keys / "other"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    (d / "authorized_keys").write_text((keys / "id.pub").read_text())
    port = _free_port()
    (d / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        f"PidFile {d / 'sshd.pid'}\nStrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nLogLevel ERROR\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation folder
    with open(d / "sshd.log", "w") as log:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config"), "-p", str(port)], stderr=log)
    if not _wait_port(port, proc):
        proc.kill()
        pytest.fail(f"sshd did not start: {(d / 'sshd.log').read_text()}")
    yield {"port": port, "key": keys / "id", "other_key": keys / "other", "dir": d}
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def cfg(sshd, tmp_path):
    """A fake repo, a remote project folder (with a space) under tmp_path, and a config file pointing at both."""
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    (repo / "main.py").write_text("print('hi')\n")
    (repo / "sub" / "data.txt").write_text("data\n")
    (repo / "Makefile").write_text("setup:\n\ttouch .installed\n")
    (repo / ".gitignore").write_text("outputs/\n.venv/\nnotes_private.txt\n")
    (repo / "notes_private.txt").write_text("ignored\n")
    for ignored in (".venv/bin", ".git", "outputs/old"):
        (repo / ignored).mkdir(parents=True)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    socket_name = f"sc_test_{uuid.uuid4().hex[:8]}"
    values = {
        "host": "127.0.0.1",
        "port": sshd["port"],
        "user": "root",
        "key": str(sshd["key"]),
        "known_hosts": str(tmp_path / "known_hosts"),
        "remote_dir": str(tmp_path / "remote home" / "proj"),
        "local_dir": str(repo),
        "secrets_file": str(tmp_path / "local secrets" / "secrets.env"),
        "remote_secrets": str(tmp_path / "remote home" / ".config" / "secrets.env"),
        "tmux_socket": socket_name,
    }
    path = tmp_path / "box.yaml"
    path.write_text(yaml.safe_dump(values))
    yield {"path": path, "repo": repo, "remote": Path(values["remote_dir"]), **values}
    if shutil.which("tmux"):
        subprocess.run(["tmux", "-L", socket_name, "kill-server"], capture_output=True)


def cli(cfg: dict, sub: str, *args: str) -> None:
    box.main([sub, "--config", str(cfg["path"]), *args])


def launch(cfg: dict, capfd, *args: str) -> str:
    capfd.readouterr()
    cli(cfg, "launch", *args)
    return capfd.readouterr().out.strip().splitlines()[-1]


def wait_for(path: Path, seconds: float = 15.0) -> str:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    time.sleep(0.05)
    return path.read_text()


# ---- the remote-command builder ---------------------------------------------------------------------------------


def test_remote_script_quotes_every_value_as_one_word(tmp_path):
    hostile = HOSTILE + " \\ \n $HOME"
    line = box.remote_script("cd {dir} && printf '%s\\n' {a} {cmd}", dir=str(tmp_path), a=hostile, cmd=["b c", "$(d)"])
    out = subprocess.run(["sh", "-c", line], capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    assert out == f"{hostile}\nb c\n$(d)\n"
    assert not list(tmp_path.glob("pwned*"))
    rel = box.remote_script("echo {p}", p=box.RemotePath("~/a b/c"))
    assert rel == "echo \"$HOME\"/'a b/c'"
    assert box.remote_script("echo {p}", p=box.RemotePath("/abs")) == "echo /abs"


# ---- the ssh side, for real --------------------------------------------------------------------------------------


def test_setup_syncs_repo_honouring_gitignore_then_installs(cfg, capfd):
    cli(cfg, "setup")
    remote = cfg["remote"]
    assert (remote / "main.py").read_text() == "print('hi')\n"
    assert (remote / "sub" / "data.txt").is_file()
    assert (remote / ".installed").is_file()  # `make setup` ran on the box
    for ignored in ("notes_private.txt", ".venv", ".git", "outputs"):
        assert not (remote / ignored).exists(), ignored
    assert "synced" in capfd.readouterr().out


def test_secrets_copied_with_mode_0600_on_both_ends_and_never_printed(cfg, capfd):
    secret = f"WANDB_API_KEY=s3cr3t-{uuid.uuid4().hex}\nOPENAI_API_KEY=sk-also-secret\n"
    local = Path(cfg["secrets_file"])
    local.parent.mkdir()
    local.write_text(secret)
    local.chmod(0o644)
    cli(cfg, "secrets")
    remote = Path(cfg["remote_secrets"])
    assert remote.read_text() == secret
    assert stat.S_IMODE(remote.stat().st_mode) == 0o600
    assert stat.S_IMODE(local.stat().st_mode) == 0o600
    out = capfd.readouterr()
    assert "s3cr3t" not in out.out + out.err and "sk-also" not in out.out + out.err
    assert not Path(str(remote) + ".tmp").exists()


WRITER = (
    "import os, sys, time, json\n"
    "for i in range(3):\n"
    "    print('step', i, flush=True); time.sleep(0.2)\n"
    "print('key seen:', os.environ.get('WANDB_API_KEY') == 'k1')\n"
    "open(os.path.join(sys.argv[1], 'results.json'), 'w').write(json.dumps({'runs': []}))\n"
)


@pytest.mark.parametrize("detach", ["tmux", "nohup"])
def test_launch_detached_then_follow_log_then_fetch(cfg, capfd, detach):
    if detach == "tmux" and not shutil.which("tmux"):
        pytest.skip("tmux not installed")
    cli(cfg, "setup", "--no_install")
    Path(cfg["secrets_file"]).parent.mkdir()
    Path(cfg["secrets_file"]).write_text("WANDB_API_KEY=k1\n")
    cli(cfg, "secrets")
    run = launch(cfg, capfd, "--name", "smoke", "--detach", detach, "--", "python3", "-c", WRITER, "{run_dir}")
    assert run.endswith("_smoke")
    run_dir = cfg["remote"] / "outputs" / run
    assert (run_dir / "launch.pid").is_file() or wait_for(run_dir / "launch.pid")

    cli(cfg, "logs", "--follow")  # returns once the run ends
    log = capfd.readouterr().out
    assert "step 0\nstep 1\nstep 2\nkey seen: True\n" in log
    assert wait_for(run_dir / "launch.exit").strip() == "0"

    cli(cfg, "fetch")
    local = cfg["repo"] / "outputs" / run
    assert json.loads((local / "results.json").read_text()) == {"runs": []}
    assert "step 2" in (local / "launch.log").read_text()
    cli(cfg, "logs", "--run", run)
    assert "key seen: True" in capfd.readouterr().out


def test_stop_ends_a_running_run(cfg, capfd):
    cli(cfg, "setup", "--no_install")
    run = launch(cfg, capfd, "--name", "long", "--", "sleep", "60")
    pid = int(wait_for(cfg["remote"] / "outputs" / run / "launch.pid"))
    os.kill(pid, 0)
    cli(cfg, "stop")
    assert f"{run}: stopped" in capfd.readouterr().out
    deadline = time.monotonic() + 10
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "the run survived stop"
        time.sleep(0.05)
    cli(cfg, "stop", "--run", run)
    assert "not running" in capfd.readouterr().out


def test_hostile_run_name_and_remote_dir_pass_through_as_data(cfg, capfd, tmp_path):
    token = uuid.uuid4().hex[:10]
    remote = tmp_path / f"r; touch /tmp/pwned_{token}_$RANDOM $(touch /tmp/pwned_{token}_b) `touch pwned3` 'q\"" / "p"
    values = yaml.safe_load(cfg["path"].read_text()) | {"remote_dir": str(remote)}
    cfg["path"].write_text(yaml.safe_dump(values))
    cfg["remote"] = remote
    before = set(Path("/tmp").glob("pwned*"))

    cli(cfg, "setup")
    assert (remote / ".installed").is_file()
    marker = "import sys; open(sys.argv[1] + '/marker.txt', 'w').write(sys.argv[2])"
    run = launch(cfg, capfd, "--name", HOSTILE, "--", "python3", "-c", marker, "{run_dir}", HOSTILE)
    assert run.endswith("_" + HOSTILE)  # used literally
    cli(cfg, "logs", "--follow", "--run", run)
    assert wait_for(remote / "outputs" / run / "launch.exit").strip() == "0"
    cli(cfg, "fetch", "--run", run)
    assert (cfg["repo"] / "outputs" / run / "marker.txt").read_text() == HOSTILE
    cli(cfg, "stop", "--run", run)

    # the issue's own example: a '/' cannot be one folder name, so it is refused, and nothing runs
    with pytest.raises(UserError, match="may not contain '/'"):
        cli(cfg, "launch", "--name", f"x; touch /tmp/pwned_{token}_$RANDOM", "--", "true")

    # `touch` makes files; the folders of the hostile remote path are named like that on purpose
    assert set(Path("/tmp").glob("pwned*")) == before
    made = [*tmp_path.rglob("pwned*"), *Path.home().glob("pwned*"), *ROOT.glob("pwned*"), *Path("/").glob("pwned*")]
    assert not [p for p in made if not p.is_dir()]


def test_wait_answers_at_once_and_gives_up_on_a_closed_port(cfg, capfd):
    cli(cfg, "wait", "--tries", "3")
    assert "ssh answers" in capfd.readouterr().out
    with pytest.raises(UserError, match="no ssh answer .* after 2 tries"):
        cli(cfg, "wait", "--port", str(_free_port()), "--tries", "2", "--backoff", "0.05")


@pytest.mark.parametrize(
    "case, expected",
    [
        ("wrong_key", "cannot reach root@127.0.0.1"),
        ("wrong_port", "cannot reach root@127.0.0.1"),
        ("missing_config", "config file"),
        ("failed_remote", "reading the log of nosuchrun failed (exit 1)"),
        ("no_host", "no host"),
    ],
)
def test_failures_give_one_line_and_exit_2(cfg, sshd, tmp_path, case, expected):
    (tmp_path / "hostless.yaml").write_text("port: 2222\n")
    args = {
        "wrong_key": ["setup", "--config", str(cfg["path"]), "--key", str(sshd["other_key"])],
        "wrong_port": ["logs", "--config", str(cfg["path"]), "--port", str(_free_port())],
        "missing_config": ["setup", "--config", str(cfg["path"]) + ".missing"],
        "failed_remote": ["logs", "--config", str(cfg["path"]), "--run", "nosuchrun"],
        "no_host": ["setup", "--config", str(tmp_path / "hostless.yaml")],
    }[case]
    proc = subprocess.run([sys.executable, "-m", "vastai", *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ssh_side_dry_run_prints_and_runs_nothing(cfg, capfd):
    cli(cfg, "launch", "--dry-run", "--name", HOSTILE, "--", "python3", "-c", "print(1)")
    lines = capfd.readouterr().out.splitlines()
    assert len(lines) == 1
    argv = shlex.split(lines[0])
    assert argv[:1] == ["ssh"] and argv[-2] == "127.0.0.1" and "tmux -L" in argv[-1]
    assert not cfg["remote"].exists()


# ---- the rental side --------------------------------------------------------------------------------------------

FAKE_VASTAI = """#!{python}
import json, sys
from pathlib import Path
log = Path(__file__).with_name("calls.jsonl")
with log.open("a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
calls = log.read_text().splitlines()
cmd = sys.argv[1:3]
if cmd == ["search", "offers"]:
    print(json.dumps([
        {{"id": 11, "gpu_name": "RTX 3090", "num_gpus": 1, "dph_total": 0.31, "disk_space": 80, "reliability": 0.99}},
        {{"id": 22, "gpu_name": "RTX 3090", "num_gpus": 1, "dph_total": 0.19, "disk_space": 60, "reliability": 0.98}},
    ]))
elif cmd == ["create", "instance"]:
    print(json.dumps({{"success": True, "new_contract": 777}}))
elif cmd == ["show", "instance"]:
    shows = sum('"show"' in c for c in calls)
    status = "running" if shows >= 2 else "loading"
    print(json.dumps({{"id": 777, "actual_status": status, "ssh_host": "ssh4.vast.ai", "ssh_port": 40022}}))
elif cmd == ["destroy", "instance"]:
    print("destroying instance 777.")
else:
    sys.exit("unknown command")
"""


@pytest.fixture
def fake_vastai(tmp_path):
    path = tmp_path / "fake vastai"
    path.write_text(FAKE_VASTAI.format(python=sys.executable))
    path.chmod(0o755)
    return path


def calls(fake: Path) -> list[list[str]]:
    log = fake.with_name("calls.jsonl")
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_rent_dry_run_prints_the_exact_commands(fake_vastai, capfd):
    common = ["--vastai", str(fake_vastai), "--gpu", "RTX 3090", "--max_price", "0.4", "--disk", "50"]
    box.main(["rent", "--dry-run", "--offer", "123", "--image", "pytorch/pytorch:latest", *common])
    f = shlex.quote(str(fake_vastai))
    assert capfd.readouterr().out.splitlines() == [
        f"{f} create instance 123 --image pytorch/pytorch:latest --disk 50 --ssh --raw",
        f"{f} show instance '<new instance>' --raw",
    ]
    box.main(["find", "--dry_run", *common])
    query = "'gpu_name=RTX_3090 num_gpus=1 dph_total<=0.4 disk_space>=50 rentable=true'"
    assert capfd.readouterr().out.splitlines() == [f"{f} search offers {query} --order dph_total --raw"]
    box.main(["rent", "--dry-run", "--image", "img", *common])  # no --offer: search, then rent the cheapest
    assert capfd.readouterr().out.splitlines() == [
        f"{f} search offers {query} --order dph_total --raw",
        f"{f} create instance '<cheapest offer>' --image img --disk 50 --ssh --raw",
        f"{f} show instance '<new instance>' --raw",
    ]
    box.main(["destroy", "--dry-run", "--instance_id", "777", "--vastai", str(fake_vastai)])
    assert capfd.readouterr().out.splitlines() == [f"{f} destroy instance 777"]
    assert calls(fake_vastai) == []


def test_rent_cheapest_offer_waits_and_writes_config_then_destroy(fake_vastai, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("VASTAI_BIN", str(fake_vastai))  # the client comes from the environment here
    written = tmp_path / "box.yaml"
    written.write_text("key: ~/.ssh/id_ed25519\n")
    box.main(["find", "--max_price", "0.35"])
    out = capfd.readouterr().out.splitlines()
    assert out[0].split()[0] == "22" and out[1].split()[0] == "11"  # cheapest first
    box.main(["rent", "--max_price", "0.35", "--write_config", str(written), "--backoff", "0.01"])
    assert "ssh -p 40022 root@ssh4.vast.ai" in capfd.readouterr().out
    query = "gpu_name=RTX_3090 num_gpus=1 dph_total<=0.35 disk_space>=40 rentable=true"
    assert calls(fake_vastai)[1:] == [
        ["search", "offers", query, "--order", "dph_total", "--raw"],
        ["create", "instance", "22", "--image", "pytorch/pytorch:latest", "--disk", "40", "--ssh", "--raw"],
        ["show", "instance", "777", "--raw"],
        ["show", "instance", "777", "--raw"],
    ]
    saved = yaml.safe_load(written.read_text())
    assert saved == {
        "key": "~/.ssh/id_ed25519",
        "host": "ssh4.vast.ai",
        "port": 40022,
        "user": "root",
        "instance_id": 777,
    }
    box.main(["destroy", "--config", str(written)])
    assert calls(fake_vastai)[-1] == ["destroy", "instance", "777"]


def test_missing_client_and_non_json_answers_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found .*pip install vastai"):
        box.main(["find", "--vastai", str(tmp_path / "no-such-vastai")])
    liar = tmp_path / "liar"
    liar.write_text("#!/bin/sh\necho 'not json'\n")
    liar.chmod(0o755)
    with pytest.raises(UserError, match="did not answer JSON"):
        box.main(["rent", "--vastai", str(liar)])
