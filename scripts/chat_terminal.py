"""
Multi-turn chat with a Milli-Chat checkpoint in the terminal, streamed as it is generated.

    python scripts/chat_terminal.py --model out/sft/run1/final [--adapter DIR] [--temperature 0.7] [--top_p 0.9]
                                    [--top_k 0] [--repetition_penalty 1.0] [--max_new_tokens 512] [--system TEXT]

Commands: /reset clears the history, /system TEXT sets the system prompt (and clears the history), /exit quits.
Ctrl-C stops the current answer (the part already shown stays in the history); at the prompt it quits.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere: repo root on path

from model.engine import CHAT_SAMPLING, Engine, SamplingParams

HELP = "commands: /reset, /system TEXT, /exit (Ctrl-C stops an answer)"

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
            return "(history cleared)"
        if name == "/system":
            self.system, self.history = arg.strip(), []
            return f"(system prompt set{': ' + self.system if self.system else ' to none'}; history cleared)"
        return f"(unknown command {name}; {HELP})"

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
        note = " (stopped)" if interrupted else ""
        write(
            f"\n[{stream.completion_tokens} tokens, {stream.tokens_per_s:.1f} tokens/s, "
            f"first token {1000 * (stream.ttft_s or 0):.0f} ms]{note}"
        )
        return stream


def chat_loop(session: ChatSession, read=input, write=print):
    write(HELP)
    while True:
        try:
            line = read("\nyou> ").strip()
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
        write("bot> ", end="", flush=True)
        try:
            session.reply(line, write)
        except ValueError as e:  # the message alone does not fit in the context window
            session.history.pop()
            write(f"\n(error: {e})")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """--max_new_tokens ... --seed, defaulting to CHAT_SAMPLING (the server takes the same flags)."""
    d = CHAT_SAMPLING
    parser.add_argument("--max_new_tokens", type=int, default=d.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=d.top_k, help="0 = off")
    parser.add_argument("--top_p", type=float, default=d.top_p)
    parser.add_argument("--repetition_penalty", type=float, default=d.repetition_penalty, help="1 = off")
    parser.add_argument("--seed", type=int, default=d.seed)


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return CHAT_SAMPLING.replace(
        **{
            k: getattr(args, k)
            for k in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed")
        }
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory (save_pretrained output or Llama folder)")
    parser.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory, merged at load")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--quantize",
        default="none",
        choices=["none", "int8", "int4"],
        help="weight-only quantization of the linear layers (CPU inference)",
    )
    parser.add_argument("--system", default="", help="system prompt")
    add_sampling_args(parser)
    args = parser.parse_args()

    engine = Engine.from_pretrained(args.model, adapter=args.adapter, device=args.device, quantize=args.quantize)
    chat_loop(ChatSession(engine, args.system, sampling_from_args(args)))


if __name__ == "__main__":
    main()
