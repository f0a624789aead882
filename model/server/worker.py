"""
The generation worker: the only thread that touches the model. The HTTP handlers submit Jobs (a prompt and its
SamplingParams) and read their events; the worker takes the waiting jobs together, as one static batch through
Engine.stream_batch, so throughput grows with the number of clients instead of serialising them. Jobs share a batch
when their sampling settings agree; a job with a seed runs alone, so its answer never depends on its neighbours. A
job whose client left (Job.cancelled) stops its row of the batch; one that generates past max_generation_s ends.
"""

import queue
import threading
import time
from collections import Counter, deque

from model.engine import SamplingParams
from model.server.protocol import ServerLimits


class Job:
    """One request for the worker: its prompt ids and sampling in, its text pieces and end out (events), and a flag
    its handler sets when the client leaves."""

    def __init__(self, prompt: list[int], sampling: SamplingParams):
        self.prompt, self.sampling = prompt, sampling
        self.events: queue.Queue = queue.Queue()  # ("piece", str) ..., then ("done", TextStream) or ("error", str)
        self.cancelled = threading.Event()


def batch_key(s: SamplingParams) -> tuple:
    """Requests with equal keys can share a batch: the sampler's settings are one per batch."""
    return (
        ("greedy", s.repetition_penalty)
        if s.temperature <= 0
        else (s.temperature, s.top_k, s.top_p, s.repetition_penalty)
    )


class Worker(threading.Thread):
    def __init__(self, engine, limits: ServerLimits):
        super().__init__(daemon=True, name="generation-worker")
        self.engine, self.limits = engine, limits
        self.pending: deque[Job] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.batch_sizes: Counter = Counter()  # batch size -> how many batches had it (tests, benchmarks)
        self.current: list[Job] = []  # the batch being generated

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full (the caller answers 429)."""
        with self.cond:
            if len(self.pending) >= self.limits.max_queue:  # jobs whose clients left hold no place in the queue
                self.pending = deque(j for j in self.pending if not j.cancelled.is_set())
            if self.stopping or len(self.pending) >= self.limits.max_queue:
                return False
            self.pending.append(job)
            self.cond.notify()
            return True

    def run(self):
        while True:
            with self.cond:
                while not self.pending and not self.stopping:
                    self.cond.wait()
                deadline = time.monotonic() + self.limits.batch_wait_s
                while not self.stopping and len(self.pending) < self.limits.max_batch and time.monotonic() < deadline:
                    self.cond.wait(max(0.0, deadline - time.monotonic()))
                if self.stopping:
                    return
                batch = self._take_batch()
            if batch:
                self._run(batch)

    def _take_batch(self) -> list[Job]:
        """The oldest live job and the queued ones that can join it (same sampler, room in the cache, no seed:
        a seeded answer must not depend on the other rows). The rest keep their order for the next batch."""
        batch, rest = [], deque()
        for job in self.pending:
            if job.cancelled.is_set():
                continue  # its client left while it was queued
            if not batch or self._joins(batch, job):
                batch.append(job)
            else:
                rest.append(job)
        self.pending = rest
        return batch

    def _joins(self, batch: list[Job], job: Job) -> bool:
        if len(batch) >= self.limits.max_batch or job.sampling.seed is not None or batch[0].sampling.seed is not None:
            return False
        longest = max(len(j.prompt) for j in batch + [job])
        most = max(j.sampling.max_new_tokens for j in batch + [job])
        # Rows are left-padded to the longest prompt: alone, each row fits; together they must fit as well.
        return batch_key(job.sampling) == batch_key(batch[0].sampling) and longest + most <= self.engine.max_context

    def _run(self, batch: list[Job]):
        self.batch_sizes[len(batch)] += 1
        self.current = batch
        try:
            stream = self.engine.stream_batch([j.prompt for j in batch], [j.sampling for j in batch])
            t0 = time.monotonic()
            try:
                for step in stream:
                    for row, piece in step:
                        batch[row].events.put(("piece", piece))
                    late = time.monotonic() - t0 > self.limits.max_generation_s
                    for row, job in enumerate(batch):
                        if late or job.cancelled.is_set():
                            stream.stop(row)  # frees nothing by itself, but the batch ends when no row runs
            finally:
                stream.close()
            for job, result in zip(batch, stream.results):
                job.events.put(("done", result))
        except Exception as e:  # a bug must not kill the only worker
            for job in batch:
                job.events.put(("error", f"{type(e).__name__}: {e}"))

    def stop(self, timeout: float = 10.0):
        """Finish the current batch, then exit (queued jobs are dropped)."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.join(timeout)
