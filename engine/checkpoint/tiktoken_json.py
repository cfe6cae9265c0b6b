"""The Llama 3 tiktoken tokenizer as a HF `tokenizers` tokenizer.json, built here from the tiktoken file.

tiktoken ranks byte strings and merges, inside each piece its pattern splits off, the adjacent pair whose
concatenation ranks lowest. A tokenizers BPE computes the same when its merges are every (left, right) split of
each token that both rank, ordered by the rank of the token they make, and `ignore_merges` takes a piece that is a
whole token as it is (tiktoken's shortcut). Bytes are spelled in the byte-level alphabet tokenizers uses.
"""

from typing import Dict, List, Tuple


def byte_alphabet() -> Dict[int, str]:
    """tokenizers' ByteLevel spelling of each byte: printable bytes as themselves, the others shifted past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


def bpe_merges(ranks: Dict[bytes, int]) -> List[Tuple[bytes, bytes]]:
    """Every split of a token into two ranked tokens, ordered by the rank of the token they make (then by the
    ranks of the halves, so the order is fixed)."""
    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [(left, right) for _, _, _, left, right in merges]


def llama3_tokenizers_json() -> str:
    """tokenizer.json text of the Llama 3 tokenizer herd uses (engine.data.tokenizer.Llama3Tokenizer)."""
    from tiktoken.load import load_tiktoken_bpe
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    from engine.data.tokenizer import _LLAMA3_PATTERN, Llama3Tokenizer, llama3_model_path
    ranks = load_tiktoken_bpe(str(llama3_model_path()))
    spell = byte_alphabet()

    def word(b: bytes) -> str:
        return "".join(spell[x] for x in b)

    vocab = {word(token): rank for token, rank in ranks.items()}
    merges = [(word(left), word(right)) for left, right in bpe_merges(ranks)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = Llama3Tokenizer().specials
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False)
                            for name in sorted(specials, key=specials.get)])
    for name, token_id in specials.items():
        if tok.token_to_id(name) != token_id:  # added tokens take the next ids: they must be Llama 3's
            raise AssertionError(f"special token {name} got id {tok.token_to_id(name)}, not {token_id}")
    return tok.to_str()
