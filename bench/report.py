"""The figures of a run and its summary: results, ratios to bare, this tree against the baseline build,
the performance targets, memory, and the checks after each gateway run."""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway_config import BASELINE, GATEWAY
from procs import memory_kb
from profiles import CALLGRIND_MIN_S

if TYPE_CHECKING:
    from bench import Bench

MAX_DROP = 0.05     # a change to the request path may cost gateway at most this share of gateway-base's RPS
Pairs = list[tuple["RunResult", "RunResult"]]


@dataclass
class RunResult:
    """One wrk run against one target."""

    target: str
    scenario: str
    conc: int
    round: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int                              # non-2xx + socket errors + timeouts
    cpu_ms_per_req: float
    core_busy: float
    loadgen_busy: float
    upstream_hits_per_req: float
    store_cpu_ms_per_req: float | None = None
    budget: dict[str, Any] = field(default_factory=dict)


def mean(values: list[float]) -> float:
    """The mean, NaN for no values."""
    return statistics.fmean(values) if values else float("nan")


def summarize(bench: Bench, extra: dict[str, Any]) -> str:
    """The run's summary.md."""
    results = [r for r in bench.results if r.round > 0]
    runs = (f"each target under callgrind, one wrk run of {max(bench.args.duration, CALLGRIND_MIN_S)} s after "
            f"{bench.args.warmup} s of warm-up" if bench.args.instructions else
            f"wrk {bench.args.duration} s (+{bench.args.drain} s drain) x {bench.args.rounds} interleaved rounds "
            "per cell")
    lines = [f"# gateway bench {bench.out.name}", "",
             f"Command: `{' '.join(['bench/run.sh', *sys.argv[2:]])}`; {runs}; load side on CPU "
             f"{bench.loadgen_cpus}, SUT on CPU {bench.sut_cpus}; {time.monotonic() - bench.started:.0f} s in all.", ""]
    if bench.builds:
        lines += ["Builds: " + "; ".join(f"{name} = {build}" for name, build in bench.builds.items()) + ".", ""]
    if results:
        lines += _results_table(results) + [""] + _ratio_table(results) + [""]
        comparison = baseline_table(results)
        lines += comparison + [""] * bool(comparison) + _targets_table(results) + [""]
    lines += _memory_table(bench) + [""]
    if bench.unit:
        lines.append("Unit cost per request (from one request's budget delta, = mock usage x price): "
                     + "; ".join(f"{s}: {u[0]} nano-USD, {u[1]} tokens" for s, u in bench.unit.items()))
    lines += _checks_text(results, bool(bench.args.drain))
    if "soak" in extra:
        lines += ["", _soak_text(extra["soak"])]
    if extra.get("instructions"):
        lines += [""] + _instructions_table(extra["instructions"])
    if extra.get("profile"):
        lines += [""] + _profile_text(extra["profile"])
    lines += [""] + [f"- note: {n}" for n in bench.notes]
    lines += [f"- FAILURE: {f}" for f in bench.failures] or ["- every check passed"]
    return "\n".join(lines) + "\n"


def _checks_text(results: list[RunResult], drained: bool) -> list[str]:
    """How many runs of each gateway target passed the checks after the run (budget, access log)."""
    checked = [r for r in results if r.budget]
    if not checked:
        return []
    targets = list(dict.fromkeys(r.target for r in checked))
    exact = {t: sum(r.budget["verdict"] == "exact" for r in checked if r.target == t) for t in targets}
    slack = [r.budget["charged_not_read_by_wrk"] for r in checked if "charged_not_read_by_wrk" in r.budget]
    rule = ("spent requests = wrk's completed requests = chat 200s in the access log; USD and tokens = "
            "that x unit cost; no reservation left behind" if drained else
            "completed <= charged <= completed + connections (no --drain: wrk cuts requests off)")
    counts = ", ".join(f"{t} {exact[t]}/{sum(r.target == t for r in checked)}" for t in targets)
    return [f"Budget checks: {counts} runs exact ({rule}; a variant without budgets or access log is checked "
            "on what it has); charged minus completed: "
            + (f"{min(slack)} to {max(slack)} per run." if slack else "- (no budgeted gateway).")]


