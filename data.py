"""
Tokenizers, prompt formats and datasets with response-only loss masks, and batching.

    tok = load_tokenizer("default")            # or an HF folder, or a .gguf file
    fmt = prompt_format(tok)                   # chatml | llama3 | llama2 | alpaca, from the chat template
    train, val = load_examples("default")      # AlpacaEval's 805 pairs, fetched once with pip
    ids, targets, truncated = encode_example(tok, fmt, messages, seq_len=512)

A dataset is JSON Lines or a JSON array (UTF-8); a record is alpaca-style {"instruction", "input"?,
"output"} or chat-style {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}.
A record that is neither is one error naming the file and line.
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


def render(messages: list[dict], fmt: dict, tok: Tokenizer, generation: bool = False) -> list[tuple[str | int, bool]]:
    """The conversation as pieces, each text or a token id (BOS and EOS go in as ids: a SentencePiece
    tokenizer would spell out "</s>" written as text); True marks what the model must learn to say."""
    name, eos = fmt["name"], tok.eos_id
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
                if tok.bos_id is not None:
                    out.append((tok.bos_id, False))
                out.append((f"[INST] {system}{_user_text(m, fmt)} [/INST]", False))
                system = ""
            else:
                out += [(" " + m["content"] + " ", True), (eos, True)]
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
                out += [(m["content"], True), (eos, True)]
        gen = ""
    if generation and gen:
        out.append((gen, False))
    return [(p, r) for p, r in out if p is not None]   # no EOS id: check_eos says so


def encode_pieces(tok, fmt, messages, generation: bool = False) -> list[tuple[list[int], bool]]:
    """render(), tokenized: (ids, is_response) per piece."""
    return [([p] if isinstance(p, int) else tok.encode(p), r) for p, r in render(messages, fmt, tok, generation)]


def encode_prompt(tok, fmt, messages) -> list[int]:
    """The ids of a conversation up to where the assistant speaks next (for generation)."""
    return [i for ids, _ in encode_pieces(tok, fmt, messages, generation=True) for i in ids]


def encode_example(tok, fmt, messages, seq_len: int, train_on_prompt: bool = False):
    """(input ids, target ids, truncated): targets[t] is the token after ids[t], or IGNORE where no loss."""
    ids, keep = [], []
    for piece, is_response in encode_pieces(tok, fmt, messages):
        ids += piece
        keep += [is_response or train_on_prompt] * len(piece)
    truncated = len(ids) > seq_len + 1
    ids, keep = ids[:seq_len + 1], keep[:seq_len + 1]
    targets = [t if k else IGNORE for t, k in zip(ids[1:], keep[1:])]
    return ids[:-1], targets, truncated


def check_eos(tok, fmt, convs: list, where: str):
    """Refuse data whose responses would not end with the tokenizer's EOS carrying loss: a model trained
    on them never learns to stop (the usual cause of fine-tunes that talk on forever)."""
    if tok.eos_id is None:
        raise ValueError(f"{where}: the tokenizer names no EOS token, so no response can end with one; set "
                         "eos_token in the model's tokenizer_config.json")
    for n, msgs in enumerate(convs, 1):
        for ids, is_response in encode_pieces(tok, fmt, msgs):
            if is_response and (not ids or ids[-1] != tok.eos_id):
                last = tok.decode(ids[-1:]) if ids else ""
                raise ValueError(
                    f"{where}: example {n}: a response ends with {last!r}, not the tokenizer's EOS "
                    f"{tok.decode([tok.eos_id])!r} (id {tok.eos_id}), in the {fmt['name']} prompt format: the "
                    "model would never learn to stop. Fix: choose the prompt format whose end-of-turn token is "
                    "the EOS (--prompt-format chatml|llama3|llama2|alpaca), or set eos_token in the model's "
                    "tokenizer_config.json to the end-of-turn token its chat template uses")


def show_example(tok, fmt, messages, seq_len: int, train_on_prompt: bool = False, color: bool = False) -> str:
    """The example as the model sees it: its text with the loss-carrying tokens marked, and the EOS."""
    ids, targets, truncated = encode_example(tok, fmt, messages, seq_len, train_on_prompt)
    ids = ids + [t for t in targets[-1:] if t != IGNORE]   # the last target is a token the model sees too
    loss = [False] + [t != IGNORE for t in targets]        # token j carries loss if it is the target at j-1
    on, off = ("\033[1;32m", "\033[0m") if color else ("[[", "]]")
    text, run = [], []
    for j, (i, carries) in enumerate(zip(ids, loss)):
        if j and carries != loss[j - 1]:
            text.append(tok.decode(run) if not loss[j - 1] else on + tok.decode(run) + off)
            run = []
        run.append(i)
    text.append(on + tok.decode(run) + off if loss[len(ids) - 1] else tok.decode(run))
    n_loss = sum(loss[:len(ids)])
    eos_ok = any(i == tok.eos_id and c for i, c in zip(ids, loss))
    marks = "bold green" if color else "[[ ]]"
    return (f"{''.join(text)}\n\n--- {len(ids)} tokens, {n_loss} carry loss (marked {marks}); prompt format "
            f"{fmt['name']}; EOS {tok.decode([tok.eos_id]) if tok.eos_id is not None else None!r} "
            f"(id {tok.eos_id}) {'carries loss' if eos_ok else 'carries NO loss'}"
            f"{'; truncated to --seq-len ' + str(seq_len) if truncated else ''}")


# ----------------------------------------------------------------------------------------------
# Datasets: JSON Lines or a JSON array; each record alpaca-style or chat-style

def read_dataset(path) -> list[list[dict]]:
    """Each record -> a list of messages. Every error names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such dataset file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}); save the file as UTF-8") from None
    records = _json_array(text, path) if text.lstrip().startswith("[") else _json_lines(text, path)
    convs = [_to_messages(row, f"{path}:{line}") for line, row in records]
    if not convs:
        raise ValueError(f"{path}: the dataset is empty")
    return convs


