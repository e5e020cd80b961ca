"""The report as one self-contained HTML page (pure: report document in, HTML text out).

The service graph is inline SVG computed here (a layered layout: callers left of callees), so
the page fetches nothing and shows the picture even with scripts off. A short inline script
adds what a picture on paper cannot: click a workload to light up its blast radius. Every
string from the report is escaped; the embedded JSON cannot close its script element.

Edges, one path per kind present between two nodes:
- ``edge-allowed`` (green): requests the policy allowed in the window;
- ``edge-denied`` (red): requests denied;
- ``edge-dryrun`` (amber, dashed): requests a dry-run policy would deny;
- ``edge-unused`` (grey, dashed): the policy allows the call but no traffic used it.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from html import escape
from typing import Any

NODE_W, NODE_H = 168, 46
# A picture stops helping long before the mesh ends: past these, the graph shows the busiest
# workloads and edges and says so (the tables and --json have the rest).
MAX_GRAPH_NODES = 80
MAX_GRAPH_EDGES = 1200
MAX_TABLE_ROWS = 500
COL_GAP, ROW_GAP = 250, 78
MARGIN = 40
KINDS = (
    ("allowed", "#2e8540", "allowed traffic"),
    ("denied", "#d83933", "denied traffic"),
    ("dryrun", "#e5a000", "a dry-run policy would deny"),
    ("unused", "#9aa0a6", "allowed by policy, not used"),
)
COLORS = {kind: color for kind, color, _ in KINDS}

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1b1b1b}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px}
.meta{color:#555;font-size:13px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:16px 0}
.card{border:1px solid #ddd;border-radius:8px;padding:10px 14px;min-width:150px}
.card b{display:block;font-size:22px}
.card span{color:#555;font-size:12px}
table{border-collapse:collapse;font-size:13px;margin:4px 0}
th,td{border-bottom:1px solid #e5e5e5;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f6f6f6}
.graph{border:1px solid #ddd;border-radius:8px;overflow:auto;background:#fcfcfc}
.node rect{fill:#eef4fb;stroke:#3a6ea5;stroke-width:1.5;rx:8}
.node.external rect{fill:#f3f3f3;stroke:#888;stroke-dasharray:4 3}
.node text{font-size:12px;fill:#1b1b1b;pointer-events:none}
.node text.ns{font-size:10px;fill:#666}
.node .badge{font-size:10px;fill:#fff}
.node .badge-bg{fill:#b50909}
.node{cursor:pointer}
.edge{fill:none}
.edge-dryrun,.edge-unused{stroke-dasharray:6 4}
svg.focus .edge,svg.focus .node{opacity:.18}
svg.focus .hl{opacity:1}
svg.focus .node.hl rect{stroke:#b50909;stroke-width:3}
.legend span{display:inline-block;margin-right:16px;font-size:12px}
.legend i{display:inline-block;width:26px;height:0;border-top:3px solid;margin-right:6px;
vertical-align:middle}
.ok{color:#2e8540} .warn{color:#b36b00} .bad{color:#d83933}
"""

SCRIPT = """
(function(){
  var data = JSON.parse(document.getElementById('report-data').textContent);
  var svg = document.getElementById('graph');
  var radius = data.blast_radius || {};
  var info = document.getElementById('focus');
  function clear(){
    svg.classList.remove('focus');
    svg.querySelectorAll('.hl').forEach(function(e){e.classList.remove('hl');});
    info.textContent = 'Click a workload to see its blast radius.';
  }
  function focus(id){
    clear();
    var r = radius[id]; if (!r) { return; }
    var reach = {}; reach[id] = true;
    r.transitive.forEach(function(t){ reach[t] = true; });
    svg.classList.add('focus');
    svg.querySelectorAll('.node').forEach(function(n){
      if (reach[n.dataset.id]) { n.classList.add('hl'); }
    });
    svg.querySelectorAll('.edge-unused,.edge-allowed').forEach(function(e){
      if (reach[e.dataset.source] && reach[e.dataset.target]) { e.classList.add('hl'); }
    });
    info.textContent = 'If ' + id + ' were compromised it could call ' + r.direct_count +
      ' workload(s) directly and reach ' + r.transitive_count + ' in all: ' +
      (r.transitive.join(', ') || 'none') + '.';
  }
  svg.querySelectorAll('.node').forEach(function(n){
    n.addEventListener('click', function(ev){ ev.stopPropagation(); focus(n.dataset.id); });
  });
  svg.addEventListener('click', clear);
  clear();
  svg.setAttribute('data-interactive', 'ready');
  svg.setAttribute('data-drawn-nodes', String(svg.querySelectorAll('.node').length));
  svg.setAttribute('data-drawn-edges', String(svg.querySelectorAll('.edge').length));
})();
"""


