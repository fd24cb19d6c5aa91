"""Work over forked processes that share the parent's objects (nextword.forked)."""

import os
import threading

import torch

from nextword.forked import forked_map


def where(shared, item):
    """Runs in a worker: the item, the worker's pid and torch threads, and what the shared object holds."""
    lock, numbers = shared
    with lock:  # a lock cannot be pickled: it reached the worker by the fork
        return item, os.getpid(), torch.get_num_threads(), numbers[item]


def test_the_workers_share_the_parents_objects_and_the_results_keep_the_items_order():
    shared = (threading.Lock(), {i: i * i for i in range(6)})
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the workers' one thread is theirs, not inherited
    try:
        results = forked_map(where, shared, list(range(6)), processes=2)
    finally:
        torch.set_num_threads(threads)
    assert [(item, square) for item, _, _, square in results] == [(i, i * i) for i in range(6)]
    workers = {pid for _, pid, _, _ in results}
    assert os.getpid() not in workers and 1 <= len(workers) <= 2
    assert {threads for _, _, threads, _ in results} == {1}  # the processes already use the cores


def test_one_process_or_one_item_runs_here():
    shared = (threading.Lock(), {0: 0, 1: 1})
    for items, processes in (([0, 1], 1), ([1], 4)):
        assert {pid for _, pid, _, _ in forked_map(where, shared, items, processes)} == {os.getpid()}
