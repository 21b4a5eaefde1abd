"""Relative time in what people say, resolved against when they said it.

"I went there yesterday", said on 8 May 2023, becomes "I went there yesterday (7 May 2023)": the
original words stay (they read naturally), the absolute date is written next to them so the
memory is true out of context and a search for "7 May 2023" or "May 2023" finds it.
"""

from __future__ import annotations

import calendar
import re
from datetime import date, datetime, timedelta

WEEKDAYS = {name.lower(): i for i, name in enumerate(calendar.day_name)}
NUMBERS = {
    "a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
    "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "couple of": 2,
    "a couple of": 2, "few": 3, "a few": 3,
}  # fmt: skip
_NUMBER = r"(?P<n>\d+|" + "|".join(sorted(NUMBERS, key=len, reverse=True)) + ")"
_WEEKDAY = "(?P<wd>" + "|".join(WEEKDAYS) + ")"

PATTERNS: list[tuple[str, str]] = [
    ("day_before_yesterday", r"the day before yesterday"),
    ("yesterday", r"yesterday|last night"),
    ("today", r"today|tonight|this morning|this afternoon|this evening"),
    ("tomorrow", r"tomorrow"),
    ("ago", _NUMBER + r"\s+(?P<unit>day|week|month|year)s?\s+ago"),
    ("last_weekend", r"(?:last|this past) weekend"),
    ("last_weekday", r"(?:last|this past) " + _WEEKDAY),
    ("next_weekday", r"next " + _WEEKDAY),
    ("last_unit", r"(?:last|past) (?P<unit>week|month|year)"),
    ("this_unit", r"this (?P<unit>week|month|year)"),
    ("next_unit", r"next (?P<unit>week|month|year)"),
    ("in_units", r"in " + _NUMBER + r"\s+(?P<unit>day|week|month|year)s?"),
]
_COMPILED = {name: re.compile(pattern, re.IGNORECASE) for name, pattern in PATTERNS}
# One scanner over all kinds (inner group names removed: they repeat across kinds); each hit is
# then parsed by its own kind's pattern.
_NAMED_GROUP = re.compile(r"\(\?P<\w+>")
_SCANNER = re.compile(
    "|".join(
        f"(?P<{name}>\\b(?:{_NAMED_GROUP.sub('(?:', pattern)})\\b)" for name, pattern in PATTERNS
    ),
    re.IGNORECASE,
)


def fmt_day(d: date) -> str:
    return f"{d.day} {calendar.month_name[d.month]} {d.year}"


def fmt_month(d: date) -> str:
    return f"{calendar.month_name[d.month]} {d.year}"


def week_of(d: date) -> str:
    return f"the week of {fmt_day(d - timedelta(days=d.weekday()))}"


def add_months(d: date, months: int) -> date:
    month = d.month - 1 + months
    year = d.year + month // 12
    month = month % 12 + 1
    return date(year, month, min(d.day, calendar.monthrange(year, month)[1]))


def _shift(d: date, n: int, unit: str) -> str:
    """``n`` units after ``d`` (before if negative), at the precision the unit implies."""
    if unit == "day":
        return fmt_day(d + timedelta(days=n))
    if unit == "week":
        return week_of(d + timedelta(weeks=n))
    if unit == "month":
        return fmt_month(add_months(d, n))
    return str(d.year + n)


def _resolve(kind: str, groups: dict[str, str | None], d: date) -> str:
    unit = (groups.get("unit") or "").lower()
    n_text = (groups.get("n") or "").lower()
    n = int(n_text) if n_text.isdigit() else NUMBERS.get(n_text, 1)
    weekday = WEEKDAYS.get((groups.get("wd") or "").lower(), 0)
    if kind == "day_before_yesterday":
        return fmt_day(d - timedelta(days=2))
    if kind == "yesterday":
        return fmt_day(d - timedelta(days=1))
    if kind == "today":
        return fmt_day(d)
    if kind == "tomorrow":
        return fmt_day(d + timedelta(days=1))
    if kind == "ago":
        return _shift(d, -n, unit)
    if kind == "in_units":
        return _shift(d, n, unit)
    if kind == "last_weekend":
        saturday = d - timedelta(days=(d.weekday() - 5) % 7 or 7)
        return f"the weekend of {fmt_day(saturday)}"
    if kind == "last_weekday":
        return fmt_day(d - timedelta(days=(d.weekday() - weekday) % 7 or 7))
    if kind == "next_weekday":
        return fmt_day(d + timedelta(days=(weekday - d.weekday()) % 7 or 7))
    offset = {"last_unit": -1, "this_unit": 0, "next_unit": 1}[kind]
    return _shift(d, offset, unit)


def resolve(text: str, at: datetime | date) -> tuple[str, list[str]]:
    """Annotate every relative time expression in ``text`` with its absolute date.

    Returns the annotated text and the absolute dates found, in order of appearance.
    """
    day = at.date() if isinstance(at, datetime) else at
    found: list[str] = []

    def annotate(match: re.Match[str]) -> str:
        kind = match.lastgroup or ""
        parsed = _COMPILED[kind].fullmatch(match.group(0))
        groups = {k: v for k, v in parsed.groupdict().items() if v is not None} if parsed else {}
        absolute = _resolve(kind, groups, day)
        found.append(absolute)
        return f"{match.group(0)} ({absolute})"

    return _SCANNER.sub(annotate, text), found
