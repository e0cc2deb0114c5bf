"""Seeded synthetic data for the demo scenarios (generated in code, written as Parquet).

Banks: three banks hold exposures for overlapping customers (a shared customer id), with the
customer's segment and internal rating; three corporate customers rated CCC are shared by all
three banks, so that cell is too small to release; six private-banking customers are shared too,
one of whom dominates that cell's exposure.

Hospitals: three hospitals hold patient stays (age, diagnosis group, length of stay, cost); one rare
diagnosis occurs in only a few patients across all sites, so it is suppressed.
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SEGMENTS = ("retail", "sme", "corporate")
RATINGS = ("A", "B", "C")
BANKS = ("bank_a", "bank_b", "bank_c")
HOSPITALS = ("hospital_north", "hospital_south", "hospital_east")
DIAGNOSES = ("cardiology", "oncology", "orthopedics", "respiratory")
RARE_DIAGNOSIS = "prion_disease"
AGE_BANDS = ("0-39", "40-64", "65+")


def bank_tables(*, customers: int = 3000, seed: int = 7) -> dict[str, pa.Table]:
    """One row per customer a bank serves: its total exposure, loan count and default flag."""
    rng = random.Random(seed)
    profile = {}
    for cid in range(100_000, 100_000 + customers):
        segment = rng.choices(SEGMENTS, weights=(6, 3, 1))[0]
        rating = rng.choices(RATINGS, weights=(5, 4, 2))[0]
        profile[cid] = (segment, rating)
    # Three corporate customers rated CCC, served by all three banks: a cell too small to release.
    rare = list(range(900_000, 900_003))
    for cid in rare:
        profile[cid] = ("corporate", "CCC")
    # Six private-banking customers shared by all banks, one of whom holds almost all the exposure:
    # enough customers for the minimum group size, but dominated by one (the dominance rule).
    private = list(range(950_000, 950_006))
    for cid in private:
        profile[cid] = ("private", "A")
    rare += private
    out = {}
    for b, bank in enumerate(BANKS):
        brng = random.Random(seed * 100 + b)
        cols: dict[str, list] = {k: [] for k in ("customer_id", "segment", "rating", "exposure", "loans", "defaulted")}
        for cid, (segment, rating) in profile.items():
            if cid not in rare and brng.random() >= 0.8:
                continue  # each bank serves a large, overlapping subset of customers
            scale = {"retail": 20_000, "sme": 250_000, "corporate": 2_000_000, "private": 100_000}[segment]
            if cid == private[0]:
                scale = 400_000_000  # the dominant private-banking customer
            pd_rate = {"A": 0.01, "B": 0.04, "C": 0.12, "CCC": 0.35}[rating]
            loans = brng.choice((1, 1, 1, 2, 3))
            cols["customer_id"].append(cid)
            cols["segment"].append(segment)
            cols["rating"].append(rating)
            cols["exposure"].append(round(sum(brng.lognormvariate(0, 0.6) for _ in range(loans)) * scale, 2))
            cols["loans"].append(loans)
            cols["defaulted"].append(1 if brng.random() < pd_rate else 0)
        out[bank] = pa.table(
            {
                "customer_id": pa.array(cols["customer_id"], pa.int64()),
                "segment": pa.array(cols["segment"], pa.string()),
                "rating": pa.array(cols["rating"], pa.string()),
                "exposure": pa.array(cols["exposure"], pa.float64()),
                "loans": pa.array(cols["loans"], pa.int32()),
                "defaulted": pa.array(cols["defaulted"], pa.int32()),
            }
        )
    return out


def hospital_tables(*, patients: int = 2500, seed: int = 11) -> dict[str, pa.Table]:
    out = {}
    for h, hospital in enumerate(HOSPITALS):
        rng = random.Random(seed * 10 + h)
        cols: dict[str, list] = {
            k: [] for k in ("patient_id", "age", "age_band", "diagnosis", "length_of_stay", "cost")
        }
        n = patients + 500 * h
        for i in range(n):
            diagnosis = rng.choices(DIAGNOSES, weights=(4, 3, 3, 2))[0]
            age = max(0, min(99, int(rng.gauss({"cardiology": 67, "oncology": 61}.get(diagnosis, 50), 15))))
            los = max(1, int(rng.expovariate(1 / {"oncology": 9, "cardiology": 6}.get(diagnosis, 4))))
            cols["patient_id"].append(f"{hospital[9].upper()}{i:06d}")
            cols["age"].append(age)
            cols["age_band"].append(age_band(age))
            cols["diagnosis"].append(diagnosis)
            cols["length_of_stay"].append(los)
            cols["cost"].append(round(los * rng.uniform(800, 1600), 2))
        if h < 2:  # two patients with a rare diagnosis, at two sites
            cols["patient_id"].append(f"{hospital[9].upper()}999999")
            cols["age"].append(45 + h)
            cols["age_band"].append(age_band(45 + h))
            cols["diagnosis"].append(RARE_DIAGNOSIS)
            cols["length_of_stay"].append(21)
            cols["cost"].append(64_000.0)
        # Every field is required (NOT NULL): an MPC stage then opens a cell's count with its sums
        # and divides in the clear, instead of dividing in fixed point inside the MPC.
        types = {
            "patient_id": pa.string(),
            "age": pa.int32(),
            "age_band": pa.string(),
            "diagnosis": pa.string(),
            "length_of_stay": pa.int32(),
            "cost": pa.float64(),
        }
        out[hospital] = pa.table(
            [pa.array(cols[name], t) for name, t in types.items()],
            schema=pa.schema([pa.field(name, t, nullable=False) for name, t in types.items()]),
        )
    return out


def age_band(age: int) -> str:
    return AGE_BANDS[0] if age < 40 else AGE_BANDS[1] if age < 65 else AGE_BANDS[2]


def write_parquet(tables: dict[str, pa.Table], directory: Path, dataset: str) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for party, table in tables.items():
        path = directory / f"{party}.{dataset}.parquet"
        pq.write_table(table, path)
        paths[party] = path
    return paths
