"""README.md stays true: its presets table is what scripts/model_summary.py prints, and it opens with the two
commands (the demo and the tests)."""

import re
from pathlib import Path

from scripts.model_summary import preset_rows

ROOT = Path(__file__).resolve().parents[1]


def test_presets_table_matches_code():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = re.search(r"<!-- presets:start -->\n(.*?)\n<!-- presets:end -->", text, re.S).group(1)
    assert table.splitlines() == preset_rows()


def test_readme_opens_with_demo_and_test_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    assert "main.py --stage all --config config/demo.yaml" in first_block
    assert "pytest" in first_block
    assert (ROOT / "config" / "demo.yaml").exists()
