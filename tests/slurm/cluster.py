"""A real Slurm cluster on this machine, for tests: munged, slurmctld and one or two slurmd
"nodes" started in a scratch folder and stopped by PID.

Debian's packages (slurmctld, slurmd, slurm-client, munge) are installed with apt-get when they
are missing; ``ClusterUnavailable`` says why a cluster cannot be had here (not root, no apt, no
packages), so the tests can skip with that reason. (Slurm 22.05 from Debian on one host: munge
with its own key and socket, slurmctld/slurmd in the foreground, stopped by PID.)
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel")


class ClusterUnavailable(RuntimeError):
    """Slurm cannot run here (the reason is the message)."""


def ensure_installed(timeout: float = 600) -> None:
    """Install Slurm and munge from Debian's packages unless every binary is already there."""
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in BINARIES):
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"Slurm/munge are not installed and installing them needs root: "
                                 f"apt-get install {' '.join(PACKAGES)}")
    if not shutil.which("apt-get"):
        raise ClusterUnavailable("Slurm/munge are not installed and there is no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", *PACKAGES]
    for attempt in ([install], [["apt-get", "update", "-q"], install]):  # update only if needed
        try:
            if all(subprocess.run(c, env=env, capture_output=True, timeout=timeout).returncode == 0 for c in attempt):
                return
        except (OSError, subprocess.TimeoutExpired):
            pass
    raise ClusterUnavailable(f"apt-get could not install {' '.join(PACKAGES)} (no package registry reachable?)")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


@dataclasses.dataclass
class JobInfo:
    job_id: str
    state: str
    exit_code: int
    restarts: int
    start: str
    end: str
    fields: dict


