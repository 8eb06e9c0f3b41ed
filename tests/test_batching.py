"""Continuous batching: requests that share one running batch get exactly what
they would get alone, and leaving the batch (cancel, stop) disturbs no one else.

The engine-level tests drive `TransformersEngine.generate` from threads, as a worker's ModelQ
threads do; the last test goes through a real worker process with four slots."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import torch
from helpers import REPO, stream, wait_for
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from test_jobs import create, read_some

from textstream.config import Settings
from textstream.engines.transformers.engine import TransformersEngine
from textstream.engines.transformers.loading import load_transformers
from textstream.engines.transformers.sampling import Sequence
from textstream.job import SamplingParams

PROMPTS = [
    "The capital of France is",
    "Say hi in emoji:",
    "Hello",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
]


def load(model_dir: Path, batching: bool, **settings: object) -> TransformersEngine:
    engine = load_transformers(
        Settings(model_id=str(model_dir), model_fallback="", device="cpu", **settings)  # type: ignore[arg-type]
    )
    assert not batching or engine.start_batching()
    return engine


@pytest.fixture(scope="module")
def alone(tiny_model_dir: Path) -> TransformersEngine:
    return load(tiny_model_dir, batching=False)


@pytest.fixture
def batched(tiny_model_dir: Path) -> TransformersEngine:
    return load(tiny_model_dir, batching=True)


def greedy(tokens: int, **extra: object) -> SamplingParams:
    return SamplingParams(max_new_tokens=tokens, temperature=0, ignore_eos=True, **extra)


def ids(
    engine: TransformersEngine, prompt: str, params: SamplingParams, stop_after: int = 0
) -> list[int]:
    out: list[int] = []
    for step in engine.generate(
        engine.encode_prompt(prompt), params, lambda: bool(stop_after) and len(out) >= stop_after
    ):
        out.append(step.token_id)
    return out


def staggered(
    engine: TransformersEngine, jobs: list[tuple[str, SamplingParams, int]]
) -> list[list[int]]:
    """Run the jobs concurrently; each joins once the one before it has 3 tokens, so
    requests enter a batch that is already decoding (and leave at different steps)."""
    results: list[list[int]] = [[] for _ in jobs]
    joined = [threading.Event() for _ in jobs]

    def run(i: int) -> None:
        if i:
            joined[i - 1].wait(30)
        prompt, params, stop_after = jobs[i]
        for step in engine.generate(
            engine.encode_prompt(prompt),
            params,
            lambda: bool(stop_after) and len(results[i]) >= stop_after,
        ):
            results[i].append(step.token_id)
            if len(results[i]) == 3:
                joined[i].set()
        joined[i].set()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_concurrent_batched_requests_get_the_same_greedy_tokens_as_alone(alone, batched):
    jobs = [(prompt, greedy(40 + 15 * i), 0) for i, prompt in enumerate(PROMPTS)]
    expected = [ids(alone, prompt, params) for prompt, params, _ in jobs]
    assert staggered(batched, jobs) == expected
    assert batched.batcher is not None and batched.batcher.peak == len(PROMPTS)


def test_the_batch_narrows_when_its_longest_request_leaves(alone, batched):
    # The long prompt sets the batch's width; when it ends, the columns only it
    # used are cut off, and the others must not notice.
    jobs = [(PROMPTS[3], greedy(8), 0), ("Hello", greedy(50), 0), (PROMPTS[0], greedy(50), 0)]
    expected = [ids(alone, prompt, params) for prompt, params, _ in jobs]
    assert staggered(batched, jobs) == expected


def test_each_request_keeps_its_own_sampling_parameters(alone, batched):
    jobs = [
        ("The capital of France is", SamplingParams(max_new_tokens=30, temperature=0), 0),
        (
            "Say hi in emoji:",
            SamplingParams(max_new_tokens=40, temperature=0.9, seed=7, ignore_eos=True),
            0,
        ),
        ("Hello", greedy(50, repetition_penalty=1.5, presence_penalty=0.5), 0),
        (
            "a b c",
            SamplingParams(max_new_tokens=25, temperature=0.7, top_k=5, seed=3, ignore_eos=True),
            0,
        ),
    ]
    expected = [ids(alone, prompt, params) for prompt, params, _ in jobs]
    # The first stops at end-of-text well before its budget; the others run to theirs.
    assert expected[0][-1] == alone.tokenizer.eos_token_id and len(expected[0]) < 30
    assert [len(e) for e in expected[1:]] == [40, 50, 25]
    assert staggered(batched, jobs) == expected


def test_a_logprobs_row_leaves_its_greedy_batch_mate_unchanged(alone, batched):
    """Only the row that asks pays for logprobs (and leaves the shared argmax): its
    plain greedy batch-mate gets the same tokens as alone, without logprobs; the
    logprobs row's top-1 is the token it took."""
    jobs = [(PROMPTS[0], greedy(30), 0), ("Hello", greedy(30, logprobs=3), 0)]
    expected = [ids(alone, prompt, params) for prompt, params, _ in jobs]
    assert staggered(batched, jobs) == expected
    steps = list(batched.generate(batched.encode_prompt("Hello"), greedy(10, logprobs=3)))
    assert [s.token_id for s in steps] == expected[1][:10]
    for step in steps:
        assert step.logprobs is not None
        chosen, top = step.logprobs
        assert len(top) == 3 and top[0][0] == step.token_id and top[0][1] == chosen <= 0
        assert sum(torch.tensor([lp for _, lp in top]).exp()) <= 1 + 1e-5
    plain = list(batched.generate(batched.encode_prompt("Hello"), greedy(3)))
    assert all(step.logprobs is None for step in plain)


