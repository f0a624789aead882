"""
Multi-turn chat with a Milli-Chat checkpoint in the terminal, streamed as it is generated.

    python scripts/chat_terminal.py                     # the newest finished model under out/ (a final/ folder)
    python scripts/chat_terminal.py --model out/sft/run1/final [--adapter DIR] [--temperature 0.7] [--top_p 0.9]
                                    [--top_k 0] [--repetition_penalty 1.0] [--max_new_tokens 512] [--system TEXT]

Commands: /reset clears the history, /system TEXT sets the system prompt (and clears the history), /exit quits.
Ctrl-C stops the current answer (the part already shown stays in the history); at the prompt it quits.
Where the platform has `readline`, the prompt has line editing and up-arrow history (kept in ~/.milli_chat_history).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere: repo root on path

from model.engine import (
    CHAT_SAMPLING,
    SamplingParams,
    add_engine_args,
    add_sampling_args,
    engine_from_args,
    sampling_from_args,
)

HELP = "命令 commands: /reset 清空对话, /system 文本 设置系统提示, /exit 退出 (Ctrl-C 停止回答 stops an answer)"
USER_PROMPT, BOT_PROMPT = "\n你 you> ", "模型 bot> "
HISTORY_FILE = os.path.join(os.path.expanduser("~"), ".milli_chat_history")

# -----------------------------------------------------------------------------


class ChatSession:
    """The conversation state and the command handling, separate from terminal I/O so tests can drive it."""

    def __init__(self, engine, system: str = "", sampling: SamplingParams = CHAT_SAMPLING, **changes):
        self.engine, self.system, self.sampling = engine, system, sampling.replace(**changes)
        self.history: list[dict] = []

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def command(self, line: str) -> str | None:
        """Handle a /command; returns a message to show, "exit" to quit, or None when line is not a command."""
        if not line.startswith("/"):
            return None
        name, _, arg = line.partition(" ")
        if name == "/exit":
            return "exit"
        if name == "/reset":
            self.history = []
            return "（已清空对话 history cleared）"
        if name == "/system":
            self.system, self.history = arg.strip(), []
            shown = f": {self.system}" if self.system else " to none"
            return f"（已设置系统提示并清空对话 system prompt set{shown}; history cleared）"
        return f"（未知命令 unknown command {name}; {HELP}）"

    def reply(self, user_text: str, write=print):
        """Stream the answer to user_text through write(); the history gets the turn even if interrupted."""
        self.history.append({"role": "user", "content": user_text})
        stream = self.engine.chat_stream(self.messages(), self.sampling)
        interrupted = False
        try:
            for piece in stream:
                write(piece, end="", flush=True)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            stream.close()
        self.history.append({"role": "assistant", "content": stream.text})
        note = " （已停止 stopped）" if interrupted else ""
        write(
            f"\n[{stream.completion_tokens} tokens, {stream.tokens_per_s:.1f} tokens/s, "
            f"first token {1000 * (stream.ttft_s or 0):.0f} ms]{note}"
        )
        return stream


def chat_loop(session: ChatSession, read=input, write=print):
    write(HELP)
    while True:
        try:
            line = read(USER_PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            write("")
            return
        if not line:
            continue
        result = session.command(line)
        if result == "exit":
            return
        if result is not None:
            write(result)
            continue
        write(BOT_PROMPT, end="", flush=True)
        try:
            session.reply(line, write)
        except ValueError as e:  # the message alone does not fit in the context window
            session.history.pop()
            write(f"\n（错误 error: {e}）")


def line_editing(history_file: str = HISTORY_FILE):
    """Arrow keys, line editing and up-arrow history for input() through `readline` where the platform has it (not
    on plain Windows): without it a terminal passes arrow keys on as escape codes, into the question. The history
    is read from and saved to history_file."""
    try:  # not on every platform (plain Windows); importing it also changes how input() reads a terminal
        import readline
    except ImportError:
        return None
    import atexit  # only an interactive chat saves its history at exit

    try:
        readline.read_history_file(history_file)
    except OSError:  # none yet, or unreadable: start empty
        pass
    readline.set_history_length(1000)
    atexit.register(_save_history, readline, history_file)
    return readline


def _save_history(readline, history_file: str):
    try:
        readline.write_history_file(history_file)
    except OSError:
        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_engine_args(parser)
    parser.add_argument("--system", default="", help="system prompt")
    add_sampling_args(parser)
    args = parser.parse_args()

    engine, _ = engine_from_args(args)
    line_editing()
    chat_loop(ChatSession(engine, args.system, sampling_from_args(args)))


if __name__ == "__main__":
    main()
