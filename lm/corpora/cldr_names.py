"""English → other-language names from the CLDR (Unicode Common Locale Data Repository) data `babel` ships:
territories, languages, scripts, currencies, month and weekday names.

Each CLDR key (territory ``FR``, language ``de``, month ``3`` …) is one item and gives one pair. Names equal in
both languages (``France`` → ``France``) are real data and kept; ``names`` counts them.
"""

from __future__ import annotations

import babel
from babel import Locale
from babel.core import get_cldr_version

KINDS = ("territories", "languages", "scripts", "currencies", "months", "days")


def versions() -> dict[str, str]:
    """What the names depend on: the babel release and the CLDR release it ships."""
    return {"babel": babel.__version__, "cldr": str(get_cldr_version())}


def _names(locale: Locale, kind: str) -> dict:
    """The locale's names of one kind by CLDR key (months and weekdays: the wide format names)."""
    if kind == "months":
        return dict(locale.months["format"]["wide"])
    if kind == "days":
        return dict(locale.days["format"]["wide"])
    return dict(getattr(locale, kind))


def names(target_lang: str, kinds: tuple[str, ...] | None = None) -> tuple[dict[str, tuple[str, str]], dict[str, int]]:
    """``{"<kind>:<key>": (english name, target-language name)}`` for every key both locales name (non-empty),
    sorted, and counts: items per kind and how many names are identical in both languages."""
    english, other = Locale.parse("en"), Locale.parse(target_lang)
    items: dict[str, tuple[str, str]] = {}
    counts = {"identical": 0}
    for kind in kinds or KINDS:
        source, target = _names(english, kind), _names(other, kind)
        kept = 0
        for key in sorted(source.keys() & target.keys(), key=str):
            pair = (str(source[key]).strip(), str(target[key]).strip())
            if all(pair):
                items[f"{kind}:{key}"] = pair
                kept += 1
                counts["identical"] += pair[0] == pair[1]
        counts[kind] = kept
    return items, counts
