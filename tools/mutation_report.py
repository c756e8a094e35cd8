"""Tallies a `make mutation` run (mutmut 3) per module, as docs/testing.md reports it.

    python tools/mutation_report.py 'bidvl.objectives.*' 'bidvl.models.ema.*'   # after mutmut run

Reads `mutmut results --all true` in the repository root, keeps the mutants the patterns name
(fnmatch, as `mutmut run` selects them), and counts killed, survived, timeout, no tests and
equivalent per module (`not checked`: a run stopped before them). Equivalent mutants are listed in tests/mutation_equivalents.txt, one
`pattern  reason` per line: a survivor that matches one changes nothing a user can observe (the
reason says why); it is left out of the score, killed / (checked mutants - equivalent). A reason
starting `subprocess:` marks a mutant only multi-process runs can show, one starting `gpu:` a
mutant only a GPU run can show (fp16's GradScaler): both counted apart, also outside the score. Survivors that
are not equivalent are printed with `mutmut show NAME` to read them.
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EQUIVALENTS = REPO / "tests" / "mutation_equivalents.txt"
LINE = re.compile(r"^\s*(\S+): (.+?)\s*$")


def equivalents(path: Path = EQUIVALENTS) -> list[tuple[str, str]]:
    """(pattern, reason) of every non-comment line of the equivalents file."""
    rows = []
    for number, text in enumerate(path.read_text().splitlines(), 1):
        text = text.strip()
        if not text or text.startswith("#"):
            continue
        pattern, _, reason = text.partition(" ")
        if not reason.strip():
            raise SystemExit(f"{path}:{number}: expected `pattern  reason`, got {text!r}")
        rows.append((pattern, reason.strip()))
    return rows


def module_of(name: str) -> str:
    """bidvl.engine.xǁTrainerǁtrain_step__mutmut_3 -> bidvl.engine"""
    return name.split(".x", 1)[0] if ".x" in name else name.rsplit(".", 1)[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("patterns", nargs="+", help="mutant name patterns (the Makefile's MUTANTS)")
    args = parser.parse_args(argv)
    out = subprocess.run([str(Path(sys.executable).parent / "mutmut"), "results", "--all", "true"], cwd=REPO,
                         capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        return out.returncode
    status = {}
    for line in out.stdout.splitlines():
        match = LINE.match(line)
        if match and any(fnmatch.fnmatch(match.group(1), p) for p in args.patterns):
            status[match.group(1)] = match.group(2)
    if not status:
        print("no mutants match the patterns: run `make mutation` (or mutmut run) first", file=sys.stderr)
        return 1
    known = equivalents()
    counts: dict[str, Counter] = defaultdict(Counter)
    open_survivors = []
    for name, state in sorted(status.items()):
        row = counts[module_of(name)]
        row["mutants"] += 1
        reason = next((r for p, r in known if fnmatch.fnmatch(name, p)), None)
        if state != "killed" and reason is not None:
            row["subprocess only" if reason.startswith(("subprocess:", "gpu:")) else "equivalent"] += 1
            continue
        row[state] += 1
        if state not in ("killed", "not checked"):
            open_survivors.append((name, state))
    columns = ["mutants", "killed", "survived", "timeout", "no tests", "not checked", "equivalent",
               "subprocess only"]
    print("| module | " + " | ".join(columns) + " | killed of checked non-equivalent |")
    print("|---|" + "---|" * (len(columns) + 1))
    total = Counter()
    for module, row in sorted(counts.items()):
        total.update(row)
        score = row["killed"] / max(1, row["mutants"] - row["equivalent"] - row["not checked"]
                                     - row["subprocess only"])
        print(f"| {module} | " + " | ".join(str(row[c]) for c in columns) + f" | {score:.1%} |")
    score = total["killed"] / max(1, total["mutants"] - total["equivalent"] - total["not checked"]
                                         - total["subprocess only"])
    print("| all | " + " | ".join(str(total[c]) for c in columns) + f" | {score:.1%} |")
    other = set(status.values()) - {"killed", "survived", "timeout", "no tests", "not checked"}
    if other:
        print(f"\nother states: {', '.join(sorted(other))}")
    if open_survivors:
        print(f"\n{len(open_survivors)} not killed and not listed in {EQUIVALENTS.relative_to(REPO)}:")
        for name, state in open_survivors:
            print(f"  {name}: {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