def test_cancelling_one_request_does_not_disturb_the_others(alone, batched):
    jobs = [(prompt, greedy(60), 0) for prompt in PROMPTS]
    expected = [ids(alone, prompt, params) for prompt, params, _ in jobs]
    jobs[1] = (PROMPTS[1], greedy(60), 5)  # its reader stops after 5 tokens
    results = staggered(batched, jobs)
    assert results[1] == expected[1][:5]
    assert results[:1] + results[2:] == expected[:1] + expected[2:]


def test_a_reader_that_walks_away_leaves_the_batch(batched):
    assert batched.batcher is not None
    steps = batched.generate(batched.encode_prompt("Hello"), greedy(1000))
    first = [next(steps).token_id for _ in range(3)]
    steps.close()  # e.g. a stop string matched: the worker breaks out of its loop
    wait_for(lambda: not batched.batcher._running, 10, "the batch to empty")
    steps_before = batched.batcher.steps
    assert ids(batched, "Hello", greedy(3)) == first  # the batch still serves
    assert batched.batcher.steps - steps_before == 2  # one prefill token, two decode steps


def test_a_prompt_over_the_window_fails_alone(batched):
    with pytest.raises(Exception, match="context window"):
        ids(batched, "word " * 1100, greedy(5))
    assert ids(batched, "Hello", greedy(5))


def test_one_worker_serves_concurrent_streams_as_one_batch(make_service, slow_model_dir):
    reference = load(slow_model_dir, batching=False)
    prompts = ["Once upon a time", "The weather today", "In 1492 Columbus"]
    expected = [reference.decode(ids(reference, p, greedy(60))) for p in prompts]

    svc = make_service(model=slow_model_dir, concurrency=4)
    victim = create(svc.base, prompt="Hello", max_new_tokens=1000, ignore_eos=True)
    jobs = [
        create(svc.base, prompt=p, max_new_tokens=60, ignore_eos=True, temperature=0)
        for p in prompts
    ]
    read_some(svc.base, victim, tokens=3)
    assert httpx.delete(f"{svc.base}/jobs/{victim}", timeout=5).status_code == 202

    results = [stream(svc.base, f"/jobs/{job}/events") for job in jobs]
    assert [r.last.event for r in results] == ["done"] * 3
    assert [r.text for r in results] == expected
    cancelled = stream(svc.base, f"/jobs/{victim}/events").last
    assert cancelled.event == "error" and cancelled.data["error"]["type"] == "cancelled"
    (worker,) = httpx.get(svc.base + "/workers", timeout=5).json()["workers"]
    assert worker["batching"] is True and worker["slots"] == 4
    assert worker["peak_batch"] >= 3


