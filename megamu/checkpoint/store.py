"""Saving and resuming through DeepSpeed so that a checkpoint is complete or ignored.

DeepSpeed's `save_checkpoint` is not atomic (every rank writes into the final directory), so
after it every rank writes its RNG state, all ranks vote on success, and only then rank 0 moves
megamu's pointer. Resume reads only that pointer, so a crash mid-save leaves the previous
checkpoint in charge. Every rank must read the same pointer (the checkpoint directory is shared), and
the saved layout must allow the current one (layout.py), before DeepSpeed loads anything.

Resuming is three calls: `resume_tag` picks the checkpoint (the pointer's, or the newest intact one before
it when a file of it is missing or truncated: manifest.py); `plan_resume` runs before the engine is built,
because a change of data-parallel size under ZeRO 1/2 loads DeepSpeed's universal checkpoint
(universal.py), which the engine must be built for; then `load_checkpoint` loads it into the engine.
"""
from __future__ import annotations

import os
import shutil
import socket
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist

from megamu.checkpoint.layout import (CheckpointLayout, check_resumable, needs_universal, read_layout,
                                      rng_source_rank, save_layout)
from megamu.checkpoint.manifest import drop_manifest, intact_tag, write_manifest
from megamu.checkpoint.pointer import POINTER, diverged_tag, read_pointer, tag_for, write_pointer
from megamu.checkpoint.rng import load_rng_state, save_rng_state
from megamu.checkpoint.universal import convert_to_universal, universal_info, universal_tag
from megamu.config import Config
from megamu.errors import CheckpointError, MegamuWarning, RankCheckpointError
from megamu.parallel.state import any_rank, get_parallel_state


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _all_ranks_succeeded(ok: bool) -> bool:
    return not any_rank(not ok)


def current_layout(zero_stage: int) -> CheckpointLayout:
    """This run's layout under ZeRO `zero_stage`."""
    layout = get_parallel_state().layout
    return CheckpointLayout(layout.tensor, layout.pipeline, layout.data, zero_stage)


def _current_layout(engine: Any) -> CheckpointLayout:
    return current_layout(int(engine.zero_optimization_stage()))


def _shown(tag: Optional[str]) -> str:
    return repr(tag) if tag else "no pointer"


def _agreed_tag(ckpt_dir: str) -> Optional[str]:
    """The pointer's tag, once every rank has read the same one.

    Ranks on nodes that do not share the checkpoint directory read different pointers (or none); loading
    anyway would mix checkpoints or hang in DeepSpeed's collectives, so every rank raises instead (a rank
    whose view differs from rank 0's names its own).
    """
    tag = read_pointer(ckpt_dir)
    if not dist.is_initialized():
        return tag
    views: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(views, (tag, socket.gethostname()))
    first_tag, first_host = views[0]
    differing = [rank for rank, (seen, _host) in enumerate(views) if seen != first_tag]
    if not differing:
        return tag
    path = os.path.join(ckpt_dir, POINTER)
    rank = dist.get_rank()
    if rank in differing:
        what = (f"rank {rank} on {socket.gethostname()} reads {_shown(tag)} at {path}, but rank 0 on {first_host} "
                f"reads {_shown(first_tag)}")
    else:
        hosts = sorted({views[r][1] for r in differing})
        what = f"rank(s) {differing} on {', '.join(hosts)} read another {path} than rank 0 ({_shown(first_tag)})"
    # A rank whose view differs says what it sees itself (its node's first rank may see rank 0's pointer).
    error = RankCheckpointError if rank in differing else CheckpointError
    raise error(f"{what}: the checkpoint directory must be on storage every node shares (a network or "
                f"parallel file system mounted at the same path on every node); set train.out_dir to such a path")


def save_checkpoint(engine: Any, ckpt_dir: str, step: int, client_state: dict[str, Any], cfg: Config, *,
                    diverged: bool = False) -> str:
    """Save through DeepSpeed the model of `cfg`, then move megamu's pointer once every rank has written
    everything. `diverged`: the weights of a run that stopped on non-finite steps, saved under
    `diverged_tag` for inspection; the pointer stays where it was, so a resume never starts from them.

    Collective: every rank must call it. Returns the tag.
    """
    tag = diverged_tag(step) if diverged else tag_for(step)
    rank = _rank()
    layout = _current_layout(engine)
    # What DeepSpeed's universal converter reads from the model files, should a resume change the DP size.
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    client_state = {**client_state, UNIVERSAL_CHECKPOINT_INFO: universal_info(cfg)}
    error: Optional[BaseException] = None
    try:
        if rank == 0:  # a tag saved anew (after a resume from an older one) must not keep an old conversion
            shutil.rmtree(os.path.join(ckpt_dir, universal_tag(tag)), ignore_errors=True)
            drop_manifest(ckpt_dir, tag)  # nor pass for complete while it is rewritten
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state)
        save_rng_state(ckpt_dir, tag, rank)
        if rank == 0:
            save_layout(ckpt_dir, tag, layout)
    except Exception as e:  # reported after the vote, so no rank blocks waiting for a failed peer
        error = e
    if not _all_ranks_succeeded(error is None):
        # Not a CheckpointError: the cause may be a bug, whose traceback must survive.
        raise RuntimeError(f"checkpoint {tag} in {ckpt_dir} failed on at least one rank; "
                           f"{POINTER} still names the previous complete checkpoint") from error
    if rank == 0 and not diverged:
        write_manifest(ckpt_dir, tag)
        write_pointer(ckpt_dir, tag)
    if dist.is_initialized():
        dist.barrier()  # nobody reads the pointer (or exits) before it has moved
    return tag


