"""Rank helpers: not distributed, rank read lazily from the environment, and a real gloo process group."""

import socket

import pytest
import torch
import torch.multiprocessing as mp

from yolotrain.utils import dist

LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_not_distributed(clean_env):
    assert dist.rank() == -1 and dist.local_rank() == -1
    assert dist.world_size() == 1
    assert not dist.is_dist() and dist.is_main()
    dist.barrier()
    obj = {"a": [1, 2]}
    assert dist.broadcast_object(obj) is obj
    tensor = torch.tensor([1.0, 3.0])
    assert dist.all_reduce_mean(tensor) is tensor
    assert tensor.tolist() == [1.0, 3.0]
    ran = []
    with dist.main_process_first():
        ran.append(True)
    assert ran == [True]
    dist.destroy_process_group()
    dist.destroy_process_group()  # safe twice without a group


def test_rank_is_read_lazily_from_the_environment(clean_env):
    calls = []

    @dist.rank_zero_only
    def log_once(value):
        calls.append(value)
        return value * 2

    assert log_once(2) == 4
    clean_env.setenv("RANK", "1")
    clean_env.setenv("LOCAL_RANK", "1")
    clean_env.setenv("WORLD_SIZE", "2")
    assert dist.rank() == 1 and dist.local_rank() == 1 and dist.world_size() == 2
    assert not dist.is_main()
    assert log_once(3) is None
    assert calls == [2]
    assert log_once.__name__ == "log_once"
    clean_env.setenv("RANK", "0")
    assert dist.is_main()


def test_single_process_gloo_group(clean_env):
    clean_env.setenv("MASTER_ADDR", "127.0.0.1")
    clean_env.setenv("MASTER_PORT", str(_free_port()))
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "1")
    dist.init_process_group("gloo", timeout_s=30)
    try:
        dist.init_process_group("gloo")  # already initialised: no-op
        assert dist.rank() == 0 and dist.world_size() == 1 and dist.is_main()
        assert not dist.is_dist()  # one process: collectives are skipped
    finally:
        dist.destroy_process_group()
        dist.destroy_process_group()
    clean_env.delenv("RANK")
    assert dist.rank() == -1


def _two_process_worker(rank: int, port: int, folder: str, results) -> None:
    import os
    from pathlib import Path

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout_s=60)
    try:
        flag = Path(folder) / "written_by_main"
        with dist.main_process_first():
            if rank == 0:
                flag.write_text("done")  # e.g. a dataset cache
            saw_main_output = flag.exists()
        mean = dist.all_reduce_mean(torch.tensor([float(rank), 10.0 * rank]))
        shared = dist.broadcast_object({"from": rank})
        results[rank] = {"is_dist": dist.is_dist(), "mean": mean.tolist(), "shared": shared, "main": dist.is_main(),
                         "saw_main_output": saw_main_output}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_collectives(clean_env, tmp_path):
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.spawn(_two_process_worker, args=(_free_port(), str(tmp_path), results), nprocs=2, join=True)
    assert results[0] == {"is_dist": True, "mean": [0.5, 5.0], "shared": {"from": 0}, "main": True,
                          "saw_main_output": True}
    assert results[1] == {"is_dist": True, "mean": [0.5, 5.0], "shared": {"from": 0}, "main": False,
                          "saw_main_output": True}
    manager.shutdown()