# --- prefill: arrivals together, long prompts in chunks ----------------------------------


class PassLog:
    """Records the batcher's forward passes ("prefill", rows) / ("decode", rows); while
    `gate` is clear, a decode pass waits for it (so that arrivals pile up)."""

    def __init__(self, engine: TransformersEngine) -> None:
        assert engine.passes is not None
        self.passes: list[tuple[str, int]] = []
        self.gate = threading.Event()
        self.gate.set()
        prefill, decode = engine.passes.prefill, engine.passes.decode

        def logged_prefill(cache, chunks, offsets):  # type: ignore[no-untyped-def]
            self.passes.append(("prefill", len(chunks)))
            return prefill(cache, chunks, offsets)

        def logged_decode(cache, tokens, lengths):  # type: ignore[no-untyped-def]
            self.gate.wait(30)
            self.passes.append(("decode", len(tokens)))
            return decode(cache, tokens, lengths)

        engine.passes.prefill = logged_prefill  # type: ignore[method-assign]
        engine.passes.decode = logged_decode  # type: ignore[method-assign]

    def prefills(self) -> list[int]:
        return [rows for kind, rows in self.passes if kind == "prefill"]


def run_together(engine: TransformersEngine, jobs: list[tuple[list[int], SamplingParams]]):
    """Start the jobs at once from threads; returns each one's ids or exception."""
    results: list[object] = [None] * len(jobs)

    def run(i: int) -> None:
        prompt_ids, params = jobs[i]
        try:
            results[i] = [step.token_id for step in engine.generate(prompt_ids, params)]
        except Exception as exc:  # the test looks at it
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    return threads, results


def test_requests_that_arrive_together_are_prefilled_in_one_pass(alone, batched):
    log = PassLog(batched)
    prompts = [batched.encode_prompt(p) for p in PROMPTS]
    expected = [ids(alone, p, greedy(12)) for p in PROMPTS]
    # A first request holds the batcher in a decode step while four arrive.
    log.gate.clear()
    first, _ = run_together(batched, [(prompts[0], greedy(30))])
    wait_for(lambda: ("prefill", 1) in log.passes, 10, "the first prefill")
    threads, results = run_together(batched, [(p, greedy(12)) for p in prompts])
    wait_for(lambda: len(batched.batcher._arrived) == 4, 10, "four arrivals")  # type: ignore[union-attr]
    log.gate.set()
    for thread in threads + first:
        thread.join(60)
    assert results == expected
    assert log.prefills() == [1, 4]


