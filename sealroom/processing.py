"""The record of processing (GDPR Article 30) that a data owner declares per dataset in ``[processing]``.

It is part of the dataset policy, so of its digest and of every plan the owner signs; it is public
like the rest of the policy and never enters the transparency log (whose entries hold only the
policy digest). :mod:`sealroom.audit.ropa` renders it for a compliance reviewer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sealroom.config import check_keys, key_error

# The record of processing (GDPR Article 30) that an owner declares per dataset in ``[processing]``.
# Lawful bases: Article 6(1)(a)-(f).
LEGAL_BASES = ("consent", "contract", "legal_obligation", "vital_interests", "public_task", "legitimate_interests")
# Special categories (Article 9(1)) and criminal convictions and offences (Article 10).
SPECIAL_CATEGORIES = (
    "racial_or_ethnic_origin",
    "political_opinions",
    "religious_or_philosophical_beliefs",
    "trade_union_membership",
    "genetic",
    "biometric",
    "health",
    "sex_life_or_sexual_orientation",
    "criminal_convictions",
)
# The conditions of Article 9(2)(a)-(j) that allow processing special categories.
SPECIAL_CATEGORY_CONDITIONS = (
    "explicit_consent",
    "employment_and_social_security",
    "vital_interests",
    "not_for_profit_body",
    "made_public_by_subject",
    "legal_claims",
    "substantial_public_interest",
    "health_or_social_care",
    "public_health",
    "archiving_research_or_statistics",
)
MAX_PROCESSING_TEXT = 500  # characters of one declared text (a controller's name, a category, ...)
_PURPOSE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-")


def is_purpose(value: Any) -> bool:
    """A purpose identifier: 1-100 letters, digits and ``_ . : -``, starting with a letter or digit."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= 100
        and value[0].isascii()
        and value[0].isalnum()
        and set(value) <= _PURPOSE_CHARS
    )


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip()) and len(value) <= MAX_PROCESSING_TEXT


@dataclass(frozen=True)
class ProcessingRecord:
    """What the owner declares about this dataset for the record of processing (GDPR Article 30):
    the purposes it may be used for (identifiers a collaboration names), the lawful basis, the
    categories of data subjects and of personal data, any special categories with the Article 9(2)
    condition that allows them, the retention of the source data, and who the controller is.

    It is part of the policy, so of its digest and of every plan the owner signs; a policy without
    ``[processing]`` reads and hashes as before. It is public like the rest of the policy, and never
    enters the transparency log (whose entries hold only the policy digest).
    """

    purposes: tuple[str, ...]
    legal_basis: str
    data_subjects: tuple[str, ...]
    personal_data: tuple[str, ...]
    special_categories: tuple[str, ...] = ()
    special_category_condition: str | None = None
    retention: str | None = None
    controller: str | None = None
    contact: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "purposes": list(self.purposes),
            "legal_basis": self.legal_basis,
            "data_subjects": list(self.data_subjects),
            "personal_data": list(self.personal_data),
        }
        if self.special_categories:
            out["special_categories"] = list(self.special_categories)
            out["special_category_condition"] = self.special_category_condition
        for key in ("retention", "controller", "contact"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_dict(cls, doc: Any, *, source: str, prefix: str) -> ProcessingRecord:
        if not isinstance(doc, Mapping):
            raise key_error(
                source, prefix.rstrip("."), 'a table [processing] with purposes = [...], legal_basis = "..."'
            )
        check_keys(doc, _PROCESSING_KEYS, source=source, prefix=prefix)
        purposes = _purposes(doc.get("purposes"), source=source, prefix=prefix)
        basis = doc.get("legal_basis")
        if basis not in LEGAL_BASES:
            raise key_error(source, f"{prefix}legal_basis", f"one of {', '.join(LEGAL_BASES)} (GDPR Article 6(1))")
        lists: dict[str, tuple[str, ...]] = {}
        for key, what in (("data_subjects", "data subjects"), ("personal_data", "personal data")):
            value = doc.get(key)
            if not isinstance(value, list) or not value or not all(_text(v) for v in value):
                raise key_error(
                    source,
                    f"{prefix}{key}",
                    f"a non-empty list of categories of {what} (non-empty strings of at most "
                    f"{MAX_PROCESSING_TEXT} characters)",
                )
            lists[key] = tuple(value)
        special = doc.get("special_categories", [])
        if (
            not isinstance(special, list)
            or not all(c in SPECIAL_CATEGORIES for c in special)
            or len(set(special)) != len(special)
        ):
            raise key_error(
                source,
                f"{prefix}special_categories",
                "a list of distinct special categories (GDPR Articles 9 and 10) drawn from "
                + ", ".join(SPECIAL_CATEGORIES),
            )
        condition = doc.get("special_category_condition")
        if special and condition not in SPECIAL_CATEGORY_CONDITIONS:
            raise key_error(
                source,
                f"{prefix}special_category_condition",
                f"one of {', '.join(SPECIAL_CATEGORY_CONDITIONS)} (GDPR Article 9(2)), since special_categories "
                "is not empty",
            )
        if not special and condition is not None:
            raise key_error(source, f"{prefix}special_category_condition", "left out: special_categories is empty")
        texts: dict[str, str | None] = {}
        for key in ("retention", "controller", "contact"):
            value = doc.get(key)
            if value is not None and not _text(value):
                raise key_error(
                    source, f"{prefix}{key}", f"a non-empty string of at most {MAX_PROCESSING_TEXT} characters"
                )
            texts[key] = value
        return cls(
            purposes=purposes,
            legal_basis=basis,
            data_subjects=lists["data_subjects"],
            personal_data=lists["personal_data"],
            special_categories=tuple(sorted(special, key=SPECIAL_CATEGORIES.index)),
            special_category_condition=condition,
            retention=texts["retention"],
            controller=texts["controller"],
            contact=texts["contact"],
        )


_PROCESSING_KEYS = {
    "purposes", "legal_basis", "data_subjects", "personal_data", "special_categories",
    "special_category_condition", "retention", "controller", "contact",
}  # fmt: skip


def _purposes(purposes: object, *, source: str, prefix: str) -> tuple[str, ...]:
    if (
        not isinstance(purposes, list)
        or not purposes
        or not all(is_purpose(p) for p in purposes)
        or len(set(purposes)) != len(purposes)
    ):
        raise key_error(
            source,
            f"{prefix}purposes",
            "a non-empty list of distinct purpose identifiers (letters, digits and _ . : -, e.g. "
            '"credit_risk_statistics"): the purposes a collaboration may use this dataset for',
        )
    return tuple(purposes)