# --------------------------------------------------------------------------- layout


def ranks(nodes: list[str], edges: list[tuple[str, str]]) -> dict[str, int]:
    """Column per node: callers left of their callees. Kahn's order; a cycle is broken at the
    remaining node with the fewest callers (then by name), so every graph gets a layout."""
    preds: dict[str, set[str]] = defaultdict(set)
    succs: dict[str, set[str]] = defaultdict(set)
    for src, dst in edges:
        if src != dst:
            preds[dst].add(src)
            succs[src].add(dst)
    remaining = set(nodes)
    indeg = {n: len(preds[n] & remaining) for n in nodes}
    rank: dict[str, int] = {}
    while remaining:
        ready = sorted(n for n in remaining if indeg[n] == 0)
        if not ready:
            ready = [min(remaining, key=lambda n: (indeg[n], n))]
        for n in ready:
            done = [rank[p] for p in preds[n] if p in rank]
            rank[n] = 1 + max(done) if done else 0
            remaining.discard(n)
            for s in succs[n]:
                if s in remaining:
                    indeg[s] -= 1
    return rank


def layout(nodes: list[str], edges: list[tuple[str, str]]) -> dict[str, tuple[float, float]]:
    """Top-left corner per node. Callers left of callees; but where cycles make that a chain
    far wider than tall (everyone calls everyone), columns of about the square root of the
    node count instead, in the same order: a block, not a ribbon."""
    rank = ranks(nodes, edges)
    columns: dict[int, list[str]] = defaultdict(list)
    for n in sorted(nodes, key=lambda n: (n.split("/")[0], n)):
        columns[rank[n]].append(n)
    width = math.ceil(math.sqrt(len(nodes))) if nodes else 1
    if len(columns) > 2 * width + 1:
        ordered = sorted(nodes, key=lambda n: (rank[n], n.split("/")[0], n))
        columns = defaultdict(list)
        for i, n in enumerate(ordered):
            columns[i // width].append(n)
    tallest = max((len(c) for c in columns.values()), default=1)
    out: dict[str, tuple[float, float]] = {}
    for col, members in columns.items():
        offset = (tallest - len(members)) * ROW_GAP / 2  # centre short columns
        for row, n in enumerate(members):
            out[n] = (MARGIN + col * COL_GAP, MARGIN + 40 + offset + row * ROW_GAP)
    return out


def _width(count: int) -> float:
    return round(1.5 + 1.4 * math.log10(count + 1), 2)


def _slots(
    pairs: list[tuple[str, str]], pos: dict[str, tuple[float, float]]
) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], float]]:
    """Where each edge leaves its caller and enters its callee (vertical offsets from the
    middle), spread by the other end's height so edges of one node do not share one point."""
    out_slot: dict[tuple[str, str], float] = {}
    in_slot: dict[tuple[str, str], float] = {}
    for end, slots in ((0, out_slot), (1, in_slot)):
        groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for pair in pairs:
            groups[pair[end]].append(pair)
        for members in groups.values():
            members.sort(key=lambda p: (pos[p[1 - end]][1], p[1 - end]))
            step = min(8.0, (NODE_H - 12) / max(1, len(members) - 1))
            for i, pair in enumerate(members):
                slots[pair] = (i - (len(members) - 1) / 2) * step
    return out_slot, in_slot


