"""notebooks/milli_chat_colab_kaggle.ipynb cannot rot: executed headless (nbclient) on the CPU, as the test suite's
"local" platform, with its QUICK setting on the shared data pack and the recipe stopped after SFT (the whole QUICK
recipe takes ~5 minutes here; the stages after SFT are tested by tests/test_recipe.py). Then executed again, as a
user does after a disconnect: every finished stage is skipped, and the chat and export cells work from what is on
the (here: temporary) persistent storage.

    python -m pytest tests/test_notebook.py      # needs nbclient, nbformat, ipykernel (requirements-dev.txt)
"""

import os
from pathlib import Path

import pytest

from tests.helpers import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "milli_chat_colab_kaggle.ipynb"
PACK = Path(os.environ.get("MILLI_SHARED_DATA", SHARED_DATA))  # another checkout's ../shared/data: name it here


def run_notebook() -> tuple[str, int]:
    """Execute every cell in a fresh kernel started in notebooks/ (as Jupyter would); -> (all text output, images)."""
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    text, images = [], 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            text.append(output.get("text", "") + output.get("data", {}).get("text/plain", ""))
            images += "image/png" in output.get("data", {})
    return "\n".join(text), images


def statuses(out: Path) -> dict:
    rows = [line.split("\t") for line in (out / "timings.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    return {name: status for name, _, status in rows}


@pytest.mark.slow
def test_notebook_runs_headless_and_resumes_after_a_disconnect(tmp_path, monkeypatch):
    pytest.importorskip("ipykernel")
    if not (PACK / "pretrain" / "zh").is_dir():
        pytest.skip(f"shared data pack not found at {PACK} (MILLI_SHARED_DATA=DIR names another place)")
    # the kernel inherits this environment: the notebook's settings cell reads these
    for key, value in {
        "MILLI_QUICK": "1",
        "MILLI_STOP_AFTER": "sft",
        "MILLI_PERSIST": str(tmp_path),
        "MILLI_DATA": str(PACK),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MILLI_INSTALL", raising=False)
    out = tmp_path / "out-quick"

    text, images = run_notebook()
    assert f"platform: local | code: {ROOT}" in text and "local run: using the packages already installed" in text
    assert statuses(out) == {name: "done" for name in ("clean", "tokenizer", "shards", "pretrain", "sft")}
    assert "pretrain: " in text and "tokens/s" in text and "sft: " in text  # the progress summary
    assert images == (1 if _has_matplotlib() else 0)  # the loss curves, inline
    assert f"chatting with {out / 'sft' / 'final'}" in text and text.count("milli-chat: ") == 3
    assert (out / "export" / "llama" / "config.json").is_file() and (out / "export" / "milli-chat-f16.gguf").is_file()

    # after a disconnect: the same cells again find every stage finished, and chat and export still work
    text, _ = run_notebook()
    assert statuses(out) == {name: "skipped" for name in ("clean", "tokenizer", "shards", "pretrain", "sft")}
    assert "complete (" in text and text.count("milli-chat: ") == 3


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_notebook_has_no_outputs_and_runs_the_recipe():
    """The committed notebook is clean (no outputs from someone's run) and drives the recipe, not a copy of it."""
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
    assert "scripts/run_recipe.sh" in code and "/content/drive" in code and "/kaggle/working" in code
    assert "hf-mirror.com" in code and "dataset_snapshot_download" in code  # the routes from China
