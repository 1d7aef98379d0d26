"""One self-contained HTML file per plan, or per pair of phases: readable without the paper at hand.

    write_html(plan, "plan.html")                      # one phase
    write_html(plan_pair("palm-540b", chips=64, batch=64, prompt=2048), "pair.html")   # both + the cache move

The page holds everything it shows: CSS, a few lines of script and SVG drawings inline, no font, image or
script from the network. For each plan it draws the mesh with its axes, their sizes and the role each
plays; one table row per layer row of the plan (a run of identical blocks is one row with its count),
with its layout in the paper's notation, the weight bytes it reads per chip, its collectives and bytes,
and its time split into compute, memory and communication (a row expands into every weight layout,
collective and note); memory per chip against the chip's capacity; the fractions of the parameter bytes
and matmul FLOPs split over the chips, with what stays whole (a block's unsharded matmuls warned of); and
every candidate the planner weighed with its time and why it lost. With two phases, buttons switch
between them or show them side by side, and the KV-cache redistribution between them is listed.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from ..errors import ShardwiseError
from ..ir.collective import format_bytes
from ..ir.kinds import LayerKind
from ..ir.plan import LayerPlan, Plan
from ..strategies.family import parse_ffn
from . import svg
from .phases import PlanPair
from .views import PART_NAMES, PARTS, axis_roles, explained, memory_parts, sharded_parts, step_label, time_parts

SHOWN_CANDIDATES = 12  # candidates drawn before "show all"


def write_html(plans: Plan | list[Plan] | PlanPair, path: str | Path, *, title: str | None = None) -> Path:
    """Write the report of one plan, two plans (prefill and decode) or a PlanPair to `path`."""
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ShardwiseError(f"report path {str(path)!r}: expected a file name ending in .html (the report is one "
                             f"HTML file); pass e.g. --html plan.html")
    text = render_html(plans, title=title)
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise ShardwiseError(f"cannot write the report to {str(path)!r}: {e.strerror}; expected a writable file "
                             f"in an existing folder: choose another path") from None
    return path


def render_html(plans: Plan | list[Plan] | PlanPair, *, title: str | None = None) -> str:
    """The report as one HTML document (see the module docstring)."""
    pair = plans if isinstance(plans, PlanPair) else None
    plans = pair.plans if pair else [plans] if isinstance(plans, Plan) else list(plans)
    if not plans or not all(isinstance(p, Plan) for p in plans) or len(plans) > 2:
        raise ShardwiseError(f"render_html got {len(plans)} object(s) of types "
                             f"{sorted({type(p).__name__ for p in plans})}; expected one Plan, a list of two Plans "
                             f"(prefill and decode) or a report.phases.PlanPair")
    if len(plans) == 2 and {str(p.phase) for p in plans} != {"prefill", "decode"}:
        raise ShardwiseError(f"two plans of phases {[str(p.phase) for p in plans]}: expected one prefill and one "
                             f"decode plan; report other plans in separate files")
    plans = sorted(plans, key=lambda p: str(p.phase) != "prefill")
    head = plans[0]
    title = title or f"shardwise plan: {head.model} on {head.mesh.size} chips ({head.hardware})"
    body = [f"<header><h1>{escape(title)}</h1>",
            f"<p class='sub'>{escape(_subtitle(plans))}</p>", _switch(plans), "</header>",
            f"<main id='plans' class='plans{' both' if len(plans) == 2 else ''}'>",
            *(_plan_section(p) for p in plans), "</main>"]
    if pair is not None:
        body.append(_bridge_section(pair))
    body.append(_legend())
    return (f"<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{escape(title)}</title><style>{CSS}</style></head>\n<body>\n" + "\n".join(body) +
            f"\n<script>{SCRIPT}</script>\n</body></html>\n")


# ------------------------------------------------------------------------------------ page parts
def _subtitle(plans: list[Plan]) -> str:
    p = plans[0]
    s = p.settings
    return (f"{p.model} · mesh {p.mesh} ({p.mesh.size} chips) · {p.hardware} · weights {s.weights}, KV cache {s.kv} "
            f"· objective {s.objective}" + (" · all communication overlapped" if s.overlap else ""))


def _switch(plans: list[Plan]) -> str:
    if len(plans) < 2:
        return ""
    buttons = [("both", "side by side")] + [(str(p.phase), str(p.phase)) for p in plans]
    return ("<nav class='switch' aria-label='phase'>" + "".join(
        f"<button type='button' data-show='{k}' aria-pressed='{str(k == 'both').lower()}'>{escape(v)}</button>"
        for k, v in buttons) + "</nav>")


def _plan_section(p: Plan) -> str:
    t = p.totals
    cards = [("latency per step", _ms(t.latency)), ("cost", f"{t.chip_ms_per_token:.4g} chip-ms / token"),
             ("MFU", f"{t.mfu * 100:.1f}%"), ("tokens per step", f"{t.tokens_per_step:,}"),
             ("mesh", f"{p.mesh} = {p.mesh.size} chips")]
    if t.transitions:
        cards.append(("between runs of blocks", _ms(t.transitions)))
    if (sp := sharded_parts(p)) is not None:
        cards.append(("sharded: parameters · matmul FLOPs", f"{sp.params * 100:.1f}% · {sp.flops * 100:.1f}%"))
    parts = [f"<section class='plan' data-phase='{escape(str(p.phase))}' id='plan-{escape(str(p.phase))}'>",
             f"<h2><span class='phase'>{escape(str(p.phase))}</span> {escape(p.family or p.chosen or '')}</h2>",
             f"<p class='what'>{escape(step_label(p))}. Chosen, run by run: <code>{escape(p.chosen)}</code>.</p>",
             "<div class='cards'>" + "".join(f"<div class='card'><div class='k'>{escape(k)}</div>"
                                             f"<div class='v'>{escape(v)}</div></div>" for k, v in cards) + "</div>",
             "<h3>The mesh</h3>", svg.mesh_svg(p.mesh, axis_roles(p)),
             "<h3>Layers</h3>", _layer_table(p),
             "<h3>Memory per chip</h3>", _memory(p), *_sharded(p),
             "<h3>Candidates and why each lost</h3>", _candidates(p)]
    if p.unknown_ops:
        parts.append("<h3>Ops without a layout rule (run on replicated inputs)</h3><ul>" + "".join(
            f"<li><code>{escape(u.node)}</code>: {escape(u.target)} in {escape(u.module or '(top level)')}</li>"
            for u in p.unknown_ops) + "</ul>")
    if p.notes:
        parts.append("<h3>How the plan was made</h3><ul class='notes'>" +
                     "".join(f"<li>{escape(n)}</li>" for n in p.notes) + "</ul>")
    parts.append("</section>")
    return "\n".join(parts)


def _layer_table(p: Plan) -> str:
    scale = max((max(time_parts(l)[k] for k in PARTS) for l in p.layers), default=0.0)
    head = ("<table class='layers'><thead><tr><th>layer</th><th>kind</th><th>layout</th>"
            "<th class='num'>weights read / chip</th><th>collectives</th><th>time per step: compute · memory · "
            "communication</th><th class='num'>ms</th></tr></thead><tbody>")
    rows = []
    for i, l in enumerate(p.layers):
        tp = time_parts(l)
        count = f" <span class='count' title='{l.count} identical blocks'>×{l.count}</span>" if l.count > 1 else ""
        total = f"<div class='muted'>×{l.count} = {tp['time'] * l.count * 1e3:.3f}</div>" if l.count > 1 else ""
        comm = (f"{len(l.collectives)} · {format_bytes(l.comm_bytes)}/chip" if l.collectives else "none")
        rows.append(
            f"<tr class='layer kind-{escape(str(l.kind))}' data-index='{i}' tabindex='0' aria-expanded='false'>"
            f"<td><span class='caret'>▸</span> <code>{escape(l.name)}</code>{count}</td>"
            f"<td>{escape(str(l.kind))}</td><td>{_layout_cell(l, p)}</td>"
            f"<td class='num'>{format_bytes(l.cost.get('weight_bytes', 0.0))}</td><td>{comm}</td>"
            f"<td>{svg.time_bars(tp, scale)}</td><td class='num'>{tp['time'] * 1e3:.3f}{total}</td></tr>")
        rows.append(f"<tr class='detail' hidden><td colspan='7'>{_layer_detail(l)}</td></tr>")
    return head + "".join(rows) + "</tbody></table>"


def _layout_cell(l: LayerPlan, p: Plan) -> str:
    if l.kind == LayerKind.FFN:
        word = parse_ffn(l.choice).effective(p.mesh).family
    elif l.kind == LayerKind.ATTENTION:
        word = f"attention by {l.choice}"
    elif l.kind == LayerKind.TRANSITION:
        word = "the residual stream redistributed"
    else:
        word = {"E": "split over d_model", "vocab": "split over the vocabulary",
                "tokens": "split over its rows (tokens), the weight whole on every chip"}.get(l.choice, "")
    weights = "".join(f"<div class='w'><span class='role'>{escape(role)}</span> <code>{escape(w['in_use'])}</code></div>"
                      for role, w in l.weights.items())
    return f"<code class='choice'>{escape(l.choice)}</code> <span class='muted'>{escape(word)}</span>{weights}"


def _layer_detail(l: LayerPlan) -> str:
    out = []
    if l.weights:
        out.append("<table class='inner'><tr><th>weight</th><th>in use</th><th>stored</th></tr>" + "".join(
            f"<tr><td>{escape(r)}</td><td><code>{escape(w['in_use'])}</code></td><td><code>{escape(w['at_rest'])}"
            f"</code>{' (gathered before use)' if w['at_rest'] != w['in_use'] else ''}</td></tr>"
            for r, w in l.weights.items()) + "</table>")
    if l.collectives:
        out.append("<table class='inner'><tr><th>collective</th><th>group</th><th>from → to</th>"
                   "<th class='num'>bytes / chip</th><th class='num'>on the wire</th><th>moves</th></tr>" + "".join(
            f"<tr><td>{escape(c.kind.replace('_', '-'))}</td><td>{escape(c.group)}</td><td><code>{escape(c.src)}"
            f"</code> → <code>{escape(c.dst)}</code></td><td class='num'>{format_bytes(c.bytes)}</td>"
            f"<td class='num'>{format_bytes(c.wire_bytes)}</td><td>{'a weight' if c.weight else 'activations'}</td></tr>"
            for c in l.collectives) + "</table>")
    if l.cost:
        c = l.cost
        out.append("<p class='cost'>" + " · ".join(
            [f"{PART_NAMES[k]} {c.get(k, 0) * 1e3:.4f} ms" for k in PARTS] +
            [f"step {c.get('time', 0) * 1e3:.4f} ms", f"{c.get('flops', 0):.3g} FLOPs per chip",
             f"KV cache read {format_bytes(c.get('kv_bytes', 0))}"]) + "</p>")
    out += [f"<p class='note'>note: {escape(n)}</p>" for n in l.notes]
    return "".join(out) or "<p class='muted'>nothing to add</p>"


def _memory(p: Plan) -> str:
    m = memory_parts(p)
    cap = m["capacity"]
    fill = f"{m['total'] / cap * 100:.0f}% of its {format_bytes(cap)}" if cap else "capacity unknown"
    return (svg.memory_svg(m) + f"<p class='what'>Each chip holds {format_bytes(m['total'])}: {fill}. The whole "
            f"model's weights are {format_bytes(p.memory.weights_total)}.</p>")


def _sharded(p: Plan) -> list[str]:
    """What the plan splits over the chips and what it leaves whole (nothing for a plan that records none)."""
    sp = sharded_parts(p)
    if sp is None:
        return []
    out = ["<h3>What is sharded</h3>", f"<p class='what sharded'>{escape(sp.line)}.</p>"]
    if sp.unsharded:
        out.append("<div class='warn'><b>Matmuls of the blocks not sharded</b> (every chip computes them or holds "
                   "their weights whole):<ul>" + "".join(f"<li><code>{escape(u)}</code></li>" for u in sp.unsharded)
                   + "</ul></div>")
    if sp.experts:
        out.append(f"<p class='note'>{escape(sp.experts)}</p>")
    if sp.replicated:
        out.append(f"<details><summary>{len(sp.replicated)} parameter{'s' * (len(sp.replicated) > 1)} held whole "
                   f"by every chip ({sum(s for _, s in sp.replicated) * 100:.1f}% of the parameter bytes)</summary>"
                   "<table class='inner'><tr><th>parameter</th><th class='num'>share of the bytes</th></tr>" + "".join(
                       f"<tr><td><code>{escape(name)}</code></td><td class='num'>{share * 100:.2f}%</td></tr>"
                       for name, share in sp.replicated) + "</table></details>")
    return out


def _candidates(p: Plan) -> str:
    ex = explained(p)
    if not ex.candidates:
        return "<p class='muted'>The plan carries no explanation (its layouts were all forced, or it was loaded " \
               "without one).</p>"
    timed = [c for c in ex.candidates if not c.refused]
    out = [(f"<p class='what'>On mesh {escape(ex.mesh)} the planner costed {len(ex.candidates)} candidates (a "
           f"feed-forward layout × an attention split), each for all {ex.blocks} blocks; the time is per step. "
           f"The reason given is the cost term that grew the most against the chosen one.</p>"),
           f"<div class='cand-top'>{svg.candidates_svg(ex, rows=SHOWN_CANDIDATES)}</div>"]
    if len(timed) > SHOWN_CANDIDATES:
        out += [f"<div class='cand-all' hidden>{svg.candidates_svg(ex, rows=len(timed))}</div>",
                f"<button type='button' class='show-all'>show all {len(timed)} candidates</button>"]
    refused = [c for c in ex.candidates if c.refused]
    if refused:
        out.append(f"<details><summary>{len(refused)} refused</summary><ul>" + "".join(
            f"<li><code>{escape(c.name)}</code>: {escape(c.verdict)}</li>" for c in refused) + "</ul></details>")
    if ex.meshes:
        out.append(f"<details><summary>{len(ex.meshes)} other meshes of the same chips (their best)</summary>"
                   "<table class='inner'><tr><th>mesh</th><th class='num'>ms per step</th><th>best</th></tr>" + "".join(
            f"<tr><td>{escape(m.mesh)}</td><td class='num'>{'' if m.ms is None else f'{m.ms:.3f}'}</td>"
            f"<td><code>{escape(m.best)}</code></td></tr>" for m in ex.meshes) + "</table></details>")
    return "\n".join(out)


def _bridge_section(pair: PlanPair) -> str:
    out = ["<section class='bridge'><h2>Between the phases: the KV cache</h2>"]
    if pair.bridge:
        out.append(f"<p class='what'>Prefill leaves the cache split as its attention wants it, decode reads it as "
                   f"its own wants it: once, between the phases, {format_bytes(pair.bridge_bytes)} per chip move.</p>"
                   "<ul>" + "".join(f"<li><code>{escape(s.line())}</code></li>" for s in pair.bridge) + "</ul>")
    else:
        out.append("<p class='what'>Both phases keep the KV cache in the same layout, or one each chip already "
                   "holds its part of: nothing moves between them.</p>")
    out += [f"<p class='note'>{escape(n)}</p>" for n in pair.notes]
    out.append("</section>")
    return "\n".join(out)


def _legend() -> str:
    return ("<footer><h3>Reading the notation</h3><p><code>BLE_xyz</code>: a tensor of batch B, sequence L and "
            "model width E, with E split over the chips of mesh axes x, y and z; an axis missing from a subscript "
            "means every chip along it holds the same data. <code>{Σx}</code>: a partial sum still to be added "
            "up over x. F is the feed-forward width, H/K the query/key-value heads, D the head size, V the "
            "vocabulary. Layouts: <b>1D WS</b> weights split over all chips on F; <b>2D WS</b> on E over x and "
            "F over y·z; <b>WG-X/XY/XYZ</b> weights gathered over those axes, which split the batch instead. "
            "Time per step is the largest of compute, memory traffic and prefetched weight communication, plus "
            "the activation communication that cannot overlap. Bars: <span style='color:"
            f"{svg.COLORS['compute']}'>■ compute</span> <span style='color:{svg.COLORS['memory']}'>■ memory</span> "
            f"<span style='color:{svg.COLORS['comm']}'>■ communication</span>.</p></footer>")


def _ms(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds >= 1 else f"{seconds * 1e3:.3f} ms"


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2733;background:#f7f8fa}
header{padding:18px 28px 10px;background:#fff;border-bottom:1px solid #dde3ea}
h1{font-size:20px;margin:0 0 4px}h2{font-size:17px;margin:4px 0 6px}h3{font-size:14px;margin:18px 0 6px;color:#34495e}
.sub,.muted{color:#66768a}.muted{font-size:12px}code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace}
.switch{margin-top:10px}.switch button{font:inherit;padding:4px 12px;margin-right:6px;border:1px solid #9fb0c3;
background:#fff;border-radius:14px;cursor:pointer}.switch button[aria-pressed=true]{background:#2f5d8c;color:#fff;border-color:#2f5d8c}
.plans{display:grid;grid-template-columns:1fr;gap:18px;padding:16px 28px}.plans.both{grid-template-columns:repeat(2,minmax(0,1fr))}
.plan,.bridge{background:#fff;border:1px solid #dde3ea;border-radius:8px;padding:14px 18px;overflow-x:auto}
.bridge{margin:0 28px 16px}.phase{display:inline-block;background:#2f5d8c;color:#fff;border-radius:4px;padding:0 8px;
margin-right:6px;font-size:13px;text-transform:uppercase;letter-spacing:.04em}
.cards{display:flex;flex-wrap:wrap;gap:8px}.card{border:1px solid #e3e8ee;border-radius:6px;padding:6px 10px;min-width:120px}
.card .k{font-size:11px;color:#66768a}.card .v{font-size:15px;font-weight:600}
table.layers{border-collapse:collapse;width:100%;font-size:13px}table.layers th{text-align:left;font-size:11px;color:#66768a;
border-bottom:1px solid #cfd8e3;padding:4px 6px}table.layers td{border-bottom:1px solid #eef1f5;padding:5px 6px;vertical-align:top}
tr.layer{cursor:pointer}tr.layer:hover,tr.layer:focus{background:#f2f6fb;outline:none}
tr.layer[aria-expanded=true] .caret{display:inline-block;transform:rotate(90deg)}tr.detail td{background:#fafbfd}
.num{text-align:right;white-space:nowrap}.count{background:#e8eef6;border-radius:8px;padding:0 6px;font-size:12px;font-weight:600}
.w{font-size:12px}.role{color:#66768a;display:inline-block;min-width:44px}
table.inner{border-collapse:collapse;margin:4px 0 8px;font-size:12px}table.inner td,table.inner th{padding:2px 8px;
border-bottom:1px solid #eef1f5;text-align:left}.note{color:#7a5b00;font-size:12px;margin:2px 0}.cost{font-size:12px}
svg text{font-family:system-ui,sans-serif;fill:#1d2733}svg text.muted{fill:#66768a}svg text.mono{font-family:ui-monospace,monospace}
.show-all{font:inherit;font-size:12px;margin:4px 0;padding:2px 10px;border:1px solid #9fb0c3;background:#fff;border-radius:12px;cursor:pointer}
details{margin:6px 0}summary{cursor:pointer;color:#2f5d8c}footer{padding:4px 28px 24px;color:#4a5a6c;font-size:13px}
tr.kind-transition td{background:#fff8ec}
.warn{background:#fff4e5;border:1px solid #f0c36d;border-radius:6px;padding:6px 10px;margin:6px 0;font-size:13px}
"""