def _clearing(x1: float, x2: float, y0: float, ceiling: float) -> float:
    """The control height of a cubic arc from (x1, y0) to (x2, y0) with control points
    (x1, cy), (x2, cy) that is at or above ``ceiling`` over the columns between: from the right
    side of the first column in between to the left side of the last (a node's width past
    each end). x(t) = x1 + (x2 - x1)(3t^2 - 2t^3), y(t) = y0((1-t)^3 + t^3) + 3t(1-t) cy."""
    f = min(0.5, (COL_GAP - NODE_W) / max(1.0, x2 - x1))
    lo, hi = 0.0, 0.5
    for _ in range(40):  # 3t^2 - 2t^3 = f, by bisection (monotonic on [0, 0.5])
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 3 * mid * mid - 2 * mid**3 < f else (lo, mid)
    t = max(lo, 0.05)
    cy = (ceiling - y0 * ((1 - t) ** 3 + t**3)) / (3 * t * (1 - t))
    return max(cy, (4 - 0.25 * y0) / 0.75)  # the apex (t = 1/2) stays inside the picture


def _edge_path(
    a: tuple[float, float],
    b: tuple[float, float],
    bend: float,
    slot: tuple[float, float],
    ceiling: float | None = None,
) -> str:
    """``ceiling``: for an edge over columns in between, the height its arc must clear (the
    top of the highest node it passes), so it never seems to end at a node it skips."""
    ax, ay = a
    bx, by = b
    if bx > ax:  # forward: right side of the caller to the left side of the callee
        x1, y1 = ax + NODE_W, ay + NODE_H / 2 + slot[0] + bend / 3
        x2, y2 = bx - 2, by + NODE_H / 2 + slot[1] + bend / 3
        dx = (x2 - x1) / 2
        if ceiling is not None:  # arc above the columns between
            cy = _clearing(x1, x2, max(y1, y2), ceiling - abs(bend))
            return f"M{x1:.1f},{y1:.1f} C{x1:.1f},{cy:.1f} {x2:.1f},{cy:.1f} {x2:.1f},{y2:.1f}"
        return (
            f"M{x1:.1f},{y1:.1f} C{x1 + dx:.1f},{y1:.1f} {x2 - dx:.1f},{y2:.1f} {x2:.1f},{y2:.1f}"
        )
    # same column or backwards: leave and enter at the bottom, loop below
    x1, y1 = ax + NODE_W / 2 + bend, ay + NODE_H
    x2, y2 = bx + NODE_W / 2 + bend, by + NODE_H + 6
    drop = 40 + abs(ay - by) / 3 + abs(bend) * 2
    low = max(y1, y2) + drop
    return f"M{x1:.1f},{y1:.1f} C{x1:.1f},{low:.1f} {x2:.1f},{low:.1f} {x2:.1f},{y2:.1f}"


def _edge_kinds(edge: dict[str, Any]) -> list[tuple[str, int, str]]:
    out = []
    if edge["allowed"]:
        out.append(("allowed", edge["allowed"], f"{edge['allowed']} allowed requests"))
    if edge["denied"]:
        out.append(("denied", edge["denied"], f"{edge['denied']} denied requests"))
    if edge["would_deny"]:
        out.append(("dryrun", edge["would_deny"], f"{edge['would_deny']} would be denied"))
    if edge["policy_allows"] and not edge["allowed"]:
        out.append(("unused", 0, f"allowed by policy, unused: {edge['summary']}"))
    return out


def _traffic(edge: dict[str, Any]) -> int:
    return int(edge["allowed"] + edge["denied"] + edge.get("errors", 0))


