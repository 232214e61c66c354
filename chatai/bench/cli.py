"""``chatai bench``: the side-by-side benchmark (and ``chatai bench relay``, the relay ceiling)."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(help="Benchmarks that print figures (no pass/fail): see docs/performance.md.",
                  invoke_without_command=True, no_args_is_help=False)

ALL_PATHS = ("vllm", "chatai", "ceiling")


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter("give concurrency levels as numbers, e.g. 1,16,64") from None
    if not levels or min(levels) < 1:
        raise typer.BadParameter("concurrency levels must be 1 or more")
    return levels


def stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the servers and stacks a run started are stopped too."""
    import signal

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


@contextmanager
def favoured_client() -> Iterator[int]:
    """Raise this process's CPU priority (where allowed: root) while it drives load, and only then,
    so the servers it started keep the normal one. The load generator stands for users on other
    machines: starved by the servers it measures, it would read their streams late and in bursts,
    and that would count against whichever server it measures. Yields the nice value in force."""
    before = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -10)
    except OSError:
        pass
    try:
        yield os.getpriority(os.PRIO_PROCESS, 0)
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, before)


def requests_for(concurrency: int, requests: int | None) -> int:
    """Enough requests that every client runs several in a row (a closed loop reaches its steady state)."""
    return requests or max(32, 4 * concurrency)


