"""
The one generation path of Milli-Chat: prefill, then token-by-token decode on a preallocated KV cache.

Chat (scripts/chat_terminal.py), the API server (model/server/, scripts/serve_api.py), evaluation samples and the
PPO/GRPO rollouts all call this Engine, so that a fix or a speed-up here reaches every user.

    from model.engine import Engine
    engine = Engine.from_pretrained("out/sft/run1/final")               # or adapter="out/lora/run1/final"
    ids = engine.generate([engine.encode("你好")], max_new_tokens=32)   # new token ids only
    for piece in engine.chat_stream([{"role": "user", "content": "你好"}], CHAT_SAMPLING):
        print(piece, end="", flush=True)                                # always whole UTF-8 characters

Works with any causal LM whose forward takes (input_ids, attention_mask (4-D bool), position_ids, cache,
logits_to_keep) and calls cache.update(k, v, layer_idx): SLMForCausalLM and transformers' LlamaForCausalLM
(an exported Llama folder) both do.
"""

import argparse
import dataclasses
import math
import threading
import time
import warnings

import torch
from transformers import AutoTokenizer

from model.chat_format import chatml_pieces, check_chatml
from model.hub import stop_token_ids
from model.lora import adapter_base_model, is_adapter_dir, merge_lora_weights
from model.model_slm import SLMPreTrainedModel
from model.quantize import check_quantize_device, quantize_model
from model.runtime import load_pretrained, resolve_device, resolve_dtype, resolve_model, set_cpu_threads

# -----------------------------------------------------------------------------
# Static KV cache


class StaticKVCache:
    """Preallocated (B, n_kv, max_len, hd) key/value buffers, one pair per layer, in the compute dtype.

    It speaks the part of transformers' Cache protocol the models call: update(), get_seq_length(),
    get_mask_sizes(). It is not a transformers Cache subclass on purpose: the mask helpers then treat it as a plain
    object and use the 4-D mask we pass. Two phases:
    - prefill (slot is None): update() writes at seq_len.. and returns views of the filled slots only, so the prompt
      attends over what exists (with the mask-free causal kernel when nothing is padded).
    - decode (slot set: a (1,) long tensor on the device): update() writes the new token at `slot` with index_copy_
      and returns the first `window` slots. window = max_len (the default): every step has the same shapes and reads
      no Python number that changes, so one compiled step serves every token and can be captured as a CUDA graph.
      Eager decoding sets window = seq_len + 1 each step instead and attends over the filled slots only (on the CPU
      attention over the whole buffer would cost time in proportion to max_len, not to the tokens so far). The
      caller masks the slots not yet written and advances slot and seq_len after each step (Engine._decode_step)."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device,
    ):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        # zeros, not empty: a decode step attends over every slot and masks the unwritten ones, and a masked slot
        # holding NaN garbage would still turn its row into NaN (0 * NaN in the weighted sum of values).
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_layers = num_layers
        self.max_len = max_len
        self.seq_len = 0  # slots filled by finished forward passes
        self.slot: torch.Tensor | None = None  # decode phase: the slot the next token is written to
        self.window = max_len  # decode phase: how many slots update() returns

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.slot is not None:
            # .to: a no-op when k and v come in the compute dtype (they do once RoPE keeps q/k in v's dtype)
            keys.index_copy_(2, self.slot, k.to(keys.dtype))
            values.index_copy_(2, self.slot, v.to(values.dtype))
            return keys[:, :, : self.window], values[:, :, : self.window]
        start, end = self.seq_len, self.seq_len + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} > {self.max_len} slots")
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        if layer_idx == self.num_layers - 1:
            self.seq_len = end  # the last layer has written: the step is complete
        return keys[:, :, :end], values[:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_len

    def get_mask_sizes(self, q_len: int, layer_idx: int = 0) -> tuple[int, int]:
        if self.slot is not None:
            return self.window, 0
        return self.seq_len + q_len, 0


# -----------------------------------------------------------------------------
# Sampling


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop: the one set of defaults for chat, the server, eval and RL rollouts.

    The defaults are greedy and unpenalised, so a call that sets nothing is reproducible (eval reports, pretraining
    samples, tests). Interactive use starts from CHAT_SAMPLING; eval and RL set their fields from their configs."""

    max_new_tokens: int = 256  # fewer when the context window is reached first
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off; 0 keeps only the most likely token (as OpenAI and transformers do)
    repetition_penalty: float = 1.0  # 1 = off; CTRL's penalty on every token already in the prompt or reply
    seed: int | None = None  # makes sampling reproducible; None = a fresh draw each call
    stop_token_ids: tuple[int, ...] | None = None  # None = EOS + end of turn; () = never stop early
    stop_strings: tuple[str, ...] = ()  # the text ends before the first of these (the token completing it is kept)

    def __post_init__(self):
        # Lists are accepted (JSON, argparse) and stored as tuples, so a params object can be shared and hashed.
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings or ()))
        if (
            self.max_new_tokens < 0
            or not all(math.isfinite(x) for x in (self.temperature, self.top_p, self.repetition_penalty))
            or self.temperature < 0
            or self.top_k < 0
            or not 0.0 <= self.top_p <= 1.0
            or self.repetition_penalty <= 0
        ):
            raise ValueError(f"invalid sampling parameters: {self}")

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes) if changes else self