def shown(doc: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """The nodes and edges the picture draws: all of them, or the busiest MAX_GRAPH_NODES
    nodes (traffic, then edges) and the busiest MAX_GRAPH_EDGES edges among them."""
    nodes = [n["id"] for n in doc["nodes"]]
    edges = list(doc["edges"])
    if len(nodes) > MAX_GRAPH_NODES:
        weight: dict[str, tuple[int, int]] = {n: (0, 0) for n in nodes}
        for e in edges:
            for end in (e["source"], e["destination"]):
                if end in weight:
                    t, d = weight[end]
                    weight[end] = (t + _traffic(e), d + 1)
        keep = set(sorted(nodes, key=lambda n: (-weight[n][0], -weight[n][1], n))[:MAX_GRAPH_NODES])
        nodes = [n for n in nodes if n in keep]
        edges = [e for e in edges if e["source"] in keep and e["destination"] in keep]
    if len(edges) > MAX_GRAPH_EDGES:
        edges = sorted(edges, key=lambda e: (-_traffic(e), -e["would_deny"], e["source"],
                                             e["destination"]))[:MAX_GRAPH_EDGES]  # fmt: skip
    return nodes, edges


def svg(doc: dict[str, Any]) -> str:
    nodes, edges = shown(doc)
    workloads = {n["id"] for n in doc["nodes"] if n["workload"]}
    pos = layout(nodes, [(e["source"], e["destination"]) for e in edges])
    width = max((x for x, _ in pos.values()), default=0) + NODE_W + 2 * MARGIN
    backwards = any(
        pos[e["source"]][0] >= pos[e["destination"]][0]
        for e in edges
        if e["source"] in pos and e["destination"] in pos and e["source"] != e["destination"]
    )
    height = max((y for _, y in pos.values()), default=0) + NODE_H + 2 * MARGIN
    height += 120 if backwards else 0
    parts = [
        f'<svg id="graph" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" '
        f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" role="img" '
        f'aria-label="service graph" data-nodes="{len(nodes)}" data-edges="{len(edges)}">',
        "<defs>",
    ]
    for kind, color, _ in KINDS:
        parts.append(
            f'<marker id="arrow-{kind}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="9" '
            f'markerHeight="9" markerUnits="userSpaceOnUse" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
            f'fill="{color}"/></marker>'
        )
    parts.append("</defs>")
    parts.append('<g class="edges">')
    drawn = [(e["source"], e["destination"]) for e in edges
             if e["source"] in pos and e["destination"] in pos]  # fmt: skip
    out_slot, in_slot = _slots(drawn, pos)
    long_edges = 0
    for e in edges:
        a, b = pos.get(e["source"]), pos.get(e["destination"])
        if a is None or b is None or e["source"] == e["destination"]:
            continue
        kinds = _edge_kinds(e)
        key = (e["source"], e["destination"])
        slot = (out_slot.get(key, 0.0), in_slot.get(key, 0.0))
        between = [y for x, y in pos.values() if a[0] < x < b[0]]
        ceiling = None
        if between:  # each long edge a little higher than the last, so they stay apart
            ceiling = min(between) - 14 - 5 * (long_edges % 6)
            long_edges += 1
        for i, (kind, count, text) in enumerate(kinds):
            bend = (i - (len(kinds) - 1) / 2) * 9
            title = f"{e['source']} → {e['destination']}: {text}"
            parts.append(
                f'<path class="edge edge-{kind}" data-source="{escape(e["source"])}" '
                f'data-target="{escape(e["destination"])}" d="{_edge_path(a, b, bend, slot, ceiling)}" '
                f'stroke="{COLORS[kind]}" stroke-width="{_width(count)}" '
                f'marker-end="url(#arrow-{kind})"><title>{escape(title)}</title></path>'
            )
    parts.append("</g>")
    parts.append('<g class="nodes">')
    radius = doc.get("blast_radius", {})
    for n in nodes:
        x, y = pos[n]
        ns, _, name = n.rpartition("/")
        external = n not in workloads
        r = radius.get(n)
        tip = (
            f"{n}: blast radius {r['direct_count']} direct, {r['transitive_count']} transitive"
            if r
            else f"{n}: not a declared workload (callers without a mesh identity)"
        )
        parts.append(
            f'<g class="node{" external" if external else ""}" data-id="{escape(n)}" '
            f'transform="translate({x:.0f},{y:.0f})"><title>{escape(tip)}</title>'
            f'<rect width="{NODE_W}" height="{NODE_H}" rx="8"/>'
            f'<text x="12" y="20">{escape(name or n)}</text>'
            f'<text class="ns" x="12" y="36">{escape(ns or "outside the mesh")}</text>'
        )
        if r and r["transitive_count"]:
            parts.append(
                f'<circle class="badge-bg" cx="{NODE_W - 4}" cy="4" r="11"/>'
                f'<text class="badge" x="{NODE_W - 4}" y="8" text-anchor="middle">'
                f"{r['transitive_count']}</text>"
            )
        parts.append("</g>")
    parts.append("</g></svg>")
    return "".join(parts)


# --------------------------------------------------------------------------- tables


def _table(headers: tuple[str, ...], rows: list[tuple[Any, ...]], empty: str) -> str:
    if not rows:
        return f"<p class='meta'>{escape(empty)}</p>"
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>"
        for row in rows[:MAX_TABLE_ROWS]
    )
    more = len(rows) - MAX_TABLE_ROWS
    note = (
        f"<p class='meta'>… and {more} more rows (meshward report --json)</p>" if more > 0 else ""
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"


def _names(names: list[str], count: int, most: int = 20) -> str:
    if not names:
        return "-"
    more = count - min(len(names), most)
    return ", ".join(names[:most]) + (f" … and {more} more" if more > 0 else "")


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * float(value):.1f} %"


