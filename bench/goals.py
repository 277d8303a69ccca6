"""The goals of the "Service core" issue, one line each, the same shape in every bench.

`make bench` runs several benches; `grep ^GOAL` over its output gives the verdicts. A bench
exits 0 whatever its verdict: it reports figures, it is not a test.
"""

from __future__ import annotations

WIDTH = 52


def goal_line(goal: str, figure: str, target: str, met: bool) -> str:
    """`GOAL <goal> : <figure> vs <target>  PASS|FAIL`, columns aligned across benches."""
    return f"GOAL {goal:<{WIDTH}}: {figure} vs {target}  {'PASS' if met else 'FAIL'}"
