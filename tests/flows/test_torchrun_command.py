"""The torchrun command lines a train task runs and logs (fast: nothing is launched)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from flows.torchrun import command, other_nodes
from lm.config import DistributedConfig
from lm.distributed import interface_towards

JOB = Path(".lmp/runs/RUN/job.json")


def test_one_host_uses_a_standalone_rendezvous():
    args = command(DistributedConfig(nproc_per_node=2), JOB)
    assert args[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--standalone" in args
    assert args[-3:] == ["-m", "flows.ddp_worker", str(JOB)]


def test_several_hosts_meet_at_master_addr_and_each_other_host_is_told_its_command():
    cfg = DistributedConfig(nnodes=3, nproc_per_node=2, master_addr="10.0.0.5", master_port=29400)
    args = " ".join(command(cfg, JOB))
    assert "--nnodes 3 --nproc-per-node 2" in args and "--standalone" not in args and "rdzv" not in args
    assert "--node-rank 0 --master-addr 10.0.0.5 --master-port 29400 -m flows.ddp_worker" in args
    lines = other_nodes(cfg, JOB)
    assert [line.split(":")[1].strip() for line in lines] == ["node 1 of 3", "node 2 of 3"]
    for rank, line in enumerate(lines, start=1):
        told = shlex.split(line.split(", run: ", 1)[1])
        assert told == command(cfg, JOB, rank) and f"in {shlex.quote(str(Path.cwd()))}, run:" in line


def test_the_interface_towards_an_address_of_this_machine_is_the_one_that_has_it():
    assert interface_towards("127.0.0.1", 29500) is not None  # the loopback interface, whatever its name
    assert interface_towards("no-such-host.invalid", 29500) is None