def _cards(doc: dict[str, Any]) -> str:
    s = doc["reachability_summary"]
    worst = max(doc["blast_radius"].items(), key=lambda kv: kv[1]["transitive_count"],
                default=("-", {"transitive_count": 0}))  # fmt: skip
    ready = sum(1 for d in doc["dry_run"] if d["ready"])
    cards = [
        (f"{s['reachable_pairs']} / {s['pairs']}", "workload pairs that may connect"),
        (str(worst[1]["transitive_count"]), f"largest blast radius ({worst[0]})"),
        (_pct(doc["compliance"]["rate"]), "allowed by an explicit ALLOW rule"),
        (_pct(doc["mtls"]["coverage"]), "requests over mTLS"),
        (str(len(doc["unused_rules"])), "unused rules"),
        (f"{ready} / {len(doc['dry_run'])}", "dry-run policies ready to enforce"),
    ]
    return "<div class='cards'>" + "".join(
        f"<div class='card'><b>{escape(v)}</b><span>{escape(t)}</span></div>" for v, t in cards
    ) + "</div>"  # fmt: skip


def _sections(doc: dict[str, Any]) -> str:
    out = []
    out.append("<h2>Reachability under the policy in force</h2>")
    if doc["reachability_summary"]["skipped"]:
        out.append(f"<p class='warn'>{escape(doc['reachability_summary']['skipped'])}</p>")
    out.append(_table(
        ("source", "destination", "may", "allowed by"),
        [(e["source"], e["destination"], e["summary"],
          ", ".join(r or "(no ALLOW policy)" for r in e["rules"])) for e in doc["reachability"]],
        "No workload may call another.",
    ))  # fmt: skip
    if doc["conditional_rules"]:
        out.append(_table(
            ("workload", "also reachable with an end-user token or header (rules)"),
            [(k, ", ".join(v)) for k, v in doc["conditional_rules"].items()], "",
        ))  # fmt: skip
    out.append("<h2>Blast radius</h2>")
    radius = sorted(doc["blast_radius"].items(), key=lambda kv: (-kv[1]["transitive_count"], kv[0]))
    out.append(_table(
        ("workload", "direct", "transitive", "could reach"),
        [(w, r["direct_count"], r["transitive_count"], _names(r["transitive"], r["transitive_count"]))
         for w, r in radius],
        "No workloads.",
    ))  # fmt: skip
    out.append("<h2>Unused rules</h2>")
    out.append(_table(
        ("rule", "action", "workloads", "note"),
        [(u["rule"], u["action"], ", ".join(u["workloads"]) or "-", u["note"])
         for u in doc["unused_rules"]],
        "Every enforced rule decided at least one flow in the window.",
    ))  # fmt: skip
    out.append("<h2>Emergency allows</h2>")
    out.append(_table(
        ("policy", "state", "expires at", "workloads"),
        [(e["policy"], e["state"], e["expires_at"], ", ".join(e["workloads"]) or "-")
         for e in doc["emergency"]],
        "No policy carries meshward.dev/expires-at.",
    ))  # fmt: skip
    out.append("<h2>Dry-run policies</h2>")
    out.append(_table(
        ("policy", "action", "state", "would deny", "requests seen", "would deny (pairs)"),
        [(d["policy"], d["action"], d["state"], d["would_deny"], d["requests_seen"],
          ", ".join(d["would_deny_pairs"][:10])) for d in doc["dry_run"]],
        "No dry-run policies.",
    ))  # fmt: skip
    c = doc["compliance"]
    out.append("<h2>Compliance</h2>")
    out.append(
        f"<p>{escape(_pct(c['rate']))} of {c['allowed']} allowed requests matched an explicit "
        f"ALLOW rule; {c['no_policy']} were allowed because no ALLOW policy selects the "
        "callee.</p>"
    )
    out.append(_table(
        ("destination without an ALLOW policy", "allowed requests"),
        [(d["destination"], d["count"]) for d in c["no_policy_destinations"]], "",
    ))  # fmt: skip
    m = doc["mtls"]
    out.append("<h2>mTLS coverage</h2>")
    out.append(
        f"<p>{escape(_pct(m['coverage']))} of {m['requests']} requests arrived over mTLS; "
        f"{m['plaintext']} were plaintext.</p>"
    )
    out.append(_table(
        ("destination", "port", "mode", "plaintext requests let in"),
        [(p["destination"], p["port"], p["mode"], p["count"]) for p in m["plaintext_permissive"]],
        "No plaintext request was let in by a PERMISSIVE port.",
    ))  # fmt: skip
    return "".join(out)


