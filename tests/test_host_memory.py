"""Freed host memory is kept for reuse: after `keep_freed_host_memory` (and after `lorakit.train` has trained on the
CPU), allocating and freeing a 64 MiB tensor over and over faults no new pages in (in the median cycle), where
glibc's own policy maps and zero-fills it afresh every time (counted by the kernel, `getrusage`); a `MALLOC_*`
setting of the user's is left alone. Each case runs in a fresh interpreter: the setting lasts for the life of a
process."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the setting is glibc's"
)

PAGES_PER_BLOCK = 64 * 2**20 // 4096  # above glibc's largest automatic mmap threshold (32 MiB)
CYCLES = 5

COUNT_FAULTS = f"""
import resource, statistics, torch
def faults_per_cycle():
    for _ in range(2):  # the first uses fault their pages in either way
        torch.empty(16 * 2**20).fill_(1.0)
    counts = []
    for _ in range({CYCLES}):
        begin = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(16 * 2**20).fill_(1.0)  # 64 MiB, freed at once
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - begin)
    # the median: a heap left fragmented (by a training run) may have to grow once before its free block fits
    return statistics.median(counts)
"""


def run_python(body: str, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    script = COUNT_FAULTS + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**clean, **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_freed_blocks_are_reused_instead_of_mapped_again():
    applied, before, after = run_python(
        """
        from lorakit.host_memory import keep_freed_host_memory
        before = faults_per_cycle()
        print(keep_freed_host_memory(), before, faults_per_cycle())
        """
    )
    assert applied == "True"
    assert float(before) >= 0.9 * PAGES_PER_BLOCK  # glibc's default: every page of every cycle faults anew
    assert float(after) < 0.02 * PAGES_PER_BLOCK


def test_a_users_malloc_setting_is_left_alone():
    applied, after = run_python(
        """
        from lorakit.host_memory import keep_freed_host_memory
        print(keep_freed_host_memory(), faults_per_cycle())
        """,
        MALLOC_MMAP_THRESHOLD_="131072",  # the user wants freed memory back at once
    )
    assert applied == "False" and float(after) >= 0.9 * PAGES_PER_BLOCK


def test_training_on_the_cpu_keeps_freed_memory(tmp_path):
    (after,) = run_python(
        f"""
        import sys
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        from train.test_loop import SETTINGS, features, tiny_model
        from lorakit.train.data import Collator
        from lorakit.train.loop import LoopSettings, train_adapter
        train_adapter(tiny_model(), features(), Collator(0), LoopSettings(**SETTINGS), {str(tmp_path)!r})
        print(faults_per_cycle())
        """
    )
    assert float(after) < 0.02 * PAGES_PER_BLOCK
