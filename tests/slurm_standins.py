"""Stand-in ``sbatch`` / ``srun`` / ``scontrol`` executables for testing the rendered scripts.

They behave like a one-machine Slurm: ``sbatch`` starts a detached "slurmd" that runs the
batch script with the SLURM_* job variables (and runs it again when the script called
``scontrol requeue``, with SLURM_RESTART_COUNT incremented); ``srun`` starts the step's tasks
as local processes with SLURM_PROCID/SLURM_LOCALID/SLURM_NODEID/SLURM_NTASKS set and relays
signals to them, as real srun does; ``scontrol show hostnames`` expands a comma list.
State and logs go to $STANDIN_DIR. ``install(bin_dir)`` writes the executables.

Failures are Slurm's too. ``sbatch`` refuses a script file it cannot open ("sbatch: error:
Unable to open file ...", exit 1, no job) but, like real sbatch, does not look at the
``--output`` path: that is opened on the node when the job starts, and Slurm creates no
folders, so a job whose log folder is missing fails before its script runs and leaves no log
(slurmstepd's "Could not open stdout file" goes to the node's log: $STANDIN_DIR/slurmd.err;
the job's end is recorded in ``job-state``, FAILED, and the script never starts).
"""

from __future__ import annotations

import sys
from pathlib import Path

SBATCH = r"""
import os, re, subprocess, sys
state = os.environ["STANDIN_DIR"]
script = sys.argv[-1]
try:
    open(script).close()
except OSError:
    sys.exit(f"sbatch: error: Unable to open file {script}")
job_id = os.environ.get("STANDIN_JOB_ID", str(os.getpid()))
subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "standin-slurmd"), job_id, script],
                 start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                 stderr=open(os.path.join(state, "slurmd.err"), "ab"))
print(f"Submitted batch job {job_id}")
"""

SLURMD = r"""
import os, re, subprocess, sys
job_id, script = sys.argv[1], sys.argv[2]
state = os.environ["STANDIN_DIR"]
max_restarts = int(os.environ.get("STANDIN_MAX_RESTARTS", "1"))
text = open(script).read()
opts = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", text, re.M))
name = opts.get("job-name", "job")
out = opts.get("output", f"slurm-{job_id}.out").replace("%x", name).replace("%j", job_id)
nodelist = os.environ.get("STANDIN_NODELIST", "localhost")
restart = 0
while True:
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        # as slurmstepd: the log is opened before the script starts; no folder, no job
        with open(os.path.join(state, "slurmd.err"), "a") as f:
            f.write(f"slurmstepd: error: Could not open stdout file {out}: No such file or directory\n")
        open(os.path.join(state, "job-state"), "w").write("FAILED")
        break
    env = dict(os.environ, SLURM_JOB_ID=job_id, SLURM_JOB_NAME=name, SLURM_JOB_NODELIST=nodelist,
               SLURM_NNODES=str(len(nodelist.split(","))), SLURM_RESTART_COUNT=str(restart),
               SLURM_SUBMIT_DIR=os.getcwd())
    with open(out, "ab") as log:
        p = subprocess.Popen(["bash", script], env=env, stdout=log, stderr=subprocess.STDOUT)
        with open(os.path.join(state, f"batch-{restart}.pid.tmp"), "w") as f:
            f.write(str(p.pid))
        os.replace(os.path.join(state, f"batch-{restart}.pid.tmp"), os.path.join(state, f"batch-{restart}.pid"))
        rc = p.wait()
    with open(os.path.join(state, f"batch-{restart}.rc"), "w") as f:
        f.write(str(rc))
    if os.path.exists(os.path.join(state, f"requeue-{restart}")) and restart < max_restarts:
        restart += 1
        continue
    open(os.path.join(state, "job-state"), "w").write("COMPLETED" if rc == 0 else "FAILED")
    break
open(os.path.join(state, "finished"), "w").write(str(restart))
"""

SRUN = r"""
import json, math, os, signal, subprocess, sys, time
args = sys.argv[1:]
opts, i = {}, 0
while i < len(args) and args[i].startswith("-"):
    a = args[i]
    if a.startswith("--"):
        k, _, v = a[2:].partition("=")
        opts[k] = v
    else:  # short options take the next word: -w host, -N 1, -n 2
        opts[{"-N": "nodes", "-n": "ntasks", "-w": "nodelist"}.get(a, a)] = args[i + 1]
        i += 1
    i += 1
cmd = args[i:]
nodes = int(opts.get("nodes") or os.environ.get("SLURM_NNODES", "1"))
if opts.get("ntasks"):
    n = int(opts["ntasks"])
    tpn = int(opts.get("ntasks-per-node") or math.ceil(n / nodes))
else:
    tpn = int(opts.get("ntasks-per-node") or 1)
    n = nodes * tpn
state = os.environ["STANDIN_DIR"]
with open(os.path.join(state, "srun.log"), "a") as f:
    f.write(json.dumps({"opts": opts, "cmd": cmd, "ntasks": n, "pid": os.getpid()}) + "\n")
procs = []
for r in range(n):
    env = dict(os.environ, SLURM_PROCID=str(r), SLURM_LOCALID=str(r % tpn), SLURM_NODEID=str(r // tpn),
               SLURM_NTASKS=str(n), SLURM_STEP_NUM_TASKS=str(n), SLURM_NTASKS_PER_NODE=str(tpn))
    procs.append(subprocess.Popen(cmd, env=env))
def relay(sig, frame):
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
    signal.signal(s, relay)
kill_on_bad = "kill-on-bad-exit" in opts and opts["kill-on-bad-exit"] in ("", "1")
rc = 0
while any(p.poll() is None for p in procs):
    bad = [p.returncode for p in procs if p.returncode not in (None, 0)]
    if bad and kill_on_bad:
        for p in procs:
            if p.poll() is None:
                p.terminate()
    time.sleep(0.05)
codes = [p.returncode for p in procs]
sys.exit(next((c if c > 0 else 128 - c for c in codes if c != 0), 0))
"""

SCONTROL = r"""
import os, sys
state = os.environ["STANDIN_DIR"]
a = sys.argv[1:]
if a[:2] == ["show", "hostnames"]:
    nodelist = a[2] if len(a) > 2 else os.environ["SLURM_JOB_NODELIST"]
    print("\n".join(nodelist.split(",")))
elif a[:1] == ["requeue"]:
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    with open(os.path.join(state, "scontrol.log"), "a") as f:
        f.write(f"requeue {a[1]} restart={restart}\n")
    open(os.path.join(state, f"requeue-{restart}"), "w").close()
else:
    sys.exit(f"stand-in scontrol: unsupported {a}")
"""


def install(bin_dir: Path) -> Path:
    """Write the stand-ins into ``bin_dir`` (put it first on PATH); returns ``bin_dir``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, src in (
        ("sbatch", SBATCH),
        ("standin-slurmd", SLURMD),
        ("srun", SRUN),
        ("scontrol", SCONTROL),
    ):
        p = bin_dir / name
        p.write_text(f"#!{sys.executable}\n{src.lstrip()}")
        p.chmod(0o755)
    return bin_dir
