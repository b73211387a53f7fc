"""Several GPUs: one engine per group of `tensor_parallel_size` GPUs, alphas dealt round robin.

When a model fits one GPU, several engines over different alphas beat one engine
with tensor parallelism (no all-reduce per layer). Each group runs this sweep's own
command line in `generate_only` mode on its share of the grid, seeing only its GPUs
(CUDA_VISIBLE_DEVICES); they fill the shared cache, and the calling sweep then finds
every generation there and scores. A search is sequential and is not sharded.
"""

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import yaml

from expo_eval.backends.base import BackendError
from expo_eval.files import write_text
from expo_eval.lock import SHARD_TOKEN_ENV


def gpu_groups(gpus: Sequence[str], tensor_parallel_size: int) -> List[List[str]]:
    """[0,1,2,3] with tensor parallelism 2 -> [[0,1],[2,3]]: one engine per group."""
    if tensor_parallel_size < 1 or len(gpus) % tensor_parallel_size:
        raise ValueError(f"{len(gpus)} GPUs do not split into groups of {tensor_parallel_size}")
    return [list(gpus[i : i + tensor_parallel_size]) for i in range(0, len(gpus), tensor_parallel_size)]


def shard_alphas(alphas: Sequence[Optional[float]], shards: int) -> List[List[Optional[float]]]:
    """alphas dealt round robin to `shards` engines; empty shards are dropped.

    Round robin, not contiguous blocks: large alphas are the slow ones (collapsed
    responses run to the length limit), and blocks would give them all to one engine.
    """
    if shards < 1:
        raise ValueError(f"need at least one shard, got {shards}")
    return [list(alphas[i::shards]) for i in range(shards) if alphas[i::shards]]


def shard_configs(config, alphas: Sequence[Optional[float]]) -> List[tuple]:
    """(GPU group, sweep config) per shard: its alphas, generate_only, no further sharding.

    None (the SFT model) travels as include_sft.
    """
    groups = gpu_groups(config.gpus, config.engine.tensor_parallel_size)
    result = []
    for group, shard in zip(groups, shard_alphas(list(alphas), len(groups))):
        update = {
            "alphas": [a for a in shard if a is not None],
            "include_sft": None in shard,
            "generate_only": True,
            "gpus": None,
        }
        result.append((group, config.model_copy(update=update)))
    return result


def generate_sharded(config, alphas: Sequence[Optional[float]], lock_token: Optional[str]) -> None:
    """Run every shard at once, each in its own process on its own GPUs; wait for all.

    lock_token: the calling sweep's lock on the output folder, which the shards share.
    """
    shards_dir = Path(config.out) / "shards"
    processes = []
    for index, (group, shard) in enumerate(shard_configs(config, alphas)):
        path = shards_dir / f"shard-{index}.yaml"
        write_text(path, yaml.safe_dump(shard.model_dump(mode="json", exclude={"recipe"}), sort_keys=False))
        command = [sys.executable, "-m", "expo_eval.cli", "sweep", str(config.recipe), "--config", str(path)]
        log = open(shards_dir / f"shard-{index}.log", "w")
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(group)}
        if lock_token is not None:
            env[SHARD_TOKEN_ENV] = lock_token
        processes.append((group, shard, log, subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)))
    try:
        codes = [process.wait() for _, _, _, process in processes]
    except BaseException:  # interrupted: stop the shards too, or they would race a rerun
        for _, _, _, process in processes:
            process.terminate()
        for _, _, _, process in processes:
            process.wait()
        raise
    finally:
        for _, _, log, _ in processes:
            log.close()
    failed = [
        f"GPUs {','.join(group)} (alphas {shard.alphas}; see {log.name})"
        for (group, shard, log, _), code in zip(processes, codes)
        if code != 0
    ]
    if failed:
        raise BackendError(f"sharded generation failed on {'; '.join(failed)}")
