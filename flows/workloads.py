"""The work the paid agents do in these flows: small, real, and standard library only.

Nothing here knows about payments. The flows call these functions inside their
billable steps, so what an agent is paid for is real computation with a
measurable result (an accuracy, a validation verdict, a scored shard), seeded so
every run of a flow gives the same numbers.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import random
import statistics
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

Point = tuple[float, float]


class InjectedFailure(RuntimeError):
    """Raised where the user asked for a failure (``--fail_at``, ``--fail_shards``)."""


def fail_if_asked(step: str, fail_at: Iterable[str]) -> None:
    if step in set(fail_at):
        raise InjectedFailure(f"failure injected in step {step!r} (--fail_at {step})")


def parse_fail_at(text: str, allowed: Sequence[str]) -> list[str]:
    """``"train,deploy"`` -> ``["train", "deploy"]``, each one a step the flow can fail."""
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(
            f"--fail_at names {', '.join(unknown)}; failures can be injected in: {', '.join(allowed)}"
        )
    return names


def parse_shard_list(text: str, num_shards: int) -> list[int]:
    """``"3,7"`` -> ``[3, 7]``: shard indices (0-based) that exist in this run."""
    out = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or int(part) >= num_shards:
            raise ValueError(
                f"--fail_shards: {part!r} is not a shard of this run (shards are 0 to {num_shards - 1})"
            )
        out.append(int(part))
    return sorted(set(out))


# ---------------------------------------------------------------------------------------
# A classifier: logistic regression by gradient descent on two Gaussian blobs.


def make_blobs(n: int, seed: int, spread: float = 1.0) -> list[tuple[Point, int]]:
    """``n`` labelled points: class 0 around (-1, -1), class 1 around (1, 1)."""
    rng = random.Random(seed)
    data = []
    for i in range(n):
        label = i % 2
        centre = 1.0 if label else -1.0
        data.append(((rng.gauss(centre, spread), rng.gauss(centre, spread)), label))
    rng.shuffle(data)
    return data


def split(data: Sequence, holdout: float = 0.3) -> tuple[list, list]:
    cut = int(len(data) * (1 - holdout))
    return list(data[:cut]), list(data[cut:])


@dataclass(frozen=True)
class Model:
    w1: float
    w2: float
    b: float

    def probability(self, x: Point) -> float:
        z = self.w1 * x[0] + self.w2 * x[1] + self.b
        return 1.0 / (1.0 + math.exp(-max(min(z, 30.0), -30.0)))

    def predict(self, x: Point) -> int:
        return int(self.probability(x) >= 0.5)

    def to_dict(self) -> dict:
        return {"w1": self.w1, "w2": self.w2, "b": self.b}

    @classmethod
    def from_dict(cls, weights: Mapping[str, float]) -> "Model":
        return cls(weights["w1"], weights["w2"], weights["b"])


def fit_logistic(data: Sequence[tuple[Point, int]], epochs: int = 200, rate: float = 0.5) -> Model:
    """Batch gradient descent on the log loss."""
    w1 = w2 = b = 0.0
    n = len(data)
    for _ in range(epochs):
        g1 = g2 = gb = 0.0
        model = Model(w1, w2, b)
        for (x1, x2), y in data:
            err = model.probability((x1, x2)) - y
            g1 += err * x1
            g2 += err * x2
            gb += err
        w1 -= rate * g1 / n
        w2 -= rate * g2 / n
        b -= rate * gb / n
    return Model(w1, w2, b)


def accuracy(model: Model, data: Sequence[tuple[Point, int]]) -> float:
    return sum(model.predict(x) == y for x, y in data) / len(data)


def model_bundle(model: Model, version: str) -> dict:
    """What "deploying" the model produces: its weights, a version and a checksum."""
    body = json.dumps({"version": version, "weights": model.to_dict()}, sort_keys=True)
    return {"version": version, "weights": model.to_dict(),
            "sha256": hashlib.sha256(body.encode()).hexdigest()}


def load_bundle(bundle: Mapping) -> Model:
    body = json.dumps({"version": bundle["version"], "weights": bundle["weights"]}, sort_keys=True)
    if hashlib.sha256(body.encode()).hexdigest() != bundle["sha256"]:
        raise ValueError("model bundle checksum does not match its contents")
    return Model.from_dict(bundle["weights"])


# ---------------------------------------------------------------------------------------
# A data delivery: a CSV checked against a schema and a null-rate limit.

NULLS = frozenset({"", "na", "n/a", "null", "none"})
_CASTS = {"int": int, "float": float, "str": str}


class DeliveryRejected(ValueError):
    """The delivered CSV cannot be used: missing, unreadable, or not the agreed schema."""


@dataclass(frozen=True)
class Delivery:
    rows: list
    null_cells: int
    cells: int

    @property
    def null_rate(self) -> float:
        return self.null_cells / self.cells if self.cells else 0.0


def read_delivery(text: str, schema: Mapping[str, str], source: str) -> Delivery:
    """Parse ``text`` as CSV with ``schema`` (column -> int|float|str); nulls are allowed,
    wrong types and missing columns are not."""
    unknown = {t for t in schema.values() if t not in _CASTS}
    if unknown:
        raise ValueError(f"schema types must be int, float or str, got {sorted(unknown)}")
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    missing = [c for c in schema if c not in header]
    if missing:
        raise DeliveryRejected(
            f"schema error in {source}: missing column(s) {', '.join(missing)} (header: {', '.join(header)})"
        )
    rows, nulls = [], 0
    for line, raw in enumerate(reader, start=2):
        row = {}
        for column, kind in schema.items():
            value = (raw.get(column) or "").strip()
            if value.lower() in NULLS:
                row[column] = None
                nulls += 1
                continue
            try:
                row[column] = _CASTS[kind](value)
            except ValueError:
                raise DeliveryRejected(
                    f"schema error in {source} line {line}: column {column} should be {kind}, got {value!r}"
                ) from None
        rows.append(row)
    if not rows:
        raise DeliveryRejected(f"{source} has a header but no rows")
    return Delivery(rows=rows, null_cells=nulls, cells=len(rows) * len(schema))


# ---------------------------------------------------------------------------------------
# Batch scoring: synthetic transactions scored with a fixed risk model.

RISK_WEIGHTS = {"amount": 0.004, "night": 1.3, "new_account": 1.1, "bias": -2.5}


def make_transactions(shard: int, rows: int, seed: int) -> list[dict]:
    rng = random.Random(seed * 100_003 + shard)
    return [
        {
            "id": f"tx-{shard:04d}-{i:05d}",
            "amount": round(rng.lognormvariate(4.0, 1.0), 2),
            "night": rng.random() < 0.2,
            "new_account": rng.random() < 0.1,
        }
        for i in range(rows)
    ]


def risk(tx: Mapping) -> float:
    z = (RISK_WEIGHTS["bias"] + RISK_WEIGHTS["amount"] * tx["amount"]
         + RISK_WEIGHTS["night"] * tx["night"] + RISK_WEIGHTS["new_account"] * tx["new_account"])
    return 1.0 / (1.0 + math.exp(-z))


def score_shard(transactions: Sequence[Mapping], threshold: float = 0.5) -> dict:
    """Score every row; the shard's result is its flagged rows and score statistics."""
    scores = [risk(tx) for tx in transactions]
    flagged = [tx["id"] for tx, s in zip(transactions, scores) if s >= threshold]
    return {
        "rows": len(scores),
        "flagged": flagged,
        "mean_risk": round(statistics.fmean(scores), 6),
        "max_risk": round(max(scores), 6),
    }
