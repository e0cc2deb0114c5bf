"""The demo's collaboration in dp mode: two hospitals release cohort statistics under differential
privacy, with one budget for the whole collaboration that their agents enforce.

What it shows: ``explain`` states the cost (epsilon) and the expected 95 % error of every output
before anything runs; released cells carry their intervals; the rare diagnosis that threshold mode
suppresses is released here, with noise, because the groups come from a public domain; the
budget left after each query; and the owners' refusal once the budget is spent.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sealroom.app.cluster import DatasetSpec, PartySpec
from sealroom.app.demo_data import HOSPITALS, hospital_tables, write_parquet
from sealroom.policy import DatasetPolicy, PrivacyRule

# The collaboration may spend epsilon 2 in all, never more than 1 per query. Each patient is one row
# of a hospital's table, so one row and one group per patient bound every contribution.
REGISTRY_PRIVACY = PrivacyRule(
    mode="dp",
    epsilon_budget=2.0,
    scope="collaboration",
    max_query_epsilon=1.0,
    max_groups_per_unit=1,
    max_rows_per_unit=1,
)
DP_HOSPITALS = HOSPITALS[:2]


def registry_parties(data_dir: Path, base: DatasetPolicy) -> list[PartySpec]:
    """hospital_north and hospital_south, each with its stays in dp mode (``base`` plus
    :data:`REGISTRY_PRIVACY`)."""
    tables = {h: t for h, t in hospital_tables().items() if h in DP_HOSPITALS}
    paths = write_parquet(tables, data_dir, "stays")
    policy = dataclasses.replace(base, privacy=REGISTRY_PRIVACY)
    return [
        PartySpec(h, (DatasetSpec("stays", str(paths[h]), policy, "inpatient stays, one row per patient"),))
        for h in DP_HOSPITALS
    ]


STAYS = "(SELECT * FROM hospital_north.stays UNION ALL SELECT * FROM hospital_south.stays) s"
BY_DIAGNOSIS = f"""
SELECT diagnosis, COUNT(*) AS patients, AVG(length_of_stay) AS mean_stay
FROM {STAYS}
GROUP BY diagnosis
ORDER BY diagnosis"""
BY_AGE_BAND = f"""
SELECT age_band, COUNT(*) AS patients, SUM(length_of_stay) AS bed_days
FROM {STAYS}
GROUP BY age_band
ORDER BY age_band"""
