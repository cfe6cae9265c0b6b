"""Tokenizers: a byte-level BPE from HF `tokenizers` (trained on the corpus or loaded), and the real Llama 3.

The Llama 3 tokenizer is the tiktoken BPE file that the `llama-models` wheel ships (128,000 regular tokens plus
256 special ones, 128,256 in all; paper section 3.1). It is read from the installed package, offline; herd never
copies it into the repository.
"""

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Iterable, List, Protocol

from engine.config import TokenizerConfig
from engine.errors import ConfigError, DataError

# Special tokens shared by both tokenizers, so chat formatting code is the same for either.
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>"]

# Llama 3's pre-tokenization pattern and special-token layout (ids 128000..128255), from the paper's tokenizer.
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                   r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_NAMED = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>", 5: "<|step_id|>",
                 6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>",
                 10: "<|python_tag|>"}
LLAMA3_VOCAB_SIZE = 128256


class Tokenizer(Protocol):
    name: str
    vocab_fingerprint: str  # sha256 of the token -> id mapping (PREFIX.json vocab_sha256)
    vocab_size: int
    bos_id: int
    eod_id: int

    def encode_batch(self, texts: List[str]) -> List[List[int]]: ...

    def decode(self, ids: List[int]) -> str: ...


class HFTokenizer:
    """A `tokenizers` tokenizer.json; special tokens in text are encoded as plain text, never as control ids."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _Tok
        from engine.data.indexed import require_file
        try:  # missing, a directory, a FIFO, a name too long: each said as such
            require_file(Path(path), "expected a tokenizers tokenizer.json")
        except DataError as e:
            raise ConfigError("data.tokenizer.path", str(e).replace(": file not found", ": tokenizer file not found")
                              ) from None
        try:
            self._tok = _Tok.from_file(str(path))
        except Exception as e:
            raise ConfigError("data.tokenizer.path", f"{path}: not a tokenizers JSON file ({e})") from None
        # `add_special_tokens=False` only stops the post-processor adding BOS; without this flag a literal
        # "<|eot_id|>" in the text would still become the control id (a user could forge a turn boundary)
        self._tok.encode_special_tokens = True
        self.name = f"hf:{path}"
        self.vocab_size = self._id_limit(path)
        self.bos_id = self._required_id("<|begin_of_text|>", path)
        self.eod_id = self._required_id("<|end_of_text|>", path)
        if self.bos_id == self.eod_id:
            raise ConfigError("data.tokenizer.path", f"{path}: <|begin_of_text|> and <|end_of_text|> share id "
                                                     f"{self.eod_id}")

    def _id_limit(self, path: str) -> int:
        """One more than the largest id: the rows an embedding needs and the range a token file's integers must
        hold (ids need not be contiguous: a tokenizer of 500 tokens with an id of 65,541 wrapped in 16-bit
        files). Two tokens with one id would make decoding and the vocabulary fingerprint ambiguous: refused."""
        vocab = self._tok.get_vocab(with_added_tokens=True)
        by_id: dict = {}
        for token, token_id in sorted(vocab.items()):
            if token_id in by_id:
                raise ConfigError("data.tokenizer.path", f"{path}: tokens {by_id[token_id]!r} and {token!r} share "
                                                         f"id {token_id}")
            by_id[token_id] = token
        return max(by_id) + 1 if by_id else 0

    @property
    def vocab_fingerprint(self) -> str:
        """sha256 of the token -> id mapping: what token files prepared with this tokenizer mean. Files that
        merely differ in formatting or normalization settings share it; a BPE trained on other text does not."""
        return _fingerprint(sorted(self._tok.get_vocab(with_added_tokens=True).items(), key=lambda item: (item[1],
                                                                                                         item[0])))

    def _required_id(self, token: str, path: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ConfigError("data.tokenizer.path", f"{path}: has no '{token}' token")
        return token_id

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: List[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        return self._required_id(token, self.name)

    def control_ids(self) -> List[int]:
        """Ids of the special (control) tokens: never produced from text, only by the chat format or a model."""
        return sorted(i for i, token in self._tok.get_added_tokens_decoder().items() if token.special)


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style, every byte representable) on `texts` and save tokenizer.json."""
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_path))
    return HFTokenizer(out_path)


def llama3_model_path() -> Path:
    spec = importlib.util.find_spec("llama_models")
    if spec is None or spec.origin is None:
        raise ConfigError("data.tokenizer.kind", "llama3 needs the llama-models package, which ships the "
                          "tokenizer file (pip install --no-deps llama-models; `make` installs it)")
    path = Path(spec.origin).parent / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise ConfigError("data.tokenizer.kind", f"llama3: {path} is missing from the llama-models package")
    return path


class Llama3Tokenizer:
    """The Llama 3 tokenizer through tiktoken, loaded offline from the llama-models package."""

    def __init__(self):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
        path = llama3_model_path()
        ranks = load_tiktoken_bpe(str(path))
        specials = {_LLAMA3_NAMED.get(i, f"<|reserved_special_token_{i - 2 if i < 4 else i - 9}|>"): len(ranks) + i
                    for i in range(LLAMA3_VOCAB_SIZE - len(ranks))}
        self._enc = tiktoken.Encoding(name="llama3", pat_str=_LLAMA3_PATTERN, mergeable_ranks=ranks,
                                      special_tokens=specials)
        self.specials, self._ranks = specials, ranks
        self.name = "llama3"
        self.vocab_size = len(ranks) + len(specials)
        self.bos_id = specials["<|begin_of_text|>"]
        self.eod_id = specials["<|end_of_text|>"]

    @property
    def vocab_fingerprint(self) -> str:
        """sha256 of the token -> id mapping (the byte strings as Latin-1 text, then the special tokens)."""
        ranks = sorted(self._ranks.items(), key=lambda item: item[1])
        return _fingerprint([(token.decode("latin-1"), rank) for token, rank in ranks] +
                            sorted(self.specials.items(), key=lambda item: item[1]))

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        return self._enc.encode_ordinary_batch(texts, num_threads=2)

    def decode(self, ids: List[int]) -> str:
        return self._enc.decode(list(ids))

    def token_id(self, token: str) -> int:
        return self.specials[token]

    def control_ids(self) -> List[int]:
        return sorted(self.specials.values())


def _fingerprint(pairs: List) -> str:
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=True).encode()).hexdigest()


def load_tokenizer(cfg: TokenizerConfig) -> "Tokenizer":
    if cfg.kind == "llama3":
        return Llama3Tokenizer()
    if cfg.kind == "hf":
        if not cfg.path:
            raise ConfigError("data.tokenizer.path", "kind=hf needs the path of a tokenizer.json")
        return HFTokenizer(cfg.path)
    raise DataError(f"unknown tokenizer kind '{cfg.kind}'")
