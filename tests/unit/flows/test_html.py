"""The HTML report (pure part): every string escaped, the embedded data cannot close its script,
nothing is fetched, every graph (cycles included) gets a layout with callers left of callees.
(The page rendered in a real Chromium: tests/integration/test_report.py.)"""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshward.flows import html
from meshward.flows.report import build
from meshward.flows.report_query import FlowTotal
from meshward.policy import parse

NOW = datetime(2026, 12, 1, tzinfo=UTC)
MESH = (
    "apiVersion: meshward.dev/v1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {}\n"
    + "".join(
        f"---\napiVersion: meshward.dev/v1\nkind: Workload\nmetadata: {{name: {n}, namespace: shop}}\n"
        "spec: {ports: [{name: http, port: 8080, protocol: HTTP}]}\n"
        for n in ("a", "b")
    )
)
HOSTILE = '</script><script>alert("x")</script><img src=x onerror=alert(1)>'


def test_hostile_strings_are_escaped_and_nothing_is_fetched() -> None:
    totals = [
        FlowTotal(HOSTILE, "shop/a", 8080, "deny", "", (), 3),
        FlowTotal("shop/a", "shop/b", 8080, "allow", "", (HOSTILE,), 2),
    ]
    page = html.render(build(parse({"m.yaml": MESH}), totals, now=NOW))
    assert HOSTILE not in page
    assert "<img" not in page and "onerror=alert" not in page.replace("onerror=alert(1)&gt;", "")
    # exactly the two script elements the page itself has
    assert len(re.findall(r"<script", page)) == 2
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and "url(http" not in page


def test_every_node_and_edge_kind_is_drawn() -> None:
    totals = [
        FlowTotal("shop/a", "shop/b", 8080, "allow", "", ("shop/dry",), 5),
        FlowTotal("shop/a", "shop/b", 8080, "deny", "", (), 1),
        FlowTotal("plaintext", "shop/a", 8080, "deny", "", (), 1),
    ]
    doc = build(parse({"m.yaml": MESH}), totals, now=NOW)
    svg = html.svg(doc)
    for node in ("shop/a", "shop/b", "plaintext"):
        assert f'data-id="{node}"' in svg
    assert 'class="node external" data-id="plaintext"' in svg
    kinds = re.findall(r'class="edge edge-(\w+)" data-source="([^"]+)" data-target="([^"]+)"', svg)
    assert ("allowed", "shop/a", "shop/b") in kinds
    assert ("denied", "shop/a", "shop/b") in kinds
    assert ("dryrun", "shop/a", "shop/b") in kinds
    assert ("denied", "plaintext", "shop/a") in kinds
    # no policy: b may call a, never used
    assert ("unused", "shop/b", "shop/a") in kinds


@settings(max_examples=100, deadline=None)
@given(
    st.integers(min_value=1, max_value=10).flatmap(
        lambda n: st.tuples(
            st.just([f"ns/w{i}" for i in range(n)]),
            st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=3 * n),
        )
    )
)
def test_every_graph_gets_a_layout(graph: tuple[list[str], list[tuple[int, int]]]) -> None:
    nodes, pairs = graph
    edges = [(nodes[a], nodes[b]) for a, b in pairs]
    ranks = html.ranks(nodes, edges)
    assert set(ranks) == set(nodes)
    positions = html.layout(nodes, edges)
    assert len(set(positions.values())) == len(nodes)  # no two nodes on one spot
    # In a graph without cycles every caller sits left of its callees.
    if not _cyclic(nodes, edges):
        for a, b in edges:
            if a != b:
                assert ranks[a] < ranks[b]


def _cyclic(nodes: list[str], edges: list[tuple[str, str]]) -> bool:
    succ: dict[str, set[str]] = {n: set() for n in nodes}
    for a, b in edges:
        succ[a].add(b)
    state: dict[str, int] = {}

    def visit(n: str) -> bool:
        state[n] = 1
        for m in succ[n]:
            if state.get(m) == 1 or (m not in state and visit(m)):
                return True
        state[n] = 2
        return False

    return any(n not in state and visit(n) for n in nodes)


def test_a_big_graph_shows_the_busiest_part_and_says_so() -> None:
    from meshward.testing.topology import worst_case

    totals = [FlowTotal("mesh/svc0003", "mesh/svc0004", 8080, "allow", "", (), 9)]
    doc = build(worst_case(30), totals, now=NOW)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(html, "MAX_GRAPH_NODES", 10)
        mp.setattr(html, "MAX_GRAPH_EDGES", 40)
        mp.setattr(html, "MAX_TABLE_ROWS", 25)
        nodes, edges = html.shown(doc)
        assert len(nodes) == 10 and len(edges) == 40
        assert {"mesh/svc0003", "mesh/svc0004"} <= set(nodes)  # the busiest stay
        page = html.render(doc)
    assert "Showing the busiest 10 of 30 workloads and 40 of 870 edges" in page
    assert page.count('class="node"') == 10 and page.count('class="edge ') == 40
    assert "… and 845 more rows" in page
