"""The test launcher itself (tests/dist.py): a rank that outlives the timeout is aborted and reported with
where it was stuck, beside the ranks that ended, instead of the launch raising and losing their output."""
from __future__ import annotations

import time

from dist import run_script

HANG_ON_RANK_1 = """
import os, sys, time
print(f"rank {os.environ['RANK']} started", flush=True)
if os.environ["RANK"] == "1":
    time.sleep(600)
sys.exit(3)
"""


def test_a_rank_past_the_timeout_is_aborted_with_its_stack_and_the_others_are_kept():
    started = time.time()
    result = run_script(HANG_ON_RANK_1, [], nprocs=2, timeout=5)
    assert time.time() - started < 30
    ended, hung = result.ranks
    assert (ended.returncode, ended.timed_out) == (3, False) and "rank 0 started" in ended.output
    assert hung.timed_out and hung.returncode != 0
    # faulthandler's dump names the line it hung on: the sleep, line 5 of the script
    assert "rank 1 started" in hung.output and 'File "<string>", line 5' in hung.output
    assert "timed out" in result.describe()
