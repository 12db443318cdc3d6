"""Stopping a job from outside, and two jobs on one folder, with real processes and real
signals: SIGTERM to torchrun's process group (what Slurm sends; a terminal's Ctrl-C sends
SIGINT the same way) finishes the step, writes its checkpoint and stops every rank with one
line, and the resumed run matches an uninterrupted one bit for bit; a second job on a dump
folder in use stops at once; the folder's lock dies with its holder.
"""

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import ROOT, read_metrics, tiny_run_args, torchrun, torchrun_many
from torchtitan_ext.distributed import launch_env, torchrun_command
from torchtitan_ext.preemption import STOPPED_EXIT_CODE

# Constant schedule length: a run of any training.steps trains at the same LRs, so a run
# stopped at an unpredictable step can be compared with a shorter uninterrupted one.
SCHEDULE = ["--lr_scheduler.total_steps", "1000"]


def run_args(dump: Path, steps: int) -> list[str]:
    return [
        *tiny_run_args(dump, steps, global_batch_size=4, warmup_steps=2),
        *("--checkpoint.interval", "1000", *SCHEDULE),
    ]


def start(cmd: list[str]) -> subprocess.Popen[str]:
    """A job in a process group of its own (as a batch system or a terminal starts one)."""
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=launch_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def read_until(proc: subprocess.Popen[str], pattern: str) -> str:
    """The job's output up to the first line matching ``pattern``."""
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if re.search(pattern, line):
            return "".join(seen)
    proc.wait()
    raise AssertionError(f"exited ({proc.returncode}) before {pattern!r}:\n{''.join(seen)[-3000:]}")


def stop(proc: subprocess.Popen[str], sig: signal.Signals, timeout: float = 120) -> str:
    """Send ``sig`` to the job's process group; its remaining output once it has exited."""
    os.killpg(proc.pid, sig)
    out, _ = proc.communicate(timeout=timeout)
    return out


def losses(dump: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(dump)}


def test_sigterm_to_torchrun_saves_the_step_and_resumes_exactly(tmp_path):
    """SIGTERM to torchrun's process group mid-run: each worker gets it (twice: from the
    group and forwarded by torchrun), the ranks agree on one step, write its checkpoint and
    print one line each; rerunning resumes there, and every loss equals an uninterrupted run's
    bit for bit."""
    dump, ref = tmp_path / "run", tmp_path / "ref"
    job = start(torchrun_command(2, [str(ROOT / "train.py"), *run_args(dump, 100_000)]))
    try:
        out = read_until(job, r"step:\s+3 ")
        out += stop(job, signal.SIGTERM)
    finally:
        job.kill()
        job.wait()
    lines = re.findall(r"\[rank(\d)\] SIGTERM: stopped at step (\d+); (.*)", out)
    assert sorted(r for r, _, _ in lines) == ["0", "1"], out[-4000:]
    steps = {int(s) for _, s, _ in lines}
    assert len(steps) == 1, lines  # every rank stopped after the same step
    n = steps.pop()
    assert n >= 3
    assert {rest for _, _, rest in lines} == {
        f"checkpoint step-{n}; run the same command to resume"
    }
    assert f'File "{ROOT / "torchtitan_ext"}' not in out  # torchrun's traceback only
    assert sorted(p.name for p in (dump / "checkpoint").iterdir()) == [f"step-{n}"]
    assert sorted(losses(dump)) == list(range(1, n + 1))

    # The rerun and the uninterrupted run share one launch (torchrun_many).
    resumed, _ = torchrun_many(2, [run_args(dump, n + 2), run_args(ref, n + 2)])
    assert f"step-{n} (" in resumed.stdout  # "resumed from .../step-N (model, ...)"
    got, want = losses(dump), losses(ref)
    assert sorted(got) == list(range(1, n + 3))
    assert got == want


