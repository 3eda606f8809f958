"""The decoding pool: one thread per worker, memory kept between patients, crashes heard."""

from __future__ import annotations

import pytest


def test_pool_workers_run_one_thread_each(run_as_main_script):
    """prepare's and predict's workers are the parallelism: each must use one torch and one
    OpenCV thread, also when the parent script imported torch before the pool started (a
    spawned worker runs that script again, so torch is loaded before the initializer)."""
    stdout = run_as_main_script(
        "import torch\n"
        "from brainmets.data.workers import map_jobs\n\n"
        "def threads(job):\n"
        "    import cv2\n"
        "    return torch.get_num_threads(), cv2.getNumThreads()\n\n"
        "if __name__ == '__main__':\n"
        "    torch.set_num_threads(2)\n"
        "    print(sorted(set(map_jobs(threads, list(range(4)), workers=2, progress=False))))\n",
    )
    assert stdout.strip() == "[(1, 1)]"


def test_pool_workers_reuse_freed_volume_memory(run_as_main_script):
    """A worker decodes patient after patient; a volume-sized array (64 MB, 60 slices of 512²
    float32) freed by one patient must be reused by the next, not handed back to the kernel
    and page-faulted in again. The parent, with glibc's defaults, shows the faults."""
    stdout = run_as_main_script(
        "import resource\n"
        "import numpy as np\n"
        "from brainmets.data.workers import keep_freed_memory, map_jobs\n\n"
        "def faults(_=None):\n"
        "    volume = np.ones((60, 512, 512), np.float32); del volume  # the first patient\n"
        "    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    for _ in range(3):\n"
        "        volume = np.ones((60, 512, 512), np.float32); del volume\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start\n\n"
        "def worker(_):\n"
        "    return faults(), keep_freed_memory()  # the second call says if the first took\n\n"
        "if __name__ == '__main__':\n"
        "    results = list(map_jobs(worker, list(range(2)), workers=2, progress=False))\n"
        "    print(faults(), max(r[0] for r in results), all(r[1] for r in results))\n",
    )
    parent, worker, tuned = stdout.split()
    if tuned != "True":
        pytest.skip("this C library does not take a 1 GiB mmap threshold (not glibc, or old)")
    parent, worker = int(parent), int(worker)
    assert parent > 0
    assert worker < parent / 10


def test_a_worker_crash_without_a_handler_is_raised(run_as_main_script):
    """map_jobs' callers that cannot record a failure still hear of it."""
    stdout = run_as_main_script(
        "import os, signal\n"
        "from concurrent.futures.process import BrokenProcessPool\n"
        "from brainmets.data.workers import map_jobs\n\n"
        "def die(job):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n\n"
        "if __name__ == '__main__':\n"
        "    try:\n"
        "        list(map_jobs(die, [1, 2], workers=2, progress=False))\n"
        "    except BrokenProcessPool:\n"
        "        print('raised')\n",
    )
    assert stdout.strip() == "raised"
