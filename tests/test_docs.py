from imagesmith.config.reference import reference_page
from imagesmith.config.settings import SETTINGS
from tests.conftest import REPO


def test_reference_page_is_up_to_date() -> None:
    page = (REPO / "docs" / "config-reference.md").read_text()
    assert page == reference_page(), "run `make docs` and commit docs/config-reference.md"
    for setting in SETTINGS:
        assert f"| `{setting.name}` |" in page