class LocalSlurm:
    """munged + slurmctld + ``num_nodes`` slurmd in ``scratch``; ``start()``, then ``stop()``.

    Two nodes on one host need node names that resolve inside their jobs: each slurmd runs in
    its own mount namespace (``unshare -m``) with a private /etc/hosts naming them, which its
    jobs inherit; the machine's /etc/hosts is never touched. Without ``unshare`` one node
    named after this host is started instead.
    """

    def __init__(self, scratch: Path, num_nodes: int = 2):
        self.scratch = Path(scratch)
        self.num_nodes = num_nodes
        self.nodes: list[str] = []
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.scratch / "slurm.conf"

    # ----------------------------------------------------------------- environment for clients
    def client_env(self, **extra: str) -> dict:
        """This process's environment without any outer Slurm job's variables, plus SLURM_CONF."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra)
        return env

    def run(self, *args: str, timeout: float = 60, check: bool = True, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), env=env or self.client_env(), cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    # ----------------------------------------------------------------- start / stop
    def _can_private_hosts(self) -> bool:
        if not shutil.which("unshare"):
            return False
        probe = self.scratch / "hosts.probe"
        probe.write_text("127.0.0.1 localhost\n")
        try:
            return subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {probe} /etc/hosts"],
                                  capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False

    def _hardware_line(self) -> str:
        """This host's CPU layout as slurmd detects it; memory kept below the detected size (above it
        would drain the node)."""
        out = subprocess.run([_sbin("slurmd"), "-C"], capture_output=True, text=True, timeout=60).stdout
        fields = dict(re.findall(r"(\w+)=(\S+)", out.splitlines()[0] if out else ""))
        if "CPUs" not in fields:
            raise ClusterUnavailable(f"`slurmd -C` printed no hardware description: {out!r}")
        keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
        mem = int(int(fields.get("RealMemory", "1000")) * 0.9)
        return " ".join(f"{k}={fields[k]}" for k in keep if k in fields) + f" RealMemory={mem}"

    def _write_conf(self, private_hosts: bool) -> None:
        s = self.scratch
        host = socket.gethostname().split(".")[0]
        ctld_port, *node_ports = _free_ports(1 + self.num_nodes)
        hw = self._hardware_line()
        self.nodes = [f"kfnode{i + 1}" for i in range(self.num_nodes)] if private_hosts else [host]
        node_lines = [f"NodeName={n} NodeAddr=127.0.0.1 Port={p} {hw}" for n, p in zip(self.nodes, node_ports)]
        (s / "plugstack.conf").write_text("")
        self.conf.write_text("\n".join([
            "ClusterName=kftest",
            "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={ctld_port}", f"SlurmdPort={node_ports[0]}",
            "AuthType=auth/munge", "CredType=cred/munge",
            # cred_expire=10: a requeued job reruns after ~15 s instead of ~170 s
            f"AuthInfo=socket={s / 'munge' / 'munge.sock'},cred_expire=10",
            f"StateSaveLocation={s / 'state'}", f"SlurmdSpoolDir={s / 'spool-%n'}",
            f"SlurmctldPidFile={s / 'slurmctld.pid'}", f"SlurmdPidFile={s / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={s / 'slurmctld.log'}", f"SlurmdLogFile={s / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SwitchType=switch/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "MailProg=/bin/true",
            f"PlugStackConfig={s / 'plugstack.conf'}",
            "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=5,bf_interval=2",
            # No DependencyParameters=kill_invalid_depend: submit_pipeline.sh must cancel a broken
            # chain by itself (--kill-on-invalid-dep), as on a cluster without that setting.
            "EnforcePartLimits=ALL", "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "ReturnToService=2", "KillWait=10", "MinJobAge=600",
            "SlurmdParameters=config_overrides",  # several slurmd declaring this host's CPUs
            *node_lines,
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")
        if private_hosts:
            base = Path("/etc/hosts").read_text()
            (s / "hosts").write_text(base.rstrip("\n") + "\n127.0.0.1 " + " ".join(self.nodes) + "\n")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.scratch / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, env=self.client_env())
        log.close()

    def start(self, timeout: float = 60) -> "LocalSlurm":
        ensure_installed()
        if os.geteuid() != 0:
            raise ClusterUnavailable("the local test cluster runs its daemons as root (SlurmUser=root)")
        s = self.scratch
        munge = s / "munge"
        munge.mkdir(parents=True, exist_ok=True)
        munge.chmod(0o755)  # munged refuses a socket folder that is not 755
        if len(str(munge / "munge.sock")) > 100:
            raise ClusterUnavailable(f"scratch path {s} is too long for a unix socket")
        (s / "state").mkdir(exist_ok=True)
        private_hosts = self.num_nodes > 1 and self._can_private_hosts()
        self._write_conf(private_hosts)
        for n in self.nodes:
            (s / f"spool-{n}").mkdir(exist_ok=True)
        key = munge / "munge.key"
        if not key.exists():
            subprocess.run([_sbin("mungekey"), "-c", "-k", str(key)], check=True, capture_output=True, timeout=60)
        key.chmod(0o600)
        try:
            self._spawn("munged", [_sbin("munged"), "-F", "--force", f"--key-file={key}",
                                   f"--socket={munge / 'munge.sock'}", f"--pid-file={munge / 'munged.pid'}",
                                   f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"])
            self._wait(lambda: (munge / "munge.sock").exists(), 20, "munged's socket")
            self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            for n in self.nodes:
                slurmd = [_sbin("slurmd"), "-D", "-N", n, "-f", str(self.conf)]
                if private_hosts:  # exec keeps one PID: unshare -> sh -> slurmd
                    slurmd = ["unshare", "-m", "sh", "-c",
                              f"mount --bind {s / 'hosts'} /etc/hosts && exec {' '.join(slurmd)}"]
                self._spawn(f"slurmd-{n}", slurmd)
            self._wait(self._all_idle, timeout, f"sinfo to show {self.nodes} idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _all_idle(self) -> bool:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}; see {self.scratch / (name + '.out')} "
                                   f"and the logs next to it")
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=20).stdout.split("\n")
        states = dict(line.split() for line in out if line.strip())
        return all(states.get(n) == "idle" for n in self.nodes)

    @staticmethod
    def _wait(cond, timeout: float, what: str) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if cond():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")

    def stop(self) -> None:
        """Cancel leftover jobs, then TERM (KILL after 10 s) every daemon this object started."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                jobs = self.run("squeue", "-h", "-o", "%i", check=False, timeout=20).stdout.split()
                if jobs:
                    self.run("scancel", *jobs, check=False, timeout=20)
                    end = time.time() + 30
                    while time.time() < end and self.run("squeue", "-h", "-o", "%i", check=False,
                                                         timeout=20).stdout.split():
                        time.sleep(0.5)
            except (OSError, subprocess.SubprocessError):
                pass
        order = [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        self.procs.clear()

    # ----------------------------------------------------------------- jobs
    def sbatch(self, *args: str, env: dict | None = None, cwd: Path | None = None, wait: bool = False,
               timeout: float = 600) -> tuple[str, int]:
        """Submit; returns (job id, sbatch's exit code: the job's own with ``wait``)."""
        argv = ["sbatch", "--parsable", *(["--wait"] if wait else []), *args]
        proc = subprocess.run(argv, env=env or self.client_env(), cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
        job = proc.stdout.strip().split(";")[0].splitlines()[0] if proc.stdout.strip() else ""
        if not job:
            raise RuntimeError(f"sbatch did not submit ({proc.returncode}): {proc.stderr.strip()}")
        return job, proc.returncode

    def job(self, job_id: str) -> JobInfo:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        fields = dict(re.findall(r"(\w+)=(\S*)", out))
        return JobInfo(job_id, fields.get("JobState", "?"), int(fields.get("ExitCode", "0:0").split(":")[0]),
                       int(fields.get("Restarts", "0")), fields.get("StartTime", ""), fields.get("EndTime", ""),
                       fields)

    def wait_jobs(self, job_ids, timeout: float = 600) -> dict[str, JobInfo]:
        """Wait until every job has ended (completed, failed, cancelled...)."""
        active = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED",
                  "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}
        end = time.time() + timeout
        while True:
            infos = {j: self.job(j) for j in job_ids}
            if all(i.state not in active for i in infos.values()):
                return infos
            if time.time() > end:
                raise TimeoutError(f"jobs still running after {timeout:.0f} s: "
                                   f"{ {j: i.state for j, i in infos.items()} }")
            time.sleep(1)
