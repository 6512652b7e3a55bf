"""Mutations for the fuzzers of tests/test_hostile_fuzz.py: JSON-level (a value replaced by a hostile one, a key
dropped or added, a subtree nested thousands deep, a key written twice) and byte-level (flips, cuts, insertions,
repeats), drawn from a seeded random.Random so that every run makes the same cases. And a runner that bounds each
case's time and sorts the outcomes."""

import copy
import json
import random
import signal
import time
from collections import Counter
from collections.abc import Callable

from qwen2audio.errors import Qwen2AudioError

HOSTILE = [None, True, False, 0, -1, 1, 3, 2**31, 2**53 + 1, 2**63, 2**64, -2**63, 1.5, -0.0, 1e308, float("inf"),
           float("-inf"), float("nan"), "", "x", "0", "151646", "1e5", "F32", "BF16", "I8", "../x", "/etc/passwd",
           "a" * 5000, "\u0000", "<|AUDIO|>", [], [0], [1, 2], [0, 2**64], [-1, 4], [[1]], {}, {"a": 1},
           {"content": 5}, "__DEEP__"]
DEEP = "__DEEP__"  # dump() writes it as a list nested thousands deep


def _nodes(obj: object, path: tuple = ()) -> list[tuple]:
    """Every (path) to a value inside obj, obj itself included."""
    found = [path]
    if isinstance(obj, dict):
        for k, v in obj.items():
            found += _nodes(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += _nodes(v, path + (i,))
    return found


def _set(obj: object, path: tuple, value: object) -> object:
    if not path:
        return value
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return obj


def mutate_json(obj: object, rng: random.Random, edits: int = 0) -> object:
    """obj with 1-3 edits at random places: a hostile value, a key dropped, a key added, a value wrapped."""
    obj = copy.deepcopy(obj)
    for _ in range(edits or rng.randint(1, 3)):
        path = rng.choice(_nodes(obj))
        op = rng.random()
        target = obj
        for key in path:
            target = target[key]
        if op < 0.55:
            obj = _set(obj, path, copy.deepcopy(rng.choice(HOSTILE)))
        elif op < 0.7 and path:
            parent = obj
            for key in path[:-1]:
                parent = parent[key]
            del parent[path[-1]]
        elif op < 0.85 and isinstance(target, dict):
            target[rng.choice(["", "x", "__metadata__", "dtype", "shape", "data_offsets", "weight_map", "content"])] = \
                copy.deepcopy(rng.choice(HOSTILE))
        else:
            obj = _set(obj, path, rng.choice([[copy.deepcopy(target)], {"v": copy.deepcopy(target)}, str(target)[:50]]))
    return obj


def dump(obj: object, rng: random.Random) -> bytes:
    """JSON text of obj (NaN and Infinity as Python writes them), DEEP made a list nested 1-5000 deep, and
    sometimes one key written twice."""
    text = json.dumps(obj)
    depth = rng.choice([2, 50, 1000, 5000])
    text = text.replace(json.dumps(DEEP), "[" * depth + "]" * depth)
    if rng.random() < 0.05 and text.startswith('{"'):
        first = text[1:].split(",", 1)[0].rstrip("}")
        text = "{" + first + ", " + text[1:]
    return text.encode()


def mutate_bytes(raw: bytes, rng: random.Random) -> bytes:
    """raw with 1-4 byte-level edits."""
    data = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        op, at = rng.random(), rng.randrange(len(data) + 1)
        if op < 0.4 and data:
            data[min(at, len(data) - 1)] = rng.randrange(256)
        elif op < 0.55:
            del data[at:]
        elif op < 0.7:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op < 0.85:
            del data[at:at + rng.randint(1, 64)]
        else:
            data[at:at] = data[at:at + rng.randint(1, 64)]
    return bytes(data)


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def run_cases(n: int, seed: int, make_case: Callable[[random.Random], Callable[[], object]],
              limit_s: float = 5.0) -> dict:
    """Run n cases (each a call made by make_case from the seeded generator) under a per-case time bound (a
    SIGALRM that raises Hang); returns counts of outcomes, the foreign exceptions, hangs, and timings."""
    rng, outcomes, foreign, slowest = random.Random(seed), Counter(), [], 0.0
    previous = signal.signal(signal.SIGALRM, _alarm)
    start = time.perf_counter()
    try:
        for i in range(n):
            call = make_case(rng)
            began = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, limit_s)
            try:
                call()
                outcomes["accepted"] += 1
            except Qwen2AudioError as e:
                outcomes[type(e).__name__] += 1
            except Hang:
                outcomes["hang"] += 1
                foreign.append((i, "hang"))
            except Exception as e:  # what the fuzzers look for: anything that is not ours
                outcomes["foreign"] += 1
                foreign.append((i, f"{type(e).__name__}: {str(e)[:200]}"))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            slowest = max(slowest, time.perf_counter() - began)
    finally:
        signal.signal(signal.SIGALRM, previous)
    return {"cases": n, "outcomes": dict(outcomes), "foreign": foreign, "seconds": time.perf_counter() - start,
            "slowest_case_s": slowest}