def test_an_idle_batcher_gathers_a_burst_into_one_prefill(alone, batched):
    # The burst's threads reach the batcher one by one; an idle batcher waits
    # `gather_s` after the first (2 ms by default, longer here so that a busy test
    # machine cannot spread the four starts past it) and prefills them together.
    assert batched.batcher is not None
    batched.batcher.gather_s = 0.5
    log = PassLog(batched)
    prompts = [batched.encode_prompt(p) for p in PROMPTS]
    expected = [ids(alone, p, greedy(8)) for p in PROMPTS]
    threads, results = run_together(batched, [(p, greedy(8)) for p in prompts])
    for thread in threads:
        thread.join(60)
    assert results == expected
    assert log.prefills() == [4]


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(alone, tiny_model_dir):
    batched = load(tiny_model_dir, batching=True, prefill_chunk_tokens=16)
    long_prompt = "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 3  # 79 tokens
    expected = [ids(alone, "Hello", greedy(60)), ids(alone, long_prompt, greedy(5))]
    log = PassLog(batched)
    # The first stream waits in its first decode step until the long prompt has
    # arrived: on a fast machine it would otherwise finish before that.
    log.gate.clear()
    threads, results = run_together(batched, [(batched.encode_prompt("Hello"), greedy(60))])
    wait_for(lambda: ("prefill", 1) in log.passes, 10, "the first stream to run")
    more, late = run_together(batched, [(batched.encode_prompt(long_prompt), greedy(5))])
    wait_for(lambda: len(batched.batcher._arrived) == 1, 10, "the long prompt")  # type: ignore[union-attr]
    log.gate.set()
    for thread in threads + more:
        thread.join(60)
    assert results + late == expected
    # 79 tokens in chunks of 16: five passes, and the running stream was served
    # between any two of them.
    start = log.passes.index(("prefill", 1), 1)
    chunked = log.passes[start : start + 9]
    assert chunked == [("prefill", 1), ("decode", 1)] * 4 + [("prefill", 1)]


def test_a_prompt_that_breaks_the_model_fails_alone_in_its_prefill_group(alone, batched):
    log = PassLog(batched)
    good = [batched.encode_prompt(p) for p in PROMPTS[:3]]
    expected = [ids(alone, p, greedy(10)) for p in PROMPTS[:3]]
    bad = [15496, 10**7]  # an id past the vocabulary: the embedding lookup raises
    log.gate.clear()
    first, _ = run_together(batched, [(good[0], greedy(30))])
    wait_for(lambda: ("prefill", 1) in log.passes, 10, "the first prefill")
    threads, results = run_together(batched, [(p, greedy(10)) for p in [good[0], bad, *good[1:]]])
    wait_for(lambda: len(batched.batcher._arrived) == 4, 10, "four arrivals")  # type: ignore[union-attr]
    log.gate.set()
    for thread in threads + first:
        thread.join(60)
    assert isinstance(results[1], IndexError)
    assert [results[0], *results[2:]] == expected
    # The group's pass failed; each was then prefilled alone.
    assert log.prefills() == [1, 4, 1, 1, 1, 1]


def test_rows_left_full_of_nan_do_not_poison_the_next_requests(alone, batched):
    jobs = [(PROMPTS[3], greedy(20), 0), ("Hello", greedy(20), 0)]
    expected = [ids(alone, prompt, params) for prompt, params, _ in jobs]
    assert ids(batched, PROMPTS[1], greedy(5))
    batcher = batched.batcher
    assert batcher is not None
    # What requests whose numbers overflowed would leave behind in their rows. The
    # short request's row is read (masked) as far as the long one's: a masked NaN
    # still makes a NaN.
    with torch.inference_mode():
        for cache in (batcher._cache, batcher._group_cache):
            cache.reserve(4, 64)
            for layer in cache.slot_layers:
                assert layer.keys is not None and layer.values is not None
                layer.keys.fill_(float("nan"))
                layer.values.fill_(float("nan"))
    assert staggered(batched, jobs) == expected


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_weights_keep_the_batch_contract(tiny_model_dir, quantize):
    # QUANTIZE=int8/int4 compute differently from float32, but alike alone and batched.
    alone_q = load(tiny_model_dir, batching=False, quantize=quantize)
    batched_q = load(tiny_model_dir, batching=True, quantize=quantize)
    # The layers take bfloat16 rows; the model around them stays float32.
    assert alone_q.model.dtype == torch.float32
    assert {m.scale.dtype for m in alone_q.model.modules() if hasattr(m, "scale")} == {
        torch.bfloat16
    }
    kinds = {type(m).__name__ for m in alone_q.model.transformer.modules()}
    assert ("Int4Linear" in kinds) == (quantize == "int4")
    jobs = [(prompt, greedy(30 + 10 * i), 0) for i, prompt in enumerate(PROMPTS)]
    expected = [ids(alone_q, prompt, params) for prompt, params, _ in jobs]
    assert staggered(batched_q, jobs) == expected
    if quantize == "int8":  # int4's rounding is coarse enough to move a random model's
        assert ids(alone_q, "The capital of France is", greedy(3)) == ids(
            load(tiny_model_dir, batching=False), "The capital of France is", greedy(3)
        )