SCRIPT = """
(function () {
  function toggle(row) {
    var detail = row.nextElementSibling, open = detail.hidden;
    detail.hidden = !open;
    row.setAttribute('aria-expanded', String(open));
  }
  document.querySelectorAll('tr.layer').forEach(function (row) {
    row.addEventListener('click', function () { toggle(row); });
    row.addEventListener('keydown', function (e) {
      if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); toggle(row); }
    });
  });
  document.querySelectorAll('.show-all').forEach(function (button) {
    button.addEventListener('click', function () {
      var section = button.closest('section'), all = section.querySelector('.cand-all');
      var showing = !all.hidden;
      all.hidden = showing;
      section.querySelector('.cand-top').hidden = !showing;
      button.textContent = showing ? button.dataset.more : 'show the first ' + SHOWN;
    });
    button.dataset.more = button.textContent;
  });
  var plans = document.getElementById('plans');
  document.querySelectorAll('.switch button').forEach(function (button) {
    button.addEventListener('click', function () {
      var show = button.dataset.show;
      plans.classList.toggle('both', show === 'both');
      plans.querySelectorAll('section.plan').forEach(function (s) {
        s.hidden = !(show === 'both' || s.dataset.phase === show);
      });
      document.querySelectorAll('.switch button').forEach(function (b) {
        b.setAttribute('aria-pressed', String(b === button));
      });
    });
  });
})();
""".replace("SHOWN", str(SHOWN_CANDIDATES))