def _graph_note(doc: dict[str, Any]) -> str:
    nodes, edges = shown(doc)
    if len(nodes) == len(doc["nodes"]) and len(edges) == len(doc["edges"]):
        return ""
    return (
        f"<p class='warn'>Showing the busiest {len(nodes)} of {len(doc['nodes'])} workloads and "
        f"{len(edges)} of {len(doc['edges'])} edges.</p>"
    )


def render(doc: dict[str, Any]) -> str:
    """The whole page. ``doc``: the ``/report`` document."""
    nodes, _ = shown(doc)
    drawn = set(nodes)
    radius = {  # what the click handler needs: the drawn nodes and what of the drawing they reach
        n: {**r, "transitive": [t for t in r["transitive"] if t in drawn]}
        for n, r in doc.get("blast_radius", {}).items()
        if n in drawn
    }
    data = json.dumps({"blast_radius": radius}, sort_keys=True).replace("</", "<\\/")
    legend = "".join(
        f"<span><i style='border-color:{color}'></i>{escape(text)}</span>"
        for _, color, text in KINDS
    )
    window = doc["window"]
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>Meshward report {escape(str(doc['generated_at']))}</title>"
        f"<style>{STYLE}</style></head><body>"
        "<h1>Meshward report</h1>"
        f"<p class='meta'>generated {escape(str(doc['generated_at']))} · policy version "
        f"{escape(str(doc['policy_version'])[:12])} · flows from "
        f"{escape(str(window['since'] or 'everything kept'))} to {escape(str(window['until']))}"
        "</p>"
        f"{_cards(doc)}"
        "<h2>Service graph</h2>"
        f"<p class='legend'>{legend}</p>"
        "<p id='focus' class='meta'>The red badge on a workload is its blast radius.</p>"
        f"{_graph_note(doc)}<div class='graph'>{svg(doc)}</div>"
        f"{_sections(doc)}"
        f"<script type='application/json' id='report-data'>{data}</script>"
        f"<script>{SCRIPT}</script>"
        "</body></html>\n"
    )
