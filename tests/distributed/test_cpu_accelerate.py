"""cpu_accelerate.py runs a copy of accelerate's FSDP-adoption branch: fail when the real one changes.

The FSDP2 Trainer tests only mean something while the copy does what accelerate does on a GPU.
This reads the installed accelerate's ``AcceleratorState.__init__``, finds the branch that
adopts the FSDP plugin and compares it, statement by statement (as syntax trees), with
``cpu_accelerate.ADOPTION_BRANCH``; and checks that MULTI_CPU is still outside the list that
guards it (if accelerate admits it one day, the lift is unneeded and should go).
"""

from __future__ import annotations

import ast
import inspect
import textwrap

from tests.distributed.cpu_accelerate import ADOPTION_BRANCH


def _init_tree() -> ast.Module:
    from accelerate.state import AcceleratorState

    return ast.parse(textwrap.dedent(inspect.getsource(AcceleratorState.__init__)))


def _adopts_fsdp(stmt: ast.stmt) -> bool:
    return (isinstance(stmt, ast.Assign) and ast.unparse(stmt.targets[0]) == "self.distributed_type"
            and ast.unparse(stmt.value) == "DistributedType.FSDP")


def _adoption_branches(tree: ast.Module) -> list[list[ast.stmt]]:
    return [node.body for node in ast.walk(tree) if isinstance(node, ast.If)
            and any(_adopts_fsdp(s) for s in node.body)]


def _dump(stmts) -> list[str]:
    return [ast.dump(s, annotate_fields=False) for s in stmts]


def test_the_copied_branch_is_accelerates():
    branches = _adoption_branches(_init_tree())
    assert len(branches) == 1, f"accelerate now adopts FSDP in {len(branches)} places: re-read state.py"
    assert _dump(branches[0]) == _dump(ast.parse(ADOPTION_BRANCH).body), (
        "accelerate's FSDP-adoption branch changed shape:\n" + "\n".join(map(ast.unparse, branches[0])))


def test_multi_cpu_is_still_left_out():
    """The guard of the adoption branch lists the multi-device types; MULTI_CPU is not among them."""
    tree = _init_tree()
    guards = [node for node in ast.walk(tree) if isinstance(node, ast.If)
              and any(any(_adopts_fsdp(s) for s in ast.walk(inner) if isinstance(s, ast.stmt))
                      for inner in node.body)
              and "DistributedType.MULTI_GPU" in ast.unparse(node.test)]
    assert guards, "the MULTI_GPU / ... list guarding FSDP adoption is gone: re-read accelerate's state.py"
    assert all("MULTI_CPU" not in ast.unparse(g.test) for g in guards), (
        "accelerate adopts FSDP on MULTI_CPU itself now: tests/distributed/cpu_accelerate.py can go")