# --- one request never hurts its batch-mates ------------------------------------------


class FailingSequence(Sequence):
    """A request whose own sampling breaks at its `fail_at`-th token (as NaN logits
    would): the batch must end it alone."""

    fail_at = 3

    def choose(self, logits):  # type: ignore[no-untyped-def]
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.fail_at:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return super().choose(logits)


def test_a_request_whose_step_fails_ends_alone_and_the_batch_goes_on(alone, batched):
    reference = [ids(alone, p, greedy(30)) for p in PROMPTS[:3]]
    sampled = SamplingParams(max_new_tokens=30, temperature=0.8, seed=1, ignore_eos=True)
    bad = batched.start(batched.encode_prompt("Hello"), sampled, 0)
    bad.__class__ = FailingSequence
    failed: list[BaseException] = []
    results: list[list[int]] = [[] for _ in PROMPTS[:3]]
    started = threading.Barrier(4)

    def run_good(i: int) -> None:
        started.wait(10)
        for step in batched.generate(batched.encode_prompt(PROMPTS[i]), greedy(30)):
            results[i].append(step.token_id)

    def run_bad() -> None:
        started.wait(10)
        try:
            for _ in batched.batcher.generate(bad, lambda: False):  # type: ignore[union-attr]
                pass
        except RuntimeError as exc:
            failed.append(exc)

    threads = [threading.Thread(target=run_good, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=run_bad))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(failed) == 1 and "nan" in str(failed[0])
    assert results == reference


EXTREME_FLOATS = [5e-324, 1e-300, 1e-40, 1e-5, 1e-5 + 1e-12]
VOCAB = 50257


@st.composite
def valid_sampling(draw: st.DrawFn) -> SamplingParams:
    """Any parameters the API accepts, extreme floats included."""
    unit = st.one_of(st.sampled_from(EXTREME_FLOATS), st.floats(1e-320, 1.0))
    return SamplingParams(
        max_new_tokens=draw(st.integers(1, 12)),
        temperature=draw(st.one_of(st.just(0.0), unit, st.floats(0.0, 2.0))),
        top_p=draw(st.one_of(st.just(1.0), unit)),
        top_k=draw(st.one_of(st.just(0), st.integers(1, 2 * VOCAB), st.just(2**31 - 1))),
        seed=draw(st.one_of(st.none(), st.integers(0, 2**63 - 1))),
        presence_penalty=draw(st.floats(-2.0, 2.0)),
        frequency_penalty=draw(st.floats(-2.0, 2.0)),
        repetition_penalty=draw(st.one_of(st.just(1.0), unit, st.floats(1e-300, 10.0))),
        ignore_eos=draw(st.booleans()),
        logprobs=draw(st.one_of(st.none(), st.integers(0, 20))),
    )


@pytest.fixture(scope="module")
def shared_batch(tiny_model_dir: Path) -> TransformersEngine:
    return load(tiny_model_dir, batching=True)


