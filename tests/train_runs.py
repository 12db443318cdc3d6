"""Processes that run ``train.py``'s ``main`` several times in turn, for ``train_single_many``
and ``torchrun_many`` (``tests/conftest.py``): the imports of a training process are paid once.

``python -m tests.train_runs single`` (run lists as JSON on stdin, 1 rank each: a fresh default
process group on a fresh port per run, destroyed by ``main``) or, on every rank of a torchrun
launch, ``python -m tests.train_runs torchrun RUNS.json``: every run gets a default process
group of its own, rank 0 hosting a fresh TCPStore on a free port that it hands to the other
ranks through torchrun's store (so no run rendezvouses on a previous run's keys).

After run i each rank writes ``RUN_MARK i exit CODE`` (torchrun: ``RUN_MARK i rank R exit
CODE``) on stdout and stderr; rank 0 hands out run i + 1's port only after writing its line.
Under torchrun a run that fails ends the process with its status (torchrun stops the other
ranks, which could wait on it); the process otherwise exits 0 through ``exit_process``.
"""

import os
import sys

RUN_MARK = "=== tests: end of run"


def _run(i: int, args: list[str], tag: str) -> int:
    """Run ``main(args)`` as train.py calls it; write run i's mark; return its status."""
    import gc
    import traceback

    from torchtitan_ext.distributed import clear_dtensor_caches
    from torchtitan_ext.tools.auto_mesh import choose_stage_mesh
    from torchtitan_ext.trainer import main

    try:
        code = main(args, mesh_planner=choose_stage_mesh)
    except BaseException:
        traceback.print_exc()
        code = 1
    gc.collect()  # the run's trainers and their process groups
    clear_dtensor_caches()
    for stream in (sys.stdout, sys.stderr):
        stream.write(f"{RUN_MARK} {i}{tag} exit {code}\n")
        stream.flush()
    return code


def single() -> None:
    """The runs of stdin's JSON list, one after the other, each on 1 rank."""
    import json

    from torchtitan_ext.distributed import exit_process

    for i, args in enumerate(json.loads(sys.stdin.read())):
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(key, None)
        _run(i, args, "")
    exit_process(0)


def torchrun(runs_file: str) -> None:
    """This rank's part of the runs listed in ``runs_file`` (JSON), one after the other."""
    import json
    import socket
    from datetime import timedelta

    from torch.distributed import TCPStore

    from torchtitan_ext.distributed import exit_process

    rank = int(os.environ["RANK"])
    agent = TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
        timeout=timedelta(seconds=600),
    )  # fmt: skip
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"  # rank 0 hosts each run's store
    with open(runs_file) as f:
        runs = json.load(f)
    for i, args in enumerate(runs):
        key = f"tests/train_many/run{i}/port"
        if rank == 0:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                agent.set(key, str(s.getsockname()[1]))
        os.environ["MASTER_PORT"] = agent.get(key).decode()
        code = _run(i, args, f" rank {rank}")
        if code != 0:
            exit_process(code)
    exit_process(0)


if __name__ == "__main__":
    if sys.argv[1] == "single":
        single()
    else:
        torchrun(sys.argv[2])