def test_sigint_stops_with_a_checkpoint_and_status_75(tmp_path):
    """Ctrl-C (SIGINT to the foreground process group) on a 1-rank run: the step finishes,
    its checkpoint is written, one line names it, and the status says "stopped, resume"."""
    dump = tmp_path / "run"
    job = start([sys.executable, str(ROOT / "train.py"), *run_args(dump, 100_000)])
    try:
        out = read_until(job, r"step:\s+2 ")
        out += stop(job, signal.SIGINT)
    finally:
        job.kill()
        job.wait()
    assert job.returncode == STOPPED_EXIT_CODE, out[-3000:]
    m = re.search(r"\[rank0\] SIGINT: stopped at step (\d+); checkpoint step-(\d+); run the "
                  r"same command to resume", out)  # fmt: skip
    assert m and m.group(1) == m.group(2), out[-3000:]
    n = int(m.group(1))
    assert sorted(p.name for p in (dump / "checkpoint").iterdir()) == [f"step-{n}"]
    assert (dump / "checkpoint" / f"step-{n}" / ".metadata").is_file()
    assert "Traceback" not in out and "KeyboardInterrupt" not in out


def test_second_job_on_a_dump_folder_in_use_stops_at_once(tmp_path):
    """A 2-rank job on the dump folder of a running job: every rank prints one config error
    naming the folder and the holder's pid, before touching the folder (the running job's
    metrics keep each step once). Killed with SIGKILL, the holder leaves no stale lock."""
    from torchtitan_ext.run_lock import FolderInUse, acquire

    dump = tmp_path / "run"
    holder = start([sys.executable, str(ROOT / "train.py"), *run_args(dump, 100_000)])
    try:
        read_until(holder, r"step:\s+1 ")
        second = torchrun(2, run_args(dump, 2), check=False)
        assert second.returncode != 0, second.stdout[-3000:]
        workers = second.stderr.partition(" FAILED\n")[0]  # torchrun's summary repeats a line
        refused = re.findall(
            rf"\[rank(\d)\] config error: job.dump_folder = '{re.escape(str(dump))}': in use "
            rf"by another job \(pid {holder.pid} on host ",
            workers,
        )
        assert sorted(refused) == ["0", "1"], second.stderr[-3000:]
        try:
            acquire(str(dump))
            raise AssertionError("the lock of a running job was granted")
        except FolderInUse as e:
            assert f"pid {holder.pid} on host " in e.holder
    finally:
        stop(holder, signal.SIGKILL)
    steps = [r["step"] for r in read_metrics(dump)]
    assert steps == list(range(1, len(steps) + 1))  # only the holder's records
    acquire(str(dump)).release()  # the kernel released the dead holder's lock


GRACE_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from torchtitan_ext.preemption import STOP
    STOP.install(
        float(sys.argv[1]),
        0,
        lambda name: print(f"start-up stopped by {name}", flush=True),
        lambda name: print(f"expired after {name}", flush=True),
    )
    if sys.argv[2] == "training":
        STOP.defer()
    print("ready", flush=True)
    time.sleep(60)  # a step that does not end in time, or a slow start-up
    print("slept", flush=True)
    """
)


def test_stop_signal_outside_a_step_boundary(tmp_path):
    """In the training loop a signal is only recorded; when the step and its checkpoint are
    not done within checkpoint.stop_grace_seconds, the watchdog prints its line and exits 1.
    Before the training loop the signal ends the process at once with its line and status 75,
    also while the main thread is busy."""
    script = tmp_path / "grace.py"
    script.write_text(GRACE_SCRIPT)
    env = {**launch_env(), "PYTHONPATH": str(ROOT)}
    procs = {
        phase: subprocess.Popen(
            [sys.executable, str(script), "0.5", phase],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for phase in ("training", "start-up")
    }
    outs = {}
    for phase, proc in procs.items():
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        outs[phase] = proc.communicate(timeout=60)[0]
    assert procs["training"].returncode == 1, outs
    assert outs["training"].splitlines()[-1] == "expired after SIGTERM"  # after the notice
    assert procs["start-up"].returncode == STOPPED_EXIT_CODE, outs
    assert outs["start-up"] == "start-up stopped by SIGTERM\n"
