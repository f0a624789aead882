"""
Write the current chat template (model/chat_format.py CHAT_TEMPLATE, with tool use and OpenAI content parts) into
tokenizer folders saved before it, e.g. out/tokenizer or a checkpoint's final/; nothing else in them changes.

    python scripts/update_chat_template.py out/tokenizer out/sft/run1/final
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere: repo root on path

from trainer.train_tokenizer import update_chat_template


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="folders holding tokenizer.json and tokenizer_config.json")
    for path in parser.parse_args().paths:
        update_chat_template(path)
        print(f"{path}: chat template updated")


if __name__ == "__main__":
    main()
