"""The docs' tables from the benchmarks' JSON files, so that no figure is copied by hand (issue 36).

    python bench/tables.py bench/results/<day>/*.json > tables.md

Reads what ``bench/gpu_scale.py`` (rows of (model, stack) runs) and ``bench/train_compare.py`` (curves, speed)
write, and prints for each file its stamp (commit and dirty flag, versions, GPU, host) and its tables: the scale
rows (``gpu_scale.markdown``) with the loss curves side by side and, for runs with memory left free, the cost of
eviction against the same model's unconstrained run; the speed ratios with their intervals; the curves' agreement.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import gpu_scale  # noqa: E402


def stamp_line(stamp: dict | None) -> str:
    if not stamp:
        return "_no stamp (a result from before issue 36)_"
    code, v = stamp.get("code", {}), stamp.get("versions", {})
    commit = (code.get("commit") or "unknown")[:10]
    dirty = {True: ", dirty", False: "", None: ", dirty flag unknown"}[code.get("dirty")]
    match = {True: "", False: " — the sources differ from the frozen commit", None: ""}[code.get("matches_frozen")]
    gpus = ", ".join(g["name"] for g in stamp.get("gpu", [])) or "no GPU"
    h = stamp.get("host", {})
    vers = ", ".join(f"{k} {v[k]}" for k in ("torch", "cuda", "transformers", "peft", "bitsandbytes") if v.get(k))
    return (f"commit {commit}{dirty}{match} (sources {code.get('source_sha256', '?')[:12]}); {vers}; {gpus}; "
            f"host {h.get('cpu', '?')}, {h.get('cores', '?')} cores; {stamp.get('time_utc', '?')}")


def _fmt(x, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def scale_tables(payload: dict) -> str:
    rows = payload["rows"]
    parts = [gpu_scale.markdown(rows, payload.get("ratios") or gpu_scale.ratios(rows))]
    curves = [r for r in rows if r.get("status") == "ok" and r.get("losses")]
    if curves:
        n = max(len(r["losses"]) for r in curves)
        picks = sorted({0, 1, n // 2, n - 1})
        parts += ["", "| model | stack | " + " | ".join(f"loss at step {i + 1}" for i in picks) + " |",
                  "|---|---|" + "---:|" * len(picks)]
        for r in curves:
            cells = [_fmt(r["losses"][i]) if i < len(r["losses"]) else "" for i in picks]
            parts.append(f"| {r['model']} | {gpu_scale._label(r)} | " + " | ".join(cells) + " |")
    pressed = [r for r in rows if r.get("status") == "ok" and r.get("leave_free_bytes") is not None]
    if pressed:
        parts += ["", "| model | stack | left free GB | step s (free card) | step s (pressed) | ratio "
                      "| update s (free) | update s (pressed) | ratio |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in pressed:
            free = next((f for f in rows if f.get("status") == "ok" and f["model"] == r["model"]
                         and f["stack"] == r["stack"] and f.get("leave_free_bytes") is None
                         and f.get("cap_bytes") is None and f.get("update_times_s")), None)
            s1, u1 = r["step_s"], statistics.median(r["update_times_s"])
            s0 = free["step_s"] if free else None
            u0 = statistics.median(free["update_times_s"]) if free else None
            parts.append(f"| {r['model']} | {r['stack']} | {r['leave_free_bytes'] / 1e9:g} | {_fmt(s0, 3)} | "
                         f"{_fmt(s1, 3)} | {_fmt(s1 / s0 if s0 else None, 2)} | {_fmt(u0, 3)} | {_fmt(u1, 3)} | "
                         f"{_fmt(u1 / u0 if u0 else None, 2)} |")
    return "\n".join(parts)


def speed_tables(payload: dict) -> str:
    lines = [f"{payload['model']}, gradient accumulation {payload['accum']}, {payload['repeats_done']} interleaved "
             f"repeats of {payload['micro']} timed micro-batches + the update per stack", "",
             "| shape (batch x seq) | stack | tokens/s (median) | ours / stack: median of paired ratios "
             "| ratio of medians | n | interval (coverage) | excludes 1.0 |", "|---|---|---:|---:|---:|---:|---|---|"]
    for shape, by in payload["ratios"].items():
        tps = by["tokens_per_s"]
        for n, v in tps.items():
            if n == "ours":
                lines.append(f"| {shape} | ours | {v:,.0f} | | | | | |")
                continue
            r = by.get(n)
            if not r:
                lines.append(f"| {shape} | {n} | {v:,.0f} | n/a | | | | |")
                continue
            count = r.get("n", len(r["ratios"]))
            if r["low"] is None:
                interval, verdict = f"none: {count} < 5 repeats", "n/a"
            else:
                cover = f" ({r['coverage']:.1%})" if r.get("coverage") is not None else ""
                interval = f"[{r['low']:.2f}, {r['high']:.2f}]{cover}"
                verdict = "yes" if r["excludes_one"] else "no"
            rom = r.get("ratio_of_medians")
            lines.append(f"| {shape} | {n} | {v:,.0f} | {r['median']:.2f}x | "
                         f"{f'{rom:.2f}x' if rom is not None else ''} | {count} | {interval} | {verdict} |")
    warm = payload.get("warmup_s") or {}
    if warm:
        lines += ["", "Untimed first micro-batch and update (compile, plans): " + ", ".join(
            f"{k} {v:.1f} s" for k, v in warm.items())]
    return "\n".join(lines)


def curves_tables(payload: dict) -> str:
    b, s = payload["shape"]
    lines = [f"{payload['model']}, {b} x {s} tokens per micro-batch, {payload['accum']} per step, "
             f"{payload['steps_done']} steps, dropout {payload['recipe']['dropout']}", "",
             "| baseline | mean d = ours − baseline | z | max \\|d\\| | noise sd | window means (z) | agree |",
             "|---|---:|---:|---:|---:|---|---|"]
    for n, a in payload["agreement"].items():
        windows = ", ".join(f"{m:+.3f} ({z:+.1f})" for m, z in zip(a["window_mean_diff"], a["window_z"],
                                                                   strict=True))
        lines.append(f"| {n} | {a['mean_diff']:+.4f} | {a['z']:+.1f} | {a['max_abs_diff']:.4f} | "
                     f"{a['noise_sd']:.4f} | {windows} | {'yes' if a['agree'] else 'no'} |")
    losses = payload["losses"]
    n = len(losses["ours"])
    if n:
        picks = sorted({0, min(9, n - 1), n // 2, n - 1})
        lines += ["", "| stack | " + " | ".join(f"step {i + 1}" for i in picks) + " |", "|---|" + "---:|" * len(picks)]
        for name, curve in losses.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(curve[i]) for i in picks) + " |")
    return "\n".join(lines)


def render(paths: list[str]) -> str:
    out = []
    for path in paths:
        payload = json.loads(Path(path).read_text())
        out += [f"#### {Path(path).name}", "", stamp_line(payload.get("stamp")), ""]
        if "rows" in payload and all("stack" in r for r in payload["rows"]):
            out.append(scale_tables(payload))
        elif payload.get("mode") in ("speed", "curves") and not (payload.get("losses") or payload.get("ratios")
                                                                  and payload.get("repeats_done")):
            out.append(f"_{payload['mode']} of {payload.get('model')}: cut off at status "
                       f"{payload.get('status')!r}, before any result_")
        elif payload.get("mode") == "speed":
            out.append(speed_tables(payload))
        elif payload.get("mode") == "curves":
            out.append(curves_tables(payload))
        else:
            out.append("_not a result of gpu_scale.py or train_compare.py: its own script prints its tables_")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print(__doc__)
        return 2
    print(render(paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
