"""Whole-pipeline cost: `refdir run` with defaults, FLOP efficiency, generation speed, peak memory.

    python benchmarks/pipeline.py [--model M] [--out RUN] [--gen-prompts 16] [--gen-tokens 32]
        [--gen-rounds 2]
    python benchmarks/pipeline.py --gen-only --out RUN       # only the generation-speed comparison
    python benchmarks/pipeline.py --no-gen-speed             # the run's time, FLOPs and memory only

* ``run_minutes``: wall time of a fresh `refdir run` with defaults (built-in data, paper sizes).
* ``flop_efficiency``: a lower bound of the FLOPs done (2 x parameters x tokens through every decoder
  layer, counted by hooks, plus the unembedding rows actually computed; backward passes and attention
  scores not counted) divided by wall time and by this machine's measured fp32 matmul throughput;
  also per phase (each pipeline log line starts one), so a profile says which stage runs below peak.
* ``shape_bound``: the share of that peak the run's own matmul shapes allow. Every ``nn.Linear`` call's
  (rows, in, out) is logged by hooks and replayed alone after the run, between two peak measurements
  (a decode step multiplies [rows in flight, d] by each weight: far below a 2048² product's rate).
  ``of_shape_bound`` = ``flop_efficiency`` / ``shape_bound``: how close the run comes to its matmuls'
  own time (the rest is attention, elementwise work, Python and loading). Both also per phase; the
  logged shapes are kept in ``RUN/linear_shapes.json``.
* ``ortho_gen_ratio`` / ``hook_gen_ratio``: greedy-generation tokens/s of the orthogonalized model and
  of hook-based ablation, each relative to the unmodified model, same prompts, same process.
* ``peak_rss_ratio``: the process's peak resident memory during the run / the model's fp32 size.

Last line: ``run_minutes=… flop_efficiency=… shape_bound=… of_shape_bound=… ortho_gen_ratio=…
hook_gen_ratio=… peak_rss_ratio=…``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import resource
import shutil
import time
from pathlib import Path

import torch

from refdir.core.adapter import get_adapter
from refdir.core.forward import _cache_kwarg, bucketed_prefill, split_prefix
from refdir.core.models import DEFAULT_MODEL, load_model
from refdir.core.templates import tokenize_prompts
from refdir.method.data import load_builtin
from refdir.method.directions import load_direction
from refdir.method.interventions import directional_ablation, orthogonalize_weights
from refdir.run.pipeline import RunConfig, run_pipeline


def matmul_gflops(n: int = 2048, reps: int = 8) -> float:
    """Measured fp32 matmul throughput of this machine (all threads)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


class RssByPhase:
    """Peak resident memory of this process per pipeline phase (sampled every 0.2 s from /proc), so the
    benchmark says *where* the peak is, not only how high. The phase is the last log line."""

    def __init__(self):
        import threading

        self.phase, self.peaks, self._stop = "load", {}, threading.Event()
        self.starts = [("load", time.perf_counter())]  # (phase, start): wall seconds per phase
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.rss())

    def log(self, message: str) -> None:
        print(message, flush=True)
        self.phase = message[:48]
        self.starts.append((self.phase, time.perf_counter()))

    def seconds(self, end: float) -> dict[str, float]:
        """Wall seconds per phase (a phase entered twice sums)."""
        out: dict[str, float] = {}
        for (name, t0), (_, t1) in zip(self.starts, self.starts[1:] + [("", end)]):
            out[name] = out.get(name, 0.0) + t1 - t0
        return out

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {k: round(v / 2**30, 2) for k, v in self.peaks.items()}


