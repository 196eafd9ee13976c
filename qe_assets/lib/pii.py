"""PII redaction before export: e-mail addresses, phone numbers, Chinese resident ID numbers, bank
card numbers and IP addresses become typed placeholders, vectorised in Polars.

Why not a library: `presidio-analyzer` analyses one text at a time in Python, needs a spaCy model
that is not on the package index we may use, and knows neither Chinese resident IDs nor CN mobile
formats. Careful patterns plus checksum validation cover what reaches our datasets.

How it works, per kind (see `_PASSES` for the order): the text is cut into tokens with one regex
whose first alternative is the candidate pattern and whose other alternatives tile the rest of
the text (so the tokens concatenate back to the original, byte for byte). Rust's regex has no
look-around; the tiling gives the boundaries instead: a fallback alternative swallows a whole
digit (or alphanumeric) run whenever no candidate starts at its first character, so a candidate
never starts inside a longer number, and a candidate followed by a digit token is rejected. Each
candidate token is validated with Polars expressions over its characters (ISO 7064 MOD 11-2 for
resident IDs, Luhn for cards, octet ranges and group counts for IPs) and only valid ones are
replaced; everything else is joined back unchanged.

Decisions (the false positives and negatives we accept):

* **E-mail**: ASCII domain; the local part is quoted (`"alice"@…`), or letters, digits and
  `._%+-` of any script but Han (`josé@…`), or one to four Han characters (`张三@…`). Chinese
  text runs into an address without a space, so up to four Han characters before an `@` may be
  swallowed with it (`我的邮箱是张三@…` → `我的邮[EMAIL]`); a Han character after the domain is
  not. Non-ASCII domains are not detected.
* **Phone**: CN mobile `1[3-9]` + 9 digits, optionally `+86`/`0086`/`(+86)` and grouped 3-4-4 by
  spaces, dashes or dots; US numbers with the area code in parentheses (`(415) 555-0132`);
  international numbers with a leading `+` (E.164-ish, 8-15 digits, groups separated by space,
  dash or dot, an area code in parentheses allowed). Domestic landlines (`010-12345678`) and
  bare `415-555-0132` are not detected: without a prefix they are indistinguishable from order
  numbers and dates.
* **CN_ID**: 18 characters, contiguous or grouped 6-8-4 by spaces or dashes, with a valid
  province code (11-15, 21-23, 31-37, 41-46, 50-54, 61-65, 71, 81-83, 91), birth date
  18xx-20xx with month 01-12 and day 01-31, and the MOD 11-2 check character (`X`/`x`
  allowed). Legacy 15-digit IDs have no checksum: they are
  detected by province code and YYMMDD shape alone, so about 1 in 300 random 15-digit numbers
  with a plausible prefix is redacted too. We accept that.
* **CARD**: 13-19 digits, contiguous or grouped (4-4-4-4[-1..4] by space, dash, dot or slash;
  Amex 4-6-5, UnionPay 6-13 by space or dash), not starting with 0, not followed by `X` (that
  is an ID with a wrong check character), Luhn-valid. Luhn passes 1 in 10 random numbers, so an
  order number of card length that happens to be Luhn-valid is redacted; order numbers that
  fail Luhn are kept.
* **IP**: IPv4 is four dot-separated octets 0-255 without leading zeros. A bare `1.2.3.4` is
  indistinguishable from a four-part version number and *is* redacted (a leaked address costs more
  than a hidden version); `v1.2.3.4` (a letter right before), three-part versions, dates like
  `2024.01.15` and longer dotted runs (`1.2.3.4.5`) are kept. IPv6: full or `::`-compressed form,
  optionally with an IPv4 tail, with at least one digit and four hex digits (or exactly `::1`), so
  `std::vector`, `A::B`, MAC addresses and times are kept.
* **Full-width digits** (`１３８１２３４５６７８`, as Chinese input methods type them): each
  full-width number (with full-width or ASCII `+`, separators and `Ｘ`) is read as ASCII and
  redacted by the passes above; a number that is not PII stays as written. A number mixing
  full-width and ASCII digits is read as two numbers. Other scripts' digits are not recognised.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import polars as pl

PLACEHOLDERS: dict[str, str] = {
    "email": "[EMAIL]",
    "phone": "[PHONE]",
    "cn_id": "[CN_ID]",
    "card": "[CARD]",
    "ip": "[IP]",
}

# Local part: quoted, or a run of letters, digits and `._%+-` in any script but Han, or at most
# four Han characters (a name): Chinese text runs into an address without a space, so a longer
# Han run would swallow the sentence before it.
_EMAIL_LOCAL = r'"[^"\r\n]{1,64}"|\p{Han}{1,4}|[\p{L}\p{N}._%+\-&&[^\p{Han}]]+'
_EMAIL = rf"(?:{_EMAIL_LOCAL})@(?:[A-Za-z0-9\-]+\.)+[A-Za-z]{{2,}}"

_CN_MOBILE = r"(?:\(?(?:\+|00)86\)?[ \-]?)?1[3-9][0-9](?:[ \-.]?[0-9]{4}){2}"
# NANP with the area code in parentheses, `(415) 555-0132`: the parentheses tell it from an
# order number or a date, which bare `415-555-0132` could be.
_US_PHONE = r"\([2-9][0-9]{2}\) ?[2-9][0-9]{2}[\-. ][0-9]{4}"
_INTL_PHONE = r"\+[1-9][0-9]{0,2}(?:[ \-.]?(?:\([0-9]{1,4}\)|[0-9]{1,4})){2,6}"

_DAY = r"(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])"
# 18 characters, optionally grouped 6-8-4 (region, birth date, sequence + check) by a space or
# dash; or the legacy 15 digits, contiguous.
_CN_ID = (
    rf"[1-9][0-9]{{5}}[ \-]?(?:18|19|20)[0-9]{{2}}{_DAY}[ \-]?[0-9]{{3}}[0-9Xx]"
    rf"|[1-9][0-9]{{7}}{_DAY}[0-9]{{3}}"
)
_ID_SEPARATORS = r"[ \-]"
_PROVINCES = [
    *map(str, range(11, 16)),
    *map(str, range(21, 24)),
    *map(str, range(31, 38)),
    *map(str, range(41, 47)),
    *map(str, range(50, 55)),
    *map(str, range(61, 66)),
    "71",
    "81",
    "82",
    "83",
    "91",
]
# ISO 7064 MOD 11-2 weights of the first 17 digits; the remainder indexes the check character.
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"

_CARD = (
    r"[0-9]{13,19}"
    r"|[0-9]{4}(?:[ \-./][0-9]{4}){2,3}(?:[ \-./][0-9]{1,4})?"
    r"|[0-9]{4}[ \-][0-9]{6}[ \-][0-9]{4,5}"
    r"|[0-9]{6}[ \-][0-9]{10,13}"
)

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_H = r"[0-9A-Fa-f]{1,4}"
# Full forms first, then the compressed one with an IPv4 tail before the plain one: the regex is
# leftmost-first, so the alternative order decides which shape a token gets.
_IPV6 = (
    rf"(?:{_H}:){{7}}{_H}|(?:{_H}:){{6}}{_IPV4}"
    rf"|(?:{_H}(?::{_H}){{0,6}})?::(?:(?:{_H}:){{0,5}}{_IPV4}|{_H}(?::{_H}){{0,6}})?"
)

# Fallbacks that tile the text around candidates (see the module docstring).
_DIGIT_TILES = r"[^0-9]+|[0-9]+"
_PHONE_TILES = r"[^0-9+(]+|[+(]|[0-9]+"
_ALNUM_TILES = r"[0-9A-Za-z]+|:|[^0-9A-Za-z:]+"


@dataclass(frozen=True)
class _Tokens:
    """The candidate token and its neighbours within the same text (null at the edges)."""

    tok: pl.Expr
    prev: pl.Expr
    prev2: pl.Expr
    next: pl.Expr
    next2: pl.Expr


Validator = Callable[[_Tokens], pl.Expr]


@dataclass(frozen=True)
class _Pass:
    kind: str
    candidate: str
    tiles: str
    valid: Validator


def _starts_with(expr: pl.Expr, pattern: str) -> pl.Expr:
    return expr.str.contains(f"^(?:{pattern})").fill_null(False)


def _ends_with(expr: pl.Expr, pattern: str) -> pl.Expr:
    return expr.str.contains(f"(?:{pattern})$").fill_null(False)


def _digit_at(expr: pl.Expr, index: int | pl.Expr) -> pl.Expr:
    return expr.str.slice(index, 1).cast(pl.Int64, strict=False).fill_null(0)


def _valid_phone(t: _Tokens) -> pl.Expr:
    digits = t.tok.str.replace_all(r"[^0-9]", "").str.len_bytes()
    international = t.tok.str.starts_with("+") & ~t.tok.str.contains(f"^(?:{_CN_MOBILE})$")
    return ~_starts_with(t.next, "[0-9]") & (~international | digits.is_between(8, 15))


def _valid_cn_id(t: _Tokens) -> pl.Expr:
    chars = t.tok.str.replace_all(_ID_SEPARATORS, "")
    total = pl.sum_horizontal([_digit_at(chars, i) * w for i, w in enumerate(_ID_WEIGHTS)])
    check = pl.lit(_ID_CHECK).str.slice(total % 11, 1)
    checksum_ok = chars.str.slice(17, 1).str.to_uppercase() == check
    legacy = chars.str.len_bytes() == 15
    return (
        ~_starts_with(t.next, "[0-9]")
        & chars.str.slice(0, 2).is_in(_PROVINCES)
        & (legacy | checksum_ok)
    )


def _valid_card(t: _Tokens) -> pl.Expr:
    digits = t.tok.str.replace_all(r"[^0-9]", "")
    reverse = digits.str.reverse()
    # Luhn from the right: every second digit doubled, minus 9 when that gives two digits.
    terms = []
    for i in range(19):
        d = _digit_at(reverse, i)
        terms.append(d * 2 - (d >= 5).cast(pl.Int64) * 9 if i % 2 else d)
    # A trailing X makes it an ID-shaped token (17 digits + check character), not a card.
    return (
        ~_starts_with(t.next, "[0-9Xx]")
        & digits.str.len_bytes().is_between(13, 19)
        & ~digits.str.starts_with("0")
        & (pl.sum_horizontal(terms) % 10 == 0)
    )


def _valid_ipv4(t: _Tokens) -> pl.Expr:
    # A dot plus digits on either side means a longer dotted run (a version, an OID), not an IP.
    dotted_after = (t.next == ".") & t.next2.is_not_null()
    dotted_before = (t.prev == ".") & t.prev2.is_not_null()
    return (
        ~_starts_with(t.next, "[0-9]")
        & ~dotted_after.fill_null(False)
        & ~dotted_before.fill_null(False)
        & ~_ends_with(t.prev, "[A-Za-z]")
    )


def _valid_ipv6(t: _Tokens) -> pl.Expr:
    head = t.tok.str.replace(rf"{_IPV4}$", "")
    groups = head.str.count_matches(r"[0-9A-Fa-f]+") + pl.when(head != t.tok).then(2).otherwise(0)
    compressed = t.tok.str.contains("::", literal=True)
    hex_digits = head.str.count_matches(r"[0-9A-Fa-f]")
    return (
        ~_ends_with(t.prev, "[0-9A-Za-z]")
        & ~_starts_with(t.next, "[0-9A-Za-z:]")
        & t.tok.str.contains("[0-9]")
        & ((t.tok == "::1") | (hex_digits >= 4) | (head != t.tok))
        & pl.when(compressed).then(groups <= 7).otherwise(groups == 8)
    )


# Order matters: e-mail first (QQ addresses are all digits before the @), phones before IDs and
# cards (a +86 number is 13 digits and might pass Luhn), IDs before cards (an 18-digit ID might
# pass Luhn too), IPv6 before IPv4 (an IPv4-mapped IPv6 address is one address).
_PASSES: tuple[_Pass, ...] = (
    _Pass("phone", f"{_CN_MOBILE}|{_US_PHONE}|{_INTL_PHONE}", _PHONE_TILES, _valid_phone),
    _Pass("cn_id", _CN_ID, _DIGIT_TILES, _valid_cn_id),
    _Pass("card", _CARD, _DIGIT_TILES, _valid_card),
    _Pass("ip", _IPV6, _ALNUM_TILES, _valid_ipv6),
    _Pass("ip", _IPV4, _DIGIT_TILES, _valid_ipv4),
)


def _token_pass(texts: pl.Series, spec: _Pass) -> tuple[pl.Series, int]:
    """Replace the valid candidates of one kind; returns the new texts and how many."""
    frame = pl.DataFrame({"text": texts}).with_row_index("_row")
    hits = frame.filter(pl.col("text").str.contains(spec.candidate))
    if hits.is_empty():
        return texts, 0
    tok = pl.col("tok")
    neighbours = _Tokens(
        tok=tok,
        prev=tok.shift(1).over("_row"),
        prev2=tok.shift(2).over("_row"),
        next=tok.shift(-1).over("_row"),
        next2=tok.shift(-2).over("_row"),
    )
    is_candidate = tok.str.contains(f"^(?:{spec.candidate})$")
    tokens = (
        hits.select("_row", pl.col("text").str.extract_all(f"{spec.candidate}|{spec.tiles}"))
        .rename({"text": "tok"})
        .explode("tok")
        .with_columns(hit=(is_candidate & spec.valid(neighbours)).fill_null(False))
    )
    rebuilt = tokens.group_by("_row", maintain_order=True).agg(
        pl.when("hit")
        .then(pl.lit(PLACEHOLDERS[spec.kind]))
        .otherwise(tok)
        .str.join("")
        .alias("tok"),
        pl.col("hit").sum().alias("found"),
    )
    merged = frame.join(rebuilt, on="_row", how="left", maintain_order="left")
    out = merged.select(pl.coalesce("tok", "text").alias(texts.name)).to_series()
    return out, int(rebuilt["found"].sum())


# Full-width forms typed by Chinese input methods, and their ASCII equivalents.
_WIDE = "０１２３４５６７８９＋．－／　Ｘｘ"
_NARROW = "0123456789+.-/ Xx"
# A full-width number, maybe grouped and signed: what a full-width phone, ID or card looks like.
_WIDE_RUN = r"[＋+]?[０-９]+(?:[ 　\-－.．/／]?[０-９]+)*[ＸｘXx]?"


def _full_width_pass(texts: pl.Series) -> tuple[pl.Series, dict[str, int]]:
    """Redact full-width numbers: each run is read as ASCII and redacted by the other passes; a
    run that holds PII is replaced by the result, any other run stays as written."""
    frame = pl.DataFrame({"text": texts}).with_row_index("_row")
    hits = frame.filter(pl.col("text").str.contains("[０-９]"))
    if hits.is_empty():
        return texts, dict.fromkeys(PLACEHOLDERS, 0)
    tok = pl.col("tok")
    tokens = (
        hits.select("_row", pl.col("text").str.extract_all(f"{_WIDE_RUN}|[^０-９＋+]+|."))
        .rename({"text": "tok"})
        .explode("tok")
        .with_row_index("_tok")
    )
    wide = tokens.filter(tok.str.contains("[０-９]")).with_columns(
        narrow=tok.str.replace_many(list(_WIDE), list(_NARROW))
    )
    redacted, counts = redact_series(wide["narrow"])
    changed = wide.with_columns(redacted.alias("new")).filter(pl.col("new") != pl.col("narrow"))
    rebuilt = (
        tokens.join(changed.select("_tok", "new"), on="_tok", how="left", maintain_order="left")
        .group_by("_row", maintain_order=True)
        .agg(pl.coalesce("new", "tok").str.join("").alias("tok"))
    )
    merged = frame.join(rebuilt, on="_row", how="left", maintain_order="left")
    return merged.select(pl.coalesce("tok", "text").alias(texts.name)).to_series(), counts


def redact_series(texts: pl.Series) -> tuple[pl.Series, dict[str, int]]:
    """One string column redacted, with the number of replacements per kind."""
    if texts.dtype != pl.String:
        raise TypeError(f"redact needs String columns, {texts.name!r} is {texts.dtype}")
    counts = dict.fromkeys(PLACEHOLDERS, 0)
    counts["email"] = int(texts.str.count_matches(_EMAIL).sum())
    if counts["email"]:
        texts = texts.str.replace_all(_EMAIL, PLACEHOLDERS["email"], literal=False)
    for spec in _PASSES:
        texts, found = _token_pass(texts, spec)
        counts[spec.kind] += found
    texts, wide = _full_width_pass(texts)
    for kind, count in wide.items():
        counts[kind] += count
    return texts, counts


def redact(frame: pl.DataFrame, columns: Sequence[str]) -> tuple[pl.DataFrame, dict[str, int]]:
    """Replace PII in the given String columns with typed placeholders (`[EMAIL]`, `[PHONE]`,
    `[CN_ID]`, `[CARD]`, `[IP]`); other columns, row order and non-PII text stay byte for byte.

    Returns the new frame and the number of replacements per kind (every kind present, 0 when
    none), summed over the columns.
    """
    totals = dict.fromkeys(PLACEHOLDERS, 0)
    replaced: list[pl.Series] = []
    for name in columns:
        texts, counts = redact_series(frame.get_column(name))
        replaced.append(texts)
        for kind, count in counts.items():
            totals[kind] += count
    return frame.with_columns(replaced), totals


def redacted_labels(labels: Iterable[str]) -> dict[str, str]:
    """Each distinct label → the label with its PII redacted (most come back unchanged)."""
    distinct = pl.Series("label", list(dict.fromkeys(labels)), dtype=pl.String)
    redacted, _ = redact_series(distinct)
    return dict(zip(distinct.to_list(), redacted.to_list(), strict=True))


def redacted_label_counts(counts: Mapping[str, float]) -> dict[str, float]:
    """Counts per label with PII redacted from the labels; labels that become one add up."""
    merged: dict[str, float] = {}
    for label, redacted in redacted_labels(counts).items():
        merged[redacted] = merged.get(redacted, 0) + counts[label]
    return merged