def _cells(results: list[RunResult]) -> dict[tuple[str, int, str], list[RunResult]]:
    """Runs by (scenario, connections, target)."""
    cells: dict[tuple[str, int, str], list[RunResult]] = {}
    for r in results:
        cells.setdefault((r.scenario, r.conc, r.target), []).append(r)
    return cells


def _results_table(results: list[RunResult]) -> list[str]:
    """Every target's figures per cell, means over the rounds."""
    rows = ["| scenario | conc | target | RPS (min-max) | p50 ms | p99 ms | SUT CPU ms/req | SUT core busy "
            "| loadgen CPU busy | upstream hits/req | Redis CPU ms/req | non-2xx+sock errs |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (scenario, conc, target), runs in _cells(results).items():
        rps = [r.rps for r in runs]
        store = [r.store_cpu_ms_per_req for r in runs if r.store_cpu_ms_per_req is not None]
        rows.append(
            f"| {scenario} | {conc} | {target} | {mean(rps):,.0f} ({min(rps):,.0f}-{max(rps):,.0f}) "
            f"| {mean([r.p50_ms for r in runs]):.2f} | {mean([r.p99_ms for r in runs]):.2f} "
            f"| {mean([r.cpu_ms_per_req for r in runs]):.3f} | {mean([r.core_busy for r in runs]):.0%} "
            f"| {mean([r.loadgen_busy for r in runs]):.0%} | {mean([r.upstream_hits_per_req for r in runs]):.3f} "
            f"| {f'{mean(store):.3f}' if store else '-'} | {sum(r.errors for r in runs)} |")
    return rows


def _same_round_pairs(cells: dict[tuple[str, int, str], list[RunResult]], scenario: str, conc: int,
                      target: str = GATEWAY, reference: str = "bare") -> Pairs:
    """(target, reference) runs of one cell that belong to the same interleaved round."""
    by_round = {r.round: r for r in cells.get((scenario, conc, reference), [])}
    return [(r, by_round[r.round]) for r in cells.get((scenario, conc, target), []) if r.round in by_round]


def _pair_ratios(pairs: Pairs, attr: str) -> list[float]:
    return [getattr(g, attr) / getattr(b, attr) for g, b in pairs]


def _pair_additions(pairs: Pairs, attr: str) -> list[float]:
    return [getattr(g, attr) - getattr(b, attr) for g, b in pairs]


# A round's two runs are seconds apart, so their ratio is what machine noise moves least; a round that a
# noisy neighbour hit is an outlier of its cell, which the median of the rounds discounts.
def _pair_ratio(pairs: Pairs, attr: str) -> float:
    return statistics.median(_pair_ratios(pairs, attr))


def _pair_added(pairs: Pairs, attr: str) -> float:
    return statistics.median(_pair_additions(pairs, attr))


def _median_of(runs: list[RunResult], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in runs)


def _spread(values: list[float], fmt: str) -> str:
    """'mean M, rounds a / b / c' of per-round figures."""
    return f"mean {mean(values):{fmt}}, rounds " + " / ".join(f"{value:{fmt}}" for value in values)


def _ratio_table(results: list[RunResult]) -> list[str]:
    """Each gateway target against bare, per cell."""
    cells = _cells(results)
    rows = ["Each gateway against bare: each figure is the median of the rounds' paired figures.", "",
            "| scenario | conc | target | x bare RPS | x bare p50 | x bare p99 | x bare CPU ms/req "
            "| added p50 ms | added p99 ms |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for scenario, conc, target in cells:
        matched = _same_round_pairs(cells, scenario, conc, target) if target.startswith(GATEWAY) else []
        if not matched:
            continue
        ratio = lambda attr: _pair_ratio(matched, attr)  # noqa: E731
        added = lambda attr: _pair_added(matched, attr)  # noqa: E731
        rows.append(f"| {scenario} | {conc} | {target} | {ratio('rps'):.2f} | {ratio('p50_ms'):.2f} "
                    f"| {ratio('p99_ms'):.2f} | {ratio('cpu_ms_per_req'):.2f} | {added('p50_ms'):+.2f} "
                    f"| {added('p99_ms'):+.2f} |")
    return rows


def baseline_table(results: list[RunResult]) -> list[str]:
    """This tree's gateway against the --baseline build's, per cell, with the verdict of the 5 % rule."""
    cells = _cells(results)
    keys = [(scenario, conc) for scenario, conc, target in cells if target == BASELINE]
    if not keys:
        return []
    rows = [f"Before/after in the same run: `{GATEWAY}` (this tree) against `{BASELINE}` (the --baseline build). "
            "Each figure is the median over the rounds in which both ran (a ratio: the median of the rounds' "
            f"ratios). A change to the request path passes when {GATEWAY}'s RPS does not drop more than "
            f"{MAX_DROP:.0%} below {BASELINE}'s in any cell.", "",
            f"| cell | figure | {GATEWAY} | {BASELINE} | {GATEWAY} / {BASELINE} | {GATEWAY} / bare "
            f"| {BASELINE} / bare | verdict (RPS drop <= {MAX_DROP:.0%}) |", "|---|---|---:|---:|---:|---:|---:|---|"]
    passed = []
    for scenario, conc in keys:
        pairs = _same_round_pairs(cells, scenario, conc, GATEWAY, BASELINE)
        if not pairs:
            continue
        to_bare = (_same_round_pairs(cells, scenario, conc, GATEWAY), _same_round_pairs(cells, scenario, conc, BASELINE))
        for attr, figure, fmt in (("rps", "RPS", ",.0f"), ("cpu_ms_per_req", "CPU ms/req", ".3f"), ("p50_ms", "p50 ms", ".2f")):
            ratios = _pair_ratios(pairs, attr)
            bare = [f"{_pair_ratio(p, attr):.2f}" if p else "-" for p in to_bare]
            verdict = ""
            if attr == "rps":
                change = statistics.median(ratios) - 1
                passed.append(change >= -MAX_DROP)
                verdict = (f"{'ok' if passed[-1] else 'DROP'}: {change:+.1%} (rounds "
                           + " / ".join(f"{r - 1:+.1%}" for r in ratios) + ")")
            rows.append(f"| {scenario} c={conc} | {figure} | {_median_of([g for g, _ in pairs], attr):{fmt}} "
                        f"| {_median_of([b for _, b in pairs], attr):{fmt}} | {statistics.median(ratios):.3f} "
                        f"| {bare[0]} | {bare[1]} | {verdict} |")
    verdict = ("passes" if all(passed) else
               "FAILS (a drop of a few per cent can be noise: rerun with more --rounds before believing it)")
    return rows + ["", f"Verdict: {GATEWAY}'s RPS is within {MAX_DROP:.0%} of {BASELINE}'s in {sum(passed)} of "
                       f"{len(passed)} cells: the change {verdict}."]


# The performance targets (issue 6), judged from the same run's interleaved pairs.
TARGETS = (("chat", 16, "RPS >= 0.5 x bare", "rps", lambda ratio, added: ratio >= 0.5),
           ("stream", 16, "RPS >= 0.5 x bare", "rps", lambda ratio, added: ratio >= 0.5),
           ("chat", 1, "p50 <= bare p50 + 0.3 ms", "p50_ms", lambda ratio, added: added <= 0.3))


def _targets_table(results: list[RunResult]) -> list[str]:
    """Each target's figure in this run and whether it is met (a report, not a check that fails the run)."""
    cells = _cells(results)
    rows = ["| target | figure (median of the rounds) | met | per round |", "|---|---:|---|---|"]
    for scenario, conc, name, attr, met in TARGETS:
        matched = _same_round_pairs(cells, scenario, conc)
        if not matched:
            continue
        ratios, additions = _pair_ratios(matched, attr), _pair_additions(matched, attr)
        ratio, added = statistics.median(ratios), statistics.median(additions)
        if attr == "rps":
            figure, spread = f"{ratio:.2f} x", _spread(ratios, ".2f")
        else:
            figure, spread = f"{added:+.2f} ms", _spread(additions, "+.2f")
        by_median, by_mean = met(ratio, added), met(mean(ratios), mean(additions))
        verdict = ("yes" if by_median else "NO") + ("" if by_mean == by_median else
                                                    f" (by the mean: {'yes' if by_mean else 'NO'})")
        rows.append(f"| {scenario} c={conc}: {name} | {figure} | {verdict} | {spread} |")
    return rows


def _memory_table(bench: Bench) -> list[str]:
    """Start-up time and memory of every process."""
    rows = ["| target | process | startup s | peak RSS (VmHWM) MiB | RSS at end MiB |", "|---|---|---:|---:|---:|"]
    for name, target in bench.targets.items():
        process = "mock upstream" if name == "direct" else name
        rows.append(f"| {name} | {process} | {bench.startup_s.get(name if name != 'direct' else 'mock', 0):.1f} "
                    f"| {memory_kb(target.proc.pid, 'VmHWM') / 1024:.1f} | {memory_kb(target.proc.pid, 'VmRSS') / 1024:.1f} |")
    if bench.redis:
        rows.append(f"| (store) | redis-server | - | {memory_kb(bench.redis.pid, 'VmHWM') / 1024:.1f} "
                    f"| {memory_kb(bench.redis.pid, 'VmRSS') / 1024:.1f} |")
    return rows


def _instructions_table(rows: list[dict[str, Any]]) -> list[str]:
    """Instructions per request of every target counted, against bare (and gateway against gateway-base)."""
    per_request = {(row["target"], row["scenario"]): row["per_request"] for row in rows}
    lines = ["Instructions per request at 16 connections (callgrind; user space, every thread; the kernel's "
             "share is not counted):", "", "| scenario | target | requests counted | instructions / request | x bare |",
             "|---|---|---:|---:|---:|"]
    for row in rows:
        bare = per_request.get(("bare", row["scenario"]))
        ratio = f"{row['per_request'] / bare:.2f}" if bare else "-"
        lines.append(f"| {row['scenario']} | {row['target']} | {row['requests']:,} | {row['per_request']:,.0f} "
                     f"| {ratio} |")
    for scenario in dict.fromkeys(row["scenario"] for row in rows):
        if (GATEWAY, scenario) in per_request and (BASELINE, scenario) in per_request:
            change = per_request[(GATEWAY, scenario)] / per_request[(BASELINE, scenario)] - 1
            lines += ["", f"{scenario}: {GATEWAY} against {BASELINE}: {change:+.1%} instructions per request."]
    return lines


def _soak_text(soak: dict[str, Any]) -> str:
    """The soak's verdict in one paragraph."""
    base, final = soak["rss_after_baseline_kb"], soak["rss_final_kb"]
    if base is None:
        return f"Soak: only {soak['requests']:,} requests, no 50,000 baseline."
    return (f"Soak: {soak['requests']:,} requests (target {soak['target']:,}); RSS {base[1] / 1024:.1f} MiB after "
            f"{base[0]:,}, {final[1] / 1024:.1f} MiB after {final[0]:,} ({soak['growth']:+.1%}, limit "
            f"{soak['limit']:.0%}: {'ok' if soak['rss_ok'] else 'FAIL'}); peak {soak['vmhwm_kb'] / 1024:.1f} MiB; "
            f"budget {'exact' if soak['budget_exact'] else 'MISMATCH'} ({soak['served_logged']:,} served).")


def _profile_text(profile: dict[str, Any]) -> list[str]:
    """py-spy's shares per component and per function."""
    lines = []
    for scenario, frames in profile.items():
        lines += [f"Profile {scenario} c=16 (py-spy --nonblocking, {frames['samples'][0][1]} samples; % of the "
                  "gateway's CPU samples):", "", "| component | % | | top function (self) | % |", "|---|---:|---|---|---:|"]
        for index in range(max(len(frames["groups"]), 12)):
            group = frames["groups"][index] if index < len(frames["groups"]) else ("", "")
            own = frames["self"][index] if index < len(frames["self"]) else ("", "")
            lines.append(f"| {group[0]} | {group[1]} | | `{own[0]}` | {own[1]} |")
        lines.append("")
    return lines