class FlopCounter:
    """Forward FLOPs of the matmuls in every decoder layer and the unembedding, counted by hooks, in all
    and per phase (``phase()`` names the current one): which stage runs below the machine's peak."""

    def __init__(self, model, phase=lambda: "run"):
        ad = get_adapter(model)
        self.flops, self.phase, self.by_phase = 0.0, phase, {}
        self.handles = []
        for layer in ad.layers:
            n = sum(p.numel() for p in layer.parameters() if p.dim() == 2)
            self.handles.append(layer.register_forward_pre_hook(self._pre(n), with_kwargs=True))
        n_unembed = ad.unembed.weight.numel()
        self.handles.append(
            ad.unembed.register_forward_pre_hook(
                lambda m, args: self._add(2 * n_unembed * args[0].shape[:-1].numel())
            )
        )

    def _add(self, f: float) -> None:
        self.flops += f
        p = self.phase()
        self.by_phase[p] = self.by_phase.get(p, 0.0) + f

    def _pre(self, n_params: int):
        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            self._add(2 * n_params * x.shape[:-1].numel())

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class LinearShapes:
    """The ``(rows, in, out, bias)`` of every ``nn.Linear`` call per phase, counted by hooks: the matmul
    shapes the run actually multiplies. :func:`shape_bound` replays them after the run, so the benchmark says
    which rate this machine reaches *at those shapes* (a decode step multiplies [rows in flight, d] by
    each weight, and small row counts run far below the 2048² product that defines the peak)."""

    def __init__(self, model, phase=lambda: "run"):
        self.phase, self.calls = phase, {}
        self.handles = [
            m.register_forward_pre_hook(self._pre) for m in model.modules() if isinstance(m, torch.nn.Linear)
        ]

    def _pre(self, mod, args) -> None:
        key = (args[0].shape[:-1].numel(), mod.in_features, mod.out_features, mod.bias is not None)
        calls = self.calls.setdefault(self.phase(), {})
        calls[key] = calls.get(key, 0) + 1

    def flops(self) -> dict[str, float]:
        """2 x rows x in x out per phase: equal to :class:`FlopCounter`'s count for dense models."""
        return {
            p: sum(2.0 * m * k * n * c for (m, k, n, _), c in calls.items())
            for p, calls in self.calls.items()
        }

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def grid_rows(m: int, cap: int = 2048) -> int:
    """``m`` rounded to a grid of ratio 2^(1/4), at most ``cap``: one timing per grid point and weight shape
    (a call's time is scaled from its grid point's by rows; above ``cap`` a matmul's rate no longer
    rises with rows)."""
    return min(cap, max(1, round(2 ** (round(4 * math.log2(max(m, 1))) / 4))))


def time_linear(m: int, k: int, n: int, bias: bool, weights: dict, min_seconds: float = 0.1) -> float:
    """Seconds per ``F.linear`` call of [m, k] by a [n, k] weight (what ``nn.Linear`` runs), fp32, after a
    warm-up; repeated for at least ``min_seconds``."""
    w, b = weights[(k, n, bias)]
    x = torch.randn(m, k)
    torch.nn.functional.linear(x, w, b)
    reps, t = 0, time.perf_counter()
    while reps < 2 or time.perf_counter() - t < min_seconds:
        torch.nn.functional.linear(x, w, b)
        reps += 1
    return (time.perf_counter() - t) / reps


