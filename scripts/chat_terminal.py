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

from model.engine import CHAT_SAMPLING, Engine, SamplingParams
from model.runtime import resolve_device, set_cpu_threads

HELP = "命令 commands: /reset 清空对话, /system 文本 设置系统提示, /exit 退出 (Ctrl-C 停止回答 stops an answer)"
USER_PROMPT, BOT_PROMPT = "\n你 you> ", "模型 bot> "
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAKE_A_MODEL = "python main.py --stage all --config config/demo.yaml"  # the README's first command, ~5 min on a CPU
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


def finished_models(*roots: str) -> list[str]:
    """Every finished model under the roots (a final/ folder with a config.json: adapters need their base), newest
    (by the folder's modification time) first."""
    found = set()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            if os.path.basename(dirpath) == "final" and "config.json" in filenames:
                found.add(os.path.realpath(dirpath))
                dirnames.clear()
    return sorted(found, key=os.path.getmtime, reverse=True)


def resolve_model(model: str | None) -> str:
    """The --model to load: as given, or the newest finished model under out/ (here or in the repository, said on
    stderr). A missing model ends the program with one line naming the command that makes one (exit 2)."""
    if model is not None:
        if os.path.isdir(model):
            return model
        _no_model(f"--model {model} does not exist")
    candidates = finished_models(*{os.path.abspath("out"), os.path.join(ROOT, "out")})
    if not candidates:
        _no_model("no --model given and no finished model (a final/ folder) under out/")
    print(f"[chat] 使用最新的模型 using the newest model under out/: {os.path.relpath(candidates[0])}", file=sys.stderr)
    return candidates[0]


def _no_model(why: str):
    print(
        f"error: {why}; make one with `{MAKE_A_MODEL}` (about 5 minutes on a CPU) or pass --model DIR", file=sys.stderr
    )
    raise SystemExit(2)


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """--max_new_tokens ... --seed, defaulting to CHAT_SAMPLING (the server takes the same flags)."""
    d = CHAT_SAMPLING
    parser.add_argument("--max_new_tokens", type=int, default=d.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=d.top_k, help="0 = off")
    parser.add_argument("--top_p", type=float, default=d.top_p)
    parser.add_argument("--repetition_penalty", type=float, default=d.repetition_penalty, help="1 = off")
    parser.add_argument("--seed", type=int, default=d.seed)


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = auto (OMP_NUM_THREADS if set)")


def apply_threads(args: argparse.Namespace) -> None:
    """The one CPU thread policy (model/runtime.py set_cpu_threads), when the model runs on the CPU."""
    if resolve_device(args.device).type == "cpu":
        set_cpu_threads(args.threads)


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return CHAT_SAMPLING.replace(
        **{
            k: getattr(args, k)
            for k in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed")
        }
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default=None,
        help="checkpoint directory (save_pretrained output or Llama folder); default: the newest final/ under out/",
    )
    parser.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory, merged at load")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--quantize",
        default="none",
        choices=["none", "int8", "int4"],
        help="weight-only quantization of the linear layers (CPU inference)",
    )
    parser.add_argument("--system", default="", help="system prompt")
    add_threads_arg(parser)
    add_sampling_args(parser)
    args = parser.parse_args()
    apply_threads(args)

    model = resolve_model(args.model)
    engine = Engine.from_pretrained(model, adapter=args.adapter, device=args.device, quantize=args.quantize)
    line_editing()
    chat_loop(ChatSession(engine, args.system, sampling_from_args(args)))


if __name__ == "__main__":
    main()