# Chat in the terminal and the API server: the same model answering people, so the same sampling. Repetition
# penalty stays off (1.0): CTRL's penalty hits every token already seen, including the punctuation, particles and
# names a Chinese answer must repeat, and eval and RL measure and train the model at 1.0, so chat shows the model
# that was measured (OpenAI's API has no such penalty either). --repetition_penalty turns it on where a model loops.
CHAT_SAMPLING = SamplingParams(max_new_tokens=512, temperature=0.7, top_p=0.9)

SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed")


def finite_float(text: str) -> float:
    """argparse's float without nan and inf (float() takes both): a usage error, not a traceback later."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """--max_new_tokens ... --seed, defaulting to CHAT_SAMPLING: every command line that samples (the terminal chat,
    the server's defaults for a request that sets none) takes the same flags."""
    d = CHAT_SAMPLING
    parser.add_argument("--max_new_tokens", type=int, default=d.max_new_tokens)
    parser.add_argument("--temperature", type=finite_float, default=d.temperature, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=d.top_k, help="0 = off")
    parser.add_argument("--top_p", type=finite_float, default=d.top_p)
    parser.add_argument("--repetition_penalty", type=finite_float, default=d.repetition_penalty, help="1 = off")
    parser.add_argument("--seed", type=int, default=d.seed)


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    """The SamplingParams of add_sampling_args' flags."""
    return CHAT_SAMPLING.replace(**{k: getattr(args, k) for k in SAMPLING_FLAGS})


def sample_next(
    logits: torch.Tensor, seen: torch.Tensor | None, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). Same order as transformers: repetition penalty, temperature, top-k, top-p.

    seen (B, V) bool marks the tokens already in each row (prompt and output) for the repetition penalty (CTRL's:
    divide positive logits, multiply negative ones, so a seen token always gets less likely)."""
    logits = logits.float()
    penalty = params.repetition_penalty
    if penalty != 1.0 and seen is not None:
        penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
        logits = torch.where(seen, penalised, logits)
    if params.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p. The most likely token is always kept, also
        # at top_p=0, where "before it" is nothing and 0 >= 0 would drop every token (all -inf, NaN probabilities).
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= params.top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# -----------------------------------------------------------------------------
# Text: incremental detokenisation that never splits a character


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces that are always complete UTF-8.

    Byte-level BPE can split one Chinese character (3 bytes) or emoji (4 bytes) over several tokens; decoding such
    a prefix gives U+FFFD. We decode a short window (the last emitted chunk plus the new tokens, as TGI does) and
    emit only once the window no longer ends in U+FFFD, so the cost per token stays constant."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window: the previously emitted chunk, decoded again for context
        self.read = 0  # everything before this index has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before) :]
        return ""

    def flush(self) -> str:
        """The held-back tail at the end of generation. A character cut off by max_new_tokens is dropped rather
        than shown as U+FFFD: its remaining bytes were never generated."""
        before = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(before) :].rstrip("\ufffd")


def held_back(text: str, stop_strings: list[str]) -> int:
    """Length of the longest suffix of text that could still grow into a stop string (not to be shown yet)."""
    best = 0
    for s in stop_strings:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class TextStream:
    """What Engine.stream() returns: iterate it for text pieces; its fields fill in as generation runs.

    close() stops generation early (a client disconnected, Ctrl-C) and frees the cache."""

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens = prompt_tokens
        self.token_ids: list[int] = []  # new ids, the stop token included
        self.text = ""  # everything yielded so far
        self.finish_reason: str | None = None  # "stop" (end of turn, EOS or stop string) or "length"
        self.ttft_s: float | None = None  # time to first token (prefill + first sample)
        self.elapsed_s = 0.0
        self._gen = self._batch = None  # set by Engine.stream(); a row of a BatchStream is driven by the batch

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first over the time after the first (prefill excluded)."""
        decode_time = self.elapsed_s - (self.ttft_s or 0.0)
        return (len(self.token_ids) - 1) / decode_time if len(self.token_ids) > 1 and decode_time > 0 else 0.0

    def __iter__(self):
        return self._gen

    def close(self):
        if self._gen is not None:
            self._gen.close()
            self._batch.close()


class _RowText:
    """One request's tokens -> the text it shows, filling its TextStream: whole characters only, stop tokens and
    stop strings never shown, a possible start of a stop string held back until it is decided."""

    def __init__(self, tokenizer, result: TextStream, stop_ids, stop_strings, max_new_tokens: int):
        self.result, self.stop_ids, self.stop_strings = result, set(stop_ids), list(stop_strings)
        self.max_new_tokens = max_new_tokens
        self.decoder = IncrementalDecoder(tokenizer)
        self.text, self.shown = "", 0  # text decoded so far; how much of it has been shown
        self.done = False
        result.finish_reason = "length"

    def push(self, token: int, now: float) -> str:
        """The next token (now: seconds since the batch started) -> the new text to show."""
        r = self.result
        r.token_ids.append(token)
        r.ttft_s = now if r.ttft_s is None else r.ttft_s
        r.elapsed_s = now
        self.done = len(r.token_ids) >= self.max_new_tokens
        if token in self.stop_ids:
            r.finish_reason, self.done = "stop", True
            return ""
        self.text += self.decoder.push(token)
        hit = min(
            (i for i in (self.text.find(s, max(0, self.shown - len(s))) for s in self.stop_strings) if i >= 0),
            default=-1,
        )
        if hit >= 0:
            self.text = self.text[:hit]
            r.finish_reason, self.done = "stop", True
            return ""
        return self._show(len(self.text) - held_back(self.text, self.stop_strings))

    def finish(self) -> str:
        """The rest of the text once the row has ended (at a stop, or by length: then the decoder's tail too)."""
        self.done = True
        if self.result.finish_reason == "length":
            self.text += self.decoder.flush()
        return self._show(len(self.text))

    def _show(self, end: int) -> str:
        piece = self.text[self.shown : end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        self.result.text += piece
        return piece


class BatchStream:
    """What Engine.stream_batch() returns: iterate it for [(row, piece)] after each forward; results[row] are the
    rows' TextStreams. stop(row) ends one row early (its client left, a time limit), with finish_reason as given;
    close() ends all of them and frees the cache."""

    def __init__(self, results: list[TextStream], gen, retired: set[int]):
        self.results, self._gen, self._retired = results, gen, retired

    def __iter__(self):
        return self._gen

    def stop(self, row: int, finish_reason: str = "length"):
        if row not in self._retired:
            self._retired.add(row)
            self.results[row].finish_reason = finish_reason

    @property
    def running(self) -> int:
        return len(self.results) - len(self._retired)

    def close(self):
        self._gen.close()


# -----------------------------------------------------------------------------
# Engine


class Engine:
    """Batched KV-cache generation for one model and its tokenizer.

    generate() works on token ids (rollouts, evaluation); stream()/chat_stream() yield text (chat, server). The
    model may be in train mode: it is switched to eval for the call and restored, and no autograd graph is built."""

    def __init__(self, model, tokenizer, device=None, compile: bool | None = None):
        """compile: run each decode step as one compiled function (torch.compile, mode="reduce-overhead": a CUDA
        graph per batch size, replayed every token). None = on CUDA for our own models: there a step is otherwise
        ~260 kernel launches for microseconds of work. Not for transformers' Llama (its forward reads the cache
        length, a number that changes every token, so each step would recompile), and not on the CPU, where eager
        is as fast once warm and compiling takes minutes (bench/RESULTS.md, "Decode step"). The compiled graph is
        kept per Engine: build one Engine and reuse it."""
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if compile is None:
            compile = self.device.type == "cuda" and isinstance(model, SLMPreTrainedModel)
        self.compile = compile
        self._compiled_step = None  # built at the first compiled decode step
        self._compiled_ok = False  # it has run once: from then on an error is an error, not a reason to fall back
        self._buffers: dict[tuple, list[dict]] = {}  # compiled mode: decode buffers kept per (B, dtype), see _take
        cfg = model.config
        self.max_context = cfg.max_position_embeddings  # prompt + answer must fit in what the model was trained on
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # Default stops: EOS and the end-of-turn token, so base models and chat models both end cleanly.
        # (model/hub.py: the same ids a saved folder's generation_config.json lists.)
        self.stop_token_ids = stop_token_ids(tokenizer, cfg)
        self._chatml_checked = False  # chat_prompt checks the tokenizer's template once, at its first call
        # A fast tokenizer's split_special_tokens is one switch on the shared Rust tokenizer, flipped per call:
        # encodes from several threads (the server's handlers) must not interleave, or content encoded with the
        # switch off would turn typed markers into real ones again.
        self._tokenizer_lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls, path: str, adapter: str | None = None, device: str = "auto", dtype: str = "auto", quantize: str = "none"
    ):
        """Load a checkpoint directory (save_pretrained output, or an exported Llama folder) and its tokenizer.

        adapter: a PEFT-format LoRA directory, merged into the base weights at load (no LoRA cost per token).
        quantize: "none" | "int8" | "int4" weight-only quantization of the linear layers (model/quantize.py).
        A path that itself holds only an adapter is loaded on top of its adapter_config's base model."""
        if adapter is None and is_adapter_dir(path):
            path, adapter = adapter_base_model(path), path
        # The one device/dtype policy (model/runtime.py): the same answer as training on this device.
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        check_quantize_device(quantize, device)  # before the weights are read
        model = load_pretrained(path, dtype=dtype)
        if adapter is not None:
            merge_lora_weights(model, adapter)
        # Weight-only int8/int4 (model/quantize.py), after any LoRA merge so the adapter is quantized with its base.
        quantize_model(model, quantize)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(model.to(device).eval(), tokenizer, device=device)

    # --- ids in, ids out --------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        with self._tokenizer_lock:
            return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def generate(self, prompts: list[list[int]], sampling: SamplingParams | None = None, **changes) -> list[list[int]]:
        """Generate for a batch of prompts (token id lists of any lengths; left-padded internally).

        sampling (default SamplingParams(): greedy) with any of its fields changed by keyword, e.g.
        generate(prompts, max_new_tokens=32). Returns the new ids of each prompt. A row ends at its first stop
        token (included in the output, so RL sees the model choose to stop), at the token that completes a stop
        string (included), or after max_new_tokens (fewer if the context window is reached)."""
        params = (sampling or SamplingParams()).replace(**changes)
        out = [[] for _ in prompts]
        for step in self._steps(prompts, params):
            for row, token in step:
                out[row].append(token)
        return out

    # --- text out, streamed -----------------------------------------------------------------------------

    def stream(self, prompt: list[int], sampling: SamplingParams | None = None, **changes) -> TextStream:
        """Generate for one prompt and return a TextStream of text pieces: complete UTF-8 characters only, and
        never a part of a stop string (the stop string itself and stop tokens are not shown)."""
        batch = self.stream_batch([prompt], [(sampling or SamplingParams()).replace(**changes)])
        result = batch.results[0]
        result._gen = (piece for step in batch for _, piece in step)
        result._batch = batch
        return result

    def stream_batch(self, prompts: list[list[int]], samplings: list[SamplingParams]) -> "BatchStream":
        """Generate for several requests in one batch (the server's static batches), streamed as text.

        Iterate the BatchStream for [(row, piece)] after every forward (possibly empty); results[row] is each
        request's TextStream. Per row: max_new_tokens, stop ids and stop strings. Shared, taken from the first
        row: temperature, top_k, top_p, repetition_penalty and seed (one generator draws for the whole batch)."""
        first = samplings[0]
        shared = first.replace(
            max_new_tokens=max(s.max_new_tokens for s in samplings), stop_token_ids=(), stop_strings=()
        )
        retired: set[int] = set()
        steps = self._steps(prompts, shared, text_stops=False, retired=retired)
        results = [TextStream(len(p)) for p in prompts]
        rows = [
            _RowText(
                self.tokenizer,
                r,
                self.stop_token_ids if s.stop_token_ids is None else s.stop_token_ids,
                s.stop_strings,
                s.max_new_tokens,
            )
            for r, s in zip(results, samplings)
        ]
        return BatchStream(results, self._stream_rows(steps, rows, retired), retired)

    @staticmethod
    def _stream_rows(steps, rows: list["_RowText"], retired: set[int]):
        t0 = time.perf_counter()
        try:
            for step in steps:
                now, out = time.perf_counter() - t0, []
                for row, token in step:
                    if row in retired:
                        continue
                    piece = rows[row].push(token, now)
                    if rows[row].done:
                        piece += rows[row].finish()
                        retired.add(row)
                    if piece:
                        out.append((row, piece))
                yield out
            # The context window or the longest max_new_tokens ended the batch: the rows still open end here.
            yield [(i, p) for i, p in ((i, r.finish()) for i, r in enumerate(rows) if i not in retired) if p]
        finally:
            steps.close()  # frees the cache at once, also when the consumer stops early
            for i, r in enumerate(rows):
                if i not in retired or r.result.elapsed_s == 0.0:
                    r.result.elapsed_s = time.perf_counter() - t0

    # --- chat -------------------------------------------------------------------------------------------

    def chat_prompt(
        self,
        messages: list[dict],
        max_new_tokens: int = SamplingParams.max_new_tokens,
        max_conversation_tokens: int | None = None,
    ) -> list[int]:
        """The ChatML ids of messages plus the assistant header (model/chat_format.py chatml_pieces: special-token
        text inside content stays text, so a message cannot forge a turn).

        When prompt + max_new_tokens exceed the context window, the oldest turns are dropped, never the system
        prompt nor the last message. Each message is tokenized once and dropped by its count, so trimming costs
        one tokenization of the conversation however many turns go. Raises ValueError when the conversation is
        over max_conversation_tokens before trimming, or when even trimming leaves no room for one new token."""
        if not messages:
            raise ValueError("no messages")
        with self._tokenizer_lock:
            if not self._chatml_checked:
                check_chatml(self.tokenizer)  # chatml_pieces must give this tokenizer's template ids
                self._chatml_checked = True
            *pieces, (header, _) = chatml_pieces(self.tokenizer, messages, add_generation_prompt=True)
        lengths = [len(ids) for ids, _ in pieces]
        total = sum(lengths) + len(header)
        if max_conversation_tokens is not None and total > max_conversation_tokens:
            raise ValueError(f"the conversation is {total} tokens, more than the {max_conversation_tokens} accepted")
        first = 1 if messages[0]["role"] == "system" else 0  # the first droppable turn
        keep_from = first
        while total + max_new_tokens > self.max_context and len(pieces) - keep_from > 1:
            total -= lengths[keep_from]
            keep_from += 1
            while len(pieces) - keep_from > 1 and messages[keep_from]["role"] in ("assistant", "tool"):
                total -= lengths[keep_from]  # a conversation restarts on a user turn (not on a tool's answer)
                keep_from += 1
        if total >= self.max_context:
            raise ValueError(f"prompt is {total} tokens, the context window is {self.max_context}")
        kept = pieces[:first] + pieces[keep_from:]
        return [i for ids, _ in kept for i in ids] + header

    def chat_stream(self, messages: list[dict], sampling: SamplingParams | None = None, **changes) -> TextStream:
        params = (sampling or SamplingParams()).replace(**changes)
        return self.stream(self.chat_prompt(messages, params.max_new_tokens), params)

    def chat(self, messages: list[dict], sampling: SamplingParams | None = None, **changes) -> str:
        return "".join(self.chat_stream(messages, sampling, **changes))

    # --- the decode loop --------------------------------------------------------------------------------

    def _steps(
        self, prompts: list[list[int]], params: SamplingParams, text_stops: bool = True, retired: set[int] | None = None
    ):
        """Generator: after each forward, yields [(row, token)] for the rows still running. The caller may add
        rows to retired between steps (its own stop rules); they are not yielded again.

        Grad mode is set inside each step, never across a yield, so the caller's autograd state is untouched."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        longest = max(len(p) for p in prompts)
        if longest >= self.max_context:
            raise ValueError(f"prompt is {longest} tokens, the context window is {self.max_context}")
        max_new = min(params.max_new_tokens, self.max_context - longest)
        if max_new <= 0:
            return
        stop_ids = self.stop_token_ids if params.stop_token_ids is None else list(params.stop_token_ids)
        stop_strings = list(params.stop_strings) if text_stops else []
        decoders = [IncrementalDecoder(self.tokenizer) for _ in prompts] if stop_strings else None
        texts = ["" for _ in prompts]
        was_training = self.model.training
        buffers_out = None  # compiled mode keeps the decode buffers for the next call
        self.model.eval()  # no dropout in rollouts; restored below
        try:
            with torch.inference_mode():
                state = self._prefill(prompts, longest + max_new, params)
                tokens = self._sample(state, params)
            buffers_out = state
            running = list(range(len(prompts)))
            for n in range(max_new):
                step = [(row, tokens[row]) for row in running]
                yield step
                still = []
                for row, token in step:
                    if token in stop_ids:
                        continue
                    if decoders is not None:
                        texts[row] = (texts[row] + decoders[row].push(token))[-4 * max(map(len, stop_strings)) :]
                        if any(s in texts[row] for s in stop_strings):
                            continue
                    still.append(row)
                running = still if retired is None else [row for row in still if row not in retired]
                if not running or n == max_new - 1:
                    break
                with torch.inference_mode():
                    tokens = self._decode_step(state, params)
        finally:
            self.model.train(was_training)
            if buffers_out is not None:
                self._give_back_buffers(buffers_out)

    def compute_dtype(self) -> torch.dtype:
        """The dtype activations (and so keys and values) have: autocast's when it is on, else the weights'."""
        dev = self.device.type
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        return next(self.model.parameters()).dtype

    def _take_buffers(self, batch: int, total_len: int) -> dict:
        """The decode state's tensors: cache, keep (B, L) real-token slots, positions (B, L), token (B, 1), slot.

        Eager: sized to this call (total_len slots), freed when it ends. Compiled: sized to the context window and
        kept for the next call of the same batch size and dtype, because a compiled step (and its CUDA graph) is
        bound to its tensors' addresses; a call that finds them in use (two streams at once) gets fresh ones."""
        dtype, dev = self.compute_dtype(), self.device
        key = (batch, dtype)
        if self.compile and self._buffers.get(key):
            return self._buffers[key].pop()
        L = self.max_context if self.compile else total_len
        cache = StaticKVCache(self.num_layers, batch, self.num_kv_heads, L, self.head_dim, dtype, dev)
        buffers = {
            "key": key,
            "cache": cache,
            "keep": torch.zeros((batch, L), dtype=torch.bool, device=dev),
            "positions": torch.zeros((batch, L), dtype=torch.long, device=dev),
            "token": torch.zeros((batch, 1), dtype=torch.long, device=dev),
            "slot": torch.zeros(1, dtype=torch.long, device=dev),
        }
        if self.compile:
            for t in [*cache.keys, *cache.values, *(buffers[k] for k in ("keep", "positions", "token", "slot"))]:
                torch._dynamo.mark_static_address(t)  # updated in place, never copied into the graph's inputs
        return buffers

    def _give_back_buffers(self, state: dict):
        if self.compile:
            self._buffers.setdefault(state["key"], []).append(state)

    def _prefill(self, prompts: list[list[int]], total_len: int, params: SamplingParams) -> dict:
        B, P = len(prompts), max(len(p) for p in prompts)
        dev = self.device
        state = self._take_buffers(B, total_len)
        cache = state["cache"]
        # Prefill phase. A reused cache keeps the last call's keys and values: masked until rewritten.
        cache.seq_len, cache.slot, cache.window = 0, None, cache.max_len
        L = cache.max_len
        ids = torch.full((B, P), self.pad_id, dtype=torch.long)
        keep = torch.zeros((B, L), dtype=torch.bool)  # True = a real token in that cache slot
        for i, p in enumerate(prompts):
            ids[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)  # left padding: every row ends at slot P-1
            keep[i, P - len(p) :] = True
        keep[:, P:] = True  # generated slots are all real (a decode step also hides the slots after its own)
        ids = ids.to(dev)
        state["keep"].copy_(keep)
        keep = state["keep"]
        # Positions count real tokens only, as transformers does, so a padded row sees the same RoPE phases.
        state["positions"].copy_((keep.long().cumsum(-1) - 1).clamp(min=0))  # (B, L)
        unpadded = all(len(p) == P for p in prompts)
        mask = None  # nothing padded: the causal kernel needs no mask tensor (and SDPA takes its fastest kernel)
        if not unpadded:
            # (B, 1, P, P) bool mask: causal and not padding; each slot sees itself so no row is all-False (NaN).
            causal = torch.ones(P, P, dtype=torch.bool, device=dev).tril()
            mask = ((causal[None] & keep[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=dev)[None])[:, None]
        logits = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=state["positions"][:, :P],
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        # Decode phase from here: the next token goes to slot P.
        state["slot"].fill_(P)
        cache.slot = state["slot"]
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros((B, logits.shape[-1]), dtype=torch.bool, device=dev)
            seen.scatter_(1, ids, keep[:, :P])  # pad slots scatter False, so padding is not penalised
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=dev).manual_seed(params.seed)
        state.update(logits=logits, seen=seen, generator=generator, unpadded=unpadded)
        return state

    def _sample(self, state: dict, params: SamplingParams) -> list[int]:
        nxt = sample_next(state["logits"], state["seen"], params, state["generator"])
        if state["seen"] is not None:
            state["seen"].scatter_(1, nxt[:, None], True)
        state["token"].copy_(nxt[:, None])  # the next step's input, in place (a compiled step reads this tensor)
        return nxt.tolist()

    def decode_logits(self, cache: StaticKVCache, token, keep, positions, slot, masked: bool = True) -> torch.Tensor:
        """One decode step: token (B, 1) at cache slot `slot` ((1,) long) -> logits (B, V). It attends over the
        cache's first cache.window slots, masked to the real tokens up to `slot` (B, 1, 1, window); the finished
        rows of a batch keep decoding (their output is ignored): cheaper than reshaping batch and cache. With
        window = the whole cache: the same shapes every token, no host sync and no Python number that changes,
        which is what torch.compile(mode="reduce-overhead") captures as one CUDA graph. masked=False: the window
        holds only real tokens (eager, nothing padded), so no mask at all and SDPA takes its mask-free kernel."""
        mask = None
        if masked:
            window = cache.window
            visible = keep[:, :window] & (torch.arange(window, device=keep.device) <= slot)  # (B, window)
            mask = visible[:, None, None, :]
        return self.model(
            input_ids=token,
            attention_mask=mask,
            position_ids=positions.index_select(1, slot),  # (B, 1)
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]

    def _decode_step(self, state: dict, params: SamplingParams) -> list[int]:
        cache = state["cache"]
        args = (cache, state["token"], state["keep"], state["positions"], state["slot"])
        if self.compile:
            state["logits"] = self._run_compiled(args)
        else:
            cache.window = cache.seq_len + 1  # eager: attend over the filled slots only
            state["logits"] = self.decode_logits(*args, masked=not state["unpadded"])
        cache.seq_len += 1
        state["slot"].add_(1)  # in place: the compiled step reads the same tensor next time
        return self._sample(state, params)

    def _run_compiled(self, args) -> torch.Tensor:
        if self._compiled_step is None:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._compiled_step = torch.compile(self.decode_logits, mode=mode, dynamic=False)
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
        if self._compiled_ok:
            return self._compiled_step(*args)
        try:
            logits = self._compiled_step(*args)
        except Exception as error:  # a first GPU run must still generate: say why and decode eagerly from here on
            warnings.warn(
                f"compiled decode step failed, decoding eagerly: {type(error).__name__}: {error}", stacklevel=3
            )
            self.compile, self._buffers = False, {}
            args[0].window = args[0].seq_len + 1
            return self.decode_logits(*args)
        self._compiled_ok = True
        return logits


# -----------------------------------------------------------------------------
# The command lines that load a model to talk to (scripts/chat_terminal.py, scripts/serve_api.py)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """--model, --adapter, --device, --quantize and --threads: the model engine_from_args loads, and where."""
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
    parser.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = auto (OMP_NUM_THREADS if set)")


def engine_from_args(args: argparse.Namespace) -> tuple[Engine, str]:
    """The Engine of add_engine_args' flags and the folder it was loaded from: --model, or the newest finished
    model under out/ (model/runtime.py resolve_model: a missing one ends the program with exit 2)."""
    model = resolve_model(args.model)
    if resolve_device(args.device).type == "cpu":  # the one CPU thread policy (model/runtime.py set_cpu_threads)
        set_cpu_threads(args.threads)
    return Engine.from_pretrained(model, adapter=args.adapter, device=args.device, quantize=args.quantize), model


__all__ = [
    "CHAT_SAMPLING",
    "BatchStream",
    "Engine",
    "IncrementalDecoder",
    "SamplingParams",
    "StaticKVCache",
    "TextStream",
    "add_engine_args",
    "add_sampling_args",
    "engine_from_args",
    "sample_next",
    "sampling_from_args",
]
