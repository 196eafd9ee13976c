"""The docs cannot drift from the code: every variable the code reads is in the generated
configuration reference, and the README stays a newcomer's page. (`make docs` builds the site
with --strict; `make test` runs it before the suite.)"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from qe_assets.settings import CONTRACT_VARIABLES, ENVIRONMENT, OTHER_VARIABLES, Settings
from qe_assets.settings.reference import reference_markdown, settings_rows, with_reference

ROOT = Path(__file__).resolve().parents[1]
# Variables that exist only inside one test's own fixture script, not for anyone to set.
TEST_INTERNAL = {"QE_TEST_DIR"}


def _variables_in_code() -> set[str]:
    found: set[str] = set()
    for folder in ("qe_assets", "qe_assets_bench", "qe_assets_tests", "examples"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            found |= set(re.findall(r"\b(QE_[A-Z0-9_]*[A-Z0-9])\b", text))
            found |= set(re.findall(r"[\"'$](OPENAI_[A-Z0-9_]*[A-Z0-9])[\"'}]", text))
    found |= set(re.findall(r"\b(QE_[A-Z0-9_]*[A-Z0-9])\b", (ROOT / "Makefile").read_text()))
    # The contract's list names variables before they are implemented; they are documented
    # once their setting exists.
    implemented = {variable for variable, _ in ENVIRONMENT.values()} | set(OTHER_VARIABLES)
    return found - TEST_INTERNAL - (CONTRACT_VARIABLES - implemented)


def test_every_setting_has_a_description_and_a_rule() -> None:
    for name, (variable, parse) in ENVIRONMENT.items():
        assert Settings.model_fields[name].description, f"{variable}: add a description"
        assert getattr(parse, "rule", ""), f"{variable}: its parser needs a rule (see _ruled)"
    assert set(ENVIRONMENT) == set(Settings.model_fields), "every field needs its variable"
    assert len(settings_rows()) == len(ENVIRONMENT)


def test_every_variable_the_code_reads_is_in_the_reference() -> None:
    reference = reference_markdown()
    documented = set(re.findall(r"`((?:QE|OPENAI)_[A-Z0-9_]+)`", reference))
    prefixes = [name[:-1] for name in OTHER_VARIABLES if name.endswith("*")]
    missing = sorted(
        name
        for name in _variables_in_code()
        if name not in documented and not any(name.startswith(p) for p in prefixes)
    )
    assert not missing, f"document these in qe_assets/settings.py: {missing}"


def test_the_readme_is_short_and_self_contained() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 10 * 1024
    assert "make test" in readme  # CI runs it; newcomers look for it
    for phrase in ("the seed", "the article", "CONTRACT", "shared/"):
        assert phrase not in readme, phrase
    for target in re.findall(r"\]\((?!https?://)([^)#]+)", readme):
        assert (ROOT / target).exists(), f"README links to a missing file: {target}"
    docs_nav = (ROOT / "mkdocs.yml").read_text()
    for target in re.findall(r"\]\(docs/([^)#]+\.md)", readme):
        assert target in docs_nav, f"{target} is not in the docs site's nav"


def test_the_configuration_page_in_the_repository_is_current() -> None:
    # The page is read on Git hosts as it is stored, not only in the built site: it must hold
    # exactly what the code generates now (`make docs-config` rewrites it).
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert with_reference(page) == page, "docs/configuration.md is stale: run `make docs-config`"
    assert "| `QE_MIN_CONFIDENCE` |" in page


def test_make_help_prints_no_unexpanded_make_variables() -> None:
    run = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "help"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert "make demo" in run.stdout and "make docs-config" in run.stdout
    assert "$(" not in run.stdout, run.stdout


def test_the_graph_diagrams_show_every_asset() -> None:
    from qe_assets.ops.definitions import ASSETS

    assets = {key.to_user_string() for definition in ASSETS for key in definition.keys}
    assert {"ab_test", "model_evaluation"} <= assets
    for page in ("README.md", "docs/index.md"):
        text = (ROOT / page).read_text(encoding="utf-8")
        (diagram,) = re.findall(r"```mermaid\n(.*?)```", text, re.S)
        missing = sorted(a for a in assets if not re.search(rf"\b{a}\b", diagram))
        assert not missing, f"{page}'s diagram lacks {missing}"