def shape_bound(calls: dict[str, dict], min_seconds: float = 0.1) -> dict[str, float]:
    """Seconds per phase that the run's linear layers take when replayed alone, call for call at their
    shapes (rows on :func:`grid_rows`, scaled by rows): the time a phase would take if everything but its
    matmuls were free, so ``FLOPs / these seconds`` is the highest rate the phase can reach at its shapes."""
    per_call: dict[tuple, float] = {}
    groups = sorted({(k, n, b) for c in calls.values() for (_, k, n, b) in c})
    for k, n, b in groups:  # one weight in memory at a time (the unembedding's is ~1 GB)
        weights = {(k, n, b): (torch.randn(n, k), torch.randn(n) if b else None)}
        for g in sorted(
            {grid_rows(m) for c in calls.values() for (m, kk, nn, bb) in c if (kk, nn, bb) == (k, n, b)}
        ):
            per_call[(g, k, n, b)] = time_linear(g, k, n, b, weights, min_seconds)
        del weights
    return {
        p: sum(c * per_call[(grid_rows(m), k, n, b)] * m / grid_rows(m) for (m, k, n, b), c in cs.items())
        for p, cs in calls.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--out", default=None)
    ap.add_argument("--gen-prompts", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument(
        "--gen-rounds",
        type=int,
        default=2,
        help="interleaved decodes (fresh caches) of the generation-speed comparison",
    )
    ap.add_argument(
        "--gen-only",
        action="store_true",
        help="only the generation-speed comparison, with the direction of an existing --out run",
    )
    ap.add_argument(
        "--no-gen-speed",
        action="store_true",
        help="skip the generation-speed comparison (run time, FLOPs per phase, memory only)",
    )
    ap.add_argument(
        "--reuse", action="store_true", help="keep an existing run folder (resume) instead of a fresh run"
    )
    ap.add_argument(
        "--shared-data",
        action="store_true",
        help="the paper's data from ../shared/datasets, exactly as benchmarks/results.py passes "
        "it (with --out runs/results-MODEL, results.py then reuses this run)",
    )
    a = ap.parse_args()
    out = Path(a.out or f"runs/bench-pipeline-{a.model}")
    if a.gen_only:
        base, hooked, ortho = generation_speed(a.model, out, a.gen_prompts, a.gen_tokens, a.gen_rounds)
        print(f"ortho_gen_ratio={ortho / base:.2f} hook_gen_ratio={hooked / base:.2f}")
        return
    if out.exists() and not a.reuse:
        shutil.rmtree(out)
    peak_gflops = matmul_gflops()
    print(f"machine fp32 matmul: {peak_gflops:.1f} GFLOP/s, threads {torch.get_num_threads()}", flush=True)

    t = time.perf_counter()
    rss = RssByPhase()
    model, tok = load_model(a.model)
    size_bytes = sum(p.numel() * 4 for p in model.parameters())
    counter = FlopCounter(model, lambda: rss.phase)
    shapes = LinearShapes(model, lambda: rss.phase)
    cfg = RunConfig(model=a.model)
    if a.shared_data:
        shared = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
        cfg.harmful, cfg.harmless = str(shared / "harmful_train.json"), str(shared / "harmless_train.json")
        cfg.eval_harmful, cfg.eval_harmless = (
            str(shared / "jailbreakbench.json"),
            str(shared / "harmless_val.json"),
        )
    rss.log("run: started")
    run_pipeline(cfg, out, model, tok, log=rss.log, owns_model=True)  # no second copy for the ortho check
    print("peak RSS by phase (GiB):", rss.stop(), flush=True)
    counter.remove()
    shapes.remove()
    end = time.perf_counter()
    wall = end - t
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak_gflops = max(peak_gflops, matmul_gflops())  # again now: a busy machine at the start would flatter
    eff = counter.flops / wall / (peak_gflops * 1e9)
    print(
        f"refdir run: {wall / 60:.1f} min, >= {counter.flops / 1e12:.1f} TFLOP "
        f"({counter.flops / wall / 1e9:.1f} GFLOP/s, {eff:.0%} of matmul peak), "
        f"peak RSS {peak_rss / 2**30:.2f} GiB "
        f"for a {size_bytes / 2**30:.2f} GiB fp32 model; the same FLOPs at 100% of the matmul peak: "
        f"{counter.flops / (peak_gflops * 1e9) / 60:.1f} min",
        flush=True,
    )
    del model
    gc.collect()
    (out / "linear_shapes.json").write_text(
        json.dumps({p: [[*k, c] for k, c in calls.items()] for p, calls in shapes.calls.items()})
    )
    bound = replayed_bound(shapes, counter.flops)
    print_phases(rss.seconds(end), counter.by_phase, peak_gflops, bound)
    last = (
        f"run_minutes={wall / 60:.1f} flop_efficiency={eff:.2f} shape_bound={bound['fraction']:.2f} "
        f"of_shape_bound={eff / bound['fraction']:.2f}"
    )
    if a.no_gen_speed:
        print(f"{last} peak_rss_ratio={peak_rss / size_bytes:.2f}")
        return
    base, hooked, ortho = generation_speed(a.model, out, a.gen_prompts, a.gen_tokens, a.gen_rounds)
    print(
        f"{last} ortho_gen_ratio={ortho / base:.2f} "
        f"hook_gen_ratio={hooked / base:.2f} peak_rss_ratio={peak_rss / size_bytes:.2f}"
    )


def replayed_bound(shapes: LinearShapes, counted: float) -> dict:
    """The run's linear calls replayed (:func:`shape_bound`) between two peak measurements, as fractions
    of that peak: ``fraction`` for the whole run and ``by_phase``. A ratio measured at one moment, so a
    busier machine during the replay than during the run moves both of its terms."""
    flops = shapes.flops()
    total = sum(flops.values())
    print(
        f"replaying {sum(map(len, shapes.calls.values()))} linear shapes "
        f"({total / 1e12:.1f} TFLOP; the hook count says {counted / 1e12:.1f})",
        flush=True,
    )
    before = matmul_gflops()
    seconds = shape_bound(shapes.calls)
    peak = (before + matmul_gflops()) / 2
    frac = {p: flops[p] / max(s, 1e-12) / (peak * 1e9) for p, s in seconds.items()}
    return {
        "fraction": total / max(sum(seconds.values()), 1e-12) / (peak * 1e9),
        "by_phase": frac,
        "seconds": seconds,
        "peak_gflops": peak,
    }


def print_phases(
    seconds: dict[str, float], flops: dict[str, float], peak_gflops: float, bound: dict | None = None
) -> None:
    """Seconds, FLOPs and share of the matmul peak per phase: where the run's time goes below peak.
    With ``bound``: the share of peak the phase's matmul shapes allow (``shape bound``), and the achieved
    share of that (``of bound``: the rest of the time is attention, elementwise work and Python)."""
    by = (bound or {}).get("by_phase", {})
    print(
        f"{'phase':48} {'seconds':>8} {'TFLOP':>7} {'GFLOP/s':>8} {'of peak':>7} {'bound':>6} {'of bound':>8}"
    )
    for name, sec in seconds.items():
        f = flops.get(name, 0.0)
        rate = f / max(sec, 1e-9) / 1e9
        b = by.get(name)
        extra = f" {b:6.0%} {rate / peak_gflops / b:8.0%}" if b else ""
        line = f"{name:48} {sec:8.1f} {f / 1e12:7.2f} {rate:8.1f} {rate / peak_gflops:7.0%}{extra}"
        print(line, flush=True)


def generation_speed(
    spec: str, run: Path, n_prompts: int, n_new: int, rounds: int
) -> tuple[float, float, float]:
    """Greedy decoding tokens/s of the unmodified model, hook ablation and orthogonalized weights.

    Two copies of the model (one orthogonalized), each condition with its own KV cache, decoded a step
    at a time *in turn* (baseline, hooks, ortho, baseline, ...): every condition sees the machine at the
    same moments, and a condition's speed is its batch size over its median step time. (Whole-generation
    rounds, even alternated, drift by +-8% on this VM: they once read 0.91 for weights that do exactly
    the baseline's work.) ``rounds`` repeats the interleaved decode from fresh caches."""
    import copy
    import statistics

    model, tok = load_model(spec)
    direction = load_direction(run)
    ortho_model = orthogonalize_weights(copy.deepcopy(model), direction.vector, allow_approximate=True)
    prompts = [p.instruction for p in load_builtin("harmless")[:n_prompts]]
    pb = split_prefix(tokenize_prompts(tok, prompts), True, model, n_new)
    conds = {
        "baseline": (model, contextlib.nullcontext),
        "hooks": (model, lambda: directional_ablation(model, direction.vector)),
        "ortho": (ortho_model, contextlib.nullcontext),
    }
    times: dict[str, list[float]] = {k: [] for k in conds}
    kw = _cache_kwarg(model)
    for _ in range(rounds):
        state = {}
        for name, (m, ctx) in conds.items():
            with ctx():
                cache, logits = bucketed_prefill(m, pb)
            state[name] = [cache, logits.argmax(-1), pb.attention_mask, pb.attention_mask.long().sum(-1)]
        for step in range(n_new):
            for name, (m, ctx) in conds.items():
                cache, nxt, mask, pos = state[name]
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                t = time.perf_counter()
                with ctx():
                    out = m(
                        input_ids=nxt[:, None],
                        attention_mask=mask,
                        position_ids=pos[:, None],
                        use_cache=True,
                        logits_to_keep=1,
                        **{kw: cache},
                    )
                    nxt = out.logits[:, -1, :].argmax(-1)
                if step:  # the first step after a prefill is a warm-up
                    times[name].append(time.perf_counter() - t)
                state[name] = [cache, nxt, mask, pos + 1]
    speed = {k: len(prompts) / statistics.median(v) for k, v in times.items()}
    print(
        f"greedy decoding tokens/s, batch {len(prompts)}, median of {len(times['baseline'])} "
        "interleaved steps: " + ", ".join(f"{k} {v:.1f}" for k, v in speed.items()),
        flush=True,
    )
    return speed["baseline"], speed["hooks"], speed["ortho"]


if __name__ == "__main__":
    main()