@hyp_settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wild=valid_sampling())
def test_valid_parameters_never_change_or_fail_a_greedy_batch_mate(alone, shared_batch, wild):
    expected = ids(alone, PROMPTS[0], greedy(16))
    results: dict[str, object] = {}

    def run(name: str, prompt: str, params: SamplingParams) -> None:
        try:
            results[name] = ids(shared_batch, prompt, params)
        except Exception as exc:  # the assertion below reports it
            results[name] = exc

    threads = [
        threading.Thread(target=run, args=("wild", PROMPTS[1], wild)),
        threading.Thread(target=run, args=("greedy", PROMPTS[0], greedy(16))),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results["greedy"] == expected
    assert isinstance(results["wild"], list) and 1 <= len(results["wild"]) <= wild.max_new_tokens


# Run in a fresh process with two torch threads (the test processes use one).
OPENMP_POOLS = """
import os, sys, threading, time
import torch
torch.set_num_threads(2)
from textstream.config import Settings
from textstream.job import SamplingParams
from textstream.worker.main import on_own_thread, prepare_engine

def threads():
    # libgomp's pool threads leave a moment after the thread that owned them.
    seen = []
    while len(seen) < 5 or len(set(seen[-5:])) > 1:
        seen.append(len(os.listdir("/proc/self/task")))
        time.sleep(0.05)
    return seen[-1]

def run(params, stay):
    # Generate from a thread that then stays alive until `stay` is set.
    done = threading.Event()
    def body():
        list(engine.generate(engine.encode_prompt("Hello there, how are you"), params))
        done.set()
        stay.wait()
    thread = threading.Thread(target=body)
    thread.start()
    assert done.wait(60)
    return thread

settings = Settings(model_id=sys.argv[1], model_fallback="", device="cpu")
before = threads()
engine, batching = on_own_thread(prepare_engine, settings, 4)
assert batching
loaded = threads()
gone = threading.Event()
gone.set()
run(SamplingParams(max_new_tokens=8, temperature=0), gone).join()
warm = threads()
stay = threading.Event()
penalized = SamplingParams(max_new_tokens=8, temperature=0.8, seed=1, repetition_penalty=1.3,
                           frequency_penalty=0.5)
run(penalized, stay)
busy = threads()
stay.set()
print(before, loaded, warm, busy)
"""


def test_only_the_batcher_thread_keeps_an_openmp_pool(tiny_model_dir):
    """libgomp gives each thread that starts a parallel region a pool of its own,
    and stops spinning between regions once the pools hold more threads than the
    CPUs: every decode step then waits on wake-ups and takes twice as long. So the
    load must not leave a pool behind (it ran on the main thread), and a request's
    own thread must not start one (its penalty tensors were filled there): with
    the batcher's own pool the only one, a request thread adds itself alone."""
    out = subprocess.run(
        [sys.executable, "-c", OPENMP_POOLS, str(tiny_model_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    before, loaded, warm, busy = map(int, out.stdout.split()[-4:])
    assert loaded == before + 1  # the batcher, and no pool left by the load
    assert warm == loaded + 1  # the batcher's pool thread (2 torch threads)
    assert busy == warm + 1  # the request's thread, and no pool of its own


class _Stalled:
    """A model whose every step takes until `release` is set: a long prefill of
    other rows, as far as a waiting row can tell (a stub for the model only)."""

    def __init__(self, release: threading.Event) -> None:
        self._release = release

    def new_cache(self) -> _Stalled:
        return self

    def __getattr__(self, name: str) -> object:
        def step(*args: object, **kwargs: object) -> None:
            self._release.wait()
            raise RuntimeError("released")

        return step


def test_a_row_waiting_for_its_token_sees_a_cancel_before_the_token_comes():
    """A reader whose row waits behind a long step looks at should_stop() every
    0.1 s; it waited on a bare queue get, and a cancel or the job's deadline was
    seen only once its next token came."""
    from textstream.engines.transformers.batching import Batcher

    release, stopped = threading.Event(), threading.Event()
    batcher = Batcher(_Stalled(release), prefill_tokens=16)  # type: ignore[arg-type]
    cancelled = threading.Event()
    steps: list[object] = []

    def read() -> None:
        sequence = Sequence([1, 2, 3], SamplingParams(), budget=5, stop_ids=frozenset())
        steps.extend(batcher.generate(sequence, cancelled.is_set))
        stopped.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert not stopped.wait(0.5)  # the step goes on: nothing yet
        cancelled.set()
        assert stopped.wait(2), "the reader did not see its cancel"
        assert steps == []
    finally:
        release.set()
