"""
The licenses training data declares, read from what downloads carry, for the model card (model/hub.py):

    from dataset.licenses import shard_licenses, file_licenses
    shard_licenses("dataset/shards")          # meta.json: the license of each source the shards were cut from
    file_licenses("a.parquet,sft/,x/*.jsonl")  # chat / preference / prompt files, as data_path names them
    card_licenses("out/pretrain/final")       # what a checkpoint's own card recorded (model/hub.py writes it)

A file's licenses come from the metadata beside it, never from its rows:
    dataset_info.json   `datasets` writes it into a save_to_disk folder and beside the .arrow files of its cache;
                        its "license" field (often empty)
    README.md           a Hub dataset card: the `license:` key of its YAML front matter (one id or a list; "other"
                        with `license_name:` gives that name). Looked for in the file's folder, then its parent,
                        since Hub repositories keep the card at the root and the files in data/ or <config>/
Nothing found is an empty list (the card then asks the user to check), never an error: a card must not stop a run.
"""

import json
import os

from dataset.table_files import dataset_card
from dataset.text_sources import expand_paths
from model.hub import CARD_LICENSES_KEY


def front_matter(path: str) -> dict:
    """The YAML block between the leading `---` lines of a README.md (a Hub card); {} when it has none."""
    return dataset_card(path) or {}


def _card_licenses(meta: dict) -> list[str]:
    values = meta.get("license")
    values = values if isinstance(values, list) else [values]
    name = meta.get("license_name")
    return [
        name if value == "other" and isinstance(name, str) and name.strip() else str(value).strip()
        for value in values
        if value is not None and str(value).strip()
    ]


def _info_license(path: str) -> list[str]:
    if not os.path.isfile(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return []
    value = info.get("license") if isinstance(info, dict) else None
    # Free text in `datasets` (sometimes the whole license): one line on the card.
    return [" ".join(value.split())] if isinstance(value, str) and value.strip() else []


def folder_licenses(folder: str) -> list[str]:
    """What a data folder declares: its dataset_info.json, and the README.md card of it or of its parent."""
    found = _info_license(os.path.join(folder, "dataset_info.json"))
    for candidate in (folder, os.path.dirname(os.path.abspath(folder))):
        card = os.path.join(candidate, "README.md")
        if os.path.isfile(card):
            found += _card_licenses(front_matter(card))
            break
    return found


def source_license(path: str, root: str) -> tuple[str | None, str]:
    """(license, the file that states it) for one shard source, or (None, ""): its dataset_info.json or its dataset
    card, looked for in the source's own folder first, then in each parent up to `root`, the folder its --inputs
    item named (a Hub download's card is at the top of the folder named; never above it)."""
    folder = os.path.abspath(path if os.path.isdir(path) else os.path.dirname(path) or ".")
    stop = os.path.abspath(root)
    while os.path.commonpath([folder, stop]) == stop:
        for name, read in (
            ("dataset_info.json", _info_license),
            ("README.md", lambda p: _card_licenses(front_matter(p))),
        ):
            found = read(os.path.join(folder, name))
            if found:
                return ", ".join(found), os.path.join(folder, name)
        if folder == stop:
            break
        folder = os.path.dirname(folder)
    return None, ""


def file_licenses(paths: str | list[str]) -> list[str]:
    """Sorted distinct licenses declared for the inputs `paths` names (a data_path setting: files, folders, globs;
    a save_to_disk folder is its own metadata folder)."""
    try:
        inputs = expand_paths(paths) if paths else []
    except (OSError, ValueError):
        return []
    folders = {p if os.path.isdir(p) else os.path.dirname(os.path.abspath(p)) for p in inputs}
    return sorted({lic for folder in folders for lic in folder_licenses(folder)})


def shard_licenses(data_dir: str) -> list[str]:
    """Sorted distinct license fields a shard folder's meta.json records for its sources (empty when none are)."""
    meta_path = os.path.join(data_dir, "meta.json") if data_dir else ""
    if not meta_path or not os.path.isfile(meta_path):
        return []
    with open(meta_path, encoding="utf-8") as f:
        sources = json.load(f).get("sources", [])
    found = set()
    for source in sources:
        value = source.get("license") if isinstance(source, dict) else None
        found.update(
            v.strip() for v in (value if isinstance(value, list) else [value]) if isinstance(v, str) and v.strip()
        )
    return sorted(found)


def card_licenses(model_dir: str) -> list[str]:
    """The data licenses a checkpoint's own card records (front matter CARD_LICENSES_KEY): those of everything it
    was trained on, its base models included, so a fine-tune's card lists its pretraining data's licenses too."""
    if not model_dir:
        return []
    value = front_matter(os.path.join(model_dir, "README.md")).get(CARD_LICENSES_KEY)
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []
