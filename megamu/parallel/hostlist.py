"""Slurm host lists (SLURM_JOB_NODELIST's compressed form) expanded to host names.

"gpu-[01-03,07],login1" is gpu-01, gpu-02, gpu-03, gpu-07, login1: commas outside brackets separate
names, a bracket holds comma-separated numbers or ranges (zero padding kept from the lower bound), and
several brackets in one name give every combination, the leftmost varying slowest.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from itertools import product

from megamu.errors import ConfigError

_BRACKET = re.compile(r"\[([^\[\]]*)\]")


def expand_hostlist(hostlist: str) -> list[str]:
    """Every host of a compressed Slurm host list, in order; ConfigError naming the list if malformed."""
    hosts: list[str] = []
    for item in _split_top_level(hostlist):
        pieces = _BRACKET.split(item)  # literal, range list, literal, range list, ..., literal
        if any(c in p for p in pieces[0::2] for c in "[]"):
            raise ConfigError(f"malformed host list {hostlist!r}: unbalanced or nested brackets in {item!r}")
        choices = [[p] if i % 2 == 0 else _expand_ranges(p, hostlist) for i, p in enumerate(pieces)]
        hosts.extend("".join(parts) for parts in product(*choices))
    return hosts


def _split_top_level(hostlist: str) -> list[str]:
    """Split at the commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, c in enumerate(hostlist):
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            items.append(hostlist[start:i])
            start = i + 1
    items.append(hostlist[start:])
    if depth or not all(items):
        raise ConfigError(f"malformed host list {hostlist!r}")
    return items


def _expand_ranges(ranges: str, hostlist: str) -> list[str]:
    """ "01-03,7" -> 01, 02, 03, 7; a range keeps the zero padding of its lower bound."""
    out = []
    for part in ranges.split(","):
        low, sep, high = part.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()) or (sep and int(high) < int(low)):
            raise ConfigError(f"malformed host list {hostlist!r}: bad range {part!r}")
        out.extend(str(n).zfill(len(low)) for n in range(int(low), int(high or low) + 1))
    return out


def first_slurm_host(hostlist: str) -> str:
    """The first host of a Slurm host list: by `scontrol show hostnames` where scontrol runs, else by
    expand_hostlist (scontrol also fails where no Slurm configuration can be read)."""
    if shutil.which("scontrol"):
        try:
            hosts = subprocess.run(["scontrol", "show", "hostnames", hostlist], capture_output=True, text=True,
                                   timeout=60, check=True).stdout.split()
        except (OSError, subprocess.SubprocessError):
            hosts = []
        if hosts:
            return hosts[0]
    return expand_hostlist(hostlist)[0]
