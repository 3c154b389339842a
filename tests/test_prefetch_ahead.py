"""The worker's work-ahead in its prefetch thread (runtime/worker.py ``_Ahead``): done there when the thread is free,
here when it is still busy (cancelled, not waited for), and a cancelled or dropped job holds nothing it was given."""

import gc
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

from dist_quant.runtime.worker import _Ahead


class Payload:
    pass


def test_a_free_thread_does_the_work_and_a_busy_one_leaves_it_here():
    executor = ThreadPoolExecutor(max_workers=1)
    assert _Ahead(executor, lambda: threading.current_thread().name).result() != threading.current_thread().name
    release = threading.Event()
    executor.submit(release.wait)  # the thread is reading the next expert group
    try:
        assert _Ahead(executor, lambda: threading.current_thread().name).result() == threading.current_thread().name
    finally:
        release.set()
        executor.shutdown()


def test_a_cancelled_or_dropped_job_frees_what_it_was_given_while_still_queued():
    executor = ThreadPoolExecutor(max_workers=1)
    release = threading.Event()
    executor.submit(release.wait)
    try:
        for finish in (lambda ahead: ahead.result(), lambda ahead: ahead.drop()):
            payload = Payload()
            alive = weakref.ref(payload)
            ahead = _Ahead(executor, lambda payload=payload: payload)
            finish(ahead)
            del payload
            gc.collect()
            assert alive() is None  # the queue still holds the cancelled job, not the payload
    finally:
        release.set()
        executor.shutdown()
