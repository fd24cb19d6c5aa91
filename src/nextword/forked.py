"""Work spread over processes forked from this one, which share its loaded objects instead of each loading them.

A fitted n-gram, a model folder's engines: large to pickle to every worker
and slow to load again, they reach the workers by the fork, in memory the
processes share until one writes to it. Only the items and the results travel
between processes. Each worker runs PyTorch on one thread, since the
processes already use the cores. A single process, or a single item, runs here.
"""

import concurrent.futures
import itertools
import multiprocessing
from typing import Any, Callable, Sequence, TypeVar

import torch

Item, Result = TypeVar("Item"), TypeVar("Result")

_shared: Any = None  # what forked_map shares, in a worker it forked


def forked_map(function: Callable[[Any, Item], Result], shared: Any, items: Sequence[Item],
               processes: int) -> list[Result]:
    """``[function(shared, item) for item in items]``, over up to ``processes`` forked processes.

    ``function`` is pickled by name, so it must be a module-level function.
    """
    if processes < 2 or len(items) < 2:
        return [function(shared, item) for item in items]
    with concurrent.futures.ProcessPoolExecutor(min(processes, len(items)),
                                                mp_context=multiprocessing.get_context("fork"),
                                                initializer=_share, initargs=(shared,)) as pool:
        return list(pool.map(_call, itertools.repeat(function), items))


def _share(shared: Any) -> None:
    global _shared
    _shared = shared
    torch.set_num_threads(1)


def _call(function: Callable[[Any, Item], Result], item: Item) -> Result:
    return function(_shared, item)
