"""PII redaction (`qe_assets.lib.pii`): what is replaced, what is kept byte for byte.

The checksums are checked against independent pure-Python oracles written here (ISO 7064
MOD 11-2 for resident IDs, Luhn for cards), over hand-picked edge cases and hypothesis-generated
values, in Chinese and English text. The last test runs the whole graph with seeded PII (redaction
is on by default, QE_PII_REDACTION) and greps every dataset file, raw and JSON-decoded.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qe_assets.ingest.queues import FileInbox
from qe_assets.lib.pii import PLACEHOLDERS, redact, redact_series
from qe_assets.settings import Settings
from qe_assets.store import connect
from qe_assets_tests.factories import line, make_event
from qe_assets_tests.runs import materialize

# --- independent oracles ------------------------------------------------------------------------

ID_WEIGHTS = [2 ** (17 - i) % 11 for i in range(17)]  # ISO 7064 MOD 11-2, derived, not copied


def id_check_char(first17: str) -> str:
    remainder = sum(int(d) * w for d, w in zip(first17, ID_WEIGHTS, strict=True)) % 11
    return "10X98765432"[remainder]


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def luhn_complete(prefix: str) -> str:
    """prefix + the check digit that makes it Luhn-valid."""
    return next(prefix + c for c in "0123456789" if luhn_ok(prefix + c))


PROVINCES = {
    *map(str, range(11, 16)), *map(str, range(21, 24)), *map(str, range(31, 38)),
    *map(str, range(41, 47)), *map(str, range(50, 55)), *map(str, range(61, 66)),
    "71", "81", "82", "83", "91",
}  # fmt: skip


def is_cn_id(value: str) -> bool:
    if re.fullmatch(r"\d{17}[\dXx]", value):
        birth = value[6:14]
        return (
            value[:2] in PROVINCES
            and birth[:2] in ("18", "19", "20")
            and 1 <= int(birth[4:6]) <= 12
            and 1 <= int(birth[6:8]) <= 31
            and id_check_char(value[:17]) == value[17].upper()
        )
    if re.fullmatch(r"\d{15}", value):
        return (
            value[:2] in PROVINCES and 1 <= int(value[8:10]) <= 12 and 1 <= int(value[10:12]) <= 31
        )
    return False


def test_the_oracles_agree_with_published_examples() -> None:
    assert id_check_char("11010519491231002") == "X"  # the GB 11643 sample number
    assert luhn_ok("4111111111111111") and luhn_ok("378282246310005")
    assert not luhn_ok("4111111111111112")


def one(text: str) -> tuple[str, dict[str, int]]:
    out, counts = redact_series(pl.Series("t", [text]))
    return out[0], counts


def nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if v}


# --- positives ----------------------------------------------------------------------------------

POSITIVE = [
    # e-mail
    ("联系邮箱 zhang.san@example.com。", "联系邮箱 [EMAIL]。", {"email": 1}),
    ("邮箱zhang_san+tag@mail.example.com.cn谢谢", "邮箱[EMAIL]谢谢", {"email": 1}),
    ("QQ 12345678@qq.com please", "QQ [EMAIL] please", {"email": 1}),
    ("Mail a@b.io, c.d@e-f.org.", "Mail [EMAIL], [EMAIL].", {"email": 2}),
    # phones: CN mobile
    ("电话13812345678", "电话[PHONE]", {"phone": 1}),
    ("手机：138 1234 5678，", "手机：[PHONE]，", {"phone": 1}),
    ("call 138-1234-5678 now", "call [PHONE] now", {"phone": 1}),
    ("+86 139 1234 5678", "[PHONE]", {"phone": 1}),
    ("+8613912345678和0086-150-1234-5678", "[PHONE]和[PHONE]", {"phone": 2}),
    ("(+86)19912345678", "[PHONE]", {"phone": 1}),
    ("13812345678,13912345678", "[PHONE],[PHONE]", {"phone": 2}),
    # phones: international
    ("Call +44 20 7946 0958 today", "Call [PHONE] today", {"phone": 1}),
    ("US: +1 (415) 555-2671.", "US: [PHONE].", {"phone": 1}),
    ("+49 30 901820", "[PHONE]", {"phone": 1}),
    ("北京 +86 10 8888 6666", "北京 [PHONE]", {"phone": 1}),
    ("+1.415.555.2671", "[PHONE]", {"phone": 1}),
    # resident IDs
    ("身份证号11010519491231002X。", "身份证号[CN_ID]。", {"cn_id": 1}),
    ("身份证 11010519491231002x", "身份证 [CN_ID]", {"cn_id": 1}),
    ("旧证号110105491231002，", "旧证号[CN_ID]，", {"cn_id": 1}),
    # cards
    ("卡号 4111 1111 1111 1111，", "卡号 [CARD]，", {"card": 1}),
    ("card 4111-1111-1111-1111.", "card [CARD].", {"card": 1}),
    ("Amex 3782 822463 10005 ok", "Amex [CARD] ok", {"card": 1}),
    ("Amex 378282246310005", "Amex [CARD]", {"card": 1}),
    (
        "JCB 3530111333300000 / Discover 6011111111111117",
        "JCB [CARD] / Discover [CARD]",
        {"card": 2},
    ),
    # IPs
    ("server 192.168.1.10:8080 down", "server [IP]:8080 down", {"ip": 1}),
    ("来自10.0.0.1的请求", "来自[IP]的请求", {"ip": 1}),
    ("version 1.2.3.4", "version [IP]", {"ip": 1}),  # documented: a bare dotted quad is an IP
    ("0.0.0.0 and 255.255.255.255", "[IP] and [IP]", {"ip": 2}),
    ("ipv6 2001:db8::1 ok", "ipv6 [IP] ok", {"ip": 1}),
    ("link fe80::1%eth0", "link [IP]%eth0", {"ip": 1}),
    ("loopback ::1.", "loopback [IP].", {"ip": 1}),
    ("full 2001:0db8:85a3:0000:0000:8a2e:0370:7334 x", "full [IP] x", {"ip": 1}),
    ("mapped ::ffff:192.168.0.1", "mapped [IP]", {"ip": 1}),
    ("host:fe80::a:b:c:d", "host:[IP]", {"ip": 1}),
    # issue #15: shapes that were not caught before
    ('mail "alice"@example.com ok', "mail [EMAIL] ok", {"email": 1}),
    ('"john doe"@example.org', "[EMAIL]", {"email": 1}),
    ("张三@example.com", "[EMAIL]", {"email": 1}),
    ("josé@example.com, Müller.K@example.de", "[EMAIL], [EMAIL]", {"email": 2}),
    ("联系 张三@example.com 谢谢", "联系 [EMAIL] 谢谢", {"email": 1}),
    ("电话 138.1234.5678。", "电话 [PHONE]。", {"phone": 1}),
    ("call (415) 555-0132 or (212)555.0199", "call [PHONE] or [PHONE]", {"phone": 2}),
    ("card 4111.1111.1111.1111 / 4111/1111/1111/1111", "card [CARD] / [CARD]", {"card": 2}),
    ("身份证 440301 19900307 1230。", "身份证 [CN_ID]。", {"cn_id": 1}),
    ("ID 440301-19900307-1230", "ID [CN_ID]", {"cn_id": 1}),
    ("全角１３８１２３４５６７８手机", "全角[PHONE]手机", {"phone": 1}),
    ("电话：１３８－１２３４－５６７８，", "电话：[PHONE]，", {"phone": 1}),
    ("＋８６ １３８ １２３４ ５６７８", "[PHONE]", {"phone": 1}),
    ("身份证４４０３０１１９９００３０７１２３０号", "身份证[CN_ID]号", {"cn_id": 1}),
    ("卡号４１１１　１１１１　１１１１　１１１１", "卡号[CARD]", {"card": 1}),
    (
        "complaint from carol@example.com +86 137 0000 1111",
        "complaint from [EMAIL] [PHONE]",
        {"email": 1, "phone": 1},
    ),
    # several kinds in one text
    (
        "张三，身份证11010519491231002X，电话+86 138-1234-5678，邮箱zs@ex.com，"
        "卡号6212 3456 7890 1234 7，IP 8.8.8.8。",
        "张三，身份证[CN_ID]，电话[PHONE]，邮箱[EMAIL]，卡号[CARD]，IP [IP]。",
        {"cn_id": 1, "phone": 1, "email": 1, "card": 1, "ip": 1},
    ),
]


@pytest.mark.parametrize(("text", "expected", "counts"), POSITIVE)
def test_pii_is_replaced_by_its_placeholder(text: str, expected: str, counts: dict) -> None:
    assert luhn_ok("62123456789012347")  # the UnionPay number used above
    assert one(text) == (expected, {**dict.fromkeys(PLACEHOLDERS, 0), **counts})


# --- negatives: kept byte for byte --------------------------------------------------------------

NEGATIVE = [
    "会议在2024-01-15 12:30:45举行，2024年1月15日，2024/01/15，2024.01.15。",
    "Prices: ¥1,299.00, $12,345.67, €0.99, 3.14159265358979323846.",
    "订单号 2024011512345678 已发货",  # 16 digits, fails Luhn
    "Order 4111111111111112 shipped",  # a card number off by one: fails Luhn
    "ISBN 978-7-111-12345-6, tracking 1Z999AA10123456784",
    "Versions v1.2.3.4, 1.2.3, build1.2.3.4, 1.2.3.4.5, 10.0.19045.3803",
    "Not IPs: 256.1.1.1, 1.2.3, 01.02.03.04, 999.999.999.999",
    "MAC 00:1A:2B:3C:4D:5E, time 12:30:45, std::vector, A::B, x[1::2], Face::Bad",
    "Domestic numbers without prefix: 415-555-2671, 010-12345678, 12345678901",
    "Area code alone (415), (415) 555, (123) 555-2671 (no area code starts with 1)",
    "Too long to be a mobile: 138123456789, too short: 1381234567",
    "Mobile inside a longer number: 913812345678",
    "ID with a wrong check char 110105194912310021 and a bad date 110105194913310025",
    "ID with an unknown province 991051949123100X2 and 00010519491231002X",
    "全角日期２０２４年１月１５日，价格￥１２９９．００，订单２０２４０１１５１２３４５６７８",
    "Grouped but not PII: 2024/01/15, 2024.01.15.1234, 1234 5678 9012 3456 fails Luhn",
    '"quoted words" and "x"@ alone, José, 张三 @ example',
    "An @ alone, user@localhost, a@b, @example.com, name@ example.com",
    "Scores 0.35, 1e308, -0.0, NaN; ratio 13:8; 1,234,567,890,123",
    "",
    "\x00\u2028 emoji 😀 RTL \u202e مرحبا 年假可以结转吗？",
]


@pytest.mark.parametrize("text", NEGATIVE)
def test_text_without_pii_is_unchanged(text: str) -> None:
    assert one(text) == (text, dict.fromkeys(PLACEHOLDERS, 0))


# --- checksum edge cases ----------------------------------------------------------------------


def cn_id_with_check(check: str, rng: random.Random) -> str:
    """A valid 18-character ID whose check character is `check`."""
    while True:
        first17 = (
            rng.choice(sorted(PROVINCES))
            + f"{rng.randrange(10000):04d}"
            + f"{rng.randrange(1900, 2025)}{rng.randrange(1, 13):02d}{rng.randrange(1, 29):02d}"
            + f"{rng.randrange(1000):03d}"
        )
        if id_check_char(first17) == check:
            return first17 + check


@pytest.mark.parametrize("check", list("10X98765432"))
def test_every_check_character_is_validated(check: str) -> None:
    rng = random.Random(check)
    valid = cn_id_with_check(check, rng)
    assert one(f"证件{valid}。")[0] == "证件[CN_ID]。"
    for wrong in sorted(set("0123456789X") - {check}):
        candidate = valid[:17] + wrong
        # A wrong check character is not an ID; it might still be a Luhn-valid card number.
        expected = "[CARD]" if wrong != "X" and luhn_ok(candidate) else candidate
        assert one(f"证件{candidate}。")[0] == f"证件{expected}。", candidate


def test_check_x_in_lower_case_and_ids_next_to_digits() -> None:
    valid = cn_id_with_check("X", random.Random(1))
    assert one(valid.lower())[0] == "[CN_ID]"
    assert one(f"{valid}5")[0] == f"{valid}5"  # part of a longer number
    assert one(f"5{valid}")[0] == f"5{valid}"


@pytest.mark.parametrize("length", range(13, 20))
def test_luhn_valid_cards_of_every_length_are_redacted(length: int) -> None:
    rng = random.Random(length)
    while True:
        card = luhn_complete(
            str(rng.randrange(3, 7)) + "".join(str(rng.randrange(10)) for _ in range(length - 2))
        )
        if not is_cn_id(card):
            break
    assert one(f"卡号{card}。") == ("卡号[CARD]。", {**dict.fromkeys(PLACEHOLDERS, 0), "card": 1})
    broken = card[:-1] + str((int(card[-1]) + 1) % 10)
    assert one(f"卡号{broken}。")[0] == f"卡号{broken}。"
    # One digit more is a different, longer number (which may itself be a valid card).
    longer = next(card + d for d in "0123456789" if not luhn_ok(card + d))
    assert one(longer)[0] == longer


def test_zero_padded_numbers_are_not_cards() -> None:
    assert one("0000000000000000")[0] == "0000000000000000"  # Luhn-valid, but no issuer uses 0


# --- properties -------------------------------------------------------------------------------

# No digits (ASCII or full-width) and no @: nothing in such text can match any kind, so it must
# come back intact.
safe_text = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="0123456789０１２３４５６７８９@"),
    max_size=80,
)
separators = st.sampled_from([" ", "，", "。", "\n", "、", "; ", "（", "）", "：", '"'])


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(st.none() | safe_text, min_size=1, max_size=20))
def test_text_without_digits_or_at_signs_is_unchanged(texts: list[str | None]) -> None:
    out, counts = redact_series(pl.Series("t", texts, dtype=pl.String))
    assert out.to_list() == texts
    assert sum(counts.values()) == 0


def _octets(draw: st.DrawFn) -> str:
    return ".".join(str(draw(st.integers(0, 255))) for _ in range(4))


def _maybe_wide(draw: st.DrawFn, value: str) -> str:
    """The value as typed by a Chinese input method (full-width digits), half of the time."""
    return value.translate(_TO_WIDE) if draw(st.booleans()) else value


_TO_WIDE = str.maketrans("0123456789", "０１２３４５６７８９")


@st.composite
def pii_values(draw: st.DrawFn) -> tuple[str, str]:
    """(kind, value) drawn from every format the module docstring promises to catch."""
    kind = draw(st.sampled_from(sorted(PLACEHOLDERS)))
    if kind == "email":
        local = draw(
            st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._%+\-]{0,15}", fullmatch=True)
            | st.sampled_from(["josé", "Müller.K", "张三", "欧阳娜娜", '"alice"', '"john doe"'])
        )
        domain = draw(st.from_regex(r"[a-z0-9\-]{1,10}(\.[a-z0-9\-]{1,8}){0,2}", fullmatch=True))
        tld = draw(st.from_regex(r"[a-z]{2,6}", fullmatch=True))
        return kind, f"{local}@{domain}.{tld}"
    if kind == "phone":
        if draw(st.booleans()):
            digits = f"1{draw(st.integers(3, 9))}{draw(st.integers(0, 999_999_999)):09d}"
            sep = draw(st.sampled_from(["", " ", "-", "."]))
            prefix = draw(st.sampled_from(["", "+86 ", "+86", "0086-", "(+86)"]))
            value = f"{prefix}{digits[:3]}{sep}{digits[3:7]}{sep}{digits[7:]}"
            return kind, value if "(" in prefix else _maybe_wide(draw, value)
        return kind, draw(
            st.sampled_from(
                [
                    "+44 20 7946 0958",
                    "+1 (415) 555-2671",
                    "+33 1 23 45 67 89",
                    "+81 3-1234-5678",
                    "+852 2123 4567",
                    "+49 30 901820",
                    "(415) 555-0132",
                    "(212)555.0199",
                ]
            )
        )
    if kind == "cn_id":
        first17 = (
            draw(st.sampled_from(sorted(PROVINCES)))
            + f"{draw(st.integers(0, 9999)):04d}"
            + f"{draw(st.integers(1800, 2099))}{draw(st.integers(1, 12)):02d}"
            + f"{draw(st.integers(1, 31)):02d}{draw(st.integers(0, 999)):03d}"
        )
        value = first17 + id_check_char(first17)
        sep = draw(st.sampled_from(["", " ", "-"]))
        return kind, _maybe_wide(draw, f"{value[:6]}{sep}{value[6:14]}{sep}{value[14:]}")
    if kind == "card":
        length = draw(st.integers(13, 19))
        prefix = str(draw(st.integers(3, 6))) + "".join(
            str(draw(st.integers(0, 9))) for _ in range(length - 2)
        )
        card = luhn_complete(prefix)
        if is_cn_id(card):  # an 18-digit card that is also a valid ID is reported as an ID
            return "cn_id", card
        if length == 16 and draw(st.booleans()):
            sep = draw(st.sampled_from([" ", "-", ".", "/"]))
            card = sep.join(card[i : i + 4] for i in range(0, 16, 4))
        return kind, _maybe_wide(draw, card)
    if draw(st.booleans()):
        return "ip", _octets(draw)
    groups = [f"{draw(st.integers(0, 0xFFFF)):x}" for _ in range(8)]
    groups[0] = f"{draw(st.integers(0x2000, 0x3FFF)):x}"  # global unicast: holds a digit
    start = draw(st.integers(1, 7))
    end = draw(st.integers(start, 7))
    value = (
        ":".join(groups)
        if start == end
        else (":".join(groups[:start]) + "::" + ":".join(groups[end:]))
    )
    return "ip", value


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    parts=st.lists(
        st.tuples(safe_text, separators, pii_values(), separators), min_size=1, max_size=6
    ),
    tail=safe_text,
)
def test_each_pii_value_becomes_exactly_its_placeholder(
    parts: list[tuple[str, str, tuple[str, str], str]], tail: str
) -> None:
    text = expected = ""
    counts = dict.fromkeys(PLACEHOLDERS, 0)
    for filler, left, (kind, value), right in parts:
        text += f"{filler}{left}{value}{right}"
        expected += f"{filler}{left}{PLACEHOLDERS[kind]}{right}"
        counts[kind] += 1
    text += tail
    expected += tail
    out, got = one(text)
    assert (out, got) == (expected, counts)
    assert one(out) == (out, dict.fromkeys(PLACEHOLDERS, 0))  # idempotent


# --- the frame API ----------------------------------------------------------------------------


def test_redact_frame_columns_counts_and_untouched_columns() -> None:
    frame = pl.DataFrame(
        {
            "id": [1, 2, 3, 4],
            "prompt": ["mail a@b.com", None, "", "IP 1.1.1.1 and 2.2.2.2"],
            "completion": ["电话13812345678", "ok", "卡号4111111111111111", None],
            "other": ["a@b.com", "13812345678", "x", "y"],
        }
    )
    out, counts = redact(frame, ["prompt", "completion"])
    assert out.columns == frame.columns and out.schema == frame.schema
    assert out["prompt"].to_list() == ["mail [EMAIL]", None, "", "IP [IP] and [IP]"]
    assert out["completion"].to_list() == ["电话[PHONE]", "ok", "卡号[CARD]", None]
    assert out["other"].equals(frame["other"]) and out["id"].equals(frame["id"])
    assert counts == {"email": 1, "phone": 1, "cn_id": 0, "card": 1, "ip": 2}
    same, none = redact(frame, [])
    assert same.equals(frame) and none == dict.fromkeys(PLACEHOLDERS, 0)
    with pytest.raises(TypeError, match="String"):
        redact(frame, ["id"])


def test_many_rows_in_one_vectorised_call() -> None:
    rng = random.Random(3)
    texts = [
        rng.choice(
            [
                "plain text {i}",
                "邮箱 u{i}@example.com",
                "电话 1381234{p:04d}",
                "IP 10.0.{a}.{b}",
                "订单 2024{i:08d}",
            ]
        ).format(i=i, p=i % 10_000, a=i % 256, b=(i * 7) % 256)
        for i in range(20_000)
    ]
    out, counts = redact_series(pl.Series("t", texts))
    assert counts["email"] == sum("@" in t for t in texts)
    assert counts["phone"] == sum(t.startswith("电话") for t in texts)
    assert counts["ip"] == sum(t.startswith("IP") for t in texts)
    for text, redacted in zip(texts, out, strict=True):
        if text.startswith(("plain", "订单")):
            assert redacted == text


# --- end to end: no PII reaches a dataset file -------------------------------------------------

SEEDED = {
    "email": "li.lei@example.com",
    "phone": "+86 138-1234-5678",
    "cn_id": "11010519491231002X",
    "card": "4111 1111 1111 1111",
    "ip": "192.168.10.20",
}


def test_no_seeded_pii_reaches_a_dataset_file(tmp_path: Path) -> None:
    settings = Settings(data_dir=str(tmp_path / "data"), spot_check_share=0.0)
    assert settings.pii_redaction  # on by default
    pii = "，".join(SEEDED.values())
    events = [
        make_event(
            f"pii-{i}",
            question=f"我的信息是{pii}，问题{i}？",
            answer=f"Your details {pii} are noted ({i}).",
            docs=[{"id": "kb-1", "content": f"Contact {pii}", "score": 0.9}],
            evaluation={"score": 0.5, "labels": ["factuality_error"]},
        )
        for i in range(12)
    ]
    FileInbox(settings.inbox_dir).put([line(e).decode() for e in events])
    assert materialize(settings).success

    # Not vacuous: the PII did reach the export stage (the tables keep what was received).
    with connect(settings.database, read_only=True) as conn:
        prompts = [r[0] for r in conn.execute("SELECT prompt FROM annotated_samples").fetchall()]
    assert len(prompts) == 12 and all(value in prompts[0] for value in SEEDED.values())

    files = sorted(
        (p for p in settings.datasets_dir.rglob("*") if p.is_file()),
        key=lambda p: p.relative_to(settings.datasets_dir).as_posix(),
    )
    names = [p.relative_to(settings.datasets_dir).as_posix() for p in files]
    assert names[:4] == [
        "rag_quality_tuning_v001.chat.jsonl",
        "rag_quality_tuning_v001.jsonl",
        "rag_quality_tuning_v001.manifest.json",
        "rag_quality_tuning_v001.preference.jsonl",
    ]
    assert len(names) == 4 + 9  # and the version folder: 8 split files and the card
    for path in files:
        body = path.read_text(encoding="utf-8")
        # The files hold JSON: search the decoded text too, so an escape cannot hide a value.
        documents = {".jsonl": body.splitlines(), ".json": [body]}.get(path.suffix, [])
        decoded = "\n".join(json.dumps(json.loads(d), ensure_ascii=False) for d in documents)
        for kind, value in SEEDED.items():
            assert value not in body and value not in decoded, f"{kind} leaked into {path.name}"
    records = [json.loads(x) for x in files[1].read_text(encoding="utf-8").splitlines()]
    for placeholder in PLACEHOLDERS.values():
        assert all(placeholder in r["prompt"] and placeholder in r["completion"] for r in records)
    manifest = json.loads(files[2].read_text(encoding="utf-8"))
    # Each sample: the question and the context document in the prompt, the answer in the
    # completion; the IP pass counts IPv4 and IPv6 together.
    assert manifest["pii_redactions"] == dict.fromkeys(PLACEHOLDERS, 12 * 3)


# --- end to end: ids and labels, Dagster's run storage, the fine-tune split files (issue #15) ---

# Raw PII as it arrives, in request ids, labels and texts; none may leave the store.
OUTSIDE = {
    "request_id": ["bob@example.com", "josé@example.com", "ticket 138.1234.5678"],
    "label": "complaint from carol@example.com +86 137 0000 1111",
    "texts": [
        '"alice"@example.com',
        "张三@example.com",
        "4111.1111.1111.1111",
        "4111/1111/1111/1111",
        "440301 19900307 1230",
        "(415) 555-0132",
        "１３８１２３４５６７８",
    ],
}
LEAKS = [
    *OUTSIDE["request_id"],
    OUTSIDE["label"],
    *OUTSIDE["texts"],
    *("bob@", "josé", "carol", "137 0000 1111", "alice", "张三@", "555-0132", "１３８"),
]


def _pii_events() -> list[dict]:
    events = []
    for i in range(12):
        request_id = OUTSIDE["request_id"][i] if i < 3 else f"plain-{i}"
        labels = [OUTSIDE["label"]] if i % 2 else ["factuality_error"]
        text = OUTSIDE["texts"][i % len(OUTSIDE["texts"])]
        events.append(
            make_event(
                request_id,
                question=f"我的联系方式 {text}，问题{i}？",
                answer=f"Noted {text} ({i}).",
                evaluation={"score": 0.5, "labels": labels},
            )
        )
    return events


def _leaks(text: str, where: str) -> list[str]:
    return [f"{value!r} in {where}" for value in LEAKS if value in text]


def test_no_pii_in_ids_labels_files_or_run_storage(tmp_path: Path) -> None:
    settings = Settings(data_dir=str(tmp_path / "data"), spot_check_share=0.0)
    FileInbox(settings.inbox_dir).put([line(e).decode() for e in _pii_events()])
    instance = dg.DagsterInstance.ephemeral()
    result = materialize(settings, instance=instance)
    assert result.success

    # Not vacuous: the raw values reached the tables and the version holds every sample.
    with connect(settings.database, read_only=True) as conn:
        stored = " ".join(
            str(row)
            for row in conn.execute(
                "SELECT sample_id, label, prompt FROM annotated_samples"
            ).fetchall()
        )
        in_version = conn.execute("SELECT count(*) FROM dataset_samples").fetchall()[0][0]
    assert all(value in stored for value in OUTSIDE["request_id"] + [OUTSIDE["label"]])
    assert in_version == 12

    exported = [p for p in settings.datasets_dir.rglob("*") if p.is_file()]
    finetune = [p for p in (Path(settings.data_dir) / "finetune").rglob("*") if p.is_file()]
    assert len(exported) == 13 and any(p.name == "train.chat.jsonl" for p in finetune)
    # The split files still find every sample's side, pseudonymous ids included.
    split_lines = [
        len(p.read_text(encoding="utf-8").splitlines())
        for p in finetune
        if p.name.endswith(".chat.jsonl")
    ]
    assert sum(split_lines) == 12
    leaks: list[str] = []
    for path in exported + finetune:
        body = path.read_text(encoding="utf-8")
        lines = {".jsonl": body.splitlines(), ".json": [body]}.get(path.suffix, [])
        decoded = "\n".join(json.dumps(json.loads(x), ensure_ascii=False) for x in lines if x)
        leaks += _leaks(body + decoded, path.name)
    assert leaks == []
    # Dagster's event log as stored: materialization metadata (label counts and shares, the
    # annotate stage's per-label entries), check results and log lines.
    logged = instance.all_logs(result.run_id)
    assert any(e.asset_materialization for e in logged)
    assert [leak for e in logged for leak in _leaks(repr(e), "the run's event log")] == []

    records = [json.loads(x) for x in next(p for p in exported if p.name.endswith("1.jsonl"))
               .read_text(encoding="utf-8").splitlines()]  # fmt: skip
    ids = [r["sample_id"] for r in records]
    assert len(set(ids)) == 12
    # Pseudonyms: the three PII request ids and the other three odd events' PII labels.
    assert sum(i.startswith("pii-") and "#" not in i for i in ids) == 3 + 5
    assert "plain-4#factuality_error" in ids
    assert {r["label"] for r in records} == {
        "factuality_error",
        "complaint from [EMAIL] [PHONE]",
    }
    manifest = json.loads(next(p for p in exported if p.suffix == ".json").read_text("utf-8"))
    assert manifest["label_counts"] == {"complaint from [EMAIL] [PHONE]": 6, "factuality_error": 6}
