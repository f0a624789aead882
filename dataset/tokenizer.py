"""
Facts about a trained byte-level BPE tokenizer that training, evaluation and the tokenizer stage read: the byte
alphabet its vocabulary is written in and how many UTF-8 bytes each token stands for (bits per byte). Training a
tokenizer is the stage trainer/train_tokenizer.py; shards record a tokenizer's identity with
dataset/shards.py tokenizer_fingerprint. No torch here: the tokenizer stage imports this module.
"""

# -----------------------------------------------------------------------------


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are written in (ByteLevel uses
    it): printable bytes map to themselves, the others to code points 256 and up, in byte order."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def token_byte_lengths(tokenizer) -> list[int]:
    """UTF-8 bytes each token id stands for (0 for special tokens): turns a loss in nats/token into bits/byte,
    which compares models with different tokenizers (pretraining's evaluation and the eval stage). A list, not a
    tensor: the callers make the tensor."""
    byte_of = {c: b for b, c in byte_level_alphabet().items()}
    special = set(tokenizer.all_special_ids)
    lengths = [0] * len(tokenizer)
    for token, idx in tokenizer.get_vocab().items():
        if idx not in special and idx < len(lengths):
            lengths[idx] = sum(1 for c in token if c in byte_of)
    return lengths
