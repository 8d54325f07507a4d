"""The matrix products of a compiled XLA program, and the time they take alone.

`products(compiled.as_text())` lists every dot of a compiled module (inside fusions too)
with its operand shapes, dtypes and dimension numbers; `products_alone` times all of them
as one jitted program of `lax.dot_general`s with the same shapes and dimension numbers on
row-major operands, and nothing else (median of `repeats`). For a train step that time
is a floor under what the step can take with XLA's own product kernels on this device:
everything else it does comes on top. Used by `train_step.py` and
`profile_step.py`; no flags, so either can import it.
"""

from __future__ import annotations

import collections
import math
import re
import statistics
import time

import jax
import jax.numpy as jnp

_ARRAY = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\]")
_DOT = re.compile(r"\s*(?:ROOT )?%?[\w.\-]+ = \w+\[[\d,]*\]\S* "
                  r"dot\(%?([\w.\-]+), %?([\w.\-]+)\)(.*)")
_CALLED = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
# computations that run a number of times other than once: loop bodies and conditions,
# conditional branches
_REPEATED = re.compile(r"(?:body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16, "f64": jnp.float64}
_DIMS = ("lhs_batch_dims", "rhs_batch_dims", "lhs_contracting_dims", "rhs_contracting_dims")


def products(hlo: str) -> collections.Counter:
    """The dots of a compiled module's text, counted by (lhs dtype, lhs shape, rhs dtype,
    rhs shape, dimension numbers). Raises if one runs inside a loop or a conditional,
    where its count per step would not be one."""
    arrays, calls, dots, computation = {}, collections.defaultdict(set), [], None
    loops = set()
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            computation = line.split()[0].lstrip("%")
        calls[computation].update(_CALLED.findall(line))
        loops.update(_REPEATED.findall(line))
        for branches in _BRANCHES.findall(line):
            loops.update(b.strip().lstrip("%") for b in branches.split(","))
        if m := _ARRAY.match(line):
            arrays[m.group(1)] = (m.group(2), tuple(int(d) for d in m.group(3).split(",") if d))
        if m := _DOT.match(line):
            dots.append((computation, m))
    looped, todo = set(), list(loops)
    while todo:  # every computation that a loop or a conditional reaches
        name = todo.pop()
        if name not in looped:
            looped.add(name)
            todo.extend(calls[name])
    found = collections.Counter()
    for computation, m in dots:
        if computation in looped:
            raise ValueError(f"a dot runs inside a loop body or a conditional branch "
                             f"({computation}): its count per step is not one")
        found[(*arrays[m.group(1)], *arrays[m.group(2)], _dimension_numbers(m.group(3)))] += 1
    return found


def _dimension_numbers(attributes: str) -> tuple[tuple[int, ...], ...]:
    """(lhs batch, rhs batch, lhs contracting, rhs contracting) dims of a dot's attributes;
    HLO leaves out the empty ones."""
    numbers = []
    for name in _DIMS:
        m = re.search(rf"{name}={{([\d,]*)}}", attributes)
        numbers.append(tuple(int(d) for d in m.group(1).split(",") if d) if m else ())
    return tuple(numbers)


def median_s(fn, *args, repeats: int) -> float:
    """Median seconds of `repeats` calls of fn(*args), after one untimed call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def products_alone(found: collections.Counter, repeats: int) -> dict:
    """Every product of `found`, each as often as it is counted, on operands of its own
    (so that none is computed once for two), as one jitted program of nothing else:
    XLA runs them with the same kernels and threads as in the step, without the dispatch
    of separate calls. Returns the program's median time and the products' FLOPs."""
    operands, numbers, flops = [], [], 0
    key = jax.random.PRNGKey(0)
    for (dtype, lhs_shape, _, rhs_shape, (lb, rb, lc, rc)), count in found.items():
        for _ in range(count):  # the step's operands share its dtype (the lhs's)
            key, lhs_key, rhs_key = jax.random.split(key, 3)
            lhs = jax.random.normal(lhs_key, lhs_shape, _DTYPES[dtype])
            rhs = jax.random.normal(rhs_key, rhs_shape, _DTYPES[dtype])
            operands.append((lhs, rhs))
            numbers.append(((lc, rc), (lb, rb)))
            out = jax.eval_shape(lambda a, b, n=numbers[-1]: jax.lax.dot_general(a, b, n),
                                 lhs, rhs).shape
            flops += 2 * math.prod(lhs_shape[d] for d in lc) * math.prod(out)
    program = jax.jit(lambda pairs: [jax.lax.dot_general(a, b, n)
                                     for (a, b), n in zip(pairs, numbers)])
    return {"products": len(operands), "distinct_products": len(found),
            "products_gflop": flops / 1e9,
            "products_alone_ms": 1e3 * median_s(program, operands, repeats=repeats)}
