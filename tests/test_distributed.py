"""torchrun extraction: 2 CPU processes (gloo) resume what one began, giving exactly the rows of one."""
import subprocess
import sys

import numpy as np
import pytest

from dinoprobe.cache import store as cache

from conftest import REPO, cache_rows, features_cmd, kill_during_extraction, make_folder, run_cli


def _torchrun(args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args[1:]]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def folder_and_reference(tmp_path_factory):
    root = make_folder(tmp_path_factory.mktemp("dist") / "data", per_class=9)
    run_cli(*features_cmd(root, root.parent / "single")[3:], check=True)  # in-process: one start less
    return root, cache_rows(root.parent / "single")


def _assert_same(expected, cache_dir):
    got = cache_rows(cache_dir)  # sorted by index: independent of which rank wrote what
    for split in expected:
        for key in expected[split]:
            np.testing.assert_array_equal(expected[split][key], got[split][key], err_msg=f"{split}/{key}")


@pytest.mark.slow
def test_a_run_killed_with_one_process_resumes_with_two(folder_and_reference, tmp_path):
    """Two gloo ranks finish what one process began (each rank writing shards of its own, from scratch on a CSV
    list and on tar shards in test_multilabel and test_sources): exactly the rows of one uninterrupted process."""
    root, reference = folder_and_reference
    assert kill_during_extraction(root, tmp_path / "c", after_shards=2)
    proc = _torchrun(["python", "-m", *features_cmd(root, tmp_path / "c")[2:]])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("cache ") == 1  # only rank 0 reports
    assert cache.verify(tmp_path / "c") == []
    _assert_same(reference, tmp_path / "c")


def test_decoding_workers_follow_the_cores_this_process_may_use_split_between_ranks(monkeypatch):
    """The cores are those of this process's CPU affinity (SLURM, taskset and container cpusets give fewer than the
    machine has), and torchrun's ranks on one machine share them: each takes its share before the usual rule
    (GPU: one worker per core but one, at most 8; CPU: in-process up to 4 cores, else one per 8)."""
    import os

    import torch

    from dinoprobe.device import default_workers

    monkeypatch.setattr(os, "cpu_count", lambda: 256)  # the machine's; this process may run on fewer (affinity)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert [default_workers(gpu, ranks) for ranks in (1, 2, 4, 16, 32)] == [8, 7, 3, 1, 1]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert [default_workers(cpu, ranks) for ranks in (1, 2, 8, 16)] == [8, 4, 1, 0]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)  # e.g. SLURM, 4 CPUs
    assert default_workers(cpu) == 0 and default_workers(gpu) == 3
