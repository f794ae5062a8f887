"""Processes on one machine joined by torch.distributed (gloo on 127.0.0.1): for the distributed
tests and benchmarks.

:func:`launch` starts one Python process per rank with ``RANK WORLD PORT OUT_DIR`` after the
given command, on a free port, waits with a hard timeout, and kills and reaps every child whatever
happens; :func:`joined` is the rank's side.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(command: Sequence[str], out_dir: Path, world: int = 2, timeout: float = 300.0, threads: int = 1) -> None:
    """Run ``python *command RANK WORLD PORT OUT_DIR`` on ``world`` ranks; an error with the failing
    rank's output if one fails or the time runs out."""
    port = free_port()
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=path)
    children = [
        subprocess.Popen(
            [sys.executable, *command, str(rank), str(world), str(port), str(out_dir)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    try:
        outputs = [child.communicate(timeout=timeout)[0] for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.wait()
    for rank, (child, output) in enumerate(zip(children, outputs)):
        if child.returncode != 0:
            raise RuntimeError(f"rank {rank} of {world} failed (exit {child.returncode}):\n{output[-4000:]}")


@contextmanager
def joined(rank: int, world: int, port: int) -> Iterator[None]:
    """This process as ``rank`` of ``world`` (gloo, 127.0.0.1) for the duration; a world of one
    process joins no group."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if world == 1:
        yield
        return
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