@dataclass(frozen=True)
class ResumePlan:
    tag: str  # the complete checkpoint the pointer names
    saved: Optional[CheckpointLayout]  # None for checkpoints from before layout records
    load_tag: str  # what DeepSpeed loads: `tag`, or its universal conversion

    @property
    def universal(self) -> bool:
        """Whether the engine must be built with DeepSpeed's `checkpoint.load_universal`."""
        return self.load_tag != self.tag


def _universal_conversion(ckpt_dir: str, tag: str) -> str:
    """Collective: the tag of `tag`'s universal conversion, which rank 0 writes (shared storage) while the
    others wait for its verdict, so a failed conversion stops every rank with its cause."""
    error: Optional[BaseException] = None
    if _rank() == 0 and not os.path.isdir(os.path.join(ckpt_dir, universal_tag(tag))):  # else an earlier resume's
        print(f"converting {tag} into DeepSpeed's universal checkpoint {universal_tag(tag)}, to repartition its "
              f"ZeRO optimizer state over another data-parallel size", flush=True)
        try:
            convert_to_universal(ckpt_dir, tag)
        except Exception as e:  # reported after the vote, so no rank waits for rank 0 forever
            error = e
    if not _all_ranks_succeeded(error is None):
        cause = f"{type(error).__name__}: {error}" if error is not None else "see rank 0's output"
        raise CheckpointError(f"could not convert {os.path.join(ckpt_dir, tag)} into a universal checkpoint "
                              f"({cause}); resume with the data-parallel size it was saved with") from error
    return universal_tag(tag)


def resume_tag(ckpt_dir: str) -> Optional[str]:
    """Collective: the checkpoint a resume loads, or None when there is no complete checkpoint.

    The pointer's, once every rank has read the same one; when a file of it is missing or truncated, the
    newest intact complete one before it, which rank 0 picks and announces. Raises CheckpointError on every
    rank when none is usable.
    """
    tag = _agreed_tag(ckpt_dir)
    if tag is None:
        return None
    choice = [intact_tag(ckpt_dir, tag) if _rank() == 0 else None]
    if dist.is_initialized():  # one verdict, rank 0's, however the others' view of the files differs
        dist.broadcast_object_list(choice, src=0)
    chosen, said = choice[0]
    if chosen is None:
        raise CheckpointError(said)
    if said and _rank() == 0:
        warnings.warn(said, MegamuWarning)
    return chosen


def plan_resume(ckpt_dir: str, tag: str, current: CheckpointLayout) -> ResumePlan:
    """Collective: what resuming checkpoint `tag` (from resume_tag) in layout `current` loads.

    Refuses, on every rank, a checkpoint whose layout cannot resume in `current`, and writes the universal
    conversion a ZeRO 1/2 change of DP size needs.
    """
    saved = read_layout(ckpt_dir, tag)
    if saved is None:  # checkpoints from before layout records load as before
        return ResumePlan(tag, None, tag)
    check_resumable(saved, current, os.path.join(ckpt_dir, tag))
    load_tag = _universal_conversion(ckpt_dir, tag) if needs_universal(saved, current) else tag
    return ResumePlan(tag, saved, load_tag)


def load_checkpoint(engine: Any, ckpt_dir: str, plan: ResumePlan) -> dict[str, Any]:
    """Restore checkpoint `plan` into `engine` (built for it: see ResumePlan.universal) and this rank's RNGs.

    Returns DeepSpeed's client state (step, sampler position, ...).
    """
    if bool(engine.load_universal_checkpoint()) != plan.universal:
        raise RuntimeError(f"loading {plan.load_tag} needs an engine built with checkpoint.load_universal="
                           f"{plan.universal}")
    tag, saved, current = plan.tag, plan.saved, _current_layout(engine)
    try:
        load_path, client_state = engine.load_checkpoint(ckpt_dir, tag=plan.load_tag)
    except Exception as e:  # DeepSpeed's own message names files, not the usual cause
        # This rank's files: the others may have loaded theirs, so this rank says it (RankCheckpointError).
        raise RankCheckpointError(
            f"rank {_rank()} could not load checkpoint {plan.load_tag} from {ckpt_dir} ({type(e).__name__}: {e}): "
            f"a file of it is corrupt, or it was saved with another ZeRO stage or layout. Restore the file or "
            f"resume from an earlier checkpoint (delete this one's folder); a checkpoint resumes with the ZeRO "
            f"stage it was saved with (without --deepspeed_config the stage is 0 on one data-parallel rank and 1 "
            f"otherwise)") from e
    if load_path is None:
        raise CheckpointError(f"{os.path.join(ckpt_dir, POINTER)} names {tag!r} but DeepSpeed could not load it; "
                              f"delete the pointer to start afresh or point it at another complete tag")
    rng_rank = _rank()
    if saved is not None and saved.data != current.data:
        state = get_parallel_state()
        rng_rank = rng_source_rank(saved, state.tp_rank, state.pp_rank)
        if _rank() == 0:
            print(f"resuming {tag}, saved with {saved.data} data-parallel rank(s), on {current.data}: every rank "
                  f"restores the random state of data-parallel rank 0 at its tensor and pipeline position",
                  flush=True)
    load_rng_state(ckpt_dir, tag, rng_rank)
    return client_state