@app.callback()
def compare(
    ctx: typer.Context,
    model: Annotated[Optional[Path], typer.Option(help="Model folder (default: the tiny test model, built here).")] = None,
    served_model_name: Annotated[str, typer.Option(help="Model name on both servers.")] = "tiny",
    levels: Annotated[str, typer.Option(help="Concurrency levels, comma-separated.")] = "1,16,64",
    requests: Annotated[Optional[int], typer.Option(help="Requests per level (default: max(32, 4 x concurrency)).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Output tokens per request (ignore_eos).")] = 64,
    input_len: Annotated[int, typer.Option(help="Prompt tokens per request (vLLM's random dataset).")] = 32,
    max_num_seqs: Annotated[Optional[int], typer.Option(help="Engine concurrency (default: the worker's).")] = None,
    max_model_len: Annotated[int, typer.Option(help="Context length for both engines.")] = 512,
    paths: Annotated[str, typer.Option(help="Which paths to run: vllm, chatai, ceiling.")] = ",".join(ALL_PATHS),
    tunnel: Annotated[bool, typer.Option("--tunnel/--no-tunnel", help="chatai through the SSH tunnel and breaker.")] = True,
    out: Annotated[Path, typer.Option(help="Folder for bench.json, bench.png and bench.md.")] = Path("bench-results"),
    placement: Annotated[str, typer.Option(help="deployment: the engine's server or worker on the upper half of the "
                                           "CPUs, everything else on the rest; shared: every process on every CPU.")] = "deployment",
) -> None:
    """Compare vLLM's own server, chatai's whole path and the in-process engine under one load."""
    if ctx.invoked_subcommand is not None:
        return
    from chatai.bench import report, vllm_client
    from chatai.bench.placement import Placement
    from chatai.bench.targets import ceiling, chatai_stack, scratch_dir, vllm_server
    from gpu_worker.settings import WorkerSettings

    chosen = [p.strip() for p in paths.split(",") if p.strip()]
    if unknown := set(chosen) - set(ALL_PATHS):
        raise typer.BadParameter(f"unknown path(s) {sorted(unknown)}; choose from {', '.join(ALL_PATHS)}")
    level_list = _levels(levels)
    if placement not in ("deployment", "shared"):
        raise typer.BadParameter(f"--placement is deployment or shared, not {placement!r}")
    try:
        place = Placement.choose(placement)  # type: ignore[arg-type]
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    stop_on_sigterm()
    work = scratch_dir("chatai-bench-")
    try:
        if model is None:
            from chatai.devstack.tiny_model import make_tiny_model

            model = make_tiny_model(work / "tiny-model", seed=0)
        overrides = {"max_num_seqs": max_num_seqs} if max_num_seqs else {}
        settings = WorkerSettings(model=model.resolve(), served_model_name=served_model_name,
                                  max_model_len=max_model_len, **overrides)
        plan = [{"concurrency": c, "requests": requests_for(c, requests), "max_tokens": max_tokens,
                 "warmup": min(c, 8)} for c in level_list]
        result: dict = {
            "machine": report.machine(),
            "settings": {k: v for k, v in settings.engine_kwargs().items()} | {"kv_cache_space_gb": settings.kv_cache_space_gb},
            "settings_summary": (f"{settings.served_model_name}, {settings.resolved_dtype()}, max_num_seqs "
                                 f"{settings.max_num_seqs}, {max_tokens} output tokens"),
            "placement": place.describe(),
            "load": {"levels": plan, "stream": True, "ignore_eos": True, "input_len": input_len,
                     "client": "vllm.benchmarks.serve (random dataset, --max-concurrency, --request-rate inf)"},
            "paths": {},
        }

        def drive(endpoint, name: str) -> list[dict]:
            results = []
            for lv in plan:
                with favoured_client() as nice:  # vLLM's client runs as a child: it inherits the raise
                    r = vllm_client.run_level(endpoint.base_url, endpoint.api_key, endpoint.model, model, lv,
                                              input_len, work / f"client-{name}")
                result["load"]["client_nice"] = nice
                typer.echo(f"  c={r['concurrency']:<4} {r['output_tok_s']:>9,.0f} tok/s  TTFT p50 {r['ttft_p50_ms']:7.1f} ms "
                           f"p99 {r['ttft_p99_ms']:7.1f} ms  ITL p50 {r['itl_p50_ms']:6.2f} ms  ok {r['ok']} failed {r['failed']}")
                results.append(r)
            return results

        typer.echo(f"placement: {placement} (engine on CPUs {place.describe()['node_cpus']}, "
                   f"everything else on {place.describe()['other_cpus']})")
        for name in chosen:
            typer.echo(f"{report.PATH_LABELS[name]}:")
            if name == "vllm":
                with place.elsewhere(), vllm_server(settings, work, placement=place) as endpoint:
                    result["paths"]["vllm"] = drive(endpoint, name)
            elif name == "chatai":
                with place.elsewhere(), chatai_stack(settings, work / "stack", tunnel=tunnel,
                                                     placement=place) as endpoint:
                    result["paths"]["chatai"] = drive(endpoint, name)
            else:
                result["paths"]["ceiling"] = ceiling(settings, plan, work, placement=place)
                for r in result["paths"]["ceiling"]:
                    typer.echo(f"  c={r['concurrency']:<4} {r['output_tok_s']:>9,.0f} tok/s  TTFT p50 "
                               f"{r['ttft_p50_ms']:7.1f} ms")
        result["ratios"] = report.ratios(result["paths"])
        files = report.write(result, out)
        typer.echo("")
        typer.echo(files["md"].read_text())
        typer.echo(f"wrote {files['json']}, {files['png']}, {files['md']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _relay_levels(text: str) -> list[tuple[int, int, float]]:
    """``64x20@20,1000x1@200``: (streams, tokens per step, step ms) triples."""
    triples = []
    for part in text.split(","):
        try:
            head, _, step = part.partition("@")
            streams, tokens = (int(x) for x in head.lower().split("x"))
            step_ms = float(step)
        except ValueError:
            raise typer.BadParameter(f"'{part}': give levels as STREAMSxTOKENS@STEP_MS, e.g. 64x20@20,1000x1@200") from None
        if streams < 1 or tokens < 1 or step_ms <= 0:
            raise typer.BadParameter(f"'{part}': streams, tokens per step and the step must be positive")
        triples.append((streams, tokens, step_ms))
    return triples


@app.command()
def relay(
    levels: Annotated[str, typer.Option(help="STREAMSxTOKENS@STEP_MS: concurrent streams, tokens each gets per synthetic engine step, the step in ms.")] = "64x20@20,1000x1@200",
    seconds: Annotated[float, typer.Option(help="How long each stream lasts at full speed.")] = 10.0,
    tunnel: Annotated[bool, typer.Option("--tunnel/--no-tunnel", help="Through the SSH tunnel and breaker.")] = True,
    out: Annotated[Path, typer.Option(help="Folder for relay.json and relay.md.")] = Path("bench-results"),
    replicas: Annotated[int, typer.Option(min=1, help="Gateway processes sharing one port and a private PostgreSQL "
                                          "(chatai gateway --replicas): run 1 and 2 to compare the ceilings.")] = 1,
    workers: Annotated[str, typer.Option(help="Synthetic workers pulling the one queue, comma-separated counts "
                                         "(e.g. 1,2,4,8): each level runs with each count, STREAMS per worker.")] = "1",
) -> None:
    """The relay ceiling: a synthetic token source (no model) behind the whole path, one gateway
    (or ``--replicas N`` of them), one worker (or ``--workers 1,2,4,8``, to see them scale)."""
    import json

    from chatai.bench import report, vllm_client
    from chatai.bench.relay import relay_level
    from chatai.bench.targets import chatai_stack, scratch_dir
    from chatai.devstack.tiny_model import make_tiny_model
    from gpu_worker.settings import WorkerSettings

    triples = _relay_levels(levels)
    counts = _levels(workers)
    stop_on_sigterm()
    work = scratch_dir("chatai-relay-")
    rows: list[dict] = []
    try:
        # vLLM's client makes its random prompts with a tokenizer; the synthetic engine ignores them.
        tokenizer = make_tiny_model(work / "tokenizer", seed=0)
        runs = [(n, triple) for triple in triples for n in counts]
        for i, (n, (per_worker, tokens_per_step, step_ms)) in enumerate(runs):
            # Each worker holds at most its share, so the streams spread over all of them.
            settings = WorkerSettings(engine="synthetic", served_model_name="synthetic", max_num_seqs=per_worker)
            env = {"CHATAI_WORKER_ENGINE": "synthetic", "CHATAI_WORKER_SYNTHETIC_STEP_MS": f"{step_ms:g}",
                   "CHATAI_WORKER_SYNTHETIC_TOKENS_PER_STEP": str(tokens_per_step)}
            streams = n * per_worker
            with chatai_stack(settings, work / f"stack-{i}", tunnel=tunnel, worker_env=env,
                              gateway_replicas=replicas, workers=n) as ep:
                max_tokens = max(1, int(seconds * 1000 / step_ms) * tokens_per_step)
                level = {"concurrency": streams, "requests": streams, "max_tokens": max_tokens}

                async def load(ep=ep, level=level, i=i) -> dict:  # every stream at once, one request each
                    return await asyncio.to_thread(vllm_client.run_level, ep.base_url, ep.api_key, ep.model,
                                                   tokenizer, level, 32, work / f"client-{i}")
                offered = streams * tokens_per_step * 1000 / step_ms
                with favoured_client():
                    row = asyncio.run(relay_level(load, ep.pid, ep.worker_pids))
                row.update(workers=n, tokens_per_step=tokens_per_step, step_ms=step_ms, offered_tok_s=offered)
                rows.append(row)
                typer.echo(f"  {n} worker(s), {streams:>5} streams x {tokens_per_step} tok / {step_ms:g} ms: offered {offered:>9,.0f} tok/s, "
                           f"relayed {row['output_tok_s']:>9,.0f} tok/s; TTFT p50 {row['ttft_p50_ms']:.0f} ms; "
                           f"gateway RSS peak {row['gateway_rss_peak_mb']:.0f} MB, CPU {row['gateway_cpu_percent']:.0f}%; "
                           f"worker CPU {row.get('worker_cpu_percent', float('nan')):.0f}%; ok {row['ok']} failed {row['failed']}")
        out.mkdir(parents=True, exist_ok=True)
        result = {"machine": report.machine(), "tunnel": tunnel, "gateway_replicas": replicas, "levels": rows}
        (out / "relay.json").write_text(json.dumps(result, indent=2) + "\n")
        md = ["| workers | streams | tokens / step | offered tok/s | relayed tok/s | TTFT p50 / p99 (ms) | gateway RSS before / peak (MB) | gateway CPU | workers' CPU | ok / failed |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            md.append(f"| {r['workers']} | {r['concurrency']} | {r['tokens_per_step']} / {r['step_ms']:g} ms | {r['offered_tok_s']:,.0f} | "
                      f"{r['output_tok_s']:,.0f} | {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
                      f"{r['gateway_rss_before_mb']:.0f} / {r['gateway_rss_peak_mb']:.0f} | {r['gateway_cpu_percent']:.0f}% | "
                      f"{r.get('worker_cpu_percent', float('nan')):.0f}% | {r['ok']} / {r['failed']} |")
        (out / "relay.md").write_text("\n".join(md) + "\n")
        typer.echo("\n".join(md))
        typer.echo(f"wrote {out / 'relay.json'}, {out / 'relay.md'}")
        empty = [r for r in rows if r["ok"] == 0]
        if empty:  # a level where nothing got through measured nothing: say so, and fail
            for r in empty:
                typer.echo(f"error: no stream of the {r['concurrency']}-stream level succeeded: {r['errors']}", err=True)
            raise typer.Exit(1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_result(json_path: Path, result: dict, table: str, png: Path, kept: Path | None) -> None:
    """A benchmark's JSON, its table on the terminal, and where everything went."""
    import json

    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    typer.echo(table)
    typer.echo(f"wrote {json_path} and {png}" + (f"; logs in {kept}" if kept else ""))


@app.command()
def coexistence(
    quick: Annotated[bool, typer.Option("--quick", help="A short day (about 4 minutes in all), synthetic workers only.")] = False,
    json_path: Annotated[Path, typer.Option("--json", help="Where to write the measures (JSON).")] = Path("coexistence.json"),
    png: Annotated[Optional[Path], typer.Option(help="Gantt chart (default: next to the JSON, .png).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the regular workload.")] = 11,
    day_s: Annotated[Optional[float], typer.Option(help="Seconds of arrivals (the compressed day).")] = None,
    load: Annotated[Optional[float], typer.Option(help="Offered regular load, share of all GPUs (default 0.8 quick, 0.7 full).")] = None,
    grace_s: Annotated[int, typer.Option(help="Scavenger partition GraceTime (s): a preempted worker's time to drain.")] = 10,
    real_workers: Annotated[Optional[int], typer.Option(help="Real vLLM workers (tiny model) among the 8 (default: 0 quick, 1 full).")] = None,
    rate: Annotated[float, typer.Option(help="Chat requests per second.")] = 2.0,
    trace_file: Annotated[Optional[Path], typer.Option("--trace", exists=True, dir_okay=False,
        help="Replay a real workload instead: SWF (.swf, .swf.gz, Parallel Workloads Archive) or a sacct export.")] = None,
    start: Annotated[str, typer.Option(help="With --trace: the window's start, an offset after the first submit (2d9h) or, for sacct, a date (2026-11-02T08:00).")] = "0",
    duration: Annotated[str, typer.Option(help="With --trace: the window's length in trace time (2h, 90m, 1d).")] = "2h",
    nodes: Annotated[int, typer.Option(help="Emulated one-GPU nodes; a trace's processors are folded onto them.")] = 8,
    time_scale: Annotated[float, typer.Option(help="With --trace: trace seconds per replay second (60: an hour in a minute).")] = 60.0,
    trace_capacity: Annotated[Optional[int], typer.Option(help="With --trace: the trace machine's size in its unit (default: SWF header, or sacct's peak use).")] = None,
    clip: Annotated[bool, typer.Option(help="With --trace: cut jobs at the window's end.")] = True,
    headroom: Annotated[int, typer.Option(help="GPUs the autoscaler never fills (policy: regular jobs that fit start without preemption).")] = 0,
    give_way: Annotated[bool, typer.Option(help="Policy: the autoscaler drains as many workers as waiting regular jobs need, at once, and again any that did not hear (--yield-to-pending).")] = False,
    yield_interval: Annotated[float, typer.Option(min=0.1, help="With --give-way: seconds between the autoscaler's looks for waiting regular jobs (a fifth of the emulated cluster's 1 s scheduling pass).")] = 0.2,
    drain_grace: Annotated[Optional[int], typer.Option(help="A preempted worker's time to finish what it holds (default: half the GraceTime; 0 returns it at once).")] = None,
    drain_returns_whole: Annotated[bool, typer.Option(help="Draining workers give their non-streamed answers back to the queue at once and finish only streams (the worker's --drain-returns-whole).")] = False,
    keep: Annotated[bool, typer.Option(help="Keep the scratch folder (logs).")] = False,
) -> None:
    """Regular jobs alone, then with autoscaled workers in a preemptible scavenger partition: idle time absorbed, delays, requests."""

    from chatai.bench.coexistence import gantt, report
    from chatai.bench.coexistence.runner import WorkerPlan, run_once
    from chatai.bench.coexistence.trace import TraceSpec, generate
    from chatai.bench.targets import scratch_dir

    real = (0 if quick else 1) if real_workers is None else real_workers
    if not 0 <= headroom < nodes - real:
        raise typer.BadParameter("--headroom must leave at least one synthetic worker")
    if trace_file is not None:
        from chatai.bench.coexistence.traces import TraceFormatError, replay_plan

        try:
            trace, trace_info = replay_plan(trace_file, start, duration, nodes, time_scale, trace_capacity, clip)
        except (TraceFormatError, ValueError) as exc:
            raise typer.BadParameter(str(exc), param_hint="--trace") from None
        typer.echo(f"trace window: {trace_info['trace_jobs_in_window']} jobs submitted in it (+{trace_info['carried_in']} "
                   f"running at its start), {len(trace)} replayed on {nodes} nodes ({trace_info['dropped_too_small']} "
                   f"folded to 0 nodes); trace utilisation {trace_info['trace_utilisation']:.0%}, "
                   f"replay offered {trace_info['folded_offered_load']:.0%}")
    else:
        load = load or (0.8 if quick else 0.7)
        spec = TraceSpec(seed=seed, day_s=day_s or (50.0 if quick else 240.0), cluster_nodes=nodes, load=load,
                         limits_min=(1,) if quick else (1, 2, 3), run_fraction=(0.3, 0.8) if quick else (0.3, 0.95))
        trace = generate(spec)
        trace_info = {"seed": seed, "day_s": spec.day_s, "load": load, "jobs": len(trace),
                      "limits_min": list(spec.limits_min), "run_fraction": list(spec.run_fraction)}
    stop_on_sigterm()
    work = scratch_dir("chatai-coexist-")
    try:
        model_dir = None
        if real:
            from chatai.devstack.tiny_model import make_tiny_model

            model_dir = make_tiny_model(work / "tiny-model", seed=0)
        plan = WorkerPlan(synthetic_floor=nodes - real - headroom, real_workers=real, model_dir=model_dir,
                          drain_grace_s=max(1, grace_s // 2) if drain_grace is None else drain_grace, request_rate=rate,
                          give_way=give_way, yield_interval_s=yield_interval, drain_returns_whole=drain_returns_whole)
        typer.echo(f"regular jobs: {len(trace)}, the last arriving at {trace[-1].arrival_s:.0f} s; "
                   f"workers: {plan.synthetic_floor} synthetic + {real} real vLLM on {nodes} nodes (headroom {headroom}"
                   f"{', giving way' if give_way else ''})")
        typer.echo("run 1/2: regular jobs alone")
        base = run_once(trace, work / "baseline", grace_s, None, nodes)
        typer.echo("run 2/2: regular jobs with workers")
        run = run_once(trace, work / "workers", grace_s, plan, nodes)
        plan_info = {"trace": trace_info, "nodes": nodes, "headroom": headroom, "give_way": give_way,
                     "yield_interval_s": yield_interval if give_way else None,
                     "synthetic_workers": plan.synthetic_floor, "real_vllm_workers": real,
                     "drain_grace_s": plan.drain_grace_s, "drain_returns_whole": drain_returns_whole, "request_rate": rate, "max_tokens": plan.max_tokens,
                     "worker_time": plan.time, "worker_time_min": plan.time_min, "quick": quick}
        result = report.compute(base, run, grace_s, plan_info)
        png = png or json_path.with_suffix(".png")
        from chatai.bench.coexistence.measures import intervals

        gantt.draw({"baseline: regular jobs alone": intervals(base.records, base.t0, report.kind_of),
                    "with workers (scavenger partition, chatai autoscale)": intervals(run.records, run.t0, report.kind_of)},
                   base.nodes, base.last_regular_end, grace_s, png)
        result["gantt_png"] = str(png)
        result["intervals"] = {name: [vars(i) for i in intervals(r.records, r.t0, report.kind_of)]
                               for name, r in (("baseline", base), ("workers", run))}
        result["baseline_window_s"] = base.last_regular_end
        _write_result(json_path, result, report.table(result), png, work if keep else None)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


@app.command()
def affinity(
    conversations: Annotated[int, typer.Option(help="Conversations, all at once, each a closed loop.")] = 48,
    turns: Annotated[int, typer.Option(help="Turns per conversation.")] = 6,
    system_tokens: Annotated[int, typer.Option(help="Tokens of the system prompt all conversations share.")] = 400,
    user_tokens: Annotated[int, typer.Option(help="Tokens of each user turn.")] = 60,
    max_tokens: Annotated[int, typer.Option(help="Output tokens per turn (ignore_eos).")] = 32,
    max_num_seqs: Annotated[int, typer.Option(help="Each worker's capacity (engine concurrency = prefetch).")] = 16,
    max_model_len: Annotated[int, typer.Option(help="Context length (the last turn's history must fit).")] = 2048,
    json_path: Annotated[Path, typer.Option("--json", help="Where to write the figures (JSON).")] = Path("affinity.json"),
    png: Annotated[Optional[Path], typer.Option(help="Plot (default: next to the JSON, .png).")] = None,
    keep: Annotated[bool, typer.Option(help="Keep the scratch folder (logs).")] = False,
) -> None:
    """Prefix-cache affinity: multi-turn chats on 1 worker, then 2 with affinity off and on."""

    from chatai.bench import affinity_report
    from chatai.bench.affinity import ConversationLoad, run
    from chatai.bench.targets import scratch_dir
    from chatai.devstack.tiny_model import make_tiny_model

    stop_on_sigterm()
    work = scratch_dir("chatai-affinity-")
    try:
        load = ConversationLoad(conversations, turns, system_tokens, user_tokens, max_tokens)
        typer.echo(f"{conversations} conversations x {turns} turns, system prompt {system_tokens} tokens, "
                   f"user turns {user_tokens}, answers {max_tokens}; workers of capacity {max_num_seqs}")
        result = run(make_tiny_model(work / "tiny", seed=0), work, load, max_num_seqs, max_model_len, typer.echo)
        png = png or json_path.with_suffix(".png")
        affinity_report.plot(result, png)
        result["png"] = str(png)
        _write_result(json_path, result, affinity_report.table(result), png, work if keep else None)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
