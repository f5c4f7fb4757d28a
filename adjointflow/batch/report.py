"""``results.csv`` and ``summary.md`` of a batch run: one row per item (finished ones read back from their
result files, so items of earlier runs of the same configuration are included) and one per failed item."""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field

__all__ = ["ItemRow", "RunTotals", "results_csv", "summary_md", "COLUMNS"]

COLUMNS = ("id", "status", "loss", "psnr", "nfe", "vjps", "seconds", "stop_reason", "rank", "error")


@dataclass(frozen=True)
class ItemRow:
    """One item's line: ``status`` is ``"ok"`` (``psnr`` NaN without ground truth) or ``"error"``."""

    id: str
    status: str
    loss: float = math.nan
    psnr: float = math.nan
    nfe: int = 0
    vjps: int = 0
    seconds: float = math.nan
    stop_reason: str = ""
    rank: int = -1  # the rank that ran it in this run; -1: finished by an earlier run
    error: str = ""


@dataclass
class RunTotals:
    """What this run did, over all ranks."""

    world_size: int
    ran: int
    skipped_finished: int
    seconds: float
    settings: dict = field(default_factory=dict)


def results_csv(rows: list[ItemRow]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([r.id, r.status, _num(r.loss), _num(r.psnr), r.nfe, r.vjps, _num(r.seconds), r.stop_reason,
                    r.rank, " ".join(r.error.split())])
    return buf.getvalue()


def _num(v: float) -> str:
    return "" if math.isnan(v) else repr(float(v))


def _mean(values) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def summary_md(rows: list[ItemRow], totals: RunTotals) -> str:
    ok = [r for r in rows if r.status == "ok"]
    bad = [r for r in rows if r.status != "ok"]
    fmt = lambda v, spec: "n/a" if math.isnan(v) else format(v, spec)
    lines = ["# Batch inverse problems: summary", ""]
    lines += [f"- {k}: `{v}`" for k, v in totals.settings.items()]
    rate = totals.ran / totals.seconds if totals.seconds > 0 else math.nan
    lines += [
        "",
        f"Items: {len(rows)} ({len(ok)} finished, {len(bad)} failed). This run: {totals.ran} item(s) on "
        f"{totals.world_size} process(es) in {totals.seconds:.1f} s ({fmt(rate, '.3g')} items/s); "
        f"{totals.skipped_finished} finished earlier and skipped.",
        "",
        "| | mean | min | max |",
        "|---|---|---|---|",
    ]
    for name, get, spec in (("loss", lambda r: r.loss, ".4g"), ("PSNR (dB)", lambda r: r.psnr, ".2f"),
                            ("NFE", lambda r: float(r.nfe), ".1f"), ("VJPs", lambda r: float(r.vjps), ".1f"),
                            ("seconds", lambda r: r.seconds, ".3f")):
        vals = [get(r) for r in ok if not math.isnan(get(r))]
        if vals:
            lines.append(f"| {name} | {fmt(_mean(vals), spec)} | {fmt(min(vals), spec)} | {fmt(max(vals), spec)} |")
        else:
            lines.append(f"| {name} | n/a | n/a | n/a |")
    if bad:
        lines += ["", "## Failed items (rerun the same command to retry them)", ""]
        lines += [f"- `{r.id}`: {' '.join(r.error.split())}" for r in bad]
    lines.append("")
    return "\n".join(lines)
