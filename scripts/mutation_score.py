"""Per-module mutation scores from `mutmut results --all true` (read on stdin).

    .venv/bin/mutmut results --all true | .venv/bin/python scripts/mutation_score.py [MIN_SCORE]

Prints, per mutated module, how many mutants were killed (a test failed; a timeout counts as
killed too), survived or were not tested, the score (killed / all), and every survivor by
name (`mutmut show NAME` prints its diff). Exit status 1 if a module scores below MIN_SCORE
percent (default 85), or if nothing was read.
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict

DETECTED = {"killed", "timeout", "caught by type check"}


def parse(lines: list[str]) -> dict[str, dict[str, str]]:
    """module -> {mutant name: status} from lines like `  pkg.mod.x_func__mutmut_3: killed`."""
    modules: dict[str, dict[str, str]] = defaultdict(dict)
    for line in lines:
        name, sep, status = line.strip().rpartition(": ")
        if not sep or "__mutmut_" not in name:
            continue
        module = name.rsplit(".x", 1)[0]  # the function part (after ".x") has no dots
        modules[module][name] = status.strip()
    return modules


def main(argv: list[str]) -> int:
    minimum = float(argv[0]) if argv else 85.0
    modules = parse(sys.stdin.read().splitlines())
    if not modules:
        print("no mutmut results read (run `mutmut run` first)")
        return 1
    failing = []
    print(f"{'module':45} {'mutants':>7} {'killed':>6} {'survived':>8} {'other':>5} {'score':>6}")
    for module, mutants in sorted(modules.items()):
        counts = Counter(mutants.values())
        killed = sum(counts[status] for status in DETECTED)
        survived = counts["survived"]
        other = len(mutants) - killed - survived
        score = 100 * killed / len(mutants)
        print(f"{module:45} {len(mutants):7} {killed:6} {survived:8} {other:5} {score:5.1f}%")
        if score < minimum:
            failing.append(module)
    for _, mutants in sorted(modules.items()):
        for name, status in sorted(mutants.items()):
            if status not in DETECTED:
                print(f"  {status}: {name}")
    if failing:
        print(f"below {minimum:g}%: {', '.join(failing)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
