"""`qe sql` writes every DuckDB column type in every output format (issue 26, item 8).

One query holds a column of each type, alone and nested in lists, structs, maps and arrays, and
runs through the real `qe` in table, csv, json and parquet. Polars refuses some of these types
(CSV), panics on others (JSON), or imports them wrong (the largest UHUGEINT as -1); `qe sql` must
write each, types Polars lacks as DuckDB's own text, and never a traceback.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import polars as pl
import pytest

from qe_assets.store import connect, ensure_schema
from qe_assets_tests.test_cli import qe

UUID = "11111111-2222-3333-4444-555555555555"
UNION = "UNION(num INTEGER, str VARCHAR)"
# column -> (SQL, its value as text in csv and in a printed table)
COLUMNS: dict[str, tuple[str, str]] = {
    "variant_int": ("1::VARIANT", "1"),
    "variant_text": ("'x'::VARIANT", "x"),
    "union_num": (f"union_value(num := 2)::{UNION}", "2"),
    "interval": ("INTERVAL 1 DAY + INTERVAL 2 HOUR", "1 day 02:00:00"),
    "blob": ("'\\xAA\\xBB'::BLOB", "\\xAA\\xBB"),
    "bit": ("'0101'::BIT", "0101"),
    "enum": ("'b'::ENUM('a', 'b')", "b"),
    "uuid": (f"'{UUID}'::UUID", UUID),
    "timetz": ("'12:00:00+02'::TIMETZ", "12:00:00+02"),
    "hugeint": (
        "170141183460469231731687303715884105727::HUGEINT",
        "170141183460469231731687303715884105727",
    ),
    "uhugeint": (
        "340282366920938463463374607431768211455::UHUGEINT",
        "340282366920938463463374607431768211455",
    ),
    "ubigint": ("18446744073709551615::UBIGINT", "18446744073709551615"),
    "decimal_38_0": (
        "99999999999999999999999999999999999999::DECIMAL(38,0)",
        "99999999999999999999999999999999999999",
    ),
    "decimal_38_10": (
        "-9999999999999999999999999999.9999999999::DECIMAL(38,10)",
        "-9999999999999999999999999999.9999999999",
    ),
    "bignum": (
        "'123456789012345678901234567890123456789012345678901234567890'::BIGNUM",
        "123456789012345678901234567890123456789012345678901234567890",
    ),
    "geometry": ("'POINT(1 2)'::GEOMETRY", "POINT (1 2)"),
    "json_text": ("'{\"a\": 1}'::JSON", ""),
    "map": ("MAP {'a': 1, 'b': 2}", ""),
    "struct": ("{'a': 1, 'b': 'x'}", ""),
    "list_list": ("[[1], [2, 3]]", ""),
    "array": ("[1, 2, 3]::INTEGER[3]", ""),
    "list_interval": ("[INTERVAL 1 DAY]", ""),
    "list_variant": ("[1::VARIANT, 'x'::VARIANT]", ""),
    "list_blob": ("['\\xAA'::BLOB]", ""),
    "list_bit": ("['01'::BIT]", ""),
    "list_timetz": ("['12:00:00+02'::TIMETZ]", ""),
    "list_uuid": (f"['{UUID}'::UUID]", ""),
    "list_enum": ("['a'::ENUM('a', 'b')]", ""),
    "list_decimal": ("[1.50::DECIMAL(38,2)]", ""),
    "list_uhugeint": ("[340282366920938463463374607431768211455::UHUGEINT]", ""),
    "list_hugeint": ("['-170141183460469231731687303715884105728'::HUGEINT]", ""),
    "map_interval": ("MAP {'a': INTERVAL 1 DAY}", ""),
    "struct_union": (f"{{'i': INTERVAL 2 HOUR, 'u': union_value(num := 2)::{UNION}}}", ""),
    "nested_deep": ("{'a': [{'b': INTERVAL 2 HOUR, 'v': 'y'::VARIANT}]}", ""),
    "null": ("NULL", ""),
}
QUERY = "SELECT " + ", ".join(f"{sql} AS {name}" for name, (sql, _) in COLUMNS.items())
# Nested values as JSON: the same in every format (json keeps structure Polars can hold, and
# writes the rest as JSON text).
NESTED = {
    "map": {"a": 1, "b": 2},
    "struct": {"a": 1, "b": "x"},
    "list_list": [[1], [2, 3]],
    "array": [1, 2, 3],
    "list_interval": ["1 day"],
    "list_variant": [1, "x"],
    "list_blob": ["\\xAA"],
    "list_bit": ["01"],
    "list_timetz": ["12:00:00+02"],
    "list_uuid": [UUID],
    "list_enum": ["a"],
    "list_uhugeint": [340282366920938463463374607431768211455],
    "list_hugeint": [-170141183460469231731687303715884105728],
    "map_interval": {"a": "1 day"},
    "struct_union": {"i": "02:00:00", "u": {"num": 2}},
    "nested_deep": {"a": [{"b": "02:00:00", "v": "y"}]},
}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    data = tmp_path_factory.mktemp("types") / "data"
    with connect(data / "qe.duckdb") as conn:
        ensure_schema(conn)
    return {"QE_DATA_DIR": str(data)}


def nested(value: object) -> object:
    """A nested value from json output: kept as structure, or as JSON text."""
    return json.loads(value) if isinstance(value, str) else value


def assert_clean(result: object) -> None:
    stderr = result.stderr  # type: ignore[attr-defined]
    assert result.returncode == 0, stderr  # type: ignore[attr-defined]
    assert "Traceback" not in stderr and "panicked" not in stderr, stderr


def test_every_type_in_csv(env: dict[str, str]) -> None:
    result = qe("sql", QUERY, "--format", "csv", env=env, check=False)
    assert_clean(result)
    (row,) = csv.DictReader(io.StringIO(result.stdout))
    assert list(row) == list(COLUMNS)
    for name, (_, text) in COLUMNS.items():
        if text:
            assert row[name] == text, name
    for name, value in NESTED.items():
        assert json.loads(row[name]) == value, name
    assert json.loads(row["list_decimal"]) == [1.5] and row["null"] == ""


def test_every_type_in_json(env: dict[str, str]) -> None:
    result = qe("sql", QUERY, "--format", "json", env=env, check=False)
    assert_clean(result)
    (record,) = map(json.loads, result.stdout.splitlines())
    for name, (_, text) in COLUMNS.items():
        if text:
            assert str(record[name]) == text, name
    for name, value in NESTED.items():
        assert nested(record[name]) == value, name
    assert record["list_decimal"] == ["1.50"] and record["null"] is None


def test_every_type_in_parquet_and_table(env: dict[str, str], tmp_path: Path) -> None:
    target = tmp_path / "all.parquet"
    result = qe("sql", QUERY, "--format", "parquet", "-o", str(target), env=env, check=False)
    assert_clean(result)
    frame = pl.read_parquet(target)
    assert frame.columns == list(COLUMNS)
    row = frame.row(0, named=True)
    for name, (_, text) in COLUMNS.items():
        if text:
            assert str(row[name]) == text, name
    for name, value in NESTED.items():
        assert nested(row[name]) == value, name

    # A printed table has room for a few columns at a time.
    for names in (("variant_int", "bit", "timetz"), ("uhugeint",), ("hugeint",), ("uuid", "blob")):
        query = "SELECT " + ", ".join(f"{COLUMNS[n][0]} AS {n}" for n in names)
        table = qe("sql", query, env=env, check=False)
        assert_clean(table)
        for name in names:
            assert COLUMNS[name][1] in table.stdout, name


@pytest.mark.parametrize("fmt", ["table", "csv", "json", "parquet"])
def test_duckdb_settings_and_a_bare_variant(env: dict[str, str], fmt: str, tmp_path: Path) -> None:
    """The issue's own two queries: duckdb_settings() has a VARIANT column (typed_value)."""
    output = ["-o", str(tmp_path / "out.parquet")] if fmt == "parquet" else []
    for query in ("SELECT 1::VARIANT AS v", "SELECT * FROM duckdb_settings()"):
        result = qe("sql", query, "--format", fmt, *output, env=env, check=False)
        assert_clean(result)
    settings = qe(
        "sql",
        "SELECT name, typed_value FROM duckdb_settings() WHERE name = 'threads'",
        "--format",
        "csv",
        env=env,
    )
    assert settings.stdout.splitlines()[0] == "name,typed_value"
