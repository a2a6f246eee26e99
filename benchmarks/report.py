"""Write results: a markdown table, the same as JSON, and a PNG bar chart."""

from __future__ import annotations

import json
import pathlib
from typing import Any

from benchmarks.workloads import config

__all__ = ["write_json", "markdown", "machine_line", "write_chart", "fmt"]

_TITLES = {
    "tiny-mlp": "MLP {f}, ReLU, batch {b}, softmax cross-entropy",
    "lenet-cnn": "LeNet: conv 6@5x5 SAME, avg-pool 2, conv 16@5x5, avg-pool 2, dense 120-84-10 on {s}x{s}x1, batch {b}",
    "gpt-char": "GPT: vocab {v}, context {t}, {l} layers, width {d}, {h} heads, MLP 4x, pre-LN, causal, batch {b}",
}


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table cell: ``-`` for missing, otherwise ``digits`` significant figures."""
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 10 ** (digits - 1):
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def title(workload: str, quick: bool) -> str:
    c = config(workload, quick)
    f = "-".join(map(str, c.features))
    return _TITLES[workload].format(
        f=f, b=c.batch, s=c.image, v=c.vocab, t=c.context, l=c.layers, d=c.width, h=c.heads
    )


def machine_line(machine: dict) -> str:
    v = machine.get("versions", {})
    libs = ", ".join(f"{k} {val}" for k, val in v.items())
    load = machine.get("load_average")
    load_s = f"; load average at start {load[0]:.2f}" if load else ""
    flags = f"; XLA_FLAGS={machine['xla_flags']!r}" if machine.get("xla_flags") else ""
    devices = machine.get("jax_devices") or []
    devices_s = f"; {len(devices)} JAX devices ({devices[0]}, ...)" if len(devices) > 1 else ""
    units = f" ({machine['matrix_units']})" if machine.get("matrix_units") else ""
    return (
        f"{machine['date']} on {machine['cpu']}{units}, {machine['usable_cores']} usable cores "
        f"({machine['platform']}, Python {machine['python']}); {libs}{load_s}{flags}{devices_s}."
    )


def write_json(path: pathlib.Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def write_study(
    out: pathlib.Path, study: str, quick: bool, payload: dict, text: str
) -> pathlib.Path:
    """``<out>/[quick-]<study>.{json,md}`` of a study run; prints the markdown.

    Returns the path without suffix (for further files, such as a chart).
    """
    stem = out / (f"quick-{study}" if quick else study)
    write_json(stem.with_suffix(".json"), payload)
    stem.with_suffix(".md").write_text(text)
    print(text)
    return stem


def _noise_warning(rows: list[dict]) -> list[str]:
    """A warning paragraph when other processes used the machine while it was timed."""
    loads = [r["other_cores"] for r in rows if r.get("other_cores") is not None]
    if not loads or max(loads) <= 0.25:
        return []
    return [
        f"**Noisy run:** other processes used {min(loads):.1f}-{max(loads):.1f} cores "
        "while rows were timed; ratios within this run are indicative, absolute times are not.",
        "",
    ]


def _in_table_order(names: set[str]) -> list[str]:
    """Framework names in the order of ``benchmarks.suite.FRAMEWORKS`` (unknown ones last)."""
    from benchmarks.suite import FRAMEWORKS

    order = {n: i for i, n in enumerate(FRAMEWORKS)}
    return sorted(names, key=lambda n: (order.get(n, len(order)), n))


def _x(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}x"


def markdown(rows: list[dict], machine: dict, *, quick: bool, rounds: int) -> str:
    """The suite's report: a summary grid, then one table per workload."""
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    frameworks = _in_table_order({r["framework"] for r in rows})
    cell = {(r["workload"], r["framework"]): r for r in rows}
    out = [
        f"# nnjax benchmarks{' (--quick: tiny sizes, not timings)' if quick else ''}",
        "",
        f"Measured {machine_line(machine)}",
        "",
        "Each step is a full training step (forward, softmax cross-entropy, backward, Adam "
        "lr 1e-3). `step ms`: median per optimizer step of individually waited-for calls "
        f"after warm-up, frameworks interleaved in {rounds} rounds of rotating order "
        "(fused rows: per call / steps per call). `compile s`: first call minus one steady "
        "call. `x jax` / `x torch`: step time over hand-written JAX's / PyTorch eager's in "
        "the same run. `loop ms`: per step of a plain Python loop (one wait at the end). "
        "`cores used`: mean cores this process used while the row was timed; `other cores`: mean cores other processes used meanwhile (noise).",
        "",
        *_noise_warning(rows),
        "## Step ms (x hand-written JAX)",
        "",
        "| framework | " + " | ".join(workloads) + " |",
        "|---|" + "---:|" * len(workloads),
    ]
    for fw in frameworks:
        cells = []
        for wl in workloads:
            r = cell.get((wl, fw))
            if r is None or r["status"] != "ok":
                cells.append(r["status"] if r else "-")
            else:
                cells.append(f"{fmt(r['step_ms'])} ({_x(r.get('ratio_jax'))})")
        out.append(f"| {fw} | " + " | ".join(cells) + " |")
    for wl in workloads:
        wl_rows = [cell[(wl, fw)] for fw in frameworks if (wl, fw) in cell]
        has_loop = any("loop_ms" in r for r in wl_rows)
        params = next((r["expected_params"] for r in wl_rows), None)
        out += ["", f"## {wl}", "", f"{title(wl, quick)}; {fmt(params)} parameters.", ""]
        head = ["framework", "params", "compile s", "compile x jax", "step ms", "x jax", "x torch"]
        head += ["loop ms"] if has_loop else []
        head += ["steps/call", "loss first -> last", "cores used", "other cores"]
        out += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        notes = []
        for r in wl_rows:
            if r["status"] != "ok":
                notes.append(f"- {r['framework']}: {r['status']} ({r.get('reason', '')})")
                continue
            cells = [
                r["framework"],
                fmt(r["params"]),
                fmt(r["compile_s"]),
                _x(r.get("compile_ratio_jax")),
                fmt(r["step_ms"]),
                _x(r.get("ratio_jax")),
                _x(r.get("ratio_torch")),
            ]
            cells += [fmt(r.get("loop_ms"))] if has_loop else []
            cells += [
                str(r["steps_per_call"]),
                f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}",
                fmt(r.get("own_cores"), 2),
                fmt(r.get("other_cores"), 2),
            ]
            out.append("| " + " | ".join(cells) + " |")
            if r.get("note"):
                notes.append(f"- {r['framework']}: {r['note']}")
        if notes:
            out += ["", *notes]
    return "\n".join(out) + "\n"


def write_chart(path: pathlib.Path, rows: list[dict], *, title_text: str) -> bool:
    """A bar chart of step ms per framework, one panel per workload; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4.5), squeeze=False)
    for ax, wl in zip(axes[0], workloads, strict=True):
        ok = [r for r in rows if r["workload"] == wl and r["status"] == "ok"]
        names = [r["framework"] for r in ok][::-1]
        values = [r["step_ms"] for r in ok][::-1]
        colors = [
            "tab:red"
            if n.startswith("nnjax")
            else "tab:gray"
            if n.startswith("jax")
            else "tab:orange"
            if n.startswith("torch")
            else "tab:blue"
            for n in names
        ]
        bars = ax.barh(names, values, color=colors)
        for bar, r in zip(bars, ok[::-1], strict=True):
            label = f" {fmt(r['step_ms'])} ({_x(r.get('ratio_jax'))})"
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, label, va="center")
        ax.set_title(wl)
        ax.set_xlabel("ms per training step (lower is better)")
        ax.set_xlim(0, 1.45 * max(values, default=1.0))
    fig.suptitle(title_text, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