_FORMS = "a dataset is JSON Lines (one JSON object per line) or a JSON array of objects"


def _json_lines(text: str, path) -> list[tuple[int, object]]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno}); {_FORMS}") from None
    return out


def _json_array(text: str, path) -> list[tuple[int, object]]:
    """The elements of a top-level JSON array, each with the line it starts on."""
    dec, ws, out = json.JSONDecoder(), re.compile(r"\s*"), []
    line = lambda pos: text.count("\n", 0, pos) + 1
    i = ws.match(text, text.index("[") + 1).end()
    while not text.startswith("]", i):
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno}); {_FORMS}") from None
        out.append((line(i), obj))
        i = ws.match(text, end).end()
        if text.startswith(",", i):
            i = ws.match(text, i + 1).end()
        elif not text.startswith("]", i):
            raise ValueError(f"{path}:{line(i)}: not valid JSON (expected ',' or ']' in the array); {_FORMS}")
    if text[i + 1:].strip():
        raise ValueError(f"{path}:{line(i + 1 + len(ws.match(text, i + 1).group()))}: not valid JSON (text after "
                         f"the array's closing ']'); {_FORMS}")
    return out


def _json_type(v) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(v), type(v).__name__)


def _to_messages(row, where):
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {_json_type(row)}")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: 'messages' must be a non-empty array, got {_json_type(msgs)}")
        for k, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise ValueError(f"{where}: messages[{k}] must be an object, got {_json_type(m)}")
            if m.get("role") not in ("system", "user", "assistant"):
                got = f"role {m['role']!r}" if "role" in m else "no 'role'"
                raise ValueError(f"{where}: messages[{k}] has {got} (system, user or assistant)")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: messages[{k}]['content'] must be a string, got {_json_type(m.get('content'))}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError(f"{where}: 'messages' has no assistant turn (nothing to learn)")
        return msgs
    if "instruction" in row or "output" in row:
        for k in ("instruction", "output"):
            if not isinstance(row.get(k), str):
                got = _json_type(row[k]) if k in row else "nothing"
                raise ValueError(f"{where}: '{k}' must be a string, got {got}")
        if row.get("input") is not None and not isinstance(row["input"], str):
            raise ValueError(f"{where}: 'input' must be a string (or absent), got {_json_type(row['input'])}")
        return [dict(role="user", content=row["instruction"], input=row.get("input") or ""),
                dict(role="assistant", content=row["output"])]
    raise ValueError(f"{where}: expected {{instruction, input?, output}} or {{messages: [...]}}, got keys "
                     f"{sorted(row)}")


def split_eval(convs: list, n_eval: int, seed: int = 0):
    """A fixed held-out split chosen by a seeded shuffle (the same for every run with that seed)."""
    idx = list(range(len(convs)))
    random.Random(seed).shuffle(idx)
    n_eval = min(n_eval, len(convs) // 5) if len(convs) < 5 * n_eval else n_eval
    ev = set(idx[:n_eval])
    return [c for i, c in enumerate(convs) if i not in ev], [c for i, c in enumerate(convs) if i in ev]


def load_examples(source="default", n_eval: int = 100, seed: int = 0):
    path = default_data_path() if str(source) == "default" else source
    return split_eval(read_dataset(path), n_eval, seed)


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
